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
import ipaddress
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdplb import maglev
from xdplb import structs as s
from xdplb.state import DesiredState, VipKey, VipSpec, is_ipv6

MemberId = tuple[VipKey, str]  # (VIP, backend address): one backend entry each
PROTO_NUMBERS = {"tcp": s.IPPROTO_TCP, "udp": s.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


class ReconcileError(RuntimeError):
    """The maps cannot be made to match the desired state (e.g. ring space fragmented)."""


@dataclass(frozen=True)
class Runtime:
    """Facts that are not the operator's to set: health and load-derived weights."""

    healthy: Mapping[MemberId, bool] = field(default_factory=dict)  # missing: healthy
    weights: Mapping[MemberId, int] = field(default_factory=dict)  # missing: configured


@dataclass(frozen=True)
class DatapathSettings:
    """The config map's content, apart from the clock."""

    nexthop_mac: str
    mtu: int = 1500
    gue_port: int = 6080
    encap_source_v4: str = "172.16.0.0/16"  # outer sources: host bits from the flow hash
    encap_source_v6: str = "fd00:ec::/112"
    max_new_flows_per_cpu: int = 0  # 0: record every new flow
    settled_refresh_s: int = 8  # a power of two; 0: every packet reads the flow table

    def __post_init__(self) -> None:
        self.to_lb_config(0)  # every field checked once, where it is converted

    def to_lb_config(self, now_s: int) -> s.LbConfig:
        if not 576 <= self.mtu <= 9216:
            raise ValueError(f"mtu {self.mtu}: must be 576..9216")
        if not 1 <= self.gue_port <= 65535:
            raise ValueError(f"gue_port {self.gue_port}: must be 1..65535")
        if not 0 <= self.max_new_flows_per_cpu < 2**32:
            raise ValueError(f"max_new_flows_per_cpu {self.max_new_flows_per_cpu}: out of range")
        refresh = self.settled_refresh_s
        if refresh and not (2 <= refresh <= 1024 and refresh & (refresh - 1) == 0):
            raise ValueError(f"settled_refresh_s {refresh}: must be 0 or a power of two "
                             "2..1024")
        mac = self.nexthop_mac.replace(":", "")
        if len(mac) != 12 or any(c not in "0123456789abcdefABCDEF" for c in mac):
            raise ValueError(f"nexthop_mac {self.nexthop_mac!r}: not a MAC address")
        cfg = s.LbConfig(mtu=self.mtu, gue_port=s.port_be(self.gue_port),
                         flags=s.CONFIG_F_READY, now_s=now_s,
                         max_new_flows_per_cpu=self.max_new_flows_per_cpu,
                         settled_refresh_s=refresh)
        cfg.nexthop_mac[:] = bytes.fromhex(mac)
        net4 = ipaddress.IPv4Network(self.encap_source_v4)
        cfg.encap_src4 = s.be_u32(net4.network_address.packed)
        cfg.encap_src4_hostmask = s.be_u32(net4.hostmask.packed)
        net6 = ipaddress.IPv6Network(self.encap_source_v6)
        if net6.prefixlen < 96:
            raise ValueError(f"encap_source_v6 {net6}: the prefix must be /96 or longer")
        cfg.encap_src6 = s.Addr16.of(net6.network_address)
        cfg.encap_src6_hostmask = s.be_u32(net6.hostmask.packed[12:])
        return cfg


# --- what each VIP should look like -------------------------------------------------


@dataclass(frozen=True)
class VipPlan:
    """The realisation of one VIP: who is in its ring, who is marked available."""

    ring_weights: dict[str, int]
    available: dict[str, bool]
    mode: str  # normal | panic | fail-open | fail-closed
    healthy: int
    serving: int  # backends with a non-zero weight


def plan_vip(vip: VipSpec, runtime: Runtime) -> VipPlan:
    """Health and panic rules applied to one VIP: a pure function."""
    weights, healthy = {}, {}
    for address, backend in vip.backends.items():
        member = (vip.key, address)
        weights[address] = 0 if backend.drained else runtime.weights.get(member, backend.weight)
        healthy[address] = runtime.healthy.get(member, True)
    serving = [a for a, w in weights.items() if w > 0]
    up = [a for a in serving if healthy[a]]
    mode = "normal"
    if serving and not up:
        mode = "fail-open" if vip.when_none_healthy == "all" else "fail-closed"
    elif serving and vip.panic_threshold and len(up) / len(serving) < vip.panic_threshold:
        mode = "panic"
    everyone = mode in ("panic", "fail-open")
    ring = {a: (w if everyone or healthy[a] else 0) for a, w in weights.items()}
    available = {a: everyone or healthy[a] for a in weights}
    return VipPlan(ring, available, mode, len(up), len(serving))


def vip_flags(vip: VipSpec) -> int:
    return ((s.VIP_F_HASH_SRC_ONLY if vip.hash == "source" else 0)
            | (s.VIP_F_GUE if vip.encap == "gue" else 0))


def portless_flag(key: VipKey) -> int:
    if key.port:
        return 0
    return s.VIP_ADDR_F_PORTLESS_TCP if key.protocol == "tcp" else s.VIP_ADDR_F_PORTLESS_UDP


def map_key(key: VipKey) -> s.VipKey:
    return s.VipKey(addr=s.Addr16.of(key.address), port=s.port_be(key.port),
                    proto=PROTO_NUMBERS[key.protocol])


def state_key(key: s.VipKey) -> VipKey | None:
    """The VIP a map key names, None for an entry no desired state could produce."""
    try:
        return VipKey(str(key.addr.address()), s.port_be(key.port), PROTO_NAMES[key.proto])
    except (KeyError, ValueError):
        return None


# --- allocation ----------------------------------------------------------------------


class IndexPool:
    """Indexes 1..capacity-1: never-used ones first, then freed ones oldest-first."""

    def __init__(self, capacity: int, used: Iterable[int] = ()):
        used = set(used)
        self.capacity = capacity
        self.next_fresh = max(used, default=0) + 1
        self.freed: deque[int] = deque(i for i in range(1, self.next_fresh) if i not in used)

    def take(self) -> int:
        if self.next_fresh < self.capacity:
            self.next_fresh += 1
            return self.next_fresh - 1
        if self.freed:
            return self.freed.popleft()
        raise ReconcileError(f"all {self.capacity - 1} indexes are in use")

    def give_back(self, index: int) -> None:
        self.freed.append(index)


class RingSpace:
    """First-fit allocation of contiguous regions of the shared ring array."""

    def __init__(self, size: int, used: Iterable[tuple[int, int]] = ()):
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted
        for offset, length in sorted(used):
            self._carve(offset, length)

    def _carve(self, offset: int, length: int) -> None:
        for i, (start, run) in enumerate(self.free):
            if start <= offset and offset + length <= start + run:
                pieces = [(start, offset - start), (offset + length, start + run - offset - length)]
                self.free[i:i + 1] = [p for p in pieces if p[1] > 0]
                return
        raise ReconcileError(f"ring region {offset}+{length} overlaps another VIP's")

    def take(self, length: int) -> int:
        for start, run in self.free:
            if run >= length:
                self._carve(start, length)
                return start
        largest = max((run for _, run in self.free), default=0)
        raise ReconcileError(f"no {length} contiguous ring entries free (largest free run "
                             f"{largest} of {self.size}): the ring array is fragmented or full")

    def give_back(self, offset: int, length: int) -> None:
        self.free.append((offset, length))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for start, run in self.free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + run)
            else:
                merged.append((start, run))
        self.free = merged


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
        # Removed VIPs go first: their entries, then their rings, freeing the
        # space (and ids) that VIPs added in the same change may need.
        for key in sorted(set(self.vips) - set(desired.vips)):
            self._remove_vip(key, report)
        self._scrub_free_ring(report)
        plans = {key: plan_vip(vip, runtime) for key, vip in desired.vips.items()}
        self._allocate(desired, report)
        self._write_backends(desired, plans, report)
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
        report = SettleReport(sweep)
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

    def settle(self, idle_timeout_s: int = 0, quiet_s: float = 1.0) -> SettleReport:
        """settle_begin, the sweep and settle_finish in one call (lbd runs the
        sweep off its event loop instead)."""
        start = self.settle_begin(quiet_s)
        sweep, blocked = self.bal.sweep_flows(self.clock(), idle_timeout_s)
        return self.settle_finish(start, sweep, blocked)


