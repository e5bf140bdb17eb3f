"""The reconciler: the only writer of the balancer's maps.

It turns desired state plus runtime facts (health, effective weights) into
the realised datapath: the backend table, one Maglev ring per VIP in the
shared ring array, the VIP table, the address filter and the config. It
keeps a copy of what the maps hold, compares, and writes only differences,
in an order no packet can observe half-done:

* a new VIP's backends and ring are written before its VIP entry, and its
  address-filter bit, which switches it on, last;
* a removed VIP's entry goes first, then its ring is cleared;
* a backend entry is cleared, and its index freed, only once no ring refers
  to it; freed indexes are reused oldest-first, after every never-used one,
  so connection-table entries still naming a freed index have long expired.

The maps describe themselves (each backend entry names its VIP), so a
restarted daemon rebuilds every allocation from the pinned maps and a
reconcile against the persisted state writes nothing, or only what really
changed while it was down.

Ring slots carry an "unsettled" bit (bpf/xdplb_structs.h RING_UNSETTLED): a
slot given a different backend is written with it, in the same store, and
keeps it until settle() has swept the flow table and found no entry on that
slot naming another backend. Established packets on settled slots take the
ring's backend without reading the table. The proof needs the slot unchanged
from before the sweep began until its bit is cleared, so a sweep clears bits
only in VIPs whose ring was not written since quiet_s before the sweep began
(a packet's program run, which may record a backend it read from the ring
just before a change, lasts microseconds).
"""

from __future__ import annotations

import ctypes as ct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdplb import maglev
from xdplb import structs as s
from xdplb.reconciler.allocation import (
    IndexPool,
    RingSpace,
)
from xdplb.reconciler.plan import (
    PROTO_NUMBERS,
    DatapathSettings,
    Runtime,
    VipPlan,
    map_key,
    plan_vip,
    portless_flag,
    state_key,
    vip_flags,
)
from xdplb.state import DesiredState, MemberId, VipKey, VipSpec, is_ipv6

# --- the report -------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    writes: Counter = field(default_factory=Counter)  # map name -> entries written
    ring_positions: dict[str, int] = field(default_factory=dict)  # VIP -> positions written
    vips_added: list[str] = field(default_factory=list)
    vips_removed: list[str] = field(default_factory=list)
    vips_changed: list[str] = field(default_factory=list)
    modes: dict[str, str] = field(default_factory=dict)  # VIP -> plan mode
    duration_s: float = 0.0

    @property
    def total_writes(self) -> int:
        return sum(self.writes.values())

    def summary(self) -> str:
        if not self.total_writes:
            return f"nothing to change ({self.duration_s * 1000:.1f} ms)"
        parts = [f"{n} {name}" for name, n in sorted(self.writes.items()) if n]
        rings = ", ".join(f"{vip}: {n}" for vip, n in sorted(self.ring_positions.items()) if n)
        text = f"wrote {self.total_writes} map entries ({', '.join(parts)})"
        if rings:
            text += f"; ring positions {rings}"
        return text + f" in {self.duration_s * 1000:.1f} ms"


# --- the reconciler ---------------------------------------------------------------------


@dataclass
class SettleReport:
    """What one settle() did: the sweep's totals, then the slots it settled."""

    sweep: Any  # datapath.TableSweep
    vips_settled: int = 0       # VIPs whose slots the sweep could vouch for
    vips_skipped: int = 0       # VIPs whose ring changed too recently
    slots_settled: int = 0      # unsettled bits cleared
    slots_unsettled: int = 0    # left set, in every VIP, after this settle
    # Entries seen within the sweep's active window, per (VIP, backend address).
    active: dict[tuple[VipKey, str], int] = field(default_factory=dict)

    def summary(self) -> str:
        sw = self.sweep
        return (f"swept {sw.sets} sets ({sw.entries} flows, {sw.expired} expired, "
                f"{sw.blocking} on changed slots) in {sw.seconds * 1000:.0f} ms; settled "
                f"{self.slots_settled} slots in {self.vips_settled} VIPs "
                f"({self.vips_skipped} changed too recently); {self.slots_unsettled} "
                "slots unsettled")


@dataclass(frozen=True)
class SettleStart:
    """settle_begin()'s snapshot: each VIP's ring generation at the sweep's start."""

    generations: dict[VipKey, int]
    started: float


