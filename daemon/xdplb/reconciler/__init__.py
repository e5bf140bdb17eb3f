"""The reconciler, the only writer of the maps: desired state plus runtime facts
in, the realised datapath out, writing only the difference (reconciler); what
each VIP should look like (plan); backend entries and ring regions
(allocation); the maps read back free of indexes (view)."""

from xdplb.reconciler.allocation import IndexPool, RingSpace
from xdplb.reconciler.plan import (
    PROTO_NAMES,
    PROTO_NUMBERS,
    DatapathSettings,
    ReconcileError,
    Runtime,
    VipPlan,
    map_key,
    plan_vip,
    portless_flag,
    state_key,
    vip_flags,
)
from xdplb.reconciler.reconciler import (
    Reconciler,
    ReconcileReport,
    SettleReport,
    SettleStart,
)
from xdplb.reconciler.view import read_view
from xdplb.state import MemberId

__all__ = [
    "PROTO_NAMES",
    "PROTO_NUMBERS",
    "DatapathSettings",
    "IndexPool",
    "MemberId",
    "ReconcileError",
    "ReconcileReport",
    "Reconciler",
    "RingSpace",
    "Runtime",
    "SettleReport",
    "SettleStart",
    "VipPlan",
    "map_key",
    "plan_vip",
    "portless_flag",
    "read_view",
    "state_key",
    "vip_flags",
]