def read_view(balancer: Any) -> dict[str, Any]:
    """What the maps say, in terms free of indexes and offsets: two map sets
    realising the same state read the same, whatever their history."""
    sizes = balancer.sizes
    ring = (np.frombuffer(balancer.ring.read_array(sizes.ring_entries), dtype=np.uint32)
            & s.RING_BACKEND_MASK)  # whether a slot has settled depends on history
    table = balancer.backends.read_array(sizes.max_backends)
    backends = {i: table[i] for i in range(1, sizes.max_backends)}
    vips: dict[str, Any] = {}
    vip_ids = set()
    for key, meta in balancer.vips.items():
        vip_ids.add(meta.vip_id)
        name = str(state_key(key))
        region = ring[meta.ring_offset:meta.ring_offset + meta.ring_size]
        addresses = {0: None} | {i: str(b.addr.address()) for i, b in backends.items()
                                 if b.vip_id == meta.vip_id and any(bytes(b))}
        vips[name] = {
            "flags": meta.flags,
            "ring": [addresses.get(int(i), f"?{int(i)}") for i in region],
            "backends": {str(b.addr.address()): b.flags for b in backends.values()
                         if b.vip_id == meta.vip_id and any(bytes(b))},
        }
    return {
        "vips": vips,
        "vip_addrs": {str(k.address()): v.flags for k, v in balancer.vip_addrs.items()},
        "addr_filter": list(balancer.addr_filter.read_array(s.ADDR_FILTER_WORDS)),
        "ring_entries_nonzero": int(np.count_nonzero(ring)),
        "orphan_backends": sorted(i for i, b in backends.items()
                                  if any(bytes(b)) and b.vip_id not in vip_ids),
    }
