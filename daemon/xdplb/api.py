"""The gRPC API (xdplb.v1, see v1/lb.proto) over the controller.

Requests are turned into the state module's dict form and validated there,
so the API, `lbctl apply` and the state file share one set of rules and
messages. Refusals map to gRPC codes: INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, RESOURCE_EXHAUSTED (limits), FAILED_PRECONDITION (the maps
could not be made to match), INTERNAL (the state file could not be written:
nothing changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xdplb import bgp, flows
from xdplb import state as st
from xdplb import structs as s
from xdplb.config import DaemonConfig
from xdplb.controller import ChangeResult, Controller
from xdplb.datapath import DatapathError
from xdplb.fleet import FleetConflict, FleetUnavailable
from xdplb.flows import FlowEntry
from xdplb.reconciler import ReconcileError, ReconcileReport
from xdplb.store import StoreError
from xdplb.v1 import lb_pb2 as pb
from xdplb.v1 import lb_pb2_grpc as pb_grpc
from xdplb.views import BackendView, FlowTableView, VipView

log = logging.getLogger("xdplb.api")

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (FleetConflict, grpc.StatusCode.ABORTED),
    (FleetUnavailable, grpc.StatusCode.UNAVAILABLE),
    (st.NotFound, grpc.StatusCode.NOT_FOUND),
    (st.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (st.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (st.StateError, grpc.StatusCode.INVALID_ARGUMENT),
    (ReconcileError, grpc.StatusCode.FAILED_PRECONDITION),
    (bgp.AnnounceError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.INTERNAL),
    (DatapathError, grpc.StatusCode.INTERNAL),
]


def _to_dict(message: Any) -> dict[str, Any]:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data.pop("status", None)
    for backend in data.get("backends", []):
        backend.pop("status", None)
    return data


MAX_WAIT_S = 86_400.0


def _seconds(name: str, value: float, low: float, high: float) -> float:
    """A duration from a request: finite and in range (NaN compares false to any)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise st.StateError(f"{name}: must be a number of seconds in {low:g}..{high:g}, "
                            f"got {value!r}")
    return value


def _flow_limit(limit: int, from_set: int, total_sets: int) -> int:
    """A ListFlows page's limit, once the request's limit and from_set are in range."""
    if from_set > total_sets:
        raise st.StateError(f"from_set: {from_set} is past the table's {total_sets} sets")
    try:
        return flows.flow_count_limit(limit)
    except ValueError as exc:
        raise st.StateError(str(exc)) from None


def _vip_key(text: str) -> st.VipKey:
    return st.VipKey.parse(text)


def _address(text: str) -> str:
    return st.canonical_address(text, "backend address")


def _merged_check(message: pb.HealthCheck, base: st.HealthCheck, where: str) -> st.HealthCheck:
    return st.check_from_dict(_to_dict(message), where, base)


def report_message(report: ReconcileReport | None) -> pb.ReconcileSummary | None:
    if report is None:
        return None
    return pb.ReconcileSummary(map_writes=report.total_writes,
                               ring_positions=report.ring_positions,
                               duration_ms=report.duration_s * 1000)


def backend_status(view: BackendView) -> pb.BackendStatus:
    status = pb.BackendStatus(
        healthy=view.healthy, available=view.available, index=view.index,
        ring_positions=view.ring_positions, effective_weight=view.effective_weight,
        packets=view.packets, bytes=view.bytes, health=view.health, check=view.check,
        since=view.since, last_result=view.last_result, check_latency_ms=view.latency_ms,
        health_realised=view.realised, realised_since=view.realised_since)
    if view.active_flows is not None:
        status.active_flows = view.active_flows
    if view.load is not None:
        status.load = view.load.load or 0.0
        status.load_age_s = view.load.age_s or 0.0
        status.load_state = view.load.state
        status.capacity_factor = view.load.factor
        status.slow_start_factor = view.load.slow_start
    return status


def _flow_table_status(view: FlowTableView) -> pb.FlowTableStatus:
    return pb.FlowTableStatus(
        capacity=view.capacity, entries=view.entries or 0, active=view.active or 0,
        active_window_s=view.active_window_s, swept_at=view.swept_at, evicted=view.evicted)


