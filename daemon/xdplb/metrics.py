"""Prometheus metrics of lbd.

Datapath counters are read from the BPF maps at scrape time (summed over
CPUs), so nothing polls in the background; control-plane metrics are
counted where things happen. The endpoint is served on lbd's event loop, so
a scrape never races a change. Labels are bounded: VIPs and backends (both
bounded by the map sizes), map names, check kinds, API methods and codes,
datapath and health-tunnel outcomes; never a flow.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from xdplb import structs as s
from xdplb.events import HealthTransition
from xdplb.views import Views, VipView

log = logging.getLogger("xdplb.metrics")
VIP_MODES = ("normal", "panic", "fail-open", "fail-closed")
HEALTH_STATES = ("up", "down", "unchecked", "held-down", "not-checked")
CHECK_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                         2.5, 5)


class CheckLatencies:
    """xdplb_health_check_duration_seconds: every health check's latency, per check kind.

    Observed for every check (10,000 a second with 10,000 backends at 1 s), so kept as
    plain bucket counts, one bisect and two additions per check, and turned into the
    histogram at scrape time. lbd's event loop does both, so they never race."""

    NAME = "xdplb_health_check_duration_seconds"
    HELP = "Health check latency, per check kind."

    def __init__(self, buckets: tuple[float, ...] = CHECK_SECONDS_BUCKETS):
        self.bounds = buckets
        self.counts: dict[str, list[int]] = {}  # per bucket, the last one +Inf; not cumulative
        self.sums: dict[str, float] = {}

    def observe(self, kind: str, seconds: float) -> None:
        counts = self.counts.get(kind)
        if counts is None:
            counts = self.counts[kind] = [0] * (len(self.bounds) + 1)
            self.sums[kind] = 0.0
        counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= le
        self.sums[kind] += seconds

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.NAME, self.HELP, labels=["kind"])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.NAME, self.HELP, labels=["kind"])
        for kind, counts in self.counts.items():
            cumulative = list(itertools.accumulate(counts))
            buckets = [(floatToGoString(b), n) for b, n in zip(self.bounds, cumulative[:-1],
                                                                strict=True)]
            family.add_metric([kind], [*buckets, ("+Inf", cumulative[-1])],
                              sum_value=self.sums[kind])
        yield family


class ControlPlaneMetrics:
    """Counted as things happen; registered next to the scrape-time collector."""

    def __init__(self, registry: CollectorRegistry):
        self.reconcile_seconds = Histogram(
            "xdplb_reconcile_duration_seconds", "Time to bring the maps to the desired state.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.ring_positions = Counter(
            "xdplb_ring_positions_written", "Maglev ring positions rewritten, per VIP.",
            ["vip"], registry=registry)
        self.map_writes = Counter(
            "xdplb_map_writes", "BPF map entries written by the reconciler, per map.",
            ["map"], registry=registry)
        self.api_requests = Counter(
            "xdplb_api_requests", "API requests by method and gRPC status code.",
            ["method", "code"], registry=registry)
        self.state_writes = Counter(
            "xdplb_state_file_writes", "Atomic writes of the state file.", registry=registry)
        self.health_transitions = Counter(
            "xdplb_health_transitions", "Health verdict changes, by backend and new state.",
            ["backend", "state"], registry=registry)
        self.sweep_seconds = Histogram(
            "xdplb_flow_sweep_duration_seconds",
            "Time to sweep the flow table (idle entries removed, ring slots settled).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.expired = Counter(
            "xdplb_flow_expired_entries", "Flow-table entries removed as idle by the sweep.",
            registry=registry)
        self.settled = Counter(
            "xdplb_ring_settled_positions",
            "Ring positions settled by the sweep: their established packets skip the "
            "flow table.", registry=registry)
        self.hook_runs = Counter(
            "xdplb_hook_runs", "Runs of [hooks] commands, by hook and outcome (ok, failed: "
            "a non-zero exit, timeout: killed, error: could not start, dropped: too many "
            "waiting).", ["hook", "outcome"], registry=registry)
        self.check_seconds = CheckLatencies()
        registry.register(self.check_seconds)
        self.observe_check = self.check_seconds.observe  # every check's latency

    def observe_settle(self, report: object) -> None:
        self.sweep_seconds.observe(report.sweep.seconds)
        self.expired.inc(report.sweep.expired)
        self.settled.inc(report.slots_settled)

    def observe_transition(self, event: HealthTransition) -> None:
        self.health_transitions.labels(event.backend, "up" if event.up else "down").inc()

    def observe_hook(self, hook: str, outcome: str) -> None:
        self.hook_runs.labels(hook, outcome).inc()

    def observe_state_write(self) -> None:
        self.state_writes.inc()

    def observe_api_request(self, method: str, code: str) -> None:
        self.api_requests.labels(method, code).inc()

    def observe_reconcile(self, report: object) -> None:
        self.reconcile_seconds.observe(report.duration_s)
        for vip, positions in report.ring_positions.items():
            if positions:
                self.ring_positions.labels(vip).inc(positions)
        for name, writes in report.writes.items():
            self.map_writes.labels(name).inc(writes)


