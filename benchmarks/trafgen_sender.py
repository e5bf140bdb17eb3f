"""A traffic source for bench_linerate.py that needs no special privilege:
netsniff-ng's trafgen, transmitting through an AF_PACKET TX ring (qdisc
bypassed) out of a veth in the generator's namespace.

Where the kernel refuses BPF_PROG_TEST_RUN's live-frames mode (EPERM without
CAP_SYS_RESOURCE on some machines), this sends the same frames: the
template's Ethernet, IPv4 and TCP headers and options, one of `flows`
distinct flows per frame, the flow number added to the template's source
address (trafgen's dinc, which fixes both checksums). It makes one trafgen
run per send(), with one process (pinned by trafgen to CPU 0).

What a frame costs is the CPU time trafgen and its child took (the kernel's
transmit, the veth hops and the XDP programs all run in softirqs charged to
them: this kernel has no separate IRQ time accounting) plus any work
deferred to ksoftirqd, less trafgen's fixed start-up cost, measured by runs
of one frame in the same rig. Frames are counted where they come back, as
with live frames.
"""

from __future__ import annotations

import ipaddress
import re
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

NAME = "trafgen"
DESCRIPTION = ("trafgen (netsniff-ng): AF_PACKET TX ring, qdisc bypassed, one process; "
               "CPU time of trafgen + ksoftirqd per frame, start-up cost taken away")
STARTUP_SAMPLES = 3


class TrafgenError(RuntimeError):
    pass


@dataclass(frozen=True)
class Run:
    """One trafgen run, shaped like TrafficGenerator.LiveRun."""

    frames: int
    duration_ns: float  # CPU ns per frame, start-up taken away
    wall_ns: int
    cpu_ns: int  # all the CPU time the run took, start-up included


def available() -> str | None:
    """trafgen's path, or None when it is not installed (scripts/setup.sh installs it)."""
    return shutil.which("trafgen")


def config_for(frame: bytes, flows: int) -> str:
    """A trafgen packet configuration that sends `frame`, its source address
    counting through `flows` addresses."""
    packet = Ether(frame)
    ip, tcp = packet[IP], packet[TCP]
    if ip.ihl != 5 or ip.flags.MF or ip.frag:
        raise TrafgenError("template: IPv4 without options, not a fragment")
    base = int(ipaddress.IPv4Address(ip.src))
    if base + flows - 1 > 0xFFFFFFFF:
        raise TrafgenError(f"flows={flows}: the template's source address has no room")
    options = bytes(tcp)[20:tcp.dataofs * 4]
    payload = bytes(tcp.payload)
    flags = ", ".join(name for bit, name in ((0x10, "ack"), (0x08, "psh"), (0x02, "syn"),
                                             (0x01, "fin"), (0x04, "rst")) if int(tcp.flags) & bit)
    raw = ", ".join(f"0x{b:02x}" for b in options + payload)
    return (
        "{\n"
        f"  eth(da={packet.dst}, sa={packet.src}, type=0x0800),\n"
        f"  ipv4(sa={ip.src}, da={ip.dst}, ttl={ip.ttl}, id={ip.id}, tos={ip.tos}"
        f"{', df' if ip.flags.DF else ''}"
        f"{f', sa=dinc({base}, {base + flows - 1})' if flows > 1 else ''}),\n"
        f"  tcp(sp={tcp.sport}, dp={tcp.dport}, seq={tcp.seq}, aseq={tcp.ack}, "
        f"win={tcp.window}, doff={tcp.dataofs}{', ' + flags if flags else ''})"
        f"{',' if raw else ''}\n"
        f"  {raw}\n"
        "}\n")


def _ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.joinpath("comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _ksoftirqd_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except OSError:
            continue
    return total


class TrafgenSender:
    """Sends a configured template out of one interface of one namespace."""

    name = NAME
    description = DESCRIPTION

    def __init__(self, workdir: Path, max_seconds: float):
        if available() is None:
            raise TrafgenError("trafgen is not installed (apt-get install netsniff-ng)")
        self.config_path = workdir / "trafgen.cfg"
        self.max_seconds = max_seconds
        self.startup_ns = 0
        self._ksoftirqd = _ksoftirqd_pids()
        self._target: tuple[str, str] | None = None

    def configure(self, frame: bytes, flows: int, *, netns: str, ifname: str) -> None:
        self.config_path.write_text(config_for(frame, flows))
        self._target = (netns, ifname)
        samples = [self._run(1)[1] for _ in range(STARTUP_SAMPLES)]
        self.startup_ns = int(statistics.median(samples))

    def send(self, count: int) -> Run:
        frames, cpu_ns, wall_ns = self._run(count)
        per_frame = max(0, cpu_ns - self.startup_ns) / frames if frames else 0.0
        return Run(frames, per_frame, wall_ns, cpu_ns)

    def _run(self, count: int) -> tuple[int, int, int]:
        """(frames sent, CPU ns of trafgen and ksoftirqd, wall ns) of one run."""
        if self._target is None:
            raise TrafgenError("send before configure")
        netns, ifname = self._target
        argv = ["ip", "netns", "exec", netns, "trafgen", "--dev", ifname,
                "--conf", str(self.config_path), "--num", str(count), "--cpus", "1",
                "--no-sock-mem", "--notouch-irq"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        soft0, wall0 = _ksoftirqd_ns(self._ksoftirqd), time.perf_counter_ns()
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False,
                                    timeout=self.max_seconds + 30)
        except subprocess.TimeoutExpired:
            raise TrafgenError(f"trafgen did not send {count} frames within "
                               f"{self.max_seconds + 30:.0f} s") from None
        wall = time.perf_counter_ns() - wall0
        soft = _ksoftirqd_ns(self._ksoftirqd) - soft0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise TrafgenError(f"trafgen exited {result.returncode}: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        match = re.search(r"(\d+) packets outgoing", result.stdout + result.stderr)
        if match is None:
            raise TrafgenError(f"trafgen said nothing of what it sent: {result.stdout[-300:]}")
        cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e9
        return int(match[1]), int(cpu) + soft, wall

    def close(self) -> None:
        self.config_path.unlink(missing_ok=True)
