"""The backend-side program that strips the balancer's encapsulation.

Loaded by xdplb-backend with its maps pinned (a later run, the doctor and
teardown reopen them by path, PinnedDecap), or unpinned by the lab."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import shutil
from pathlib import Path

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap, PerCpuArray, libbcc
from xdplb.datapath.errors import DatapathError, raise_errno
from xdplb.datapath.loader import BPFFS, compile_program, ensure_bpffs, load_xdp
from xdplb.datapath.netlink import attach_xdp
from xdplb.datapath.testrun import TestRunResult, prog_test_run

DECAP_PIN_ROOT = BPFFS / "xdplb-backend"
DECAP_PROGRAM = "xdplb_decap"  # its function, and the name the kernel reports
MAX_DECAP_ADDRS = 64
DECAP_MAPS = ("decap_addrs", "decap_gue_port", "decap_stats")


class _DecapMaps:
    """The three maps, however they were opened."""

    def __init__(self, fds: dict[str, int]):
        self.addrs = BpfMap("decap_addrs", fds["decap_addrs"], structs.Addr16, ct.c_uint32)
        self._gue_port = BpfMap("decap_gue_port", fds["decap_gue_port"], ct.c_uint32,
                                ct.c_uint16)
        self.stats = PerCpuArray("decap_stats", fds["decap_stats"], structs.DecapCounters)

    def accept(self, address: str) -> None:
        """Decapsulates tunnel packets addressed to `address`."""
        self.addrs.put(structs.Addr16.of(address), ct.c_uint32(1))

    def refuse(self, address: str) -> None:
        self.addrs.delete(structs.Addr16.of(address))

    def accepted(self) -> set[str]:
        return {str(key.address()) for key in self.addrs.keys()}  # noqa: SIM118 (a map)

    def set_gue_port(self, port: int) -> None:
        """GUE to this UDP port is decapsulated too (0: GUE off)."""
        self._gue_port.put(ct.c_uint32(0), ct.c_uint16(structs.port_be(port)))

    def gue_port(self) -> int:
        value = self._gue_port.get(ct.c_uint32(0))
        return structs.port_be(value.value) if value is not None else 0

    def counters(self) -> dict[str, int]:
        return self.stats.read(0)


class Decapsulator(_DecapMaps):
    """The program, compiled and loaded; with pin_dir its maps are pinned there
    (and reused when they already are)."""

    def __init__(self, gue_port: int = 6080, max_addrs: int = MAX_DECAP_ADDRS,
                 pin_dir: Path | None = None):
        defines = {"MAX_DECAP_ADDRS": str(max_addrs)}
        if pin_dir is not None:
            ensure_bpffs()
            pin_dir.mkdir(parents=True, exist_ok=True)
            defines["XDPLB_PIN_DIR"] = f'"{pin_dir}"'
        self._bpf = compile_program("decap.c", defines)
        self.prog_fd: int = load_xdp(self._bpf, DECAP_PROGRAM).fd
        super().__init__({name: self._bpf.get_table(name.encode()).map_fd
                          for name in DECAP_MAPS})
        self.set_gue_port(gue_port)

    def test_run(self, frame: bytes) -> TestRunResult:
        return prog_test_run(self.prog_fd, frame)

    def attach(self, ifname: str, *, netns: str | None = None, generic: bool = False) -> int:
        return attach_xdp(self.prog_fd, ifname, netns=netns, generic=generic)

    def close(self) -> None:
        """Releases this process's handles; an attached program and pins stay."""
        self._bpf.cleanup()


class PinnedDecap(_DecapMaps):
    """A decapsulator's pinned maps, opened by path without compiling anything."""

    def __init__(self, pin_dir: Path):
        self.pin_dir = pin_dir
        self._fds: list[int] = []
        fds = {}
        for name in DECAP_MAPS:
            fd = libbcc().bpf_obj_get(str(pin_dir / name).encode())
            if fd < 0:
                self.close()
                raise_errno(f"opening pinned map {pin_dir / name}")
            self._fds.append(fd)
            fds[name] = fd
        super().__init__(fds)

    @staticmethod
    def exists(pin_dir: Path) -> bool:
        return all((pin_dir / name).exists() for name in DECAP_MAPS)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def remove_decap_pins(pin_dir: Path) -> None:
    """Removes a decapsulator's pinned maps (the program goes when detached)."""
    if not str(pin_dir).startswith(str(DECAP_PIN_ROOT) + "/"):
        raise DatapathError(f"{pin_dir} is not under {DECAP_PIN_ROOT}")
    if pin_dir.exists():
        shutil.rmtree(pin_dir)
    with contextlib.suppress(OSError):  # the root goes with the last instance
        DECAP_PIN_ROOT.rmdir()
