"""Reading the connection table for an operator (`lbctl flows`, ListFlows).

A page is read in bounded time whatever the table's size: sets are read a
batch at a time, without locking any, from a starting set, until the page
holds `limit` matching entries, or MAX_SETS_PER_PAGE sets were read, or
PAGE_BUDGET_S passed; the page says where it stopped, and the next one
starts there. Entries are named with a snapshot of the reconciler's
allocation taken on lbd's event loop, so the read itself runs in a thread.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

import numpy as np

from xdplb.state import VipKey

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
MAX_SETS_PER_PAGE = 1 << 18  # a 1M-entry table in one page; 32 MiB read
BATCH_SETS = 1 << 14  # 2 MiB per read
PAGE_BUDGET_S = 1.0


@dataclass(frozen=True)
class FlowNames:
    """Who a table entry names, as the reconciler allocated them when asked."""

    vips: dict[int, VipKey]  # vip_id -> VIP
    backends: dict[int, str]  # backend index -> address
    now_s: int  # the datapath's clock


@dataclass(frozen=True)
class FlowEntry:
    client: str
    client_port: int
    vip: VipKey | None  # None: an entry of a VIP removed since (until the sweep or eviction)
    port: int
    backend: str
    idle_s: int


@dataclass(frozen=True)
class FlowPage:
    flows: list[FlowEntry]
    from_set: int
    next_set: int  # == total_sets once the table was read to its end
    total_sets: int
    entries_read: int  # before filtering
    limit_reached: bool


@dataclass(frozen=True)
class FlowFilter:
    vip_ids: frozenset[int] | None = None  # None: any
    backends: frozenset[int] | None = None  # backend indexes; None: any

    def select(self, ways: np.ndarray) -> np.ndarray:
        keep = np.ones(len(ways), bool)
        if self.vip_ids is not None:
            keep &= np.isin(ways["vip_id"], np.fromiter(self.vip_ids, np.uint32))
        if self.backends is not None:
            keep &= np.isin(ways["backend"], np.fromiter(self.backends, np.uint32))
        return ways[keep]


def read_page(table: object, names: FlowNames, wanted: FlowFilter, limit: int,
              from_set: int) -> FlowPage:
    """One page of `table` (a datapath.FlowTable), from set from_set."""
    deadline = time.monotonic() + PAGE_BUDGET_S
    end = min(table.sets, from_set + MAX_SETS_PER_PAGE)
    found: list[np.ndarray] = []
    matched = read = 0
    at = from_set
    while at < end and matched < limit and time.monotonic() < deadline:
        count = min(BATCH_SETS, end - at)
        ways = table.read_ways(at, count)
        chosen = wanted.select(ways)
        if matched + len(chosen) >= limit:
            # Stop after the set of the limit-th match, with that set's other
            # matches: the next page starts after it, so no entry is skipped or
            # shown twice (a page may hold up to FLOW_WAYS - 1 more than limit).
            last = chosen["set"][limit - matched - 1]
            chosen = chosen[chosen["set"] <= last]
            read += int(np.count_nonzero(ways["set"] <= last))
            found.append(chosen)
            matched += len(chosen)
            at = int(last) + 1
            break
        found.append(chosen)
        read += len(ways)
        matched += len(chosen)
        at += count
    flows = [entry(way, names) for part in found for way in part]
    return FlowPage(flows=flows, from_set=from_set, next_set=at, total_sets=table.sets,
                    entries_read=read, limit_reached=matched >= limit)


def entry(way: np.void, names: FlowNames) -> FlowEntry:
    address = ipaddress.IPv6Address(bytes(way["src"]))
    client = address.ipv4_mapped or address
    idle = (names.now_s - int(way["last_seen"])) & 0xFFFF
    return FlowEntry(client=str(client), client_port=int(way["sport"]),
                     vip=names.vips.get(int(way["vip_id"])), port=int(way["dport"]),
                     backend=names.backends.get(int(way["backend"]), "?"),
                     idle_s=0 if idle > 0xFFFF - 60 else idle)


def flow_count_limit(limit: int) -> int:
    """A request's limit: 0 means the default; anything past MAX_LIMIT is refused."""
    if not 0 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: {limit} must be 0..{MAX_LIMIT}")
    return limit or DEFAULT_LIMIT

