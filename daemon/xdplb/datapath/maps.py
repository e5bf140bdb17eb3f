"""The one list of the balancer's maps (bpf/balancer.c declares them with
XDPLB_MAP; tests/test_structs.py checks the two lists agree): names, key and
value layouts, sizes. The shapes a pinned map must have, the maps a reader of
pinned maps opens, and the typed handles the Balancer makes all come from it."""

from __future__ import annotations

import ctypes as ct
from collections.abc import Callable
from dataclasses import dataclass

from xdplb import structs as s
from xdplb.datapath.sizes import MapSizes


@dataclass(frozen=True)
class MapSpec:
    name: str
    key: type
    value: type
    entries: Callable[[MapSizes], int]
    per_cpu: bool = False
    kind: str = "array"  # or "hash"

    def shape(self, sizes: MapSizes) -> tuple[int, int, int]:
        """(key size, value size, entries): what the kernel reports of the map."""
        return ct.sizeof(self.key), ct.sizeof(self.value), self.entries(sizes)


U32, U64 = ct.c_uint32, ct.c_uint64

BALANCER_MAPS: tuple[MapSpec, ...] = (
    MapSpec("addr_filter", U32, U64, lambda z: s.ADDR_FILTER_WORDS),
    MapSpec("vip_addrs", s.Addr16, s.VipAddrMeta, lambda z: z.max_vips, kind="hash"),
    MapSpec("vips", s.VipKey, s.VipMeta, lambda z: z.max_vips, kind="hash"),
    MapSpec("vip_index", U32, s.VipIndexSlot, lambda z: 1 << z.vip_index_bits),
    MapSpec("ring", U32, U32, lambda z: z.ring_entries),
    MapSpec("backends", U32, s.Backend, lambda z: z.max_backends),
    MapSpec("conns", U32, s.FlowSet, lambda z: 1 << z.conn_set_bits),
    MapSpec("config", U32, s.LbConfig, lambda z: 1),
    MapSpec("vip_stats", U32, s.TrafficCounters, lambda z: z.max_vips, per_cpu=True),
    MapSpec("backend_stats", U32, s.TrafficCounters, lambda z: z.max_backends, per_cpu=True),
    MapSpec("global_stats", U32, s.GlobalCounters, lambda z: 1, per_cpu=True),
    MapSpec("flood", U32, s.FloodState, lambda z: 1, per_cpu=True),
    MapSpec("hc_stats", U32, s.HcCounters, lambda z: 1, per_cpu=True),
    MapSpec("vip_rings", U32, s.VipRing, lambda z: z.max_vips),
    MapSpec("settle", U32, s.SettleState, lambda z: 1),
    MapSpec("settle_blocked", U32, U64, lambda z: (z.ring_entries + 63) // 64),
    MapSpec("flow_census", U32, s.FlowCensus, lambda z: 1),
    MapSpec("flow_active", U32, U32, lambda z: z.max_backends),
    MapSpec("flow_events", U32, s.FlowEvents, lambda z: 1, per_cpu=True),
    MapSpec("quic_servers", U32, s.QuicServer, lambda z: z.max_backends),
    MapSpec("quic_stats", U32, s.QuicCounters, lambda z: 1, per_cpu=True),
    MapSpec("syn_probes", U32, s.SynProbe, lambda z: z.max_backends),
    MapSpec("syn_stats", U32, s.SynCounters, lambda z: 1, per_cpu=True),
)
BY_NAME = {spec.name: spec for spec in BALANCER_MAPS}
# What a reader of a running balancer's pinned maps opens (PinnedMaps).
INSPECTED = ("addr_filter", "vip_addrs", "vips", "ring", "backends", "config", "conns")


def map_shapes(sizes: MapSizes) -> dict[str, tuple[int, int, int]]:
    """Every map of bpf/balancer.c: (key size, value size, entries)."""
    return {spec.name: spec.shape(sizes) for spec in BALANCER_MAPS}
