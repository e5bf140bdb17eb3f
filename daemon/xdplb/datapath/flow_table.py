"""The shared set-associative flow table and the sweep's report."""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap
from xdplb.datapath.errors import DatapathError

SETTLE_SETS_PER_RUN = 16  # bpf/balancer.c gets it as -DSETTLE_SETS_PER_RUN

# struct flow_set as numpy reads a page of them (tests tie it to structs.FlowSet).
# Ports are kept in network order, hence big-endian; the rest is host order.
WAY_KEY_DTYPE = np.dtype([("src", "V16"), ("sport", ">u2"), ("dport", ">u2"),
                          ("vip_id", "=u4")])
SET_DTYPE = np.dtype([("key", WAY_KEY_DTYPE, (structs.FLOW_WAYS,)),
                      ("backend", "=u4", (structs.FLOW_WAYS,)),
                      ("last_seen", "=u2", (structs.FLOW_WAYS,)), ("seq", "=u8")])


@dataclass(frozen=True)
class TableSweep:
    """What one sweep of the flow table saw (Balancer.sweep_flows)."""

    sets: int
    entries: int   # entries seen
    blocking: int  # entries naming another backend than their ring slot's
    expired: int   # entries removed as idle
    busy: int      # sets a datapath writer held throughout: the sweep proves nothing
    seconds: float
    active: int = 0  # entries seen within the sweep's active window
    active_by_backend: dict[int, int] = field(default_factory=dict)  # index -> active entries


WAY_DTYPE = np.dtype([("set", "=u4"), ("src", "V16"), ("sport", "=u2"), ("dport", "=u2"),
                      ("vip_id", "=u4"), ("backend", "=u4"), ("last_seen", "=u2")])


def datapath_clock(config: BpfMap) -> Callable[[], int]:
    """lb_config.now_s as the datapath sees it (0 before the first config)."""
    def now_s() -> int:
        value = config.get(ct.c_uint32(0))
        return value.now_s if value is not None else 0
    return now_s


