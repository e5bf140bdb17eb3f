"""The fleet: LB hosts sharing one desired state through etcd.

settings: the [fleet] table; etcd: the client of etcd's v3 gRPC API; layout:
the keys under the prefix and the pure rules every host applies to them
(health agreement, drift); link: lbd's running link (mirror, watch, writes,
lease, reports).
"""

from xdplb.fleet.layout import FleetState, HostReport
from xdplb.fleet.link import FleetConflict, FleetLink, FleetUnavailable, FleetView
from xdplb.fleet.settings import FleetConfig, FleetConfigError, fleet_from_table

__all__ = [
    "FleetConfig",
    "FleetConfigError",
    "FleetConflict",
    "FleetLink",
    "FleetState",
    "FleetUnavailable",
    "FleetView",
    "HostReport",
    "fleet_from_table",
]
