"""The backend-side program that strips the balancer's encapsulation."""

from __future__ import annotations

import ctypes as ct

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap, PerCpuArray
from xdplb.datapath.loader import compile_program, load_xdp
from xdplb.datapath.netlink import attach_xdp
from xdplb.datapath.testrun import TestRunResult, prog_test_run


class Decapsulator:
    """The backend-side program that strips the balancer's encapsulation."""

    def __init__(self, gue_port: int = 6080, max_addrs: int = 64):
        self._bpf = compile_program("decap.c", {"MAX_DECAP_ADDRS": str(max_addrs)})
        self.prog_fd: int = load_xdp(self._bpf, "xdplb_decap").fd
        self.addrs = BpfMap("decap_addrs", self._bpf.get_table(b"decap_addrs").map_fd,
                            structs.Addr16, ct.c_uint32)
        self._gue_port = BpfMap("decap_gue_port", self._bpf.get_table(b"decap_gue_port").map_fd,
                                ct.c_uint32, ct.c_uint16)
        self._gue_port.put(ct.c_uint32(0), ct.c_uint16(structs.port_be(gue_port)))
        self.stats = PerCpuArray("decap_stats", self._bpf.get_table(b"decap_stats").map_fd,
                                 structs.DecapCounters)

    def accept(self, address: str) -> None:
        """Decapsulates tunnel packets addressed to `address`."""
        self.addrs.put(structs.Addr16.of(address), ct.c_uint32(1))

    def counters(self) -> dict[str, int]:
        return self.stats.read(0)

    def test_run(self, frame: bytes) -> TestRunResult:
        return prog_test_run(self.prog_fd, frame)

    def attach(self, ifname: str, *, netns: str | None = None, generic: bool = False) -> int:
        return attach_xdp(self.prog_fd, ifname, netns=netns, generic=generic)

    def close(self) -> None:
        self._bpf.cleanup()