class FlowTable:
    """The shared set-associative flow table (`conns`, bpf/balancer.c) as a
    FlowKey -> FlowState map, for the control plane and tests.

    A flow lives in set structs.flow_set_index(key, bits), in one of its
    structs.FLOW_WAYS ways. The datapath keeps last_seen modulo 2^16 s; it is
    read back as the latest lb_config.now_s with that remainder, exact for
    flows seen within the last 18 hours.

    A write rewrites a whole set in three updates that each change either
    seq or the content, never both (seq odd with the old content, the new
    content, seq even), so a datapath reader never accepts a torn set. It is
    a read-modify-write: a datapath write to the same set in between is lost
    (that flow takes the ring again), so writes are for tests and tools;
    lbd only reads.
    """

    _SEQ_TRIES = 1000

    def __init__(self, name: str, fd: int, set_bits: int, clock: Callable[[], int]):
        self.name, self.fd, self.set_bits = name, fd, set_bits
        self.sets = 1 << set_bits
        self.key_type, self.value_type = structs.FlowKey, structs.FlowState
        self._clock = clock
        self._sets: BpfMap = BpfMap(name, fd, ct.c_uint32, structs.FlowSet)

    def set_index(self, key: structs.FlowKey) -> int:
        return structs.flow_set_index(key, self.set_bits)

    def read_set(self, index: int) -> structs.FlowSet:
        value = self._sets.get(ct.c_uint32(index))
        if value is None:
            raise DatapathError(f"{self.name}: no set {index} (of {self.sets})")
        return value

    def _update(self, index: int, value: structs.FlowSet) -> None:
        self._sets.put(ct.c_uint32(index), value)

    def _stable_set(self, index: int) -> structs.FlowSet:
        for _ in range(self._SEQ_TRIES):
            current = self.read_set(index)
            if not current.seq & 1:
                return current
        raise DatapathError(f"{self.name}[{index}]: a writer held the set for "
                            f"{self._SEQ_TRIES} reads")

    def write_set(self, index: int, new: structs.FlowSet) -> None:
        """Replaces set `index`'s ways with new's (new.seq is ignored)."""
        current = self._stable_set(index)
        seq = current.seq
        current.seq = seq + 1
        self._update(index, current)
        content = structs.FlowSet.from_buffer_copy(new)
        content.seq = seq + 1
        self._update(index, content)
        content.seq = seq + 2
        self._update(index, content)

    def _seen_s(self, last_seen: int, now: int) -> int:
        return now - ((now - last_seen) & 0xFFFF)

    def _flows(self, flow_set: structs.FlowSet, now: int,
               ) -> Iterator[tuple[structs.FlowKey, structs.FlowState]]:
        for way in range(structs.FLOW_WAYS):
            backend = flow_set.backend[way]
            if backend:
                seen = self._seen_s(flow_set.last_seen[way], now)
                yield (structs.FlowKey.from_buffer_copy(flow_set.key[way]),
                       structs.FlowState(backend=backend, last_seen_s=seen))

    @staticmethod
    def _way_of(flow_set: structs.FlowSet, key: structs.FlowKey) -> int | None:
        raw = bytes(key)
        return next((w for w in range(structs.FLOW_WAYS)
                     if flow_set.backend[w] and bytes(flow_set.key[w]) == raw), None)

    def get(self, key: structs.FlowKey) -> structs.FlowState | None:
        flow_set = self._stable_set(self.set_index(key))
        way = self._way_of(flow_set, key)
        if way is None:
            return None
        seen = self._seen_s(flow_set.last_seen[way], self._clock())
        return structs.FlowState(backend=flow_set.backend[way], last_seen_s=seen)

    def put(self, key: structs.FlowKey, value: structs.FlowState) -> None:
        """Records a flow as the datapath does: in its own way, else an empty
        one, else in place of the flow seen longest ago."""
        if not value.backend:
            raise DatapathError(f"{self.name}: backend 0 marks an empty way")
        index = self.set_index(key)
        flow_set = self._stable_set(index)
        now = self._clock()
        way = self._way_of(flow_set, key)
        if way is None:
            way = next((w for w in range(structs.FLOW_WAYS) if not flow_set.backend[w]), None)
        if way is None:
            ages = [(now - flow_set.last_seen[w]) & 0xFFFF for w in range(structs.FLOW_WAYS)]
            way = ages.index(max(ages))
        flow_set.key[way] = key
        flow_set.backend[way] = value.backend
        flow_set.last_seen[way] = value.last_seen_s & 0xFFFF
        self.write_set(index, flow_set)

    def delete(self, key: structs.FlowKey) -> bool:
        index = self.set_index(key)
        flow_set = self._stable_set(index)
        way = self._way_of(flow_set, key)
        if way is None:
            return False
        flow_set.key[way] = structs.FlowKey()
        flow_set.backend[way] = 0
        flow_set.last_seen[way] = 0
        self.write_set(index, flow_set)
        return True

    def clear(self) -> None:
        """Empties every set, a batch per syscall: for a table with no traffic
        (a test's reset); under traffic, use delete."""
        chunk = min(self.sets, 4096)
        keys = (ct.c_uint32 * chunk)()
        empty = (structs.FlowSet * chunk)()
        for start in range(0, self.sets, chunk):
            for i in range(chunk):
                keys[i] = start + i
            self._sets.put_batch(keys, empty)

    def _scan(self, chunk: int) -> Iterator[list[tuple[structs.FlowKey, structs.FlowState]]]:
        """Every flow, `chunk` sets per syscall. A set a datapath writer is
        rewriting as it is copied may show the flow it is replacing."""
        now = self._clock()
        for flow_sets in self._sets.values_batch(max(1, min(chunk, self.sets))):
            flows = [flow for flow_set in flow_sets for flow in self._flows(flow_set, now)]
            if flows:
                yield flows

    def read_ways(self, start: int, count: int) -> np.ndarray:
        """The occupied ways of sets start..start+count-1, one batched read
        that locks nothing: fields set (its index), src, sport, dport, vip_id,
        backend, last_seen (now_s modulo 2^16), in set order. A set being rewritten as it is copied
        may show the flow it is replacing."""
        if not 0 <= start <= start + count <= self.sets:
            raise DatapathError(f"{self.name}: sets {start}..{start + count - 1} are not "
                                f"within 0..{self.sets - 1}")
        if count == 0:
            return np.zeros(0, WAY_DTYPE)
        raw = self._sets.read_range(start, count, chunk=4096)
        sets = np.frombuffer((ct.c_char * ct.sizeof(raw)).from_buffer(raw), SET_DTYPE)
        ways = np.zeros(count * structs.FLOW_WAYS, WAY_DTYPE)
        keys = sets["key"].reshape(-1)
        for name in ("src", "sport", "dport", "vip_id"):
            ways[name] = keys[name]
        ways["set"] = np.repeat(np.arange(start, start + count, dtype=np.uint32),
                                structs.FLOW_WAYS)
        ways["backend"] = sets["backend"].reshape(-1)
        ways["last_seen"] = sets["last_seen"].reshape(-1)
        return ways[ways["backend"] != 0]

    def keys(self) -> Iterator[structs.FlowKey]:
        for flows in self._scan(1024):
            for key, _ in flows:
                yield key

    def items(self) -> Iterator[tuple[structs.FlowKey, structs.FlowState]]:
        for flows in self._scan(1024):
            yield from flows

    def values_batch(self, chunk: int = 4096) -> Iterator[list[structs.FlowState]]:
        """Every flow's state (backend, last_seen_s), `chunk` sets per syscall."""
        for flows in self._scan(chunk):
            yield [state for _, state in flows]