def _flow_message(flow: FlowEntry) -> pb.Flow:
    return pb.Flow(client=flow.client, client_port=flow.client_port,
                   vip="" if flow.vip is None else str(flow.vip), port=flow.port,
                   backend=flow.backend, idle_s=flow.idle_s)


def _change_response(result: ChangeResult) -> pb.ChangeResponse:
    return pb.ChangeResponse(changes=result.changes, reconcile=report_message(result.report))


class LoadBalancerService(pb_grpc.LoadBalancerServicer):
    def __init__(self, controller: Controller):
        self.ctl = controller

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.ctl.metrics is not None:
            self.ctl.metrics.observe_api_request(method, code.name)

    async def _run(self, context: grpc.aio.ServicerContext, method: str,
                   action: Callable[[], Any], *, finished: bool = True) -> Any:
        """Runs action, turning a refusal into its gRPC code; counts the request
        as answered unless more work follows (finished=False)."""
        try:
            result = action()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            for kind, code in _CODES:
                if isinstance(exc, kind):
                    log.info("%s refused: %s", method, exc)
                    self._count(method, code)
                    await context.abort(code, str(exc))
            log.exception("%s failed", method)
            self._count(method, grpc.StatusCode.INTERNAL)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method}: {exc}")
        if finished:
            self._count(method, grpc.StatusCode.OK)
        return result

    # -- reading: the controller's views, rendered --

    def vip_message(self, view: VipView) -> pb.Vip:
        message = json_format.ParseDict(st.vip_to_dict(view.spec), pb.Vip())
        message.status.CopyFrom(pb.VipStatus(
            mode=view.mode, vip_id=view.vip_id, healthy_backends=view.healthy_backends,
            serving_backends=view.serving_backends, packets=view.packets, bytes=view.bytes,
            ring_fingerprint=view.fingerprint, unsettled_positions=view.unsettled_positions,
            announced=view.announced))
        by_address = {b.spec.address: b for b in view.backends}
        for backend in message.backends:
            backend.status.CopyFrom(backend_status(by_address[backend.address]))
        return message

    async def ListVips(self, request, context):
        return await self._run(context, "ListVips", lambda: pb.ListVipsResponse(
            vips=[self.vip_message(v) for v in self.ctl.views.vips()]))

    async def GetVip(self, request, context):
        return await self._run(context, "GetVip", lambda: self.vip_message(
            self.ctl.views.vip(_vip_key(request.vip))))

    async def GetState(self, request, context):
        return await self._run(context, "GetState", lambda: pb.StateDocument(
            document=json.dumps(self.ctl.state.to_dict(), indent=2)))

    async def GetStats(self, request, context):
        return await self._run(context, "GetStats", lambda: self._stats(request.vip))

    def _stats(self, vip_text: str) -> pb.StatsResponse:
        views = [self.ctl.views.vip(_vip_key(vip_text))] if vip_text else self.ctl.views.vips()
        response = pb.StatsResponse()
        for view in views:
            response.traffic.add(vip=str(view.spec.key), packets=view.packets,
                                 bytes=view.bytes)
            for b in sorted(view.backends, key=lambda b: st.ip_sort_key(b.spec.address)):
                response.traffic.add(vip=str(view.spec.key), backend=b.spec.address,
                                     packets=b.packets, bytes=b.bytes)
        for name, value in self.ctl.views.datapath_counters().items():
            response.counters.add(name=name, value=value)
        return response

    async def GetStatus(self, request, context):
        # pyroute2's synchronous API runs its own event loop, and birdc is a
        # subprocess: keep both off this loop.
        interfaces = await asyncio.to_thread(self.ctl.interfaces)
        bgp_state = await asyncio.to_thread(self.ctl.bgp_state)
        return await self._run(context, "GetStatus", lambda: self._status(interfaces, bgp_state))

    def _status(self, interfaces: list[tuple[str, int]],
                bgp_state: bgp.BgpState) -> pb.StatusResponse:
        host = self.ctl.views.host()
        response = pb.StatusResponse(
            version=host.version, uptime_s=time.time() - host.started,
            interfaces=[pb.Interface(name=n, prog_id=p, mode=host.xdp_mode)
                        for n, p in interfaces],
            nexthop_mac=host.nexthop_mac, nexthop_source=host.nexthop_source,
            state_file=host.state_file, pin_dir=host.pin_dir, vips=host.vips,
            backends=host.backends, max_vips=host.max_vips, max_backends=host.max_backends,
            ring_entries_used=host.ring_entries_used, ring_entries=host.ring_entries,
            vip_status=[self.vip_message(v) for v in self.ctl.views.vips()],
            host_drained=host.host_drained, flow_table=_flow_table_status(host.flow_table),
            bgp=pb.BgpStatus(enabled=bgp_state.enabled, announced=bgp_state.announced,
                             error=bgp_state.error, sessions=[
                                 pb.BgpSession(name=s.name, state=s.state, info=s.info)
                                 for s in bgp_state.sessions]))
        summary = report_message(host.last_report)
        if summary is not None:
            response.last_reconcile.CopyFrom(summary)
        return response

    # -- changes --

    async def _change(self, context: grpc.aio.ServicerContext, method: str,
                      build: Callable[[], list[st.Change]]) -> pb.ChangeResponse:
        async def change() -> pb.ChangeResponse:
            return _change_response(await self.ctl.change(build()))

        response = await self._run(context, method, change)
        await self.ctl.settle_new_backends()
        return response

    async def AddVip(self, request, context):
        return await self._change(context, "AddVip", lambda: [
            st.AddVip(st.vip_from_dict(_to_dict(request.vip), "vip"))])

    async def DeleteVip(self, request, context):
        return await self._change(context, "DeleteVip", lambda: [
            st.RemoveVip(_vip_key(request.vip))])

    async def SetVip(self, request, context):
        return await self._change(context, "SetVip", lambda: [self._set_vip(request)])

    def _set_vip(self, request: pb.SetVipRequest) -> st.Change:
        key = _vip_key(request.vip)
        vip = self.ctl.state.vip(key)
        settings: dict[str, Any] = {name: getattr(request, name) for name in (
            "hash", "encap", "ring_size", "panic_threshold", "when_none_healthy",
            "health_scope", "health_quorum")
            if request.HasField(name)}
        if request.HasField("check"):
            settings["check"] = _merged_check(request.check, vip.check, "check")
        if request.HasField("capacity"):
            settings["capacity"] = st.capacity_from_dict(_to_dict(request.capacity),
                                                         "capacity", vip.capacity)
        if request.HasField("slow_start_s"):
            settings["slow_start_s"] = request.slow_start_s
        if request.HasField("quic") and request.clear_quic:
            raise st.StateError("quic and clear_quic: give one or the other")
        if request.HasField("quic"):
            base = st.quic_to_dict(vip.quic) if vip.quic else {}
            settings["quic"] = st.quic_from_dict(
                st.StrictTable({**base, **_to_dict(request.quic)}, "quic"), "quic")
        elif request.clear_quic:
            settings["quic"] = None
        return st.SetVip(key, settings)

    async def AddBackend(self, request, context):
        return await self._change(context, "AddBackend", lambda: [self._add_backend(request)])

    def _add_backend(self, request: pb.AddBackendRequest) -> st.Change:
        key = _vip_key(request.vip)
        vip = self.ctl.state.vip(key)
        backend = st.backend_from_dict(_to_dict(request.backend), "backend", vip.check)
        return st.AddBackend(key, backend)

    async def DeleteBackend(self, request, context):
        return await self._change(context, "DeleteBackend", lambda: [
            st.RemoveBackend(_vip_key(request.vip), _address(request.address))])

    async def SetBackend(self, request, context):
        return await self._change(context, "SetBackend", lambda: self._set_backend(request))

    def _set_backend(self, request: pb.SetBackendRequest) -> list[st.Change]:
        key, address = _vip_key(request.vip), _address(request.address)
        vip = self.ctl.state.vip(key)
        if address not in vip.backends:
            raise st.NotFound(f"VIP {key}: no backend {address}")
        settings = self._backend_settings(request, vip, key, address)
        changes: list[st.Change] = []
        if settings.settings or not request.HasField("server_id"):
            changes.append(settings)
        if request.HasField("server_id"):
            current = vip.backends[address].server_id
            if request.server_id != current and not request.force_server_id:
                raise st.StateError(
                    f"VIP {key} backend {address}: server_id {current} -> "
                    f"{request.server_id} moves the connections whose IDs carry {current} "
                    "off it: add force_server_id (--force-server-id) to do it anyway")
            changes.append(st.ReassignServerId(key, address, request.server_id))
        return changes

    def _backend_settings(self, request: pb.SetBackendRequest, vip: st.VipSpec,
                          key: st.VipKey, address: str) -> st.SetBackend:
        settings: dict[str, Any] = {name: getattr(request, name) for name in (
            "weight", "drained") if request.HasField(name)}
        if request.HasField("check") and request.clear_check:
            raise st.StateError("check and clear_check: give one or the other")
        if request.HasField("check"):
            base = vip.check_for(vip.backends[address])
            settings["check"] = _merged_check(request.check, base, "check")
        elif request.clear_check:
            settings["check"] = None
        return st.SetBackend(key, address, settings)

    async def Apply(self, request, context):
        async def apply() -> pb.ChangeResponse:
            return _change_response(await self.ctl.apply_document(request.document,
                                                                  request.dry_run))

        response = await self._run(context, "Apply", apply)
        await self.ctl.settle_new_backends()
        return response

    async def DrainHost(self, request, context):
        await self._run(context, "DrainHost", lambda: (
            _seconds("wait_s", request.wait_s, 0.0, MAX_WAIT_S),
            _seconds("quiet_s", request.quiet_s, 0.0, 3600.0)), finished=False)
        await self._run(context, "DrainHost", lambda: self.ctl.set_host_drained(
            not request.undo))
        bgp_on = self.ctl.views.host().bgp_enabled
        if request.undo:
            return pb.DrainHostResponse(drained=False, message=(
                "host back in service: VIPs with a healthy backend are announced again"
                if bgp_on else "host back in service (BGP is disabled: nothing to announce)"))
        done = ("host drained: every VIP withdrawn from BGP" if bgp_on else
                "host marked drained (persisted), but BGP is disabled in lbd's configuration: "
                "no route was withdrawn and routers keep sending new flows here")
        if request.wait_s == 0:
            return pb.DrainHostResponse(drained=False, message=f"{done}; not waiting for new "
                                                               "flows to stop")
        quiet = request.quiet_s or 5.0
        idle, waited, flows = await self.ctl.wait_idle(request.wait_s, quiet)
        message = (f"{done}; no new flow for {quiet:g} s: drained" if idle else
                   f"{done}; still receiving new flows after {waited:.1f} s")
        return pb.DrainHostResponse(drained=idle, waited_s=waited, new_flows=flows,
                                    message=message)

    async def ReportLoad(self, request, context):
        return await self._run(context, "ReportLoad", lambda: self._report_load(request))

    def _report_load(self, request: pb.ReportLoadRequest) -> pb.ReportLoadResponse:
        address = _address(request.address)
        key = _vip_key(request.vip) if request.vip else None
        return pb.ReportLoadResponse(accepted=self.ctl.report_load(address, request.value,
                                                                   key))

    async def CountFlows(self, request, context):
        within = request.active_within_s or 60.0
        return await self._run(context, "CountFlows", lambda: self._count_flows(
            request.vip, request.address,
            _seconds("active_within_s", within, 1.0, MAX_WAIT_S)))

    def _count_flows(self, vip: str, address: str, within: float) -> pb.FlowCount:
        flows, active = self.ctl.count_flows(_vip_key(vip), _address(address), within)
        return pb.FlowCount(flows=flows, active=active)

    async def ListFlows(self, request, context):
        views = self.ctl.views
        names, wanted, limit = await self._run(context, "ListFlows", lambda: (
            views.flow_names(),
            views.flow_filter(_vip_key(request.vip) if request.vip else None,
                              _address(request.backend) if request.backend else None),
            _flow_limit(request.limit, request.from_set,
                        views.flow_table().capacity // s.FLOW_WAYS)),
            finished=False)
        try:
            page = await asyncio.to_thread(views.read_flow_page, names, wanted, limit,
                                           request.from_set)
        except DatapathError as exc:
            log.error("ListFlows: %s", exc)
            self._count("ListFlows", grpc.StatusCode.INTERNAL)
            await context.abort(grpc.StatusCode.INTERNAL, f"ListFlows: {exc}")
        self._count("ListFlows", grpc.StatusCode.OK)
        return pb.ListFlowsResponse(
            flows=[_flow_message(f) for f in page.flows], from_set=page.from_set,
            next_set=page.next_set, total_sets=page.total_sets, ways=s.FLOW_WAYS,
            entries_read=page.entries_read, limit_reached=page.limit_reached)

    # -- the watch stream --

    # -- the fleet --

    async def FleetStatus(self, request, context):
        return await self._run(context, "FleetStatus", self._fleet_status)

    def _fleet_status(self) -> pb.FleetStatusResponse:
        fleet = self.ctl.config.fleet
        view = self.ctl.views.fleet_view()
        if view is None:
            return pb.FleetStatusResponse(enabled=False)
        now, drift = time.time(), view.drift()
        newest = view.newest.revision if view.newest else 0
        hosts = [pb.FleetHost(
            name=name, live=name in view.live, revision=report.revision,
            behind_s=view.behind_s(report.revision, now), version=report.version,
            addresses=report.addresses, drained=report.drained, bgp=report.bgp,
            fingerprints=report.fingerprints, down=report.down, drift=drift.get(name, []),
            reported_at=report.reported_at) for name, report in sorted(view.reports.items())]
        return pb.FleetStatusResponse(
            enabled=True, connected=view.connected, prefix=fleet.prefix,
            endpoints=",".join(fleet.etcd), newest_revision=newest,
            realised_revision=self.ctl.fleet_revision, hosts=hosts, error=view.error,
            host=fleet.host_name)

    async def FleetImport(self, request, context):
        async def import_state() -> pb.FleetImportResponse:
            revision = await self.ctl.import_to_fleet()
            return pb.FleetImportResponse(revision=revision, vips=len(self.ctl.state.vips))

        return await self._run(context, "FleetImport", import_state)

    async def FleetForget(self, request, context):
        async def forget() -> pb.FleetForgetResponse:
            if self.ctl.fleet is None:
                raise st.StateError("lbd runs in local-file mode: there is no fleet")
            await self.ctl.fleet.forget(request.host)
            return pb.FleetForgetResponse()

        return await self._run(context, "FleetForget", forget)

    async def Watch(self, request, context) -> AsyncIterator[pb.Event]:
        self._count("Watch", grpc.StatusCode.OK)
        queue = self.ctl.watch()
        try:
            while True:
                event = await queue.get()
                yield pb.Event(time=event.time, kind=event.kind, message=event.message(),
                               vip=event.vip, backend=event.backend)
                if event.kind == "overflow":
                    return
        finally:
            self.ctl.unwatch(queue)


# --- the server -----------------------------------------------------------------------


class ApiError(RuntimeError):
    """The API cannot be served; the message says where and why."""


def claim_socket(path: Path) -> None:
    """Removes a stale socket file; refuses when a live lbd answers on it. lbd calls
    it before touching any map, and again just before binding."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return
    if not path.is_socket():
        raise ApiError(f"api.socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a daemon that died
        return
    finally:
        probe.close()
    raise ApiError(f"api.socket {path}: another lbd is serving on it")


def _tls_credentials(config: DaemonConfig) -> grpc.ServerCredentials:
    api = config.api
    key, cert = Path(api.tls_key).read_bytes(), Path(api.tls_cert).read_bytes()
    ca = Path(api.client_ca).read_bytes() if api.client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)


async def serve(controller: Controller) -> grpc.aio.Server:
    """Starts the API on the unix socket (0600) and, if configured, on TCP."""
    config = controller.config
    # No SO_REUSEPORT: a second lbd must fail to bind the same TCP port, not share it.
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", st.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", st.MAX_MESSAGE_BYTES)])
    pb_grpc.add_LoadBalancerServicer_to_server(LoadBalancerService(controller), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (pb.DESCRIPTOR.services_by_name["LoadBalancer"].full_name,
                health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    socket_path = config.api.socket
    claim_socket(socket_path)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    finally:
        os.umask(old_umask)
    if config.api.listen:
        if config.api.insecure:
            bound = server.add_insecure_port(config.api.listen)
        else:
            bound = server.add_secure_port(config.api.listen, _tls_credentials(config))
        if not bound:
            raise ApiError(f"api.listen {config.api.listen}: cannot listen there")
    await server.start()
    os.chmod(socket_path, 0o600)
    for service in ("", services[0]):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server


async def stop(server: grpc.aio.Server, socket_path: Path) -> None:
    await server.stop(grace=2)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
