"""The lab's and the benchmarks' own BPF programs (lab/bpf/), loaded through the
datapath's loader: a pass-all program that gives a veth the NAPI XDP_TX needs,
the memory probe, the benchmark harness, and the line-rate generator."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from xdplb.datapath import BpfMap, DatapathError, PerCpuArray, attach_xdp
from xdplb.datapath.errors import raise_errno
from xdplb.datapath.loader import compile_program, load_xdp
from xdplb.datapath.testrun import XDP_DROP, TestRunResult, prog_test_run, run_live_frames

LAB_BPF = Path(__file__).resolve().parent.parent / "bpf"
_libc = ct.CDLL(None, use_errno=True)


_pass_program: Any = None


def attach_pass(ifname: str, *, netns: str | None = None) -> None:
    """Attaches a program that passes everything: it gives a veth NAPI so that
    frames XDP_TX'd by its peer are received (see lab/bpf/pass.c)."""
    global _pass_program
    if _pass_program is None:
        _pass_program = compile_program(LAB_BPF / "pass.c", {})
    attach_xdp(load_xdp(_pass_program, "xdplb_pass").fd, ifname, netns=netns)


class _Count(ct.Structure):
    _fields_: ClassVar = [("value", ct.c_uint64)]


class MemoryProbe:
    """lab/bpf/bench_memprobe.c: a MAC swap that first reads one word of an array
    of `table_bytes` at a slot hashed from the flow, the line-rate
    benchmark's "one per-flow memory read" baseline."""

    LATENCY_READS = 256  # dependent reads per run of bench_memlatency

    def __init__(self, table_bytes: int):
        bits = max(1, (table_bytes // 8 - 1).bit_length())
        self.table_bytes = 8 << bits
        self._bpf = compile_program(LAB_BPF / "bench_memprobe.c", {"PROBE_BITS": str(bits),
                                                  "LATENCY_READS": str(self.LATENCY_READS)})
        self.prog_fd: int = load_xdp(self._bpf, "bench_memprobe").fd
        self._latency_fd: int = load_xdp(self._bpf, "bench_memlatency").fd
        self._stats = PerCpuArray("probe_stats", self._bpf.get_table(b"probe_stats").map_fd,
                                  _Count)

    def read_latency_ns(self, runs: int = 2000) -> float:
        """ns of one read of the array when each read's slot depends on the
        word read before it (bench_memlatency), averaged over `runs` runs."""
        result = prog_test_run(self._latency_fd, bytes(64), repeat=runs)
        if result.verdict != XDP_DROP:
            raise DatapathError(f"bench_memlatency returned {result.verdict}")
        return result.duration_ns / self.LATENCY_READS

    def counts(self) -> tuple[int, int]:
        """(frames probed and swapped, frames dropped as not IPv4 TCP)."""
        return self._stats.read(0)["value"], self._stats.read(1)["value"]

    def clear(self) -> None:
        for index in (0, 1):
            self._stats.clear(index)

    def close(self) -> None:
        self._bpf.cleanup()


class BenchHarness:
    """Restores a frame before each repeat and tail-calls the program under test."""

    RESTORE_LEN = 64

    def __init__(self) -> None:
        self._bpf = compile_program(LAB_BPF / "bench_harness.c", {})
        self.harness_fd: int = load_xdp(self._bpf, "bench_harness").fd
        self.mac_swap_fd: int = load_xdp(self._bpf, "bench_mac_swap").fd
        self._target = self._bpf.get_table(b"bench_target")
        self._frame = self._bpf.get_table(b"bench_frame")

    def prepare(self, frame: bytes, target_fd: int) -> None:
        if len(frame) < self.RESTORE_LEN:
            raise DatapathError(f"bench frames must be >= {self.RESTORE_LEN} bytes")
        saved = self._frame[ct.c_int(0)]
        saved.len = len(frame)
        ct.memmove(saved.bytes, frame, self.RESTORE_LEN)
        self._frame[ct.c_int(0)] = saved
        self._target[ct.c_int(0)] = ct.c_int(target_fd)

    def run(self, frame: bytes, repeat: int) -> TestRunResult:
        return prog_test_run(self.harness_fd, frame, repeat)

    def close(self) -> None:
        self._bpf.cleanup()


# --- line-rate traffic generation (benchmarks/bench_linerate.py) --------------


class TrafficGenerator:
    """In-kernel traffic generation and counting (lab/bpf/trafficgen.c).

    send() runs the generator program with BPF_PROG_TEST_RUN in live-frames
    mode: every frame it XDP_TXes is transmitted out of the ingress veth into
    its peer, whose XDP program (the one under test) runs in the softirq that
    this transmit raises, on the same CPU. The generator writes a template
    frame's headers into every frame and makes it one of `flows` distinct
    flows (per-CPU frame counter modulo flows: the high bits go into the
    source address, the low GEN_PORT_BITS into the source port).

    The counter program goes on the veth where frames come back; it counts
    them by kind (IPIP-encapsulated, plain TCP, other) and drops them.
    """

    @dataclass(frozen=True)
    class LiveRun:
        """One BPF_PROG_TEST_RUN in live-frames mode."""

        frames: int       # frames the generator ran on (each one XDP_TX'd)
        duration_ns: int  # the kernel's average per frame, an integer: all the
                          # work of the path on this CPU (see send)
        wall_ns: int      # the syscall, as the caller saw it
        cpu_ns: int       # the calling thread's CPU time during the syscall

    HEADER_LEN = 64  # GEN_HEADER_LEN in lab/bpf/trafficgen.c
    PORT_BITS = 14   # GEN_PORT_BITS
    MAX_BATCH = 256  # the kernel's TEST_XDP_MAX_BATCH
    _CLONE_NEWNET = 0x40000000

    class _Config(ct.Structure):
        _fields_ = (("flows", ct.c_uint32), ("len", ct.c_uint32),
                    ("hdr", ct.c_uint8 * 64))

    class _Frames(ct.Structure):
        _fields_ = (("frames", ct.c_uint64),)

    class _RxCounters(ct.Structure):
        _fields_ = (("encap", ct.c_uint64), ("plain", ct.c_uint64), ("other", ct.c_uint64))

    def __init__(self) -> None:
        self._bpf = compile_program(LAB_BPF / "trafficgen.c", {})
        self.gen_fd: int = load_xdp(self._bpf, "xdplb_trafficgen").fd
        self.counter_fd: int = load_xdp(self._bpf, "xdplb_rxcount").fd
        fd = self._bpf.get_table(b"gen_config").map_fd
        self._config = BpfMap("gen_config", fd, ct.c_uint32, self._Config)
        self._state = PerCpuArray("gen_state", self._bpf.get_table(b"gen_state").map_fd,
                                  self._Frames)
        self._rx = PerCpuArray("rx_stats", self._bpf.get_table(b"rx_stats").map_fd,
                               self._RxCounters)
        self._frame = b""

    def configure(self, frame: bytes, flows: int) -> None:
        """The template (Ethernet, IPv4 without options, TCP) and the flow count."""
        if len(frame) < self.HEADER_LEN:
            raise DatapathError(f"generator frames must be >= {self.HEADER_LEN} bytes")
        if frame[12:14] != b"\x08\x00" or frame[14] != 0x45 or frame[23] != 6:
            raise DatapathError("generator template: Ethernet + IPv4 (no options) + TCP only")
        if flows < 1:
            raise DatapathError(f"flows={flows}: must be >= 1")
        addr_lo = int.from_bytes(frame[28:30], "big")
        sport = int.from_bytes(frame[34:36], "big")
        if addr_lo + ((flows - 1) >> self.PORT_BITS) > 0xFFFF:
            raise DatapathError(f"flows={flows}: the template's source address has no room")
        if sport + min(flows, 1 << self.PORT_BITS) - 1 > 0xFFFF:
            raise DatapathError(f"flows={flows}: the template's source port has no room")
        config = self._Config(flows=flows, len=len(frame))
        ct.memmove(config.hdr, frame, self.HEADER_LEN)
        self._config.put(ct.c_uint32(0), config)
        self._state.clear(0)
        self._frame = frame

    def flow(self, index: int) -> tuple[str, int]:
        """Source address and port of flow `index` of the configured template."""
        import ipaddress

        base = int.from_bytes(self._frame[26:30], "big")
        sport = int.from_bytes(self._frame[34:36], "big")
        addr = ipaddress.IPv4Address(base + (index >> self.PORT_BITS))
        return str(addr), sport + (index & ((1 << self.PORT_BITS) - 1))

    def attach_counter(self, ifname: str, *, netns: str | None = None) -> int:
        return attach_xdp(self.counter_fd, ifname, netns=netns)

    def received(self) -> dict[str, int]:
        return self._rx.read(0)

    def clear_received(self) -> None:
        self._rx.clear(0)

    def generated(self) -> int:
        """Frames the generator program has run on since configure()."""
        return self._state.read(0)["frames"]

    def send(self, ifindex: int, count: int, *, netns: str | None = None,
             batch_size: int = 64) -> TrafficGenerator.LiveRun:
        """Transmits `count` frames out of interface `ifindex` in one syscall.

        The kernel resolves ifindex in the caller's netns, so with `netns` the
        calling thread enters that netns for the call. The syscall returns
        once every frame was generated; the receivers' XDP programs ran in
        softirqs on this CPU along the way (unless the kernel deferred some
        to ksoftirqd). Its duration is the kernel's own clock of that loop,
        paused while the thread yields the CPU: per frame, all the work the
        path did on this CPU.
        """
        if not self._frame:
            raise DatapathError("TrafficGenerator.send before configure")
        if not 1 <= batch_size <= self.MAX_BATCH:
            raise DatapathError(f"batch_size={batch_size}: must be 1..{self.MAX_BATCH}")
        import time

        with self._thread_in_netns(netns):
            wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
            duration = run_live_frames(self.gen_fd, self._frame, count,
                                       ingress_ifindex=ifindex, batch_size=batch_size)
            wall1, cpu1 = time.perf_counter_ns(), time.thread_time_ns()
        return self.LiveRun(count, duration, wall1 - wall0, cpu1 - cpu0)

    @staticmethod
    @contextlib.contextmanager
    def _thread_in_netns(netns: str | None) -> Iterator[None]:
        """Moves the calling thread (only it) into a named netns for the block."""
        if netns is None:
            yield
            return
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(target, TrafficGenerator._CLONE_NEWNET) != 0:
                    raise_errno(f"entering netns {netns}")
            finally:
                os.close(target)
            try:
                yield
            finally:
                if _libc.setns(own, TrafficGenerator._CLONE_NEWNET) != 0:
                    raise_errno("returning to the original netns")
        finally:
            os.close(own)

    def close(self) -> None:
        self._bpf.cleanup()