@dataclass
class _RealisedVip:
    vip_id: int
    offset: int
    size: int
    meta: bytes
    inputs: Any = None  # what its ring was last built from; None: compare positions
    generation: int = 0  # Reconciler.generation at its last ring or region change
    changed_at: float = field(default_factory=time.monotonic)  # after that change's writes
    changed_s: int = -1  # the datapath clock at that change; -1: not yet (just loaded)


class Reconciler:
    """Owns the balancer's maps; see the module docstring for the guarantees."""

    def __init__(self, balancer: Any):
        self.bal = balancer
        sizes = balancer.sizes
        self.vips: dict[VipKey, _RealisedVip] = {}
        self.members: dict[MemberId, int] = {}
        self.plans: dict[VipKey, VipPlan] = {}
        self.fingerprints: dict[VipKey, str] = {}  # of each ring as last built
        self.generation = 0  # counts ring and region changes of every VIP
        self._load(sizes)

    # -- reading what the maps hold (a restart reuses pinned maps) --

    def _load(self, sizes: Any) -> None:
        bal = self.bal
        self.ring = np.frombuffer(bal.ring.read_array(sizes.ring_entries),
                                  dtype=np.uint32).copy()
        self.backend_table = [bytes(b) for b in bal.backends.read_array(sizes.max_backends)]
        self.filter_words = list(bal.addr_filter.read_array(s.ADDR_FILTER_WORDS))
        self.addr_flags = {str(k.address()): v.flags for k, v in bal.vip_addrs.items()}
        config = bal.config.get(ct.c_uint32(0))
        self.config = bytes(config) if config is not None else b""
        self._stale_keys: list[s.VipKey] = []
        for key, meta in bal.vips.items():
            vip = state_key(key)
            if vip is None or vip in self.vips:
                self._stale_keys.append(key)
                continue
            self.vips[vip] = _RealisedVip(meta.vip_id, meta.ring_offset, meta.ring_size,
                                          bytes(meta))
        by_id = {r.vip_id: k for k, r in self.vips.items()}
        for index, raw in enumerate(self.backend_table):
            entry = s.Backend.from_buffer_copy(raw)
            vip = by_id.get(entry.vip_id)
            member = (vip, str(entry.addr.address())) if vip and index else None
            if member and member not in self.members:
                self.members[member] = index
        self.vip_rings = [bytes(v) for v in bal.vip_rings.read_array(sizes.max_vips)]
        self.vip_ids = IndexPool(sizes.max_vips, (r.vip_id for r in self.vips.values()))
        self.indexes = IndexPool(sizes.max_backends, (
            i for i, raw in enumerate(self.backend_table) if any(raw)))
        self.space = RingSpace(sizes.ring_entries,
                               ((r.offset, r.size) for r in self.vips.values()))
        self._scrub_pending = True
        self._allocated = ReconcileReport()  # writes of allocate(), until the next reconcile

    def recovered_availability(self) -> dict[MemberId, bool]:
        """Availability marks found in the maps: a restarted daemon's first health view."""
        return {m: bool(s.Backend.from_buffer_copy(self.backend_table[i]).flags
                        & s.BACKEND_F_AVAILABLE) for m, i in self.members.items()}

    # -- the writes --

    def reconcile(self, desired: DesiredState, runtime: Runtime | None = None,
                  settings: DatapathSettings | None = None) -> ReconcileReport:
        started = time.perf_counter()
        runtime = runtime or Runtime()
        report, self._allocated = self._allocated, ReconcileReport()
        self._check_ring_space(desired)  # refuses before writing anything
        if settings is not None:
            self._write_config(settings, report)
        self._remove_stale_keys(report)
        self._write_quic_servers(desired, report, adding=False)
        # Removed VIPs go first: their entries, then their rings, freeing the
        # space (and ids) that VIPs added in the same change may need.
        for key in sorted(set(self.vips) - set(desired.vips)):
            self._remove_vip(key, report)
        self._scrub_free_ring(report)
        plans = {key: plan_vip(vip, runtime) for key, vip in desired.vips.items()}
        self._allocate(desired, report)
        self._write_backends(desired, plans, report)
        self._write_quic_servers(desired, report, adding=True)
        self._write_addr_flags(desired, report, final=False)
        for key in sorted(desired.vips):
            self._realise_vip(desired.vips[key], plans[key], report)
        self._write_addr_flags(desired, report, final=True)
        self._write_filter(desired, report)
        self._free_members(desired, report)
        self.plans = plans
        report.modes = {str(k): p.mode for k, p in plans.items()}
        report.duration_s = time.perf_counter() - started
        return report

    def allocate(self, desired: DesiredState) -> None:
        """Gives new VIPs and backends their ids and indexes ahead of the reconcile
        that realises them, for what must know a backend's index first (the marks
        of checks through the VIP). Writes only their counters' reset, which the
        next reconcile reports as its own."""
        self._allocate(desired, self._allocated)

    def _check_ring_space(self, desired: DesiredState) -> None:
        """Plays the region allocations of this reconcile on a copy of the free list."""
        space = RingSpace(self.space.size)
        space.free = list(self.space.free)
        for key in set(self.vips) - set(desired.vips):
            realised = self.vips[key]
            if realised.offset >= 0:
                space.give_back(realised.offset, realised.size)
        for key in sorted(desired.vips):
            realised, size = self.vips.get(key), desired.vips[key].ring_size
            if realised is None or realised.offset < 0:
                space.take(size)
            elif realised.size != size:  # make before break: both regions at once
                space.take(size)
                space.give_back(realised.offset, realised.size)

    def _scrub_free_ring(self, report: ReconcileReport) -> None:
        """Zeroes ring entries no region owns (left by a crash or older maps), once
        after loading: a new region then starts from zeros, as its diff assumes."""
        if not self._scrub_pending:
            return
        for offset, length in self.space.free:
            self._write_ring(offset, np.zeros(length, dtype=np.uint32), report, "(free)")
        report.ring_positions.pop("(free)", None)
        self._scrub_pending = False

    def clock(self) -> int:
        """The datapath's clock (lb_config.now_s): what flows' last_seen_s compare to."""
        return s.LbConfig.from_buffer_copy(self.config).now_s if self.config else 0

    def tick(self, now_s: int) -> None:
        """Advances the datapath's clock (flow last-seen stamps), once a second."""
        if not self.config:
            return
        cfg = s.LbConfig.from_buffer_copy(self.config)
        if cfg.now_s != now_s:
            cfg.now_s = now_s
            self.bal.write_config(cfg)
            self.config = bytes(cfg)

    def _write_config(self, settings: DatapathSettings, report: ReconcileReport) -> None:
        now = (s.LbConfig.from_buffer_copy(self.config).now_s if self.config
               else int(time.monotonic()))
        cfg = settings.to_lb_config(now)
        if bytes(cfg) != self.config:
            self.bal.write_config(cfg)
            self.config = bytes(cfg)
            report.writes["config"] += 1

    def _allocate(self, desired: DesiredState, report: ReconcileReport) -> None:
        for key in sorted(desired.vips):
            if key not in self.vips:
                vip_id = self.vip_ids.take()
                self.bal.vip_stats.clear(vip_id)
                report.writes["vip_stats"] += 1
                self.vips[key] = _RealisedVip(vip_id, -1, 0, b"")
            for address in desired.vips[key].backends:
                if (key, address) not in self.members:
                    index = self.indexes.take()
                    self.bal.backend_stats.clear(index)
                    report.writes["backend_stats"] += 1
                    self.members[(key, address)] = index

    def _put_backend(self, index: int, entry: s.Backend, report: ReconcileReport) -> None:
        raw = bytes(entry)
        if self.backend_table[index] != raw:
            self.bal.backends.put(ct.c_uint32(index), entry)
            self.backend_table[index] = raw
            report.writes["backends"] += 1

    def _write_backends(self, desired: DesiredState, plans: Mapping[VipKey, VipPlan],
                        report: ReconcileReport) -> None:
        for key, vip in desired.vips.items():
            vip_id = self.vips[key].vip_id
            for address in vip.backends:
                flags = ((s.BACKEND_F_IPV6 if is_ipv6(address) else 0)
                         | (s.BACKEND_F_AVAILABLE if plans[key].available[address] else 0))
                entry = s.Backend(addr=s.Addr16.of(address), flags=flags, vip_id=vip_id)
                self._put_backend(self.members[(key, address)], entry, report)

    def _write_quic_servers(self, desired: DesiredState, report: ReconcileReport, *,
                            adding: bool) -> None:
        """A server ID names its backend entry once the entry exists (adding, after
        _write_backends) and stops naming it before the entry or its VIP id is
        freed (first, before anything is removed): no packet is ever routed to an
        entry that another backend or VIP may be given."""
        table = self.bal.quic_servers
        wanted: dict[int, tuple[int, int]] = {}
        for key, vip in desired.vips.items():
            if vip.quic is None or (adding is False and key not in self.vips):
                continue
            for address, backend in vip.backends.items():
                member = self.members.get((key, address))
                if member is not None and backend.server_id:
                    wanted[backend.server_id] = (self.vips[key].vip_id, member)
        for server_id, entry in table.in_use().items():
            if wanted.get(server_id) != entry:
                table.clear(server_id)
                report.writes["quic_servers"] += 1
        if adding:
            for server_id, (vip_id, index) in sorted(wanted.items()):
                if table.get(server_id) != (vip_id, index):
                    table.put(server_id, vip_id, index)
                    report.writes["quic_servers"] += 1

    def _ring_values(self, vip: VipSpec, plan: VipPlan, offset: int) -> np.ndarray:
        """The region's new entries: backend indexes, with RING_UNSETTLED on every
        slot whose backend changes, and kept where it was set (never on an empty
        slot, which no packet takes as settled)."""
        ring = maglev.build_ring(plan.ring_weights, vip.ring_size)
        self.fingerprints[vip.key] = ring.fingerprint()
        indexes = np.array([self.members[(vip.key, a)] for a in ring.order] + [0],
                           dtype=np.uint32)
        backends = indexes[ring.table]  # slot -1 (no backend) picks the trailing 0
        current = self.ring[offset:offset + len(backends)]
        unsettled = (((current & s.RING_UNSETTLED) != 0)
                     | ((current & s.RING_BACKEND_MASK) != backends)) & (backends != 0)
        return np.where(unsettled, backends | s.RING_UNSETTLED, backends).astype(np.uint32)

    def _write_ring(self, offset: int, values: np.ndarray, report: ReconcileReport,
                    vip: str) -> int:
        current = self.ring[offset:offset + len(values)]
        positions = np.flatnonzero(current != values)
        if len(positions):
            self.bal.write_ring((positions + offset).tolist(), values[positions].tolist())
            current[positions] = values[positions]
            report.writes["ring"] += len(positions)
        report.ring_positions[vip] = report.ring_positions.get(vip, 0) + len(positions)
        return len(positions)

    def _realise_vip(self, vip: VipSpec, plan: VipPlan, report: ReconcileReport) -> None:
        realised = self.vips[vip.key]
        inputs = (vip.ring_size, tuple(sorted(plan.ring_weights.items())),
                  tuple(self.members[(vip.key, a)] for a in sorted(plan.ring_weights)))
        new = realised.offset < 0
        resized = not new and realised.size != vip.ring_size
        old_region = (realised.offset, realised.size)
        old_meta = s.VipMeta.from_buffer_copy(realised.meta) if realised.meta else None
        if new or resized:
            realised.offset, realised.size = self.space.take(vip.ring_size), vip.ring_size
            realised.inputs = None
        meta = s.VipMeta(vip_id=realised.vip_id, ring_offset=realised.offset,
                         ring_size=realised.size, flags=vip_flags(vip))
        # A new hash mode sends every flow to another slot: none stays settled,
        # and the bits must be set before the VIP entry switches the hash.
        rehashed = old_meta is not None and bool(
            (old_meta.flags ^ meta.flags) & s.VIP_F_HASH_SRC_ONLY)
        values = None
        if realised.inputs != inputs or rehashed:
            values = self._ring_values(vip, plan, realised.offset)
            if rehashed:
                values = np.where(values != 0, values | s.RING_UNSETTLED, 0).astype(np.uint32)
            current = self.ring[realised.offset:realised.offset + len(values)]
            if np.array_equal(current, values):
                values = None
        meta_changed = bytes(meta) != realised.meta
        if realised.changed_s < 0 or values is not None or meta_changed:
            # Before any write: a sweep meanwhile must neither vouch for this VIP
            # nor count its entries idle from before the change.
            self._ring_changing(realised)
            if old_meta is not None:
                self._put_vip_ring(realised.vip_id, vip, old_meta, realised.changed_s, report)
        if values is not None:
            if new or resized:  # no packet reads the region yet
                self._write_ring(realised.offset, values, report, str(vip.key))
            else:
                self._write_read_region(realised.offset, values, report, str(vip.key))
        realised.inputs = inputs
        self._put_vip_ring(realised.vip_id, vip, meta, realised.changed_s, report)
        if meta_changed:
            self.bal.vips.put(map_key(vip.key), meta)
            realised.meta = bytes(meta)
            report.writes["vips"] += 1
            if not new:
                report.vips_changed.append(str(vip.key))
        if values is not None or meta_changed:
            realised.changed_at = time.monotonic()  # the quiet period starts after the writes
        if new:
            report.vips_added.append(str(vip.key))
        if resized:
            self._clear_region(*old_region, report, str(vip.key))

    def _ring_changing(self, realised: _RealisedVip) -> None:
        self.generation += 1
        realised.generation = self.generation
        realised.changed_s = self.clock()
        realised.changed_at = time.monotonic()

    def _write_read_region(self, offset: int, values: np.ndarray, report: ReconcileReport,
                           vip: str) -> None:
        """Rewrites ring entries packets may be reading so that none reads a
        half-written entry as settled (a 4-byte map write need not be one store):
        a slot whose backend changes is first marked unsettled, a store of its top
        byte alone; its new backend follows with the bit still set, the low bytes
        alone; an emptied slot then loses the bit, its top byte alone. The report
        counts each position once."""
        current = self.ring[offset:offset + len(values)].copy()
        moving = (current & s.RING_BACKEND_MASK) != (values & s.RING_BACKEND_MASK)
        changed = int(np.count_nonzero(current != values))
        scratch = ReconcileReport()
        for stage in (np.where(moving, current | s.RING_UNSETTLED, current),
                      np.where(moving, values | s.RING_UNSETTLED, current), values):
            self._write_ring(offset, stage.astype(np.uint32), scratch, vip)
        report.writes["ring"] += changed
        report.ring_positions[vip] = report.ring_positions.get(vip, 0) + changed

    def _put_vip_ring(self, vip_id: int, vip: VipSpec | None, meta: s.VipMeta | None,
                      changed_s: int, report: ReconcileReport) -> None:
        """What the table sweep needs to find a flow's ring slot from its vip_id."""
        entry = s.VipRing()
        if vip is not None and meta is not None:
            entry = s.VipRing(addr=s.Addr16.of(vip.key.address), ring_offset=meta.ring_offset,
                              ring_size=meta.ring_size, flags=meta.flags,
                              proto=PROTO_NUMBERS[vip.key.protocol],
                              ipv6=int(is_ipv6(vip.key.address)), changed_s=max(changed_s, 0))
        if bytes(entry) != self.vip_rings[vip_id]:
            self.bal.vip_rings.put(ct.c_uint32(vip_id), entry)
            self.vip_rings[vip_id] = bytes(entry)
            report.writes["vip_rings"] += 1

    def _clear_region(self, offset: int, size: int, report: ReconcileReport, vip: str) -> None:
        self._write_ring(offset, np.zeros(size, dtype=np.uint32), report, vip)
        self.space.give_back(offset, size)

    def _remove_vip(self, key: VipKey, report: ReconcileReport) -> None:
        realised = self.vips.pop(key)
        self.fingerprints.pop(key, None)
        self.bal.vips.delete(map_key(key))
        report.writes["vips"] += 1
        report.vips_removed.append(str(key))
        self._clear_region(realised.offset, realised.size, report, str(key))
        self._put_vip_ring(realised.vip_id, None, None, 0, report)
        self.vip_ids.give_back(realised.vip_id)

    def _remove_stale_keys(self, report: ReconcileReport) -> None:
        for key in self._stale_keys:
            self.bal.vips.delete(key)
            report.writes["vips"] += 1
        self._stale_keys = []

    def _write_addr_flags(self, desired: DesiredState, report: ReconcileReport, *,
                          final: bool) -> None:
        """Before the VIP entries change (final=False) flags are only added, since
        a VIP being removed may still need one; afterwards they are made exact."""
        wanted: dict[str, int] = {}
        for key in desired.vips:
            wanted[key.address] = wanted.get(key.address, 0) | portless_flag(key)
        for address in sorted(set(self.addr_flags) | set(wanted)):
            if address not in wanted:
                if final:
                    self.bal.vip_addrs.delete(s.Addr16.of(address))
                    del self.addr_flags[address]
                    report.writes["vip_addrs"] += 1
                continue
            target = wanted[address] | (0 if final else self.addr_flags.get(address, 0))
            if self.addr_flags.get(address) != target:
                self.bal.vip_addrs.put(s.Addr16.of(address), s.VipAddrMeta(target))
                self.addr_flags[address] = target
                report.writes["vip_addrs"] += 1

    def _write_filter(self, desired: DesiredState, report: ReconcileReport) -> None:
        written = self.bal.write_addr_filter((key.address for key in desired.vips),
                                             self.filter_words)
        if written:
            report.writes["addr_filter"] += written

    def _free_members(self, desired: DesiredState, report: ReconcileReport) -> None:
        wanted = {(k, a) for k, v in desired.vips.items() for a in v.backends}
        for member in [m for m in self.members if m not in wanted]:
            index = self.members.pop(member)
            self._put_backend(index, s.Backend(), report)
            self.indexes.give_back(index)
        owned = set(self.members.values())
        for index, raw in enumerate(self.backend_table):
            if index and any(raw) and index not in owned:  # left by a crash: no owner
                self._put_backend(index, s.Backend(), report)
                self.indexes.give_back(index)

    # -- reading back, for status and tests --

    def member_index(self, key: VipKey, address: str) -> int:
        return self.members[(key, address)]

    def vip_id(self, key: VipKey) -> int:
        realised = self.vips.get(key)
        return realised.vip_id if realised else 0

    def ring_positions(self, key: VipKey) -> dict[str, int]:
        """Positions each backend holds in the VIP's ring as written."""
        realised = self.vips.get(key)
        if realised is None or realised.offset < 0:
            return {}
        region = self.ring[realised.offset:realised.offset + realised.size]
        counts = np.bincount(region & s.RING_BACKEND_MASK, minlength=self.bal.sizes.max_backends)
        return {address: int(counts[index]) for (vip, address), index in self.members.items()
                if vip == key}

    def ring_entries_used(self) -> int:
        return sum(r.size for r in self.vips.values() if r.offset >= 0)

    def unsettled_slots(self, key: VipKey) -> int:
        """The VIP's ring slots whose flows still read the flow table."""
        realised = self.vips.get(key)
        if realised is None or realised.offset < 0:
            return 0
        region = self.ring[realised.offset:realised.offset + realised.size]
        return int(np.count_nonzero(((region & s.RING_UNSETTLED) != 0)
                                    & ((region & s.RING_BACKEND_MASK) != 0)))

    # -- settling ring slots (module docstring) --

    def settle_begin(self, quiet_s: float = 1.0) -> SettleStart:
        """Before a sweep: the VIPs it may vouch for, those whose ring has not
        changed for quiet_s."""
        now = time.monotonic()
        self.bal.load_sweeper()
        return SettleStart({key: r.generation for key, r in self.vips.items()
                            if r.offset >= 0 and now - r.changed_at >= quiet_s}, now)

    def settle_finish(self, start: SettleStart, sweep: Any, blocked: np.ndarray) -> SettleReport:
        """After a sweep: clears the unsettled bit of every slot no entry held, in
        each VIP unchanged since start. A sweep that met a busy set proves nothing."""
        report = SettleReport(sweep, active={
            member: sweep.active_by_backend.get(index, 0)
            for member, index in self.members.items()})
        writes = ReconcileReport()
        for key, realised in self.vips.items():
            if sweep.busy or start.generations.get(key) != realised.generation:
                report.vips_skipped += 1
                continue
            lo, hi = realised.offset, realised.offset + realised.size
            region = self.ring[lo:hi]
            # Only where the map holds what this copy says: a write that failed
            # half-way may have left other backends there.
            held = np.frombuffer(self.bal.ring.read_range(lo, hi - lo), dtype=np.uint32)
            settle = (((region & s.RING_UNSETTLED) != 0) & ((region & s.RING_BACKEND_MASK) != 0)
                      & ~blocked[lo:hi] & (held == region))
            if settle.any():
                report.slots_settled += self._write_ring(
                    lo, np.where(settle, region & s.RING_BACKEND_MASK, region).astype(np.uint32),
                    writes, str(key))
            report.vips_settled += 1
        report.slots_unsettled = sum(self.unsettled_slots(k) for k in self.vips)
        return report

    def settle(self, idle_timeout_s: int = 0, quiet_s: float = 1.0,
               active_window_s: int = 60) -> SettleReport:
        """settle_begin, the sweep and settle_finish in one call (lbd runs the
        sweep off its event loop instead)."""
        start = self.settle_begin(quiet_s)
        sweep, blocked = self.bal.sweep_flows(self.clock(), idle_timeout_s,
                                              active_window_s=active_window_s)
        return self.settle_finish(start, sweep, blocked)
