"""Packets per second through the balancer beside a MAC-swap XDP_TX program (issue 6).

Topology (a Lab, prefix "xbrate", torn down on exit or failure): two network
namespaces joined by one veth pair, gen:eth0 <-> lb:eth1.

  - gen: the generator. Live frames (lab/bpf/trafficgen.c under BPF_PROG_TEST_RUN
    in live-frames mode with gen:eth0 as its ingress device, so every frame it
    returns XDP_TX for is transmitted into lb:eth1) where the kernel allows
    it; else trafgen (benchmarks/trafgen_sender.py: an AF_PACKET TX ring out
    of gen:eth0), which needs no special privilege (--generator chooses; the
    table names the one used). Both send a 66-byte IPv4 TCP ACK to the VIP,
    each frame one of F distinct flows.
  - lb: the program under test, native XDP on lb:eth1, XDP_TXes each frame
    back out of lb:eth1: the balancer encapsulates it (IPIP) towards one of
    N backends; the baseline (bench_harness.c's bench_mac_swap, the one
    bench_datapath.py uses) swaps the MACs.
  - back on gen:eth0 a counter program counts what arrives, by kind
    (IPIP-encapsulated or plain TCP), in a per-CPU array, and drops it.

The balancer is configured the way lbd configures it: desired state, then the
reconciler (one VIP, N backends, the default datapath settings).

Per case (F flows, N backends) five programs take turns on lb:eth1, with the
same frames and frame count, interleaved in a rotating order for --rounds
rounds (medians are reported): the balancer as shipped ("xdplb": established
packets on settled ring slots skip the flow table, except in their refresh
second), the balancer reading the flow table for every packet ("table":
settled_refresh_s = 0, what every packet did before settled slots), the MAC
swap, the MAC swap plus one per-flow read of a flow-table-sized array ("1
read", bench_memprobe.c), and the "floor", a counting XDP_DROP program
(generator + one veth hop, nothing forwarded).

What "per core" means here: a veth has no interrupt of its own. The
generator's transmit raises lb:eth1's receive softirq on the sending CPU,
whose XDP_TX raises gen:eth0's on the same CPU, and the kernel runs both when
the generator's loop re-enables softirqs. So one CPU (--cpu; the process is
pinned to it) does all the work of a frame: generating it, two veth hops,
the program under test and the counting. With live frames the kernel times
that loop itself (BPF_PROG_TEST_RUN's duration, paused whenever the thread
gives up the CPU, so other processes on a shared machine are not counted);
with trafgen it is the CPU time of trafgen and ksoftirqd (the softirqs run in
trafgen's system calls), less trafgen's start-up. The MAC-swap baseline is
always measured with the same generator in the same rounds:

    Mpps per core = frames received / (duration x frames sent)

The generator's and the veths' fixed cost per frame dilutes this ratio, so
the table also estimates the LB side alone by taking the floor away:

    LB-side Mpps = 1000 / (ns per frame - floor ns per frame)

which leaves the program, its XDP_TX and one veth receive (the counter's,
standing in for the LB's own receive, which the floor contains). Wall-clock
Mpps (including other processes' share of the CPU and ~30 ms of fixed cost
per live-frames syscall) and the thread's CPU time are in the JSON.

Established flows: before a case is measured every flow is sent through the
balancer, pass after pass, until a whole pass finds all F in the connection
table (or a pass finds no more than the one before: see conn_entries); then
the reconciler sweeps the table and settles the ring's slots, as lbd does
every settle_interval_s. The balancer's own counters show how the measured
frames found their backend: "settled" = conn_settled / tx_forwarded (the
ring, table not read), "hits" = conn_hit / tx_forwarded (the table). Every run is bounded in frames
(--frames) and time (--max-seconds); sent, received and lost frames, and the
veths' XDP counters that say where a loss happened, are in the JSON. Writes
the table to stdout and JSON to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Lets the benchmark run from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

import trafgen_sender
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from timing import write_json

from xdplb import structs as s
from xdplb.datapath import Balancer, DatapathError, MapSizes, attach_xdp
from xdplb.reconciler import DatapathSettings, Reconciler
from xdplb.state import (
    AddVip,
    BackendSpec,
    DesiredState,
    Limits,
    VipKey,
    apply_changes,
    default_vip,
)
from xdplb_lab.lab import Host, Lab, remove_stale
from xdplb_lab.programs import BenchHarness, MemoryProbe, TrafficGenerator

PREFIX = "xbrate"
VIP, VIP_PORT = "10.200.0.10", 80
VIP_KEY = VipKey(VIP, VIP_PORT, "tcp")
CLIENT_BASE, SPORT_BASE = "198.18.1.0", 1024  # flow f: +f>>14 on the address, +f&0x3fff port
FLOWS = (1, 1000, 1_000_000)
BACKENDS = (3, 100)
RING_SIZE = 65537
TARGET_RATIO = 0.7
WARMUP_PASSES = 5
CONN_HEADROOM = 4  # connection-table entries per flow of the run
VETH_KEYS = {  # (namespace role, interface, ethtool -S counter)
    "gen_xmit": ("gen", "eth0", "tx_queue_0_xdp_xmit"),
    "gen_xmit_errors": ("gen", "eth0", "tx_queue_0_xdp_xmit_errors"),
    "lb_rx": ("lb", "eth1", "rx_queue_0_xdp_packets"),
    "lb_tx": ("lb", "eth1", "rx_queue_0_xdp_tx"),
    "lb_tx_errors": ("lb", "eth1", "rx_queue_0_xdp_tx_errors"),
    "lb_drops": ("lb", "eth1", "rx_queue_0_xdp_drops"),
    "gen_rx": ("gen", "eth0", "rx_queue_0_xdp_packets"),
}


@dataclass
class Sample:
    """One measured run of one program."""

    program: str
    sent: int
    received: int
    kernel_ns: int      # sum over syscalls of duration x frames: this CPU's work
    wall_ns: int
    thread_cpu_ns: int  # the generator thread's CPU time (softirqs included)
    ksoftirqd_ns: int   # work the kernel deferred to ksoftirqd on this CPU
    veth: dict[str, int]
    other: int = 0      # frames of other kinds that came back (not ours)
    lb_counters: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def mpps_core(self) -> float:
        return self.received / self.kernel_ns * 1e3

    @property
    def mpps_wall(self) -> float:
        return self.received / self.wall_ns * 1e3

    @property
    def mpps_cpu(self) -> float:
        return self.received / (self.thread_cpu_ns + self.ksoftirqd_ns) * 1e3

    @property
    def ns_per_frame(self) -> float:
        return self.kernel_ns / self.sent


@dataclass
class CaseResult:
    flows: int
    backends: int
    ours_mpps: float        # per core, median of rounds
    mac_swap_mpps: float
    ratio: float
    ours_ns: float          # ns of this CPU per frame, median
    mac_swap_ns: float
    extra_ns: float
    floor_ns: float         # generator + one veth hop + counting drop, median
    ours_lb_mpps: float     # LB side alone, estimated: 1e3 / (ns - floor_ns)
    mac_swap_lb_mpps: float
    lb_ratio: float
    ours_wall_mpps: float
    mac_swap_wall_mpps: float
    ours_cpu_mpps: float    # received / (thread + ksoftirqd CPU time), cross-check
    mac_swap_cpu_mpps: float
    one_read_mpps: float    # the MAC swap plus one per-flow memory read (bench_memprobe.c)
    one_read_ns: float
    one_read_ratio: float   # ours_mpps / one_read_mpps
    sent: dict[str, int]    # summed over rounds
    lost: dict[str, int]
    table_mpps: float       # the balancer reading the table for every packet
    table_ratio: float      # table_mpps / mac_swap_mpps
    conn_hit_fraction: float
    settled_fraction: float  # conn_settled / tx_forwarded
    slots_settled: int      # by the sweep before the case
    sweep_s: float
    backends_used: int
    warmup_passes: int
    rounds: list[dict] = field(default_factory=list)


def conn_entries(flows: list[int]) -> int:
    """A connection table with 4 entries for each flow of a backend
    configuration (1 << 22 for the default 1,001,001 flows): each
    configuration starts with an empty table. A flow lives in one 4-way set,
    so even a quarter full a few sets are asked for a fifth flow (about 0.4%
    of flows); the warm-up and the "conn hits" column show how many.
    """
    needed = CONN_HEADROOM * sum(flows)
    return max(1 << 16, 1 << (needed - 1).bit_length())


# --- the lab ------------------------------------------------------------------


class Rig:
    """The lab, the programs, and how a run is measured."""

    def __init__(self, lab: Lab, cpu: int, frames: int, chunk: int, max_seconds: float,
                 flows: list[int], backends: list[int], settled_refresh_s: int,
                 workdir: Path):
        self.cpu, self.frames, self.chunk, self.max_seconds = cpu, frames, chunk, max_seconds
        self.gen_host, self.lb_host = lab.add_host("gen"), lab.add_host("lb")
        self.gen_if, self.lb_if = lab.connect(self.gen_host, self.lb_host, "eth0", "eth1")
        self.hosts = {"gen": self.gen_host, "lb": self.lb_host}
        self.gen = TrafficGenerator()  # the counter, and the live-frames generator
        self.workdir = workdir
        self.trafgen: trafgen_sender.TrafgenSender | None = None  # None: live frames
        self.harness = BenchHarness()
        self.conn_entries = conn_entries(flows)
        # As many bytes as the flow table (32 per entry), so as many cache lines and pages.
        self.probe = MemoryProbe(self.conn_entries * ct.sizeof(s.FlowSet) // s.FLOW_WAYS)
        self.bal = Balancer(MapSizes(max_vips=len(backends) + 1,
                                     max_backends=sum(backends) + 1,
                                     ring_entries=len(backends) * RING_SIZE,
                                     conn_entries=self.conn_entries))
        # The counter gives gen:eth0 the NAPI that XDP_TX'd frames need.
        self.gen.attach_counter("eth0", netns=self.gen_host.name)
        self.frame = bytes(
            Ether(src=self.gen_if.mac, dst=self.lb_if.mac)
            / IP(src=CLIENT_BASE, dst=VIP)
            / TCP(sport=SPORT_BASE, dport=VIP_PORT, flags="A",
                  options=[("NOP", None), ("NOP", None), ("Timestamp", (2, 1))]))
        self.ksoftirqd = _find_ksoftirqd(cpu)
        self.rec = Reconciler(self.bal)
        self.desired = DesiredState()
        self.limits = Limits.of_map_sizes(self.bal.sizes)
        self.settings = DatapathSettings(nexthop_mac=self.gen_if.mac,
                                         settled_refresh_s=settled_refresh_s)
        self.members: list[int] = []

    def use_trafgen(self) -> None:
        self.trafgen = trafgen_sender.TrafgenSender(self.workdir, self.max_seconds)

    def live_frames_refused(self) -> str | None:
        """Why live frames cannot be used here (a one-frame try), or None."""
        self.gen.configure(self.frame, 1)
        try:
            self.gen.send(self.gen_if.ifindex, 1, netns=self.gen_host.name)
        except DatapathError as exc:
            if "errno 1)" in str(exc):  # EPERM: refused, not broken
                return str(exc)
            raise
        return None

    @property
    def generator(self) -> str:
        return "live-frames" if self.trafgen is None else trafgen_sender.NAME

    def configure_flows(self, flows: int) -> None:
        if self.trafgen is None:
            self.gen.configure(self.frame, flows)
        else:
            self.trafgen.configure(self.frame, flows, netns=self.gen_host.name,
                                   ifname=self.gen_if.name)

    def close(self) -> None:
        for part in (self.bal, self.harness, self.gen, self.probe, self.trafgen):
            if part is None:
                continue
            with contextlib.suppress(Exception):
                part.close()

    def attach(self, program: str) -> None:
        fd = {"xdplb": self.bal.prog_fd, "table": self.bal.prog_fd,
              "mac_swap": self.harness.mac_swap_fd, "one_read": self.probe.prog_fd,
              "floor": self.gen.counter_fd}[program]
        if program in ("xdplb", "table"):
            refresh = self.settings.settled_refresh_s if program == "xdplb" else 0
            self.rec.reconcile(self.desired, settings=replace(self.settings,
                                                              settled_refresh_s=refresh))
        attach_xdp(fd, "eth1", netns=self.lb_host.name)

    def program_backends(self, n: int) -> None:
        """The VIP over n backends (replacing the last configuration's), with an
        empty connection table."""
        addrs = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(n)]
        vip = default_vip(VIP_KEY, backends={a: BackendSpec(a) for a in addrs},
                          ring_size=RING_SIZE)
        self.desired = apply_changes(DesiredState(), [AddVip(vip)], self.limits)
        self.rec.reconcile(self.desired, settings=self.settings)
        self.members = [self.rec.member_index(VIP_KEY, a) for a in addrs]
        self.bal.conns.clear()

    def send(self, count: int) -> tuple[int, int, int, int]:
        """count frames in chunks, bounded by max_seconds: (sent, kernel ns,
        wall ns, thread CPU ns)."""
        if self.trafgen is not None:  # one run, bounded in frames and time by trafgen
            run = self.trafgen.send(count)
            return run.frames, int(run.duration_ns * run.frames), run.wall_ns, run.cpu_ns
        sent = kernel = wall = cpu = 0
        deadline = time.monotonic() + self.max_seconds
        while sent < count and time.monotonic() < deadline:
            run = self.gen.send(self.gen_if.ifindex, min(self.chunk, count - sent),
                                netns=self.gen_host.name)
            sent += run.frames
            kernel += run.duration_ns * run.frames
            wall += run.wall_ns
            cpu += run.cpu_ns
        return sent, kernel, wall, cpu

    def warm_up(self, flows: int) -> int:
        """Sends every flow through the balancer, a pass at a time, until a
        whole pass finds each of them in the connection table, or a pass
        finds no more of them than the one before (flows of an overfull set
        keep replacing each other)."""
        per_pass = -(-10_000 // flows) * flows  # each flow the same number of times
        best = -1
        for passes in range(1, WARMUP_PASSES + 1):
            self.bal.reset_counters()
            self.send(per_pass)
            hits = self.bal.counters()["conn_hit"]
            if hits == per_pass or hits <= best:
                return passes
            best = hits
        return WARMUP_PASSES

    def measure(self, program: str) -> Sample:
        self.gen.clear_received()
        if program in ("xdplb", "table"):
            self.bal.reset_counters()
        self.probe.clear()
        veth0 = self.veth_counters()
        soft0 = _runtime_ns(self.ksoftirqd)
        sent, kernel, wall, cpu = self.send(self.frames)
        time.sleep(0.05)  # anything the kernel deferred to ksoftirqd
        soft1 = _runtime_ns(self.ksoftirqd)
        veth1 = self.veth_counters()
        rx = self.gen.received()
        ours = program in ("xdplb", "table")
        received = rx["encap"] if ours else rx["plain"]
        sample = Sample(program, sent, received, kernel, wall, cpu, soft1 - soft0,
                        {k: veth1[k] - veth0[k] for k in veth0})
        # "other" is the stack's own chatter on the veths (IPv6 ND and the like).
        if ours and rx["plain"]:
            sys.exit(f"{program}: frames came back unencapsulated: {rx}")
        sample.other = rx["other"]
        if program == "one_read" and self.probe.counts() != (sent, 0):
            sys.exit(f"one_read: probed and dropped {self.probe.counts()} of {sent} frames")
        if ours:
            sample.lb_counters = {k: v for k, v in self.bal.counters().items() if v}
        return sample

    def veth_counters(self) -> dict[str, int]:
        stats = {role: _ethtool_stats(host, "eth0" if role == "gen" else "eth1")
                 for role, host in self.hosts.items()}
        return {k: stats[role].get(key, 0) for k, (role, _, key) in VETH_KEYS.items()}

    def backends_used(self) -> int:
        return sum(1 for i in self.members if self.bal.backend_stats.read(i)["packets"])

    def clear_backend_stats(self) -> None:
        for i in self.members:
            self.bal.backend_stats.clear(i)


def _ethtool_stats(host: Host, ifname: str) -> dict[str, int]:
    out = host.run(["ethtool", "-S", ifname]).stdout
    stats = {}
    for line in out.splitlines()[1:]:
        key, _, value = line.partition(":")
        with contextlib.suppress(ValueError):
            stats[key.strip()] = int(value)
    return stats


def _find_ksoftirqd(cpu: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(entry.name)
    return None


def _runtime_ns(pid: int | None) -> int:
    if pid is None:
        return 0
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


# --- the cases ----------------------------------------------------------------


def run_case(rig: Rig, flows: int, n_backends: int, rounds: int) -> CaseResult:
    rig.configure_flows(flows)
    rig.attach("table")  # the warm-up records every flow, as their SYNs would
    passes = rig.warm_up(flows)
    # No frame is in flight between the warm-up and the measurement, so the
    # sweep may vouch for slots changed just before it began.
    settled = rig.rec.settle(quiet_s=0)
    print(f"  {settled.summary()}", file=sys.stderr)
    rig.clear_backend_stats()
    programs = ("floor", "mac_swap", "one_read", "xdplb", "table")
    samples: dict[str, list[Sample]] = {p: [] for p in programs}
    for r in range(rounds):  # interleaved, in a rotating order
        k = r % len(programs)
        for program in programs[k:] + programs[:k]:
            rig.attach(program)
            samples[program].append(rig.measure(program))
    ours, base, floor = samples["xdplb"], samples["mac_swap"], samples["floor"]
    one_read = samples["one_read"]
    forwarded = sum(x.lb_counters.get("tx_forwarded", 0) for x in ours)
    hits = sum(x.lb_counters.get("conn_hit", 0) for x in ours)
    skipped = sum(x.lb_counters.get("conn_settled", 0) for x in ours)

    def med(xs: list[Sample], attr: str) -> float:
        return statistics.median(getattr(x, attr) for x in xs)

    ours_mpps, base_mpps = med(ours, "mpps_core"), med(base, "mpps_core")
    ours_ns, base_ns = med(ours, "ns_per_frame"), med(base, "ns_per_frame")
    floor_ns = med(floor, "ns_per_frame")
    ours_lb, base_lb = 1e3 / (ours_ns - floor_ns), 1e3 / (base_ns - floor_ns)
    return CaseResult(
        flows=flows, backends=n_backends,
        ours_mpps=ours_mpps, mac_swap_mpps=base_mpps, ratio=ours_mpps / base_mpps,
        ours_ns=ours_ns, mac_swap_ns=base_ns, extra_ns=ours_ns - base_ns,
        floor_ns=floor_ns, ours_lb_mpps=ours_lb, mac_swap_lb_mpps=base_lb,
        lb_ratio=ours_lb / base_lb,
        ours_wall_mpps=med(ours, "mpps_wall"), mac_swap_wall_mpps=med(base, "mpps_wall"),
        ours_cpu_mpps=med(ours, "mpps_cpu"), mac_swap_cpu_mpps=med(base, "mpps_cpu"),
        one_read_mpps=med(one_read, "mpps_core"), one_read_ns=med(one_read, "ns_per_frame"),
        one_read_ratio=ours_mpps / med(one_read, "mpps_core"),
        sent={p: sum(x.sent for x in xs) for p, xs in samples.items()},
        lost={p: sum(x.lost for x in xs) for p, xs in samples.items()},
        table_mpps=med(samples["table"], "mpps_core"),
        table_ratio=med(samples["table"], "mpps_core") / base_mpps,
        conn_hit_fraction=hits / forwarded if forwarded else 0.0,
        settled_fraction=skipped / forwarded if forwarded else 0.0,
        slots_settled=settled.slots_settled, sweep_s=settled.sweep.seconds,
        backends_used=rig.backends_used(),
        warmup_passes=passes,
        rounds=[_sample_json(x) for xs in samples.values() for x in xs],
    )


def _sample_json(x: Sample) -> dict:
    d = asdict(x)
    d.update(lost=x.lost, mpps_core=x.mpps_core, mpps_wall=x.mpps_wall, mpps_cpu=x.mpps_cpu,
             ns_per_frame=x.ns_per_frame)
    return d


def print_table(results: list[CaseResult], generator: str) -> None:
    described = (trafgen_sender.DESCRIPTION if generator == trafgen_sender.NAME else
                 "live frames: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, the "
                 "kernel's own timing of the loop")
    print(f"generator: {described}")
    print(f"{'':19}{'whole path on one core':^26}{'table':^15}{'LB side':^8}"
          f"{'1 read':^15}")
    print(f"{'flows':>9}{'backends':>10}{'xdplb':>9}{'swap':>9}{'ratio':>8}"
          f"{'xdplb':>8}{'ratio':>7}{'ratio':>8}{'swap+1':>8}{'ratio':>7}"
          f"{'extra':>7}{'floor':>7}{'lost':>6}{'settled':>9}{'hits':>7}")
    print(f"{'':19}{'Mpps':>9}{'Mpps':>9}{'':8}{'Mpps':>8}{'':7}{'':8}{'Mpps':>8}{'':7}"
          f"{'ns':>7}{'ns':>7}")
    for r in results:
        lost = sum(r.lost.values())
        verdict = "ok" if r.ratio >= TARGET_RATIO else "MISSED"
        print(f"{r.flows:>9}{r.backends:>10}{r.ours_mpps:>9.2f}{r.mac_swap_mpps:>9.2f}"
              f"{r.ratio:>8.3f}{r.table_mpps:>8.2f}{r.table_ratio:>7.3f}{r.lb_ratio:>8.3f}"
              f"{r.one_read_mpps:>8.2f}{r.one_read_ratio:>7.3f}"
              f"{r.extra_ns:>7.0f}{r.floor_ns:>7.0f}{lost:>6}"
              f"{r.settled_fraction:>9.1%}{r.conn_hit_fraction:>7.1%}  {verdict}")
    timing = ("the kernel's own timing of the loop" if generator != trafgen_sender.NAME else
              "the CPU time of trafgen and ksoftirqd, trafgen's start-up taken away")
    print(f"Mpps per core: frames received / the CPU time of all the work of a frame "
          f"({timing}).\ntable: the balancer with settled_refresh_s = 0 (every packet reads "
          f"the flow table).\nLB side: xdplb vs swap with the floor (generator + one veth hop + "
          f"counting drop) taken away from both.\n1 read: the MAC swap after one read of a "
          f"flow-table-sized array at a per-flow slot.\nsettled / hits: measured frames "
          f"sent by a settled ring slot / by the flow table.\nTarget: whole-path ratio >= "
          f"{TARGET_RATIO} for established flows (the LB-side ratio is the stricter reading).")


def choose_generator(rig: Rig, wanted: str) -> None:
    if wanted == "auto":
        refused = rig.live_frames_refused()
        if refused is None:
            return
        print(f"live frames refused here ({refused}): using trafgen", file=sys.stderr)
        wanted = trafgen_sender.NAME
    if wanted == trafgen_sender.NAME:
        rig.use_trafgen()


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, _frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # a child pyroute2 forked: die as it would have
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    sys.exit("terminated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", type=int, default=1, help="the one CPU that does all the work")
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames per measured run")
    parser.add_argument("--chunk", type=int, default=1_000_000,
                        help="frames per syscall (each costs ~30 ms of fixed wall time)")
    parser.add_argument("--max-seconds", type=float, default=5.0,
                        help="time bound of one run (no new syscall after it)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flows", type=int, nargs="+", default=list(FLOWS))
    parser.add_argument("--backends", type=int, nargs="+", default=list(BACKENDS))
    parser.add_argument("--settled-refresh-s", type=int,
                        default=DatapathSettings.settled_refresh_s,
                        help="the datapath setting under test (0: the table on every packet)")
    parser.add_argument("--generator", choices=("auto", "live-frames", trafgen_sender.NAME),
                        default="auto", help="auto: live frames where the kernel allows "
                        "them, else trafgen (the table says which ran)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/linerate.json"))
    args = parser.parse_args()
    if max(args.flows) > 1_000_000 or min(args.flows) < 1 or min(args.backends) < 1:
        sys.exit("flows: 1 to 1,000,000; backends: at least 1")
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, XDP)")

    # SIGTERM unwinds like Ctrl-C, so the lab is torn down either way.
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.sched_setaffinity(0, {args.cpu})
    remove_stale(PREFIX)
    started = time.monotonic()
    results: list[CaseResult] = []
    with Lab(PREFIX) as lab, tempfile.TemporaryDirectory(prefix="xbrate-") as workdir:
        rig = Rig(lab, args.cpu, args.frames, args.chunk, args.max_seconds,
                  args.flows, args.backends, args.settled_refresh_s, Path(workdir))
        try:
            choose_generator(rig, args.generator)
            read_latency_ns = rig.probe.read_latency_ns()
            for n_backends in args.backends:
                rig.program_backends(n_backends)
                for flows in args.flows:
                    rig.bal.conns.clear()
                    results.append(run_case(rig, flows, n_backends, args.rounds))
                    r = results[-1]
                    print(f"  flows={flows} backends={n_backends}: {r.ours_mpps:.2f} vs "
                          f"{r.mac_swap_mpps:.2f} Mpps per core", file=sys.stderr)
        finally:
            rig.close()
    elapsed = time.monotonic() - started
    print_table(results, rig.generator)
    print(f"A read whose slot depends on the read before, in an array as large as the "
          f"connection table ({rig.probe.table_bytes >> 20} MiB): {read_latency_ns:.0f} ns "
          f"(bench_memlatency.py).")
    print(f"took {elapsed:.0f} s")
    meta = {
        "generator": rig.generator,
        "method": f"{rig.generator} generator -> veth -> program under test (XDP_TX) -> veth "
                  "-> counter, all on one CPU; Mpps per core = received / CPU work "
                  + ("(kernel-timed)" if rig.trafgen is None else
                     "(trafgen + ksoftirqd CPU time, start-up taken away)"),
        "trafgen_startup_ns": rig.trafgen.startup_ns if rig.trafgen else None,
        "cpu": args.cpu, "frames_per_run": args.frames, "chunk": args.chunk,
        "max_seconds": args.max_seconds, "rounds": args.rounds,
        "frame_len": len(rig.frame), "ring_size": RING_SIZE, "conn_entries": rig.conn_entries,
        "kernel": platform.release(), "target_ratio": TARGET_RATIO,
        "settled_refresh_s": args.settled_refresh_s,
        "elapsed_s": round(elapsed, 1),
        "dependent_read_ns": read_latency_ns, "probe_table_bytes": rig.probe.table_bytes,
    }
    write_json(args.json, {"meta": meta, "cases": [asdict(r) for r in results]})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
