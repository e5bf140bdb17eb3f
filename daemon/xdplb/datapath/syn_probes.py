"""The `syn_probes` array: half-open checks in flight (bpf/syn_probe.h).

lbd arms a batch of slots with one syscall (address, port, a fresh cookie,
outcome pending), sends the SYNs, then reads the outcomes the balancer wrote
with one batched read of the slots in use. Slots are numbered from 0 and kept
dense by the health checker, so a read covers only what is in use.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Sequence

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap, PerCpuArray
from xdplb.datapath.sizes import HealthMarks


class SynProbeTable:
    def __init__(self, array: BpfMap, stats: PerCpuArray, slots: int,
                 marks: HealthMarks | None = None):
        self.array, self.stats, self.slots = array, stats, slots
        self.marks = marks or HealthMarks()

    def backend_of_mark(self, mark: int) -> int:
        """The backend entry a check through the VIP is marked for (0: no mark)."""
        return mark & ~self.marks.mask & 0xFFFFFFFF if mark else 0

    def arm(self, slots: Sequence[int], addresses: Sequence[structs.Addr16],
            ports_be: Sequence[int], ipv6: Sequence[bool], cookies: Sequence[int],
            backends: Sequence[int] | None = None) -> None:
        """Writes the probes of a batch about to be sent (outcome: pending)."""
        backends = backends or [0] * len(slots)
        pack = structs.SYN_PROBE_PACKING.pack
        self.arm_raw(slots, b"".join(
            pack(*addresses[i].w, cookies[i], ports_be[i], ipv6[i], structs.SYN_PENDING,
                 backends[i], 0) for i in range(len(slots))))

    def arm_raw(self, slots: Sequence[int], entries: bytes) -> None:
        """arm() for a caller that packed the entries itself (SYN_PROBE_PACKING each)."""
        n = len(slots)
        keys = (ct.c_uint32 * n)(*slots)
        values = (structs.SynProbe * n).from_buffer_copy(entries)
        self.array.put_batch(keys, values)

    def outcomes(self, used: int) -> ct.Array:
        """Slots 0..used-1 as the balancer left them (SYN_PENDING, OPEN, REFUSED)."""
        return self.array.read_array(max(1, min(used, self.slots)))

    def read_raw(self, first: int, count: int) -> bytes:
        """Slots first..first+count-1 as bytes (struct syn_probe each): one read."""
        values = self.array.read_range(first, count)
        return ct.string_at(ct.addressof(values), ct.sizeof(values))

    def counters(self) -> dict[str, int]:
        return self.stats.read(0)

    def clear_counters(self) -> None:
        self.stats.clear(0)
