"""lbd's core, free of any transport: desired state in, maps out.

One flow: a request becomes state changes; `apply_changes` validates them;
the new state is persisted atomically; only then does it become current and
the reconciler realise it; watchers hear of every step. The gRPC API,
health checks and load feedback all go through `change` or `set_runtime`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xdplb import __version__, bgp, datapath, nexthop
from xdplb.capacity import CapacityController
from xdplb.config import DaemonConfig
from xdplb.events import (
    BgpNotice,
    CapacityNotice,
    Changed,
    Event,
    HealthTransition,
    HostDrainChanged,
    Lifecycle,
    NexthopChanged,
    Observer,
    Overflow,
    Realised,
    Reconciled,
    VipServing,
)
from xdplb.fleet import FleetLink, FleetState
from xdplb.health import HealthChecker
from xdplb.hooks import HookRunner
from xdplb.reconciler import (
    MemberId,
    ReconcileError,
    Reconciler,
    ReconcileReport,
    Runtime,
    SettleReport,
)
from xdplb.state import (
    MAX_DOCUMENT_BYTES,
    Change,
    DesiredState,
    LimitExceeded,
    Limits,
    NotFound,
    StateError,
    VipKey,
    apply_changes,
    diff,
)
from xdplb.store import StateStore
from xdplb.views import Views

log = logging.getLogger("xdplb.lbd")
VERSION = __version__
WATCH_QUEUE_LIMIT = 1024


@dataclass(frozen=True)
class RealisedHealth:
    """What the maps hold for one backend's health, and since when."""

    serving: bool  # the verdict the last written reconcile used
    at: float  # unix time that reconcile finished


@dataclass(frozen=True)
class ChangeResult:
    changes: list[str]
    report: ReconcileReport | None  # None: a dry run, or nothing to change


def change_subject(change: Change) -> tuple[str, str]:
    """The VIP and backend a change is about, for events and logs ("" when none)."""
    key = getattr(change, "key", None) or getattr(getattr(change, "vip", None), "key", None)
    backend = getattr(change, "address", None) or getattr(
        getattr(change, "backend", None), "address", None)
    return (str(key) if key else "", backend or "")


