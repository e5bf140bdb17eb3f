"""Backend entries and ring regions: allocation without reuse surprises."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from xdplb.reconciler.plan import (
    ReconcileError,
)


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
