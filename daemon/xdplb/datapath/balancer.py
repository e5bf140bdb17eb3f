"""The balancer program (bpf/balancer.c) and its maps, pinned or not."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap, PerCpuArray, libbcc, pinned_map_shape
from xdplb.datapath.errors import DatapathError, raise_errno
from xdplb.datapath.flow_table import (
    SETTLE_SETS_PER_RUN,
    FlowTable,
    TableSweep,
    datapath_clock,
)
from xdplb.datapath.loader import compile_program, ensure_bpffs, load_sched_cls, load_xdp
from xdplb.datapath.maps import BY_NAME, INSPECTED, map_shapes
from xdplb.datapath.netlink import attach_tc_egress, attach_xdp
from xdplb.datapath.quic import QuicServerTable
from xdplb.datapath.sizes import HealthMarks, MapSizes
from xdplb.datapath.syn_probes import SynProbeTable
from xdplb.datapath.testrun import SkBuffCtx, TestRunResult, prog_test_run
from xdplb.datapath.vip_index import VipTable


class Balancer:
    """The balancer program and its maps.

    With a pin_dir the maps are pinned there, and a Balancer built later with
    the same pin_dir and sizes reuses them: VIPs, rings and established flows
    survive a daemon restart or a program upgrade.
    """

    def __init__(self, sizes: MapSizes | None = None, pin_dir: Path | None = None,
                 marks: HealthMarks | None = None):
        self.sizes = sizes or MapSizes()
        self.pin_dir = pin_dir
        self.marks = marks or HealthMarks()
        self.marks.validate(self.sizes.max_backends)
        self._hc_prog_fd: int | None = None
        defines = {
            "HC_MARK_BASE": f"{self.marks.base:#x}U",
            "HC_MARK_MASK": f"{self.marks.mask:#x}U",
            "MAX_VIPS": str(self.sizes.max_vips),
            "MAX_BACKENDS": str(self.sizes.max_backends),
            "RING_ENTRIES": str(self.sizes.ring_entries),
            "VIP_INDEX_BITS": str(self.sizes.vip_index_bits),
            "CONN_SET_BITS": str(self.sizes.conn_set_bits),
            "SETTLE_SETS_PER_RUN": str(SETTLE_SETS_PER_RUN),
        }
        if pin_dir is not None:
            ensure_bpffs()
            self._check_pinned_shapes(pin_dir)
            pin_dir.mkdir(parents=True, exist_ok=True)
            defines["XDPLB_PIN_DIR"] = f'"{pin_dir}"'
        self._bpf = compile_program("balancer.c", defines)
        self.prog_fd: int = load_xdp(self._bpf, "xdplb_balancer").fd
        self.addr_filter = self._map("addr_filter")
        self.vip_addrs = self._map("vip_addrs")
        self.vip_index = self._map("vip_index")
        self.vips = VipTable(self._map("vips"), self.vip_index, self.sizes.vip_index_bits)
        self.ring = self._map("ring")
        self.backends = self._map("backends")
        self.config = self._map("config")
        self.conns = FlowTable("conns", self._fd("conns"), self.sizes.conn_set_bits,
                               datapath_clock(self.config))
        self.vip_stats = self._per_cpu("vip_stats")
        self.backend_stats = self._per_cpu("backend_stats")
        self.global_stats = self._per_cpu("global_stats")
        self.hc_stats = self._per_cpu("hc_stats")
        self.vip_rings = self._map("vip_rings")
        self._settle = self._map("settle")
        self._settle_blocked = self._map("settle_blocked")
        self._census = self._map("flow_census")
        self._flow_active = self._map("flow_active")
        self.flow_events = self._per_cpu("flow_events")
        self.quic_servers = QuicServerTable(self._map("quic_servers"), self.sizes.max_backends)
        self.quic_stats = self._per_cpu("quic_stats")
        self.syn_probes = SynProbeTable(self._map("syn_probes"), self._per_cpu("syn_stats"),
                                        self.sizes.max_backends, self.marks)
        self._settle_prog_fd: int | None = None

    def map_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Every map of bpf/balancer.c: (key size, value size, entries)."""
        return map_shapes(self.sizes)

    def _check_pinned_shapes(self, pin_dir: Path) -> None:
        """Refuses, before anything is loaded, pinned maps this build cannot use:
        left by an xdplb with other layouts, or by other [maps] sizes."""
        if not pin_dir.is_dir():
            return
        for name, wanted in self.map_shapes().items():
            path = pin_dir / name
            if not path.exists():
                continue  # a map this build adds: created empty
            found = pinned_map_shape(path)
            if found != wanted:
                raise DatapathError(
                    f"pinned map {path} is (key {found[0]} B, value {found[1]} B, "
                    f"{found[2]} entries), this build needs (key {wanted[0]} B, value "
                    f"{wanted[1]} B, {wanted[2]} entries): they were made by another xdplb "
                    f"version or other [maps] sizes. Stop the lbd that made them with "
                    f"--detach-on-exit, or detach it and remove {pin_dir}")

    def _fd(self, name: str) -> int:
        return self._bpf.get_table(name.encode()).map_fd

    def _map(self, name: str) -> BpfMap:
        spec = BY_NAME[name]
        return BpfMap(name, self._fd(name), spec.key, spec.value)

    def _per_cpu(self, name: str) -> PerCpuArray:
        spec = BY_NAME[name]
        assert spec.per_cpu, name
        return PerCpuArray(name, self._fd(name), spec.value)

    def bcc_table(self, name: str) -> Any:
        """bcc's view of a map (its derived key and value layouts), for tests."""
        return self._bpf.get_table(name.encode())

    def write_config(self, config: structs.LbConfig) -> None:
        self.config.put(ct.c_uint32(0), config)

    def write_addr_filter(self, addresses: Iterable[str],
                          current: list[int] | None = None) -> int:
        """Makes the address filter pass exactly these addresses' bits (the one
        writer of the filter). Writes only the words that differ from `current`
        (the filter's words as last written, updated in place; read from the map
        when not given) and returns how many that was."""
        words = [0] * structs.ADDR_FILTER_WORDS
        for address in addresses:
            word, bit = structs.addr_filter_slot(address)
            words[word] |= 1 << bit
        if current is None:
            current = list(self.addr_filter.read_array(structs.ADDR_FILTER_WORDS))
        changed = [i for i, bits in enumerate(words) if current[i] != bits]
        for i in changed:
            self.addr_filter.put(ct.c_uint32(i), ct.c_uint64(words[i]))
            current[i] = words[i]
        return len(changed)

    def write_ring(self, slots: Iterable[int], backends: Iterable[int]) -> int:
        """Writes ring slots in one batch; returns how many were written."""
        slot_list, backend_list = list(slots), list(backends)
        if len(slot_list) != len(backend_list):
            raise DatapathError("write_ring: slots and backends differ in length")
        if slot_list and max(slot_list) >= self.sizes.ring_entries:
            raise DatapathError(
                f"ring slot {max(slot_list)} beyond ring_entries={self.sizes.ring_entries}")
        keys = (ct.c_uint32 * len(slot_list))(*slot_list)
        values = (ct.c_uint32 * len(backend_list))(*backend_list)
        self.ring.put_batch(keys, values)
        return len(slot_list)

    def read_ring(self, offset: int, size: int) -> list[int]:
        return [self.ring.get(ct.c_uint32(offset + i)).value for i in range(size)]

    def counters(self) -> dict[str, int]:
        """Every datapath counter summed over CPUs: outcomes, then events."""
        events = self.flow_events.read(0)
        return {**self.global_stats.read(0), "conn_evicted": events["evicted"]}

    def quic_counters(self) -> dict[str, int]:
        """QUIC VIPs' packets summed over CPUs: routed by connection ID, or why not."""
        return self.quic_stats.read(0)

    def reset_counters(self) -> None:
        """Zeroes what counters() and quic_counters() read (tests and benchmarks
        count from zero)."""
        self.global_stats.clear(0)
        self.flow_events.clear(0)
        self.quic_stats.clear(0)

    def test_run(self, frame: bytes, repeat: int = 1) -> TestRunResult:
        return prog_test_run(self.prog_fd, frame, repeat)

    def attach(self, ifname: str, *, netns: str | None = None, generic: bool = False) -> int:
        return attach_xdp(self.prog_fd, ifname, netns=netns, generic=generic)

    @property
    def hc_prog_fd(self) -> int:
        """The tc egress program of health checks through the tunnel: part of the
        balancer's module, so it uses these very maps; verified on first use."""
        if self._hc_prog_fd is None:
            self._hc_prog_fd = load_sched_cls(self._bpf, "xdplb_hc_encap").fd
        return self._hc_prog_fd

    def attach_health_encap(self, ifname: str, *, netns: str | None = None) -> int:
        return attach_tc_egress(self.hc_prog_fd, ifname, netns=netns)

    def hc_test_run(self, frame: bytes, mark: int) -> TestRunResult:
        """Runs the tc program on `frame` as an skb carrying `mark`."""
        return prog_test_run(self.hc_prog_fd, frame, ctx=SkBuffCtx(mark=mark))

    def hc_counters(self) -> dict[str, int]:
        return self.hc_stats.read(0)

    def load_sweeper(self) -> None:
        """Verifies and loads xdplb_settle, once (in the thread that owns bcc)."""
        if self._settle_prog_fd is None:
            self._settle_prog_fd = load_xdp(self._bpf, "xdplb_settle").fd

    def sweep_flows(self, now_s: int, idle_timeout_s: int, sets: range | None = None,
                    active_window_s: int = 60) -> tuple[TableSweep, np.ndarray]:
        """Sweeps the flow table with xdplb_settle (bpf/balancer.c): removes
        entries idle longer than idle_timeout_s (0: none), counts those seen
        within active_window_s (per backend index), and returns the totals
        with one bool per ring entry, True where some entry on that slot names
        another backend than the slot's."""
        sets = sets if sets is not None else range(self.conns.sets)
        if sets.step != 1 or not 0 <= sets.start <= sets.stop <= self.conns.sets:
            raise DatapathError(f"sweep_flows: {sets} is not a run of the table's "
                                f"{self.conns.sets} sets")
        self.load_sweeper()
        words = (self.sizes.ring_entries + 63) // 64
        keys = (ct.c_uint32 * words)(*range(words))
        self._settle_blocked.put_batch(keys, (ct.c_uint64 * words)())
        self._reset_census(active_window_s)
        self._settle.put(ct.c_uint32(0), structs.SettleState(
            next_set=sets.start, end_set=sets.stop, idle_timeout_s=idle_timeout_s,
            now_s=now_s))
        runs = -(-len(sets) // SETTLE_SETS_PER_RUN)
        started = time.perf_counter()
        if runs:
            prog_test_run(self._settle_prog_fd, bytes(64), runs)
        state = self._settle.get(ct.c_uint32(0))
        if state is None or state.next_set != sets.stop:
            raise DatapathError(f"sweep_flows: stopped at set "
                                f"{state.next_set if state else '?'} of {sets}")
        blocked = np.frombuffer(self._settle_blocked.read_array(words), dtype=np.uint64)
        bits = np.unpackbits(blocked.view(np.uint8), bitorder="little").astype(bool)
        census = self._census.get(ct.c_uint32(0))
        sweep = TableSweep(sets=len(sets), entries=state.entries, blocking=state.blocking,
                           expired=state.expired, busy=state.busy,
                           seconds=time.perf_counter() - started,
                           active=census.active if census else 0,
                           active_by_backend=self._active_by_backend())
        return sweep, bits[:self.sizes.ring_entries]

    def _reset_census(self, active_window_s: int) -> None:
        if not 0 <= active_window_s <= 0xFFFF:
            raise DatapathError(f"sweep_flows: active window {active_window_s} s is not "
                                "0..65535")
        n = self.sizes.max_backends
        self._flow_active.put_batch((ct.c_uint32 * n)(*range(n)), (ct.c_uint32 * n)())
        self._census.put(ct.c_uint32(0), structs.FlowCensus(active_window_s=active_window_s))

    def _active_by_backend(self) -> dict[int, int]:
        counts = np.frombuffer(self._flow_active.read_array(self.sizes.max_backends),
                               dtype=np.uint32)
        return {int(i): int(counts[i]) for i in np.flatnonzero(counts)}

    def close(self) -> None:
        """Releases this process's handles; pinned maps and attachments stay."""
        self._bpf.cleanup()

    def unpin(self) -> None:
        """Removes the pinned maps: the next Balancer starts empty."""
        if self.pin_dir is not None:
            remove_pins(self.pin_dir)


def remove_pins(pin_dir: Path) -> None:
    """Removes an instance's pinned maps, and the shared root once no instance is left."""
    if pin_dir.exists():
        shutil.rmtree(pin_dir)
        with contextlib.suppress(OSError):
            pin_dir.parent.rmdir()


class PinnedMaps:
    """A running balancer's pinned maps (maps.INSPECTED), opened by path without
    compiling anything: for inspection (tests, debugging); lbd is their only writer."""

    def __init__(self, pin_dir: Path, sizes: MapSizes | None = None):
        self.sizes = sizes or MapSizes()
        self.pin_dir = pin_dir
        opened = {name: self._open(name) for name in INSPECTED}
        self.addr_filter = opened["addr_filter"]
        self.vip_addrs = opened["vip_addrs"]
        self.vips = opened["vips"]  # the hash map, read only
        self.ring = opened["ring"]
        self.backends = opened["backends"]
        self.config = opened["config"]
        self.conns = FlowTable("conns", opened["conns"].fd, self.sizes.conn_set_bits,
                               datapath_clock(self.config))
        self._fds = [m.fd for m in opened.values()]

    def _open(self, name: str) -> BpfMap:
        path = self.pin_dir / name
        fd = libbcc().bpf_obj_get(str(path).encode())
        if fd < 0:
            raise_errno(f"opening pinned map {path}")
        spec = BY_NAME[name]
        return BpfMap(name, fd, spec.key, spec.value)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
