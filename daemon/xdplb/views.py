"""Read-only views of lbd: what the API and the metrics show, as plain values.

The controller owns the state, the reconciler, the balancer, the checks and
load feedback; a reader gets a snapshot from here instead of reaching into
them. Status is what the datapath realises, not what was asked for: ring
positions, availability and health come from what the maps were last given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from xdplb import bgp, flows
from xdplb.fleet.layout import HostReport, member_text
from xdplb.state import BackendSpec, DesiredState, Limits, MemberId, NotFound, VipKey, VipSpec
from xdplb.structs import FLOW_WAYS


class ControllerParts(Protocol):
    """What the views read of the controller (xdplb.controller.Controller builds
    them; naming it here would make an import cycle)."""

    state: DesiredState
    limits: Limits
    config: Any
    store: Any
    reconciler: Any
    balancer: Any
    runtime: Any
    health: Any
    capacity: Any
    announcer: Any
    nexthop: Any
    started: float
    version: str
    host_drained: bool
    last_report: Any
    last_bgp_state: bgp.BgpState
    last_settle: Any  # reconciler.SettleReport | None
    last_settle_at: float
    fleet: Any  # fleet.FleetLink | None
    fleet_revision: int
    fleet_refused: tuple[int, str]
    fleet_addresses: tuple[str, ...]

    def health_realised(self, member: MemberId) -> tuple[bool, float]: ...


@dataclass(frozen=True)
class LoadView:
    load: float | None  # smoothed, in the unit of the VIP's target
    age_s: float | None
    state: str  # none | ok | stale | unreachable: ... | malformed: ... | waiting
    factor: float  # capacity factor applied
    slow_start: float  # slow-start factor applied


@dataclass(frozen=True)
class BackendView:
    spec: BackendSpec
    healthy: bool  # the verdict the maps were last given
    available: bool  # the datapath may send flows to it
    index: int  # its backend entry (0: none yet)
    ring_positions: int
    effective_weight: int  # what its VIP's ring is built with
    packets: int
    bytes: int
    health: str  # up | down | unchecked | held-down | not-checked
    check: str  # what its check probes ("" without one)
    since: float  # unix time of the verdict (0: none)
    last_result: str
    latency_ms: float
    realised: bool  # the maps hold the current verdict
    realised_since: float
    load: LoadView | None  # with load feedback or slow start
    active_flows: int | None  # seen within flows.active_window_s at the last sweep (None: none yet)


@dataclass(frozen=True)
class VipView:
    spec: VipSpec
    mode: str  # normal | panic | fail-open | fail-closed | pending
    vip_id: int
    healthy_backends: int
    serving_backends: int
    packets: int
    bytes: int
    fingerprint: str
    unsettled_positions: int
    announced: bool
    backends: tuple[BackendView, ...]


@dataclass(frozen=True)
class FlowTableView:
    capacity: int  # entries: sets x ways
    entries: int | None  # in use at the last sweep (None: no sweep yet)
    active: int | None
    active_window_s: int
    swept_at: float  # unix time; 0: no sweep yet
    evicted: int  # flows a full set gave up, since the maps were made


@dataclass(frozen=True)
class HostView:
    version: str
    started: float
    xdp_mode: str
    nexthop_mac: str
    nexthop_source: str
    state_file: str
    pin_dir: str
    vips: int
    backends: int
    max_vips: int
    max_backends: int
    ring_entries_used: int
    ring_entries: int
    host_drained: bool
    fleet_revision: int  # fleet mode: the shared state's revision the maps realise
    bgp_enabled: bool
    announced: tuple[str, ...]
    last_report: Any  # reconciler.ReconcileReport | None
    flow_table: FlowTableView


class Views:
    """Snapshots of one controller, built on lbd's event loop (so consistent)."""

    def __init__(self, controller: ControllerParts):
        self._ctl = controller

    def vips(self) -> list[VipView]:
        return [self.vip(key) for key in sorted(self._ctl.state.vips)]

    def vip(self, key: VipKey) -> VipView:
        ctl = self._ctl
        spec = ctl.state.vips.get(key)
        if spec is None:
            raise NotFound(f"VIP {key}: no such VIP")
        plan = ctl.reconciler.plans.get(key)
        vip_id = ctl.reconciler.vip_id(key)
        counters = ctl.balancer.vip_stats.read(vip_id) if vip_id else {"packets": 0,
                                                                       "bytes": 0}
        positions = ctl.reconciler.ring_positions(key)
        backends = tuple(self._backend(spec, address, plan, positions)
                         for address in spec.backends)
        announcer = ctl.announcer
        return VipView(
            spec=spec, mode=plan.mode if plan else "pending", vip_id=vip_id,
            healthy_backends=plan.healthy if plan else 0,
            serving_backends=plan.serving if plan else 0,
            packets=counters["packets"], bytes=counters["bytes"],
            fingerprint=ctl.reconciler.fingerprints.get(key, ""),
            unsettled_positions=ctl.reconciler.unsettled_slots(key),
            announced=announcer is not None and bgp.host_prefix(key.address)
            in announcer.announced,
            backends=backends)

    def _backend(self, vip: VipSpec, address: str, plan: Any,
                 positions: dict[str, int]) -> BackendView:
        ctl = self._ctl
        member = (vip.key, address)
        index = ctl.reconciler.members.get(member, 0)
        counters = ctl.balancer.backend_stats.read(index) if index else {"packets": 0,
                                                                         "bytes": 0}
        realised, realised_since = ctl.health_realised(member)
        health, check, since, last, latency = self._health(member)
        if vip.health_scope == "fleet" and ctl.fleet is not None and health in ("up", "down"):
            # The quorum's verdict is what the ring realises; this host's own beside it.
            agreed = "up" if ctl.runtime.healthy.get(member, True) else "down"
            last = f"fleet quorum: {agreed}; this host: {health} ({last or 'no result'})"
            health = agreed
        return BackendView(
            spec=vip.backends[address], healthy=ctl.runtime.healthy.get(member, True),
            available=bool(plan and plan.available.get(address)), index=index,
            ring_positions=positions.get(address, 0),
            effective_weight=plan.ring_weights.get(address, 0) if plan else 0,
            packets=counters["packets"], bytes=counters["bytes"], health=health,
            check=check, since=since, last_result=last, latency_ms=latency,
            realised=realised, realised_since=realised_since, load=self._load(member),
            active_flows=self._active_flows(member))

    def _active_flows(self, member: MemberId) -> int | None:
        settle = self._ctl.last_settle
        return None if settle is None else settle.active.get(member, 0)

    def _health(self, member: MemberId) -> tuple[str, str, float, str, float]:
        """(health, check description, since, last result, latency ms)."""
        checker = self._ctl.health
        probe = checker.members.get(member) if checker else None
        if probe is None:
            return "not-checked", "", 0.0, "", 0.0
        verdict = checker.verdict_of(member)
        if verdict is None or verdict.up is None:
            return "unchecked", probe.describe(), 0.0, "", 0.0
        health = "held-down" if verdict.suppressed else "up" if verdict.up else "down"
        last, latency = ("", 0.0) if verdict.last is None else (
            verdict.last.reason, verdict.last.latency_s * 1000)
        return health, probe.describe(), verdict.since, last, latency

    def _load(self, member: MemberId) -> LoadView | None:
        capacity = self._ctl.capacity
        if capacity is None:
            return None
        try:
            load = capacity.status(member)
        except KeyError:  # added a moment ago: not followed yet
            return None
        return LoadView(load.load, load.age_s, load.state, load.factor, load.slow_start)

    def host(self) -> HostView:
        ctl, cfg = self._ctl, self._ctl.config
        nh = ctl.nexthop
        return HostView(
            version=ctl.version, started=ctl.started, xdp_mode=cfg.xdp_mode,
            nexthop_mac=nh.mac if nh else "",
            nexthop_source=("config" if cfg.nexthop.mac else
                            f"route via {nh.interface} to {nh.gateway}" if nh else ""),
            state_file=str(ctl.store.path), pin_dir=str(cfg.pin_dir),
            vips=len(ctl.state.vips),
            backends=sum(len(v.backends) for v in ctl.state.vips.values()),
            max_vips=ctl.limits.max_vips, max_backends=ctl.limits.max_backends,
            ring_entries_used=ctl.reconciler.ring_entries_used(),
            ring_entries=cfg.maps.ring_entries, host_drained=ctl.host_drained,
            fleet_revision=ctl.fleet_revision,
            bgp_enabled=ctl.announcer is not None,
            announced=tuple(sorted(ctl.announcer.announced)) if ctl.announcer else (),
            last_report=ctl.last_report, flow_table=self.flow_table())

    def flow_table(self) -> FlowTableView:
        ctl = self._ctl
        sweep = ctl.last_settle.sweep if ctl.last_settle is not None else None
        return FlowTableView(
            capacity=ctl.balancer.conns.sets * FLOW_WAYS,
            entries=None if sweep is None else sweep.entries,
            active=None if sweep is None else sweep.active,
            active_window_s=ctl.config.flows.active_window_s,
            swept_at=ctl.last_settle_at if sweep is not None else 0.0,
            evicted=ctl.balancer.counters()["conn_evicted"])

    # -- the flow table, for `lbctl flows` --

    def flow_names(self) -> flows.FlowNames:
        """Who the table's entries name now (taken on the event loop; the read
        that uses it runs in a thread)."""
        rec = self._ctl.reconciler
        return flows.FlowNames(
            vips={realised.vip_id: key for key, realised in rec.vips.items()},
            backends={index: address for (_, address), index in rec.members.items()},
            now_s=rec.clock())

    def flow_filter(self, key: VipKey | None, address: str | None) -> flows.FlowFilter:
        """The entries of a VIP, of a backend (in that VIP, or in any), or all;
        NotFound for a VIP or backend lbd does not have."""
        ctl = self._ctl
        if key is not None:
            ctl.state.vip(key)
        members = {m: i for m, i in ctl.reconciler.members.items()
                   if (key is None or m[0] == key) and (address is None or m[1] == address)}
        if address is not None and not members:
            raise NotFound(f"backend {address}: not a backend of "
                           f"{'VIP ' + str(key) if key else 'any VIP'}")
        return flows.FlowFilter(
            vip_ids=None if key is None else frozenset({ctl.reconciler.vip_id(key)}),
            backends=None if address is None else frozenset(members.values()))

    def read_flow_page(self, names: flows.FlowNames, wanted: flows.FlowFilter, limit: int,
                       from_set: int) -> flows.FlowPage:
        """A page of the table (flows.read_page); safe off the event loop."""
        return flows.read_page(self._ctl.balancer.conns, names, wanted, limit, from_set)

    def datapath_counters(self) -> dict[str, int]:
        """The balancer's outcome and event counters, summed over CPUs."""
        return self._ctl.balancer.counters()

    def syn_counters(self) -> dict[str, int]:
        """Replies to half-open checks, summed over CPUs."""
        return self._ctl.balancer.syn_probes.counters()

    def quic_counters(self) -> dict[str, int]:
        """QUIC VIPs' packets: routed by connection ID, or why they took the 5-tuple path."""
        return self._ctl.balancer.quic_counters()

    def tunnel_counters(self) -> dict[str, int]:
        """The tc program's counters of checks through the VIP."""
        return self._ctl.balancer.hc_counters()

    def fleet_report(self) -> HostReport:
        """What this host tells the fleet it realises."""
        ctl = self._ctl
        verdicts = ctl.health.healthy() if ctl.health is not None else {}
        bgp_state = ctl.last_bgp_state
        bgp_text = "off" if not bgp_state.enabled else (
            ", ".join(f"{s.name} {s.state}" for s in bgp_state.sessions) or "no session") + (
            f"; announcing {len(bgp_state.announced)}")
        return HostReport(
            host=ctl.config.fleet.host_name, version=ctl.version, revision=ctl.fleet_revision,
            fingerprints={str(k): fp[:16] for k, fp in ctl.reconciler.fingerprints.items()},
            addresses=ctl.fleet_addresses, drained=ctl.host_drained, bgp=bgp_text,
            down=tuple(sorted(member_text(m) for m, up in verdicts.items() if not up)),
            refused_revision=ctl.fleet_refused[0], refused_reason=ctl.fleet_refused[1],
            reported_at=time.time())

    def fleet_view(self) -> Any:
        """The fleet as this lbd last saw it (fleet.FleetView), or None: local-file mode."""
        return self._ctl.fleet.view if self._ctl.fleet is not None else None

    def bgp_sessions(self) -> bgp.BgpState:
        """What BIRD said last (refreshed every 5 s)."""
        return self._ctl.last_bgp_state
