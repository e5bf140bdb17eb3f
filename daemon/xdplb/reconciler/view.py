"""The maps read back in terms free of indexes and offsets (tests, restarts)."""

from __future__ import annotations

from typing import Any

import numpy as np

from xdplb import structs as s
from xdplb.reconciler.plan import (
    state_key,
)


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