def parse_document(document: str) -> object:
    """An apply document's JSON; StateError (or LimitExceeded) says why not. Nesting
    too deep for the parser and integers past Python's digit limit are refusals too."""
    if len(document) > MAX_DOCUMENT_BYTES:
        raise LimitExceeded(f"document: {len(document)} characters, more than the limit "
                            f"of {MAX_DOCUMENT_BYTES}")
    try:
        return json.loads(document)
    except json.JSONDecodeError as exc:
        raise StateError(f"document: not valid JSON: {exc}") from None
    except RecursionError:
        raise StateError("document: nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise StateError(f"document: {exc}") from None


class Controller:
    def __init__(self, config: DaemonConfig, *, balancer: Any = None):
        self.config = config
        self.store = StateStore(config.state_dir)
        self.limits = Limits.of_map_sizes(config.maps)
        # Every file is read (and a bad one refused) before any map exists.
        self.state = self.store.load()
        self.host_drained = self.store.load_host_drained()
        self.last_bgp_state = bgp.BgpState(config.bgp.enabled)
        self.announcer: bgp.BirdAnnouncer | None = None
        if config.bgp.enabled:
            self.announcer = bgp.BirdAnnouncer(Path(config.bgp.include_dir),
                                               Path(config.bgp.bird_socket), config.bgp.birdc)
            self.announcer.prepare()
        self.started = time.time()
        self.balancer = balancer or datapath.Balancer(config.maps, pin_dir=config.pin_dir,
                                                      marks=config.health_marks)
        self.tunnel_checks = False  # the tc program of checks through the VIP is attached
        self.reconciler = Reconciler(self.balancer)
        self.runtime = Runtime(healthy=self.reconciler.recovered_availability())
        # Per backend, the health verdict the maps realise: a verdict is only true of
        # the datapath once the reconcile that writes it has run.
        self.realised_health: dict[MemberId, RealisedHealth] = {}
        self.nexthop: nexthop.Nexthop | None = None
        self.last_report: ReconcileReport | None = None
        self.last_settle: SettleReport | None = None
        self.last_settle_at = 0.0  # unix time of the last sweep
        self.health: HealthChecker | None = None
        self.capacity: CapacityController | None = None
        self.metrics: Observer | None = None
        self.hooks: HookRunner | None = None  # lbd.py starts it when [hooks] has commands
        self.vips_serving: dict[VipKey, bool] = {}  # per VIP: a healthy backend in its ring
        self.version = VERSION
        self.fleet: FleetLink | None = None  # lbd.py starts it when [fleet] names etcd
        # In fleet mode: the revision of the shared state these maps realise, and the
        # newest one refused (with why).
        self.fleet_revision = self.store.load_fleet_revision(config.fleet.prefix)
        self.fleet_refused: tuple[int, str] = (0, "")
        self.fleet_addresses: tuple[str, ...] = ()  # this host's, as its report names them
        self.views = Views(self)  # what the API and the metrics read
        self._watchers: set[asyncio.Queue[Event]] = set()

    # -- life cycle --

    def start(self) -> None:
        """Resolves the next hop, realises the loaded state, then attaches:
        the program replaces a running one atomically, on the same pinned maps."""
        self.nexthop = self._resolve_nexthop()
        # Pinned maps kept the clock where the last lbd left it: catch it up
        # first, so the VIPs' ring-change times recorded now are today's.
        self.tick()
        self._reconcile("start")
        generic = self.config.xdp_mode == "generic"
        for ifname in self.config.interfaces:
            self.balancer.attach(ifname, generic=generic)
        self._attach_tunnel_checks(self.state)
        self.publish(Lifecycle("start", f"lbd {VERSION} forwarding on "
                                        f"{', '.join(self.config.interfaces)} "
                                        f"({self.config.xdp_mode} XDP), next hop "
                                        f"{self.nexthop.describe()}, "
                                        f"{len(self.state.vips)} VIPs"))

    def start_health(self) -> HealthChecker:
        """Starts the check loops (inside the event loop); verdicts come back in batches."""
        self.health = HealthChecker(self.apply_health, self._health_event,
                                    observe=self._observe_check,
                                    syn_table=self.balancer.syn_probes)
        self.health.update(self.state, self.runtime.healthy, self.check_marks())
        self.apply_health(self.health.healthy())
        return self.health

    def check_marks(self) -> dict[MemberId, int]:
        """The socket mark of each backend entry's checks through the VIP."""
        marks = self.config.health_marks
        return {member: marks.mark(index) for member, index in self.reconciler.members.items()}

    def _attach_tunnel_checks(self, state: DesiredState) -> None:
        """Attaches the tc egress program that carries checks through the VIP to their
        backends, once some check needs it; it then stays (it costs an unmarked
        packet one compare), replaced atomically by a restarted lbd. Without it a
        marked check would reach the VIP by plain routing (another LB, or this one's
        ring): so a state needing it is refused if it cannot be attached."""
        if self.tunnel_checks or not any(
                vip.check_for(b).via == "vip" and vip.check_for(b).kind != "none"
                for vip in state.vips.values() for b in vip.backends.values()):
            return
        self.balancer.hc_prog_fd  # noqa: B018 -- loaded (verified) here, in this thread

        def attach() -> None:
            for ifname in self.config.interfaces:
                self.balancer.attach_health_encap(ifname)

        # pyroute2's synchronous API cannot run inside a running event loop (a change
        # arrives in lbd's): netlink from a worker thread, waited for (milliseconds).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(attach).result()
        self.tunnel_checks = True
        self.publish(Lifecycle("start", "checks through the VIP: tc egress program attached "
                                        f"on {', '.join(self.config.interfaces)}"))

    def start_fleet(self) -> FleetLink:
        """Follows the fleet's etcd (inside the event loop); the local copy forwards
        until the first read."""
        self.fleet = FleetLink(self.config.fleet, on_state=self.adopt_fleet_state,
                               on_health=self._fleet_health_changed,
                               report=self.views.fleet_report)
        return self.fleet

    def adopt_fleet_state(self, newest: FleetState) -> None:
        """A revision of the shared desired state, from the watch: realised unless this
        host already realises it (or a newer one), or refuses it (its map sizes)."""
        if newest.revision == 0 or newest.revision <= self.fleet_revision:
            return
        try:
            newest.state.validate(self.limits)
            self._attach_tunnel_checks(newest.state)
        except (StateError, ReconcileError, datapath.DatapathError) as exc:
            if self.fleet_refused[0] != newest.revision:
                self.publish(Lifecycle("fleet", f"revision {newest.revision} refused: {exc}; "
                                                f"forwarding on revision {self.fleet_revision}"))
            self.fleet_refused = (newest.revision, str(exc))
            return
        self.fleet_refused = (0, "")
        by = f" (from {newest.changed_by})" if newest.changed_by else ""
        self._adopt(newest.state, diff(self.state, newest.state), newest.revision, by)

    def _fleet_health_changed(self) -> None:
        if self.health is not None:
            self.apply_health(self.health.healthy())

    def _fleet_members(self) -> dict[MemberId, int]:
        return {(key, address): vip.health_quorum for key, vip in self.state.vips.items()
                if vip.health_scope == "fleet" for address in vip.backends}

    async def settle_new_backends(self) -> None:
        """Lets the first checks of new backends decide, so a change is acknowledged
        with every new backend either in its rings (healthy) or known down."""
        if self.health is not None and self.health.unchecked():
            await self.health.first_verdicts()
            self.apply_health(self.health.healthy())

    def apply_health(self, healthy: dict[MemberId, bool]) -> None:
        """Health verdicts; a backend back up also starts its slow start. Backends of
        fleet-scoped VIPs: this host's verdicts are published, the fleet's quorum
        decides."""
        if self.fleet is not None:
            members = self._fleet_members()
            self.fleet.publish_verdicts({m: up for m, up in healthy.items() if m in members})
            healthy = self.fleet.agreed(healthy, members)
        weights = self.runtime.weights
        if self.capacity is not None:
            self.capacity.update(self.state, healthy)
            weights = self.capacity.effective_weights()
        if healthy != self.runtime.healthy or weights != self.runtime.weights:
            self.set_runtime(replace(self.runtime, healthy=healthy, weights=weights), "health")

    def start_capacity(self) -> CapacityController:
        """Load feedback and slow start (inside the event loop)."""
        self.capacity = CapacityController(self.apply_capacity, self._capacity_event)
        self.capacity.update(self.state, self.runtime.healthy)
        self.apply_capacity(self.capacity.effective_weights())
        return self.capacity

    def apply_capacity(self, weights: dict[MemberId, int]) -> None:
        if weights != self.runtime.weights:
            self.set_runtime(replace(self.runtime, weights=weights), "capacity")

    def _capacity_event(self, event: CapacityNotice) -> None:
        self.publish(event)

    def _observe_check(self, kind: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_check(kind, seconds)

    def _health_event(self, event: HealthTransition) -> None:
        if self.metrics is not None:
            self.metrics.observe_transition(event)
        self.publish(event)

    def abandon(self, unpin: bool) -> None:
        """A start that failed: release the maps, and remove them if this start made them
        (maps a previous lbd left are forwarding and stay)."""
        if unpin:
            self.balancer.unpin()
        self.balancer.close()

    def stop(self, detach: bool) -> None:
        if detach:
            for ifname in self.config.interfaces:
                datapath.detach_xdp(ifname, generic=self.config.xdp_mode == "generic")
                datapath.detach_tc_egress(ifname)
            self.balancer.unpin()
            self.publish(Lifecycle("stop", "lbd stopped: XDP detached and maps unpinned"))
        else:
            self.publish(Lifecycle("stop", "lbd stopped: the datapath keeps forwarding"))
        self.balancer.close()

    def _resolve_nexthop(self) -> nexthop.Nexthop:
        if self.config.nexthop.mac:
            return nexthop.Nexthop(self.config.nexthop.mac.lower(), "", "config")
        return nexthop.resolve(self.config.nexthop.via)

    def tick(self) -> None:
        """Once a second: the datapath's clock."""
        self.reconciler.tick(int(time.monotonic()))

    async def settle_flows(self) -> SettleReport:
        """Every flows.settle_interval_s: sweeps the flow table off the event loop
        (a million sets take tens of milliseconds), removing idle entries, and
        settles the ring slots no entry holds. Reconciles may run meanwhile:
        the reconciler settles only VIPs they left alone."""
        start = self.reconciler.settle_begin()
        flows = self.config.flows
        sweep, blocked = await asyncio.to_thread(
            self.balancer.sweep_flows, self.reconciler.clock(), flows.idle_timeout_s,
            active_window_s=flows.active_window_s)
        report = self.reconciler.settle_finish(start, sweep, blocked)
        self.last_settle, self.last_settle_at = report, time.time()
        if self.metrics is not None:
            self.metrics.observe_settle(report)
        if report.slots_settled or sweep.expired:
            log.info("flow table: %s", report.summary())
        return report

    def find_nexthop(self) -> nexthop.Nexthop | None:
        """The next hop as the kernel's tables say now (blocking: run it off the event
        loop); None when it is configured, or cannot be resolved (the old one stays)."""
        if self.config.nexthop.mac:
            return None
        try:
            return self._resolve_nexthop()
        except nexthop.NexthopError as exc:
            log.warning("next hop: %s; keeping %s", exc, self.nexthop and self.nexthop.mac)
            return None

    def use_nexthop(self, found: nexthop.Nexthop | None) -> None:
        """A router change reaches the datapath."""
        if found is None or (self.nexthop is not None and found.mac == self.nexthop.mac):
            return
        old = self.nexthop.describe() if self.nexthop else "none"
        self.nexthop = found
        self._reconcile("next hop changed")
        self.publish(NexthopChanged(old, found.describe()))

    # -- changes --

    async def change(self, changes: Iterable[Change]) -> ChangeResult:
        """Validates, persists (in fleet mode: writes to etcd if the shared state is
        still the one validated against), then realises; refuses with StateError,
        changing nothing."""
        changes = list(changes)
        base, base_revision = self.state, self.fleet_revision
        new = apply_changes(base, changes, self.limits)
        if new == base:
            return ChangeResult([], None)
        try:
            self._attach_tunnel_checks(new)
        except datapath.DatapathError as exc:
            raise ReconcileError(f"checks through the VIP need the tc egress program: {exc}"
                                 ) from None
        revision = 0
        if self.fleet is not None:
            revision = await self.fleet.commit(base, new, base_revision)
            if revision <= self.fleet_revision:  # the watch brought it (or a newer one)
                return ChangeResult([c.describe() for c in changes], self.last_report)
        return self._adopt(new, changes, revision)

    def _adopt(self, new: DesiredState, changes: list[Change], revision: int,
               origin: str = "") -> ChangeResult:
        """Persists (the local copy) and realises a validated state."""
        self.store.save(new)
        if self.fleet is not None:
            self.store.save_fleet_revision(self.config.fleet.prefix, revision)
            self.fleet_revision = revision
        if self.metrics is not None:
            self.metrics.observe_state_write()
        self.state = new
        self.reconciler.allocate(new)  # the indexes the marks of checks through the VIP name
        if self.health is not None:
            self.health.update(new, self.runtime.healthy, self.check_marks())
            self.runtime = replace(self.runtime, healthy=self.health.healthy())
        if self.capacity is not None:
            self.capacity.update(new, self.runtime.healthy)
            self.runtime = replace(self.runtime, weights=self.capacity.effective_weights())
        lines = [c.describe() for c in changes]
        for change, line in zip(changes, lines, strict=True):
            vip, backend = change_subject(change)
            self.publish(Changed(line + origin, vip=vip, backend=backend))
        report = self._reconcile("change")
        if self.fleet is not None:
            self.fleet.report_changed()
        return ChangeResult(lines, report)

    async def import_to_fleet(self) -> int:
        """Local -> etcd mode: this host's state becomes the fleet's first revision."""
        if self.fleet is None:
            raise StateError("lbd runs in local-file mode: set [fleet] etcd in its "
                             "configuration and restart it first")
        revision = await self.fleet.import_state(self.state)
        if revision > self.fleet_revision:
            self._adopt(self.state, [], revision)
        return revision

    async def apply_document(self, document: str, dry_run: bool) -> ChangeResult:
        target = DesiredState.from_dict(parse_document(document), "document")
        changes = diff(self.state, target)
        apply_changes(self.state, changes, self.limits)  # refuses before anything is said
        if dry_run:
            return ChangeResult([c.describe() for c in changes], None)
        return await self.change(changes)

    def set_runtime(self, runtime: Runtime, reason: str) -> ReconcileReport:
        """Health and load feedback: not persisted, realised at once."""
        self.runtime = runtime
        return self._reconcile(reason)

    def _reconcile(self, reason: str) -> ReconcileReport:
        settings = self.config.datapath_settings(self.nexthop.mac) if self.nexthop else None
        report = self.reconciler.reconcile(self.state, self.runtime, settings)
        self.last_report = report
        self._note_realised_health()
        if self.metrics is not None:
            self.metrics.observe_reconcile(report)
        self._announce()
        if report.total_writes:
            self.publish(Reconciled(reason, report.summary()))
            for vip, positions in sorted(report.ring_positions.items()):
                if positions:
                    self.publish(Reconciled(reason, positions=positions, vip=vip))
        self._note_vips_serving()
        return report

    def _note_realised_health(self) -> None:
        """After a reconcile was written: each backend's health as the maps now hold
        it; a verdict that reached the maps is published (kind "realised")."""
        now = time.time()
        realised: dict[MemberId, RealisedHealth] = {}
        for key, vip in self.state.vips.items():
            for address in vip.backends:
                member = (key, address)
                serving = self.runtime.healthy.get(member, True)
                before = self.realised_health.get(member)
                if before is not None and before.serving == serving:
                    realised[member] = before
                    continue
                realised[member] = RealisedHealth(serving, now)
                if before is not None:
                    self._publish_realised(member, serving, now)
        self.realised_health = realised

    def _note_vips_serving(self) -> None:
        """After a reconcile was written: a VIP whose ring went from no healthy
        backend to some, or back, is published (kind "vip")."""
        serving: dict[VipKey, bool] = {}
        for key, plan in self.reconciler.plans.items():
            serving[key] = up = plan.healthy > 0
            before = self.vips_serving.get(key)
            if before is not None and before != up:
                self.publish(VipServing(up, plan.healthy, len(self.state.vips[key].backends),
                                        vip=str(key)))
        self.vips_serving = serving

    def _publish_realised(self, member: MemberId, serving: bool, now: float) -> None:
        key, address = member
        verdict = self.health.verdict_of(member) if self.health else None
        positions = self.reconciler.ring_positions(key).get(address, 0)
        self.publish(Realised(serving, positions, now - verdict.since if verdict else None,
                              vip=str(key), backend=address))

    def health_realised(self, member: MemberId) -> tuple[bool, float]:
        """Whether the maps hold this backend's current verdict, and since when they
        hold what they hold (0: not written yet)."""
        realised = self.realised_health.get(member)
        if realised is None:
            return False, 0.0
        verdict = self.health.serving(member) if self.health else realised.serving
        vip = self.state.vips.get(member[0])
        if self.fleet is not None and vip is not None and vip.health_scope == "fleet":
            verdict = self.runtime.healthy.get(member, True)  # the quorum's
        return verdict == realised.serving, realised.at

    # -- BGP and host maintenance --

    def announceable(self) -> set[str]:
        """VIP prefixes to announce: those with a healthy backend, unless the host is drained."""
        if self.host_drained:
            return set()
        return {bgp.host_prefix(key.address) for key, plan in self.reconciler.plans.items()
                if plan.healthy > 0}

    def _announce(self) -> str:
        """Tells BIRD what to announce; the error ("" if none): lbd retries every 5 s."""
        if self.announcer is None:
            return ""
        wanted = self.announceable()
        before = set(self.announcer.announced)
        try:
            changed = self.announcer.announce(wanted)
        except bgp.AnnounceError as exc:
            self.publish(BgpNotice(f"announcing failed: {exc}"))
            return str(exc)
        if changed:
            for prefix in sorted(wanted - before):
                self.publish(BgpNotice(f"announce {prefix}"))
            for prefix in sorted(before - wanted):
                self.publish(BgpNotice(f"withdraw {prefix}"))
        return ""

    def retry_announce(self) -> None:
        """Every few seconds: an announcement BIRD did not take is tried again."""
        if self.announcer is not None and self.announcer.last_error:
            self._announce()

    def set_host_drained(self, drained: bool) -> None:
        """Persisted, then applied: a drained host withdraws every VIP from BGP."""
        if drained == self.host_drained:
            return
        self.store.save_host_drained(drained)
        self.host_drained = drained
        self.publish(HostDrainChanged(drained))
        error = self._announce()
        if error:
            state = "drained" if drained else "undrained"
            raise bgp.AnnounceError(f"host {state}, but BIRD did not take it ({error}); "
                                    "lbd retries every 5 s")

    async def wait_idle(self, wait_s: float, quiet_s: float) -> tuple[bool, float, int]:
        """Until no new flow arrived for quiet_s, at most wait_s: (idle, waited, new flows)."""
        started = time.monotonic()
        first = last = self.global_counters()["new_flows"]
        last_change = started
        while time.monotonic() - started < wait_s:
            await asyncio.sleep(min(0.5, quiet_s / 4))
            now_flows = self.global_counters()["new_flows"]
            if now_flows != last:
                last, last_change = now_flows, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                return True, time.monotonic() - started, last - first
        return False, time.monotonic() - started, last - first

    def bgp_state(self) -> bgp.BgpState:
        """Asks BIRD (blocking: run it off the event loop); kept for the metrics."""
        if self.announcer is None:
            return bgp.BgpState(False)
        self.last_bgp_state = self.announcer.status()
        return self.last_bgp_state

    # -- reading --

    def count_flows(self, key: VipKey, address: str, active_within_s: float) -> tuple[int, int]:
        """Connection-table entries pointing at a backend, and those of them that
        sent a packet within active_within_s: how far a drain has come."""
        self.state.vip(key)
        index = self.reconciler.members.get((key, address))
        if index is None:
            raise NotFound(f"VIP {key}: no backend {address}")
        now = self.reconciler.clock()
        flows = active = 0
        for chunk in self.balancer.conns.values_batch():
            for entry in chunk:
                if entry.backend == index:
                    flows += 1
                    active += now - entry.last_seen_s <= active_within_s
        return flows, active

    def report_load(self, address: str, value: float, key: VipKey | None) -> int:
        """A pushed load sample (ReportLoad): how many VIP backends it applied to."""
        if key is not None:
            self.state.vip(key)
        if self.capacity is None:
            raise StateError("load feedback is not running")
        try:
            accepted = self.capacity.report(address, value, key)
        except ValueError as exc:
            raise StateError(f"load {value!r}: {exc}") from None
        if not accepted:
            raise NotFound(f"backend {address}: no VIP with capacity source push has it")
        return accepted

    def global_counters(self) -> dict[str, int]:
        return self.balancer.counters()

    def interfaces(self) -> list[tuple[str, int]]:
        return [(name, datapath.attached_prog_id(name)) for name in self.config.interfaces]

    # -- events --

    def publish(self, event: Event) -> None:
        """One event: logged, handed to the hooks and to every watcher of the Watch
        stream."""
        log.info(event.message(), extra={"event": event.kind, "vip": event.vip,
                                         "backend": event.backend})
        if self.hooks is not None:
            self.hooks.handle(event)
        for queue in list(self._watchers):
            if queue.qsize() < WATCH_QUEUE_LIMIT:
                queue.put_nowait(event)
            else:  # a watcher that stopped reading is cut off, not waited for
                self._watchers.discard(queue)
                queue.put_nowait(Overflow(vip=event.vip, backend=event.backend))

    def watch(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[Event]) -> None:
        self._watchers.discard(queue)
