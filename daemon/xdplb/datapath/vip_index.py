"""The VIP table: the `vips` hash map and the inline-probed `vip_index` array
that the datapath reads in front of it."""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Iterator

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap


class VipTable:
    """The `vips` hash map, the source of truth, with the `vip_index` array
    that the datapath probes inline in front of it (bpf/balancer.c
    vip_index_find). Reads go to the hash map; writes go to both.

    Index layout: open addressing, a key's chain is the VIP_INDEX_PROBES
    slots from its home slot (structs.vip_index_home). Invariants the
    datapath relies on, kept by this class (the only writer):
    - a VIP of the hash map is LIVE in its chain before any EMPTY slot of
      the chain, or not in the index at all, and then every slot of its chain
      is LIVE with other keys (an "overflow": the probe is exhausted and the
      datapath asks the hash map);
    - a key is LIVE in at most one slot.
    Deleting leaves a TOMBSTONE (probes go on past it); overflowed keys move
    into freed slots of their chain, and a tombstone becomes EMPTY again as
    soon as no LIVE key's chain passes through it before reaching the key.

    Update protocol, per slot, so a packet never uses a torn entry: three
    whole-value map updates, (1) seq odd with the old content, (2) the new
    content with seq still odd, (3) the new content with seq even. Each one
    changes either seq or the content, never both. The datapath reads seq,
    the content, seq again and uses the content only if the two reads are
    equal and even; otherwise it asks the hash map. Content read while (2)
    is being copied is therefore always bracketed by an odd seq or by two
    different seqs (seq only grows, by 2 per rewrite). A torn read of seq
    itself changes nothing: (1) only sets bit 0, so any mix of its old and
    new bytes is one of the two, and while (1) and (3) are copied the content
    is not changing. The order against the hash map: a put writes the hash
    map first and then the index; a delete empties the index slot first and
    then deletes from the hash map. So a packet sees the old or the new VIP
    meta, whichever path answers it. If the writer dies between the updates
    (kill -9), a slot is left with an odd seq: packets use the hash map
    until the next VipTable (a restarted daemon) repairs it on start.
    """

    def __init__(self, hash_map: BpfMap, index: BpfMap, bits: int):
        self.hash, self.index = hash_map, index
        self.name, self.fd = hash_map.name, hash_map.fd
        self.key_type, self.value_type = hash_map.key_type, hash_map.value_type
        self.bits, self.slots = bits, 1 << bits
        self._lock = threading.Lock()
        self._mirror: list[structs.VipIndexSlot] = [
            structs.VipIndexSlot.from_buffer_copy(v) for v in index.read_array(self.slots)]
        self._overflow: dict[bytes, structs.VipKey] = {}
        with self._lock:
            self._repair()

    # -- the hash map's API, as BpfMap has it --

    def get(self, key: structs.VipKey) -> structs.VipMeta | None:
        return self.hash.get(key)

    def keys(self) -> Iterator[structs.VipKey]:
        return self.hash.keys()

    def items(self) -> Iterator[tuple[structs.VipKey, structs.VipMeta]]:
        return self.hash.items()

    def put(self, key: structs.VipKey, meta: structs.VipMeta) -> None:
        with self._lock:
            self.hash.put(key, meta)
            self._index_put(key, meta)

    def delete(self, key: structs.VipKey) -> bool:
        with self._lock:
            self._index_remove(key)
            return self.hash.delete(key)

    # -- the index --

    def chain(self, key: structs.VipKey) -> list[int]:
        """The slots a lookup of `key` probes, in order."""
        home = structs.vip_index_home(key, self.bits)
        return [(home + i) & (self.slots - 1) for i in range(structs.VIP_INDEX_PROBES)]

    def slot(self, index: int) -> structs.VipIndexSlot:
        """What this writer last wrote to a slot (tests compare it with the map)."""
        return structs.VipIndexSlot.from_buffer_copy(self._mirror[index])

    def overflowed(self) -> list[structs.VipKey]:
        """VIPs only the hash map holds: their chains were full."""
        return list(self._overflow.values())

    def _live_at(self, key: structs.VipKey) -> int | None:
        raw = bytes(key)
        for i in self.chain(key):
            slot = self._mirror[i]
            if slot.state == structs.VIP_SLOT_LIVE and bytes(slot.key) == raw:
                return i
        return None

    def _write(self, i: int, state: int, key: structs.VipKey | None = None,
               meta: structs.VipMeta | None = None) -> None:
        """Rewrites slot i with the three-update protocol (class docstring)."""
        current = self._mirror[i]
        slot = structs.VipIndexSlot.from_buffer_copy(current)
        if not slot.seq & 1:  # (1): seq odd, the old content
            slot.seq = (slot.seq + 1) & 0xFFFFFFFF
            self.index.put(ct.c_uint32(i), slot)
        odd = slot.seq
        slot = structs.VipIndexSlot(seq=odd, state=state)  # (2): the new content
        if key is not None:
            slot.key = key
        if meta is not None:
            slot.meta = meta
        self.index.put(ct.c_uint32(i), slot)
        slot.seq = (odd + 1) & 0xFFFFFFFF  # (3): seq even
        self.index.put(ct.c_uint32(i), slot)
        self._mirror[i] = slot

    def _index_put(self, key: structs.VipKey, meta: structs.VipMeta) -> None:
        at = self._live_at(key)
        if at is None:
            at = next((i for i in self.chain(key)
                       if self._mirror[i].state != structs.VIP_SLOT_LIVE), None)
        if at is None:  # the chain is full: the hash map alone answers for it
            self._overflow[bytes(key)] = structs.VipKey.from_buffer_copy(key)
            return
        self._overflow.pop(bytes(key), None)
        self._write(at, structs.VIP_SLOT_LIVE, key, meta)

    def _index_remove(self, key: structs.VipKey) -> None:
        if self._overflow.pop(bytes(key), None) is not None:
            return
        at = self._live_at(key)
        if at is None:
            return
        self._write(at, structs.VIP_SLOT_TOMBSTONE)
        self._place_overflow()
        self._reclaim(at)

    def _place_overflow(self) -> None:
        for raw, key in list(self._overflow.items()):
            meta = self.hash.get(key)
            if meta is None:
                del self._overflow[raw]
            else:
                self._index_put(key, meta)

    def _needed(self) -> set[int]:
        """Slots that some key's lookup must probe past: not to be made EMPTY."""
        needed: set[int] = set()
        for i, slot in enumerate(self._mirror):
            if slot.state == structs.VIP_SLOT_LIVE:
                chain = self.chain(slot.key)
                needed.update(chain[:chain.index(i)])
        for key in self._overflow.values():
            needed.update(self.chain(key))
        return needed

    def _reclaim(self, near: int | None = None) -> None:
        """Turns tombstones that no lookup needs back into EMPTY slots."""
        span = (range(self.slots) if near is None else
                [(near + d) & (self.slots - 1) for d in range(-structs.VIP_INDEX_PROBES + 1,
                                                             structs.VIP_INDEX_PROBES)])
        needed = self._needed()
        for i in span:
            if self._mirror[i].state == structs.VIP_SLOT_TOMBSTONE and i not in needed:
                self._write(i, structs.VIP_SLOT_EMPTY)

    def _repair(self) -> None:
        """Makes the index agree with the hash map: on start, with maps that a
        previous writer may have left mid-update (pinned maps after kill -9)."""
        truth = {bytes(k): (k, m) for k, m in self.hash.items()}
        seen: set[bytes] = set()
        for i, slot in enumerate(self._mirror):
            raw = bytes(slot.key)
            if slot.state == structs.VIP_SLOT_LIVE:
                if (raw in seen or raw not in truth or i not in self.chain(slot.key)):
                    self._write(i, structs.VIP_SLOT_TOMBSTONE)
                    continue
                seen.add(raw)
                key, meta = truth[raw]
                if slot.seq & 1 or bytes(slot.meta) != bytes(meta):
                    self._write(i, structs.VIP_SLOT_LIVE, key, meta)
            elif slot.seq & 1 or slot.state not in (structs.VIP_SLOT_EMPTY,
                                                    structs.VIP_SLOT_TOMBSTONE):
                self._write(i, structs.VIP_SLOT_TOMBSTONE)
        for raw, (key, meta) in truth.items():
            if raw not in seen:
                self._index_put(key, meta)
        self._reclaim()