class DatapathCollector:
    """Renders the controller's read-only views at scrape time (the BPF counters are
    read then, summed over CPUs)."""

    def __init__(self, views: Views):
        self.views = views

    def collect(self) -> Iterator[Metric]:
        vips = self.views.vips()
        yield from self._traffic(vips)
        yield from self._datapath_counters()
        yield from self._backends(vips)
        yield from self._vips(vips)
        yield from self._capacity()
        yield from self._bgp()
        yield from self._fleet()

    def _traffic(self, vips: list[VipView]) -> Iterator[Metric]:
        vip_packets = CounterMetricFamily("xdplb_vip_packets", "Packets forwarded per VIP.",
                                          labels=["vip"])
        vip_bytes = CounterMetricFamily("xdplb_vip_bytes", "Bytes forwarded per VIP.",
                                        labels=["vip"])
        be_packets = CounterMetricFamily("xdplb_backend_packets",
                                         "Packets forwarded per VIP backend.",
                                         labels=["vip", "backend"])
        be_bytes = CounterMetricFamily("xdplb_backend_bytes", "Bytes forwarded per VIP backend.",
                                       labels=["vip", "backend"])
        for vip in vips:
            name = str(vip.spec.key)
            vip_packets.add_metric([name], vip.packets)
            vip_bytes.add_metric([name], vip.bytes)
            for backend in vip.backends:
                be_packets.add_metric([name, backend.spec.address], backend.packets)
                be_bytes.add_metric([name, backend.spec.address], backend.bytes)
        yield from (vip_packets, vip_bytes, be_packets, be_bytes)

    def _datapath_counters(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "xdplb_datapath_packets",
            "Every packet the balancer saw, once, by what it did (pass, tx, drop) and why.",
            labels=["action", "reason"])
        events = CounterMetricFamily(
            "xdplb_datapath_events",
            "Connection-table and flow events: conn_hit, conn_miss, conn_rechosen, "
            "new_flows, new_flows_unrecorded, conn_busy, conn_settled (sent by a settled "
            "ring slot, the table not read), conn_evicted (a full set gave up the flow seen "
            "longest ago for a new one).", labels=["event"])
        counters = self.views.datapath_counters()
        for name in s.OUTCOME_COUNTERS:
            action, reason = name.split("_", 1)
            packets.add_metric([action, reason], counters[name])
        for name in s.EVENT_COUNTERS + s.FLOW_EVENT_COUNTERS:
            events.add_metric([name], counters[name])
        tunnel = CounterMetricFamily(
            "xdplb_health_tunnel_packets",
            "Packets of health checks through the VIP at tc egress, by outcome: "
            "encapsulated to their backend, or dropped (drop_unknown: the mark names no "
            "backend of the packet's VIP).", labels=["outcome"])
        hc = self.views.tunnel_counters()
        for name in s.HC_COUNTERS:
            tunnel.add_metric([name], hc[name])
        quic = CounterMetricFamily(
            "xdplb_quic_packets",
            "Packets of QUIC VIPs by how they were routed: routed (by the server ID in "
            "their connection ID), or the 5-tuple path because of client_cid (Initial, "
            "0-RTT), other_version, other_config, short_cid, not_quic, unknown_server, "
            "server_down or busy.", labels=["outcome"])
        for name, value in self.views.quic_counters().items():
            quic.add_metric([name], value)
        syn = CounterMetricFamily(
            "xdplb_syn_check_packets",
            "Replies to half-open (tcp-syn) checks the balancer saw, by outcome: open (a "
            "SYN-ACK, answered with a RST), refused (a RST), unmatched (no check expects it: "
            "passed to the stack), rst_error (recorded, but no RST could be built: dropped).",
            labels=["outcome"])
        for name, value in self.views.syn_counters().items():
            syn.add_metric([name], value)
        yield from (packets, events, tunnel, quic, syn)

    def _backends(self, vips: list[VipView]) -> Iterator[Metric]:
        healthy = GaugeMetricFamily("xdplb_backend_healthy",
                                    "1 when the backend's health verdict is up.",
                                    labels=["vip", "backend"])
        available = GaugeMetricFamily("xdplb_backend_available",
                                      "1 when the datapath may send flows to the backend.",
                                      labels=["vip", "backend"])
        weight = GaugeMetricFamily("xdplb_backend_weight", "Configured weight.",
                                   labels=["vip", "backend"])
        effective = GaugeMetricFamily("xdplb_backend_effective_weight",
                                      "Weight the ring is built with (0: drained or down).",
                                      labels=["vip", "backend"])
        load = GaugeMetricFamily("xdplb_backend_load",
                                 "Smoothed load a backend reports, in the unit of its VIP's "
                                 "capacity target (VIPs with load feedback).",
                                 labels=["vip", "backend"])
        factor = GaugeMetricFamily("xdplb_backend_capacity_ratio",
                                   "Weight multiplier from load feedback and slow start "
                                   "(1: the configured weight).",
                                   labels=["vip", "backend"])
        positions = GaugeMetricFamily("xdplb_backend_ring_positions",
                                      "Positions the backend holds in its VIP's ring.",
                                      labels=["vip", "backend"])
        active = GaugeMetricFamily("xdplb_backend_active_flows",
                                   "Connection-table entries naming the backend whose last "
                                   "packet is at most flows.active_window_s old, at the last "
                                   "sweep.", labels=["vip", "backend"])
        for vip in vips:
            for backend in vip.backends:
                labels = [str(vip.spec.key), backend.spec.address]
                healthy.add_metric(labels, int(backend.healthy))
                available.add_metric(labels, int(backend.available))
                weight.add_metric(labels, backend.spec.weight)
                effective.add_metric(labels, backend.effective_weight)
                positions.add_metric(labels, backend.ring_positions)
                if backend.active_flows is not None:
                    active.add_metric(labels, backend.active_flows)
                if backend.load is not None:
                    if backend.load.load is not None:
                        load.add_metric(labels, backend.load.load)
                    factor.add_metric(labels, backend.load.factor * backend.load.slow_start)
        yield from (healthy, available, weight, effective, positions, active, load, factor)

    def _bgp(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "xdplb_bgp_session_established",
            "1 when the BGP session is established (as BIRD reports, every 5 s).",
            labels=["session"])
        for session in self.views.bgp_sessions().sessions:
            sessions.add_metric([session.name], int(session.info.startswith("Established")))
        announced = GaugeMetricFamily("xdplb_bgp_announced",
                                      "1 when this host announces the VIP address's prefix.",
                                      labels=["prefix"])
        host = self.views.host()
        for prefix in host.announced:
            announced.add_metric([prefix], 1)
        drained = GaugeMetricFamily("xdplb_host_drained",
                                    "1 when the host is drained (every VIP withdrawn).")
        drained.add_metric([], int(host.host_drained))
        yield from (sessions, announced, drained)

    def _fleet(self) -> Iterator[Metric]:
        view = self.views.fleet_view()
        if view is None:  # local-file mode: no fleet series at all
            return
        realised = self.views.host().fleet_revision
        newest = view.newest.revision if view.newest else 0
        revision = GaugeMetricFamily("xdplb_fleet_revision", "Revisions of the fleet's "
                                     "desired state: the newest this lbd has read, and the "
                                     "one its maps realise.", labels=["kind"])
        revision.add_metric(["newest"], newest)
        revision.add_metric(["realised"], realised)
        yield revision
        yield GaugeMetricFamily("xdplb_fleet_behind_seconds", "How long the newest revision "
                                "has waited for this host's maps (0: realised).",
                                value=view.behind_s(realised, time.time()))
        yield GaugeMetricFamily("xdplb_fleet_connected", "1 while this lbd reaches etcd.",
                                value=1 if view.connected else 0)
        drift = view.drift()
        yield GaugeMetricFamily("xdplb_fleet_drifting_hosts", "Hosts that do not match the "
                                "fleet as this lbd sees it (behind, differing ring, refused "
                                "revision, lease expired).",
                                value=sum(1 for reasons in drift.values() if reasons))
        hosts = GaugeMetricFamily("xdplb_fleet_hosts", "Hosts with a report, by lease.",
                                  labels=["lease"])
        hosts.add_metric(["live"], sum(1 for name in drift if name in view.live))
        hosts.add_metric(["expired"], sum(1 for name in drift if name not in view.live))
        yield hosts

    def _vips(self, vips: list[VipView]) -> Iterator[Metric]:
        fingerprint = GaugeMetricFamily(
            "xdplb_vip_ring_info", "Always 1; the ring's fingerprint as a label: equal on "
            "every LB host with the same backends and health.", labels=["vip", "fingerprint"])
        for vip in vips:
            if vip.fingerprint:
                fingerprint.add_metric([str(vip.spec.key), vip.fingerprint[:16]], 1)
        yield fingerprint
        unsettled = GaugeMetricFamily(
            "xdplb_vip_unsettled_positions",
            "Ring positions whose established packets still read the flow table: changed "
            "since the last sweep, or held by flows recorded with another backend.",
            labels=["vip"])
        for vip in vips:
            unsettled.add_metric([str(vip.spec.key)], vip.unsettled_positions)
        yield unsettled
        mode = GaugeMetricFamily("xdplb_vip_mode",
                                 "1 for the VIP's current mode (normal, panic, fail-open, "
                                 "fail-closed), 0 for the others.", labels=["vip", "mode"])
        for vip in vips:
            for name in VIP_MODES:
                mode.add_metric([str(vip.spec.key), name], int(vip.mode == name))
        yield mode

    def _capacity(self) -> Iterator[Metric]:
        """Map occupancy (the connection table's from the last sweep), and build info."""
        host = self.views.host()
        used = GaugeMetricFamily("xdplb_map_entries_used", "Entries in use, per map.",
                                 labels=["map"])
        capacity = GaugeMetricFamily("xdplb_map_entries_capacity", "Entries a map holds.",
                                     labels=["map"])
        table = host.flow_table
        for name, n, cap in (("vips", host.vips, host.max_vips),
                             ("backends", host.backends, host.max_backends),
                             ("ring", host.ring_entries_used, host.ring_entries),
                             ("flows", table.entries, table.capacity)):
            if n is not None:  # flows: known from the first sweep
                used.add_metric([name], n)
            capacity.add_metric([name], cap)
        yield from (used, capacity)
        if table.swept_at:
            swept = GaugeMetricFamily("xdplb_flow_sweep_last_timestamp_seconds",
                                      "Unix time of the last sweep of the connection table.")
            swept.add_metric([], table.swept_at)
            yield swept
        build = GaugeMetricFamily("xdplb_build_info", "Always 1; lbd's version and the "
                                  "kernel its datapath runs on, as labels.",
                                  labels=["version", "kernel"])
        build.add_metric([host.version, os.uname().release], 1)
        yield build


def make_registry(views: Views) -> tuple[CollectorRegistry, ControlPlaneMetrics]:
    disable_created_metrics()  # no _created series beside every counter: half the series
    registry = CollectorRegistry()
    registry.register(DatapathCollector(views))
    return registry, ControlPlaneMetrics(registry)


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """GET /metrics on the event loop: a scrape sees one consistent moment."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
