"""Health checking: xdplb.health unit by unit, then through the real lbd.

Unit tests drive Verdict with a controlled clock, _judge_http with canned
responses, HealthChecker.update with desired states, and run_probe against
real listeners on 127.0.0.1 (TCP, HTTP, HTTPS, gRPC; refused and timeout).

The lab tests run the real lbd and lbctl against real servers in the
backend namespaces (xdplb_lab.backend_server: HTTP and grpc.health.v1 in one
process, failing on demand through a control file) and time what the
datapath does, read from lbd's pinned maps every 10 ms:

* a stopped backend leaves its VIPs' rings (and is marked unavailable)
  within fall x interval + timeout, and a restarted one returns within
  rise x interval + timeout (the last check's own duration), for TCP, HTTP
  and gRPC checks; each measured time is asserted between a lower bound
  that proves rise/fall were honoured and an upper bound plus ALLOWANCE_S
  (see there);
* HTTP 503 and gRPC NOT_SERVING count as down (a TCP check of the same
  server stays up);
* scapy flows during a failure: flows of healthy backends keep their
  backend, flows of the failed one all move to one healthy backend each;
* a backend flapping at every check for FLAP_S = 10 s at a 100 ms interval
  (the issue's "a minute" scaled down: 100 checks, each one a transition)
  rewrites its VIP's ring at most the number of times the damping constants
  allow, lbd survives, and the backend returns once it settles;
* the panic threshold and fail-open/fail-closed, as `lbctl status` shows
  them and as the rings hold them;
* identical checks of one backend on several VIPs run once (the backend
  counts the requests it gets).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import require_root
from tests.lbd_helpers import EMPTY_STATE, apply_doc, ok
from xdplb import health
from xdplb.health import (
    DAMPING_HALF_LIFE_CHECKS,
    DAMPING_MAX,
    DAMPING_PENALTY,
    DAMPING_REUSE,
    DAMPING_SUPPRESS,
    JITTER,
    TICK_S,
    GrpcChannels,
    HealthChecker,
    Probe,
    Result,
    Verdict,
    _judge_http,
    run_probe,
)
from xdplb.state import BackendSpec, DesiredState, HealthCheck, VipKey, VipSpec

OK = Result(True, "ok", 0.001)
FAIL = Result(False, "refused", 0.001)


def probe(kind: str = "tcp", address: str = "127.0.0.1", port: int = 80, *,
          path: str = "/", host: str = "", expect: tuple[int, ...] = (200,), body: str = "",
          service: str = "", interval_ms: int = 100, timeout_ms: int = 50, rise: int = 2,
          fall: int = 3) -> Probe:
    return Probe(kind, address, port, path, host, expect, body, service, interval_ms,
                 timeout_ms, rise, fall)


# --- Verdict: rise, fall, first verdict, damping --------------------------------------------


def test_first_check_decides_at_once():
    up = Verdict(probe())
    assert up.up is None and not up.serving() and up.reason() == "not checked yet"
    assert up.observe(OK, 0.0) and up.up and up.serving()
    down = Verdict(probe())
    assert down.observe(FAIL, 0.0) and down.up is False and not down.serving()
    assert (up.transitions, down.transitions) == (0, 0)  # a first verdict is no transition
    assert down.reason() == "refused"


def test_fall_failures_in_a_row_take_it_down_and_rise_successes_bring_it_back():
    v = Verdict(probe(rise=2, fall=3))
    v.observe(OK, 0.0)
    for now, result in enumerate([FAIL, FAIL, OK, FAIL, FAIL], start=1):
        assert not v.observe(result, now) and v.up  # the success reset the count
    since = v.since
    assert v.observe(FAIL, 6) and v.up is False and v.since >= since
    assert not v.observe(OK, 7) and v.up is False
    assert not v.observe(FAIL, 8)  # a failure resets the successes
    assert not v.observe(OK, 9)
    assert v.observe(OK, 10) and v.up
    assert v.transitions == 2 and v.streak == 0


def flap(v: Verdict, start: float, spacing: float, count: int) -> float:
    """`count` transitions of a rise=fall=1 verdict, `spacing` s apart; returns the last time."""
    now = start
    for _ in range(count):
        now += spacing
        assert v.observe(FAIL if v.up else OK, now)
    return now


def transitions_to_hold_down(spacing_s: float, half_life_s: float) -> int:
    """How many transitions `spacing_s` apart reach DAMPING_SUPPRESS from no penalty."""
    decay, penalty, n = 0.5 ** (spacing_s / half_life_s), 0.0, 0
    while penalty < DAMPING_SUPPRESS:
        penalty, n = min(penalty * decay + DAMPING_PENALTY, DAMPING_MAX), n + 1
    return n


def test_damping_holds_a_flapping_backend_down_and_releases_it_once_settled():
    v = Verdict(probe(interval_ms=100, rise=1, fall=1))
    assert v.half_life_s == pytest.approx(DAMPING_HALF_LIFE_CHECKS * 0.1)
    v.observe(OK, 0.0)
    n = transitions_to_hold_down(0.1, v.half_life_s)
    assert n == 4  # the penalty decays a little between transitions: three are not enough
    last = flap(v, 0.0, 0.1, n - 1)
    assert not v.suppressed and v.up is False  # down, up, down
    last = flap(v, last, 0.1, 1)
    assert v.suppressed and v.up and not v.serving()  # up, but held down
    assert v.reason() == "flapping: held down"
    hold = v.held_for(last)
    assert hold == pytest.approx(v.half_life_s * math.log2(v.penalty / DAMPING_REUSE))
    assert not v.release(last + hold - 0.01) and not v.serving()
    assert v.release(last + hold + 0.01) and v.serving()
    assert not v.release(last + hold + 0.02)  # once


def test_damping_penalty_is_capped_so_the_hold_down_is_bounded():
    v = Verdict(probe(interval_ms=100, rise=1, fall=1))
    v.observe(OK, 0.0)
    last = flap(v, 0.0, 0.1, 200)
    assert v.suppressed and v.penalty <= DAMPING_MAX
    assert v.held_for(last) <= v.half_life_s * math.log2(DAMPING_MAX / DAMPING_REUSE)


def test_slow_transitions_are_never_held_down():
    """Transitions further apart than the penalty can build up against its decay."""
    v = Verdict(probe(interval_ms=100, rise=1, fall=1))
    v.observe(OK, 0.0)
    flap(v, 0.0, v.half_life_s * 2, 50)  # 1000 / (1 - 0.25) < DAMPING_SUPPRESS
    assert not v.suppressed


def notes() -> tuple[list[str], HealthChecker]:
    lines: list[str] = []
    checker = HealthChecker(lambda healthy: None, lambda event: lines.append(event.message()))
    return lines, checker


def test_judge_reports_every_change_with_its_reason_and_wakes_the_batcher_on_release():
    """A release from hold-down changes who serves: the batcher must hear of it."""
    async def scenario():
        lines, checker = notes()
        v = Verdict(probe(interval_ms=100, rise=1, fall=1))
        checker._judge(v, OK, 0.0)
        assert lines[-1] == "tcp 127.0.0.1:80 is up: ok (first check)"
        assert checker._wake.is_set()
        checker._wake.clear()
        now = 0.0
        for _ in range(4):
            now += 0.1
            checker._judge(v, FAIL if v.up else OK, now)
        assert v.suppressed and v.up
        assert "tcp 127.0.0.1:80 is down: refused (1 failure in a row)" in lines
        assert "held down for" in lines[-1] and "flapping (4 transitions)" in lines[-1]
        checker._wake.clear()
        hold = v.held_for(now)
        checker._judge(v, OK, now + hold / 2)  # still held: nothing changes
        assert not checker._wake.is_set()
        checker._judge(v, OK, now + hold + 0.01)
        assert checker._wake.is_set() and v.serving()
        assert lines[-1].startswith("tcp 127.0.0.1:80 is up: released from the flapping")

    asyncio.run(scenario())


# --- the HTTP verdict -----------------------------------------------------------------------


@pytest.mark.parametrize(("response", "expect", "body", "reason"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200,), "", "ok"),
    (b"HTTP/1.0 204 No Content\r\n\r\n", (200, 204), "", "ok"),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\ndown", (200,), "", "status 503"),
    (b"HTTP/1.1 200 OK\r\n\r\nall good here", (200,), "good", "ok"),
    (b"HTTP/1.1 200 OK\r\nX: good\r\n\r\nnope", (200,), "good", "body lacks 'good'"),
    (b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n", (200,), "", "status 302"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", (200,), "", "bad response 'SSH-2.0-OpenSSH_9.2'"),
    (b"HTTP/1.1 abc\r\n\r\n", (200,), "", "bad response 'HTTP/1.1 abc'"),
    (b"", (200,), "", "empty response"),
])
def test_judge_http(response, expect, body, reason):
    assert _judge_http(probe("http", expect=expect, body=body), response) == reason


# --- HealthChecker.update: one check per probe, shared across VIPs ---------------------------


VIP_A = VipKey("10.200.0.10", 80, "tcp")
VIP_B = VipKey("10.200.0.11", 80, "tcp")
VIP_C = VipKey("10.200.0.12", 81, "tcp")
HOURLY = HealthCheck(kind="tcp", interval_ms=3_600_000, timeout_ms=1000)


def vip(key: VipKey, *backends: BackendSpec, check: HealthCheck = HOURLY) -> VipSpec:
    # Loopback backends (no validation here): a stray check stays on this host.
    return VipSpec(key, check=check, backends={b.address: b for b in backends})


def test_identical_checks_are_shared_across_vips_and_stop_when_unused():
    async def scenario():
        _, checker = notes()
        a, b = "127.0.0.2", "127.0.0.3"
        state = DesiredState({
            VIP_A: vip(VIP_A, BackendSpec(a), BackendSpec(b)),
            VIP_B: vip(VIP_B, BackendSpec(a, check=HOURLY)),  # its own, identical check
            VIP_C: vip(VIP_C, BackendSpec(a), BackendSpec(b, check=HealthCheck(kind="none"))),
        })
        known = {(VIP_A, a): True, (VIP_A, b): False}
        checker.update(state, known)
        shared, other, port81 = (Probe.of(HOURLY, a, 80), Probe.of(HOURLY, b, 80),
                                 Probe.of(HOURLY, a, 81))
        assert checker.members[(VIP_A, a)] == checker.members[(VIP_B, a)] == shared
        assert checker.members[(VIP_C, a)] == port81  # another port: another check
        assert checker.members[(VIP_C, b)] is None
        assert set(checker.verdicts) == {shared, other, port81}
        scheduled = sorted(id(v) for _, _, v in checker._due)
        assert scheduled == sorted(id(v) for v in checker.verdicts.values())  # once each
        # Seeded from what was known: a restart does not start from "unchecked"...
        assert checker.verdicts[shared].up is True
        assert checker.verdicts[other].up is False
        assert checker.healthy() == {(VIP_A, a): True, (VIP_B, a): True, (VIP_A, b): False,
                                     (VIP_C, a): False, (VIP_C, b): True}
        assert checker.unchecked() == [port81]
        # ...and its first check comes within its first interval; an unknown one at once.
        now = time.monotonic()
        firsts = {v.probe: due for due, _, v in checker._due}
        assert firsts[port81] <= now < firsts[shared] <= now + 3600
        verdict = checker.verdicts[shared]
        # VIP_A goes: its check of `a` lives on for VIP_B, the same verdict.
        checker.update(DesiredState({VIP_B: state.vips[VIP_B], VIP_C: state.vips[VIP_C]}), {})
        assert checker.verdicts[shared] is verdict
        assert other not in checker.verdicts
        checker.update(DesiredState(), {})
        assert checker.verdicts == {} and checker.members == {}
        await asyncio.sleep(0.1)  # the check of port 81 was due: it ran or was dropped
        assert checker.in_flight == 0
        runs = checker.checks_run
        await asyncio.sleep(0.1)
        assert checker.checks_run == runs
        await checker.close()

    asyncio.run(scenario())


def test_checks_through_the_vip_are_one_per_backend_entry_and_follow_its_mark():
    """A check via the VIP connects to the VIP with the backend entry's mark: one
    check per (VIP, backend), never shared with the backend's own-address check,
    and a new mark (the backend re-added under another index) is a new check."""
    async def scenario():
        _, checker = notes()
        told: list[tuple[str, str]] = []
        checker.notify = lambda event: told.append((event.message(), event.backend))
        a, b = "127.0.0.2", "127.0.0.3"
        via_vip = dataclasses.replace(HOURLY, via="vip")
        state = DesiredState({
            VIP_A: vip(VIP_A, BackendSpec(a), BackendSpec(b), check=via_vip),
            VIP_B: vip(VIP_B, BackendSpec(a)),  # the same backend, its own address
        })
        marks = {(VIP_A, a): 0x58440001, (VIP_A, b): 0x58440002, (VIP_B, a): 0x58440003}
        checker.update(state, {}, marks)
        probe_a, probe_b = checker.members[(VIP_A, a)], checker.members[(VIP_A, b)]
        assert (probe_a.address, probe_a.port, probe_a.fwmark, probe_a.backend) == (
            VIP_A.address, 80, 0x58440001, a)
        assert (probe_b.address, probe_b.fwmark, probe_b.backend) == (
            VIP_A.address, 0x58440002, b)
        own = checker.members[(VIP_B, a)]
        assert (own.address, own.fwmark, own.backend) == (a, 0, "")
        assert len(checker.verdicts) == 3
        assert probe_a.describe() == f"tcp {VIP_A.address}:80 through the tunnel to {a}"
        checker._tell(checker.verdicts[probe_a], "ok")
        assert [backend for _, backend in told] == [a]  # the backend's, not the VIP's
        checker.update(state, {}, {**marks, (VIP_A, a): 0x58440009})
        assert checker.members[(VIP_A, a)].fwmark == 0x58440009
        assert probe_a not in checker.verdicts
        with pytest.raises(ValueError, match="needs the VIP and the backend's mark"):
            Probe.of(via_vip, a, 80)
        await checker.close()

    asyncio.run(scenario())


def test_update_of_ten_thousand_backends_takes_linear_time():
    """update() runs on every change inside lbd's event loop: matching each new check
    to its backends member by member took ~14 s for 10,000 backends (quadratic)."""
    async def scenario():
        _, checker = notes()
        backends = [f"127.1.{i >> 8}.{i & 255}" for i in range(10_000)]
        keys = [VipKey(f"10.200.0.{v + 1}", 80, "tcp") for v in range(10)]
        state = DesiredState({key: vip(key, *(BackendSpec(a) for a in backends[v::10]))
                              for v, key in enumerate(keys)})
        known = {(key, a): True for key, spec in state.vips.items() for a in spec.backends}
        started = time.perf_counter()
        checker.update(state, known)
        took = time.perf_counter() - started
        assert len(checker.verdicts) == 10_000 and not checker.unchecked()
        await checker.close()
        return took

    assert asyncio.run(scenario()) < 2.0


# --- run_probe against real listeners ------------------------------------------------------


class Listeners:
    """Local servers for run_probe, inside the test's event loop."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.servers: list[asyncio.base_events.Server] = []

    async def http(self, response: bytes, *, answer: bool = True, wait_request: bool = True,
                   tls: ssl.SSLContext | None = None) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                if wait_request:
                    self.requests.append(await reader.readuntil(b"\r\n\r\n"))
                if answer:
                    writer.write(response)
                    await writer.drain()
                    writer.close()
                else:
                    await asyncio.sleep(10)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for server in self.servers:
            server.close()


@contextlib.contextmanager
def hanging_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: the kernel drops SYNs to
    it, so a connect hangs until its timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname(), timeout=1)
        try:
            yield full.getsockname()[1]
        finally:
            filler.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_probe_ok_refused_and_timeout():
    async def scenario():
        channels = GrpcChannels()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            port = listener.getsockname()[1]
            result = await run_probe(probe("tcp", port=port), channels)
            assert result.ok and result.reason == "ok" and 0 < result.latency_s < 0.05
        result = await run_probe(probe("tcp", port=closed_port()), channels)
        assert (result.ok, result.reason) == (False, "refused")
        with hanging_port() as port:
            result = await run_probe(probe("tcp", port=port, timeout_ms=100), channels)
        assert (result.ok, result.reason) == (False, "timeout")
        assert 0.09 <= result.latency_s < 0.5

    asyncio.run(scenario())


def test_http_probe_sends_path_and_host_and_judges_the_answer():
    async def scenario():
        servers, channels = Listeners(), GrpcChannels()
        good = await servers.http(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nbackend1")
        result = await run_probe(probe("http", port=good, path="/healthz", host="www.test",
                                       body="backend"), channels)
        assert result.ok, result
        request = servers.requests[-1].decode()
        assert request.startswith("GET /healthz HTTP/1.1\r\n") and "Host: www.test\r\n" in request
        await run_probe(probe("http", port=good), channels)
        assert "Host: 127.0.0.1\r\n" in servers.requests[-1].decode()
        failing = await servers.http(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        result = await run_probe(probe("http", port=failing), channels)
        assert (result.ok, result.reason) == (False, "status 503")
        result = await run_probe(probe("http", port=good, body="nginx"), channels)
        assert (result.ok, result.reason) == (False, "body lacks 'nginx'")
        mute = await servers.http(b"", answer=False)
        result = await run_probe(probe("http", port=mute, timeout_ms=100), channels)
        assert (result.ok, result.reason) == (False, "timeout")
        result = await run_probe(probe("http", port=closed_port()), channels)
        assert (result.ok, result.reason) == (False, "refused")
        servers.close()

    asyncio.run(scenario())


def test_http_probe_does_not_wait_for_a_server_that_keeps_the_connection_open():
    """A server ignoring "Connection: close": the status line is all the check needs."""
    async def scenario():
        lingering = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(lingering)
            await writer.drain()
            await asyncio.sleep(10)  # never closes

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for body in ("", "ok"):
            result = await run_probe(probe("http", port=port, body=body, timeout_ms=500),
                                     GrpcChannels())
            assert result.ok and result.latency_s < 0.2, result
        server.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("tls")
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=backend.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def test_https_probe_sends_the_host_as_sni_and_verifies_no_certificate(certificate):
    key, cert = certificate
    names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: names.append(name)

    async def scenario():
        servers = Listeners()
        port = await servers.http(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", tls=tls)
        result = await run_probe(probe("https", port=port, host="www.test", timeout_ms=1000),
                                 GrpcChannels())
        assert result.ok, result
        result = await run_probe(probe("https", port=port, timeout_ms=1000), GrpcChannels())
        assert result.ok, result
        plain = await servers.http(b"HTTP/1.1 200 OK\r\n\r\n", wait_request=False)
        result = await run_probe(probe("https", port=plain, timeout_ms=1000), GrpcChannels())
        assert not result.ok and result.reason.startswith("tls"), result
        servers.close()

    asyncio.run(scenario())
    assert names[:2] == ["www.test", None]  # no SNI for a bare address


class FakeHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        self.status = {"": serving, "lb.Backend": serving}
        self.delay = 0.0

    async def Check(self, request, context):
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.service not in self.status:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=self.status[request.service])


async def grpc_server(servicer: FakeHealth, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def test_grpc_probe_serving_not_serving_unknown_timeout_refused():
    async def scenario():
        servicer, channels = FakeHealth(), GrpcChannels()
        server, port = await grpc_server(servicer)
        check = probe("grpc", port=port, service="lb.Backend", timeout_ms=200)
        assert (await run_probe(check, channels)).ok
        assert (await run_probe(probe("grpc", port=port, timeout_ms=200), channels)).ok
        servicer.status["lb.Backend"] = health_pb2.HealthCheckResponse.NOT_SERVING
        result = await run_probe(check, channels)
        assert (result.ok, result.reason) == (False, "NOT_SERVING")
        result = await run_probe(probe("grpc", port=port, service="other"), channels)
        assert (result.ok, result.reason) == (False, "grpc NOT_FOUND")
        servicer.status["lb.Backend"] = health_pb2.HealthCheckResponse.SERVING
        servicer.delay = 0.5
        result = await run_probe(check, channels)
        assert (result.ok, result.reason) == (False, "timeout")
        assert result.latency_s < 0.4
        await server.stop(0)
        result = await run_probe(probe("grpc", port=closed_port()), channels)
        assert (result.ok, result.reason) == (False, "grpc UNAVAILABLE")
        await channels.close()

    asyncio.run(scenario())


def test_grpc_probe_sees_a_restarted_server_at_once():
    """gRPC's reconnect backoff must not delay a revived backend: a failed
    check drops its channel, and the next one connects afresh."""
    async def scenario():
        servicer, channels = FakeHealth(), GrpcChannels()
        server, port = await grpc_server(servicer)
        check = probe("grpc", port=port, timeout_ms=200)
        assert (await run_probe(check, channels)).ok
        await server.stop(0)
        for _ in range(8):  # down for 0.8 s: backoff would be at 1 s or more by now
            assert not (await run_probe(check, channels)).ok
            await asyncio.sleep(0.1)
        server, _ = await grpc_server(servicer, port)
        result = await run_probe(check, channels)
        assert result.ok, result
        await server.stop(0)
        await channels.close()

    asyncio.run(scenario())


# --- the scheduler in-process: timing, batches, robustness ------------------------------------


# What the timing assertions allow on top of the bounds of the check loops:
# one batch interval (a verdict reached just after another batch was applied
# waits for the next; a lone change is applied at once) plus 100 ms for the
# event loop, the reconcile, the scheduling of lbd, the backends and the test
# on a 2-CPU machine, and the test's own 10 ms polling of the maps.
BATCH_S = 0.2
ALLOWANCE_S = BATCH_S + 0.1


def test_marked_probes_connect_from_marked_sockets_and_speak_as_unmarked_ones(certificate):
    """A check through the VIP (a probe with a mark) opens its own socket, sets the
    mark, connects, and then speaks exactly as any check: TCP, HTTP and HTTPS (with
    the Host header as SNI, none without it) against local listeners, where the
    mark changes nothing."""
    key, cert = certificate
    names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, ctx: names.append(name)

    def marked(kind: str, port: int, **fields) -> Probe:
        return dataclasses.replace(probe(kind, port=port, timeout_ms=1000, **fields),
                                   fwmark=0x58440007, backend="10.1.0.1")

    async def scenario():
        servers = Listeners()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        port = await servers.http(answer)
        assert (await run_probe(marked("tcp", port), GrpcChannels())).ok
        result = await run_probe(marked("http", port, path="/healthz"), GrpcChannels())
        assert result.ok, result
        assert servers.requests[-1].startswith(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        secure = await servers.http(answer, tls=tls)
        for host in ("www.test", ""):
            result = await run_probe(marked("https", secure, host=host), GrpcChannels())
            assert result.ok, result
        refused = await run_probe(marked("http", closed_port()), GrpcChannels())
        assert (refused.ok, refused.reason) == (False, "refused")
        servers.close()

    asyncio.run(scenario())
    assert names == ["www.test", None]


def wait_for(condition, timeout: float, poll: float = 0.01, what: str = "condition") -> float:
    """Polls until condition() is true; returns time.monotonic() at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if condition():
            return now
        if now > deadline:
            raise AssertionError(f"{what}: not within {timeout:.2f} s")
        time.sleep(poll)


async def await_for(condition, timeout: float, what: str = "condition") -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.2f} s")
        await asyncio.sleep(0.005)
    return time.monotonic()


def test_checker_detects_a_dead_listener_and_a_revived_one_within_the_bounds():
    """The scheduler alone, with a recording apply: fall x interval + timeout down,
    rise x interval + timeout up, never sooner than rise/fall allow."""
    check = HealthCheck(kind="tcp", port=0, interval_ms=100, timeout_ms=50, rise=3, fall=2)

    async def scenario():
        async def accept(reader, writer):
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        key = VipKey("10.200.0.10", port, "tcp")
        member = (key, "127.0.0.1")
        applied: list[dict] = []
        checker = HealthChecker(applied.append, lambda event: None, BATCH_S)
        checker.update(DesiredState({key: vip(key, BackendSpec("127.0.0.1"), check=check)}),
                       {})
        batches = asyncio.create_task(checker.run_batches())
        await await_for(lambda: applied and applied[-1][member], 1.0, "first verdict")
        server.close()
        await server.wait_closed()
        died = time.monotonic()
        down = await await_for(lambda: not applied[-1][member], 2.0, "down") - died
        server = await asyncio.start_server(accept, "127.0.0.1", port, reuse_address=True)
        revived = time.monotonic()
        up = await await_for(lambda: applied[-1][member], 2.0, "up") - revived
        server.close()
        batches.cancel()
        await checker.close()
        return down, up

    down, up = asyncio.run(scenario())
    interval, timeout = check.interval_ms / 1000, check.timeout_ms / 1000
    assert (check.fall - 1) * interval * (1 - JITTER) <= down
    assert down <= check.fall * interval + timeout + ALLOWANCE_S
    assert (check.rise - 1) * interval * (1 - JITTER) <= up
    assert up <= check.rise * interval + timeout + ALLOWANCE_S


def test_scheduled_tcp_checks_say_refused_and_timeout_and_stop_on_close():
    """The scheduler's own TCP path (no task per check): its reasons and latencies."""
    async def scenario():
        lines, checker = notes()
        observed: list[tuple[str, float]] = []
        checker.observe = lambda kind, latency: observed.append((kind, latency))
        with hanging_port() as hanging:
            refused = closed_port()
            check = HealthCheck(kind="tcp", interval_ms=100, timeout_ms=60, rise=1, fall=1)
            state = DesiredState({
                key: vip(key, BackendSpec("127.0.0.1"), check=check)
                for key in (VipKey("10.200.0.10", refused, "tcp"),
                            VipKey("10.200.0.10", hanging, "tcp"))})
            checker.update(state, {})
            await await_for(lambda: not checker.unchecked(), 1.0, "first verdicts")
            await asyncio.sleep(0.35)  # a few more rounds
        last = {p.port: v.last for p, v in checker.verdicts.items()}
        assert last[refused].reason == "refused" and last[refused].latency_s < 0.05
        assert last[hanging].reason == "timeout"
        assert 0.06 <= last[hanging].latency_s < 0.06 + 0.05
        assert checker.checks_run >= 2 * 4  # every ~0.1 s each
        assert all(v.up is False for v in checker.verdicts.values())
        await checker.close()
        runs = checker.checks_run
        await asyncio.sleep(0.25)
        assert checker.checks_run == runs and checker.in_flight == 0
        assert len(checker.verdicts) == 2  # still readable for lbctl while lbd stops
        assert any("is down: timeout (first check)" in line for line in lines)
        assert len(observed) == runs and {kind for kind, _ in observed} == {"tcp"}

    asyncio.run(scenario())


def test_tcp_engine_reuses_a_socket_for_a_new_connection_after_a_reset():
    """After a successful check the engine resets the connection (the backend sees an
    RST, nothing is left in TIME_WAIT) and keeps the socket: the next check on it is a
    new connection from a new port, and the first check's deadline, still queued, does
    not time the second one out."""
    async def scenario():
        results: list[Result] = []
        prober = health._TcpProber(asyncio.get_running_loop(),
                                   lambda verdict, result, started: results.append(result))

        async def answered(n: int) -> None:
            await await_for(lambda: len(results) == n, 1.0, f"result {n}")

        with socket.socket() as listener, socket.socket() as full:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            full.bind(("127.0.0.1", 0))  # a full accept queue drops SYNs: connects hang
            full.listen(0)
            filler = socket.create_connection(full.getsockname(), timeout=1)
            try:
                port = listener.getsockname()[1]
                t0 = time.monotonic()
                prober.start(Verdict(probe(port=port, timeout_ms=100)), t0)
                await answered(1)
                assert results[0].ok
                conn, first = listener.accept()
                conn.settimeout(1)
                with pytest.raises(ConnectionResetError):
                    conn.recv(1)
                conn.close()
                (kept,) = prober._idle[(socket.AF_INET, 0)]
                # The kept socket's next check: a connect that hangs past the first deadline.
                prober.start(Verdict(probe(port=full.getsockname()[1], timeout_ms=1000)),
                             time.monotonic())
                (pending, _, t1) = next(iter(prober._pending.values()))
                assert pending is kept
                prober.expire(t0 + 0.1 + 0.01)
                assert len(prober) == 1 and len(results) == 1
                prober.expire(t1 + 1.0)
                assert results[1].reason == "timeout" and kept.fileno() == -1
                prober.start(Verdict(probe(port=port, timeout_ms=100)), time.monotonic())
                await answered(3)
                prober.start(Verdict(probe(port=port, timeout_ms=100)), time.monotonic())
                await answered(4)
                assert results[2].ok and results[3].ok
                ports = {first[1]}
                for _ in range(2):
                    conn, peer = listener.accept()
                    conn.close()
                    ports.add(peer[1])
                assert len(ports) == 3  # three connections, three ports
                # A kept socket whose connect fails at once: judged on a new socket, as
                # any check would be (TCP to a multicast address is refused outright).
                assert len(prober._idle[(socket.AF_INET, 0)]) == 1
                prober.start(Verdict(probe(address="224.0.0.1", port=port)), time.monotonic())
                assert results[4] == (False, "network is unreachable", results[4].latency_s)
                assert prober._idle[(socket.AF_INET, 0)] == [] and len(prober) == 0
            finally:
                filler.close()
                prober.close()
        out = subprocess.run(["ss", "-tan", "state", "time-wait",
                              f"( sport = :{port} or dport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
        assert len(out.splitlines()) <= 1, out  # the header alone: no TIME_WAIT either side

    asyncio.run(scenario())


def test_check_latencies_are_exported_as_prometheus_own_histogram_would_be():
    """lbd's per-check latency histogram keeps plain counts; scraped, it reads exactly as
    a prometheus_client Histogram fed the same latencies (edges included)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from xdplb.metrics import CHECK_SECONDS_BUCKETS, CheckLatencies, ControlPlaneMetrics

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    observe = ControlPlaneMetrics(ours).observe_check
    reference = Histogram(CheckLatencies.NAME, CheckLatencies.HELP, ["kind"],
                          buckets=CHECK_SECONDS_BUCKETS, registry=theirs)
    latencies = [0.0, 0.0001, 0.0005, 0.00051, 0.001, 0.3, 1, 2.5, 4.99, 5, 7.5]
    for kind in ("tcp", "http"):
        for seconds in latencies:
            observe(kind, seconds)
            reference.labels(kind).observe(seconds)

    def text(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if CheckLatencies.NAME in line and "_created" not in line]

    assert text(ours) == text(theirs)
    assert 'xdplb_health_check_duration_seconds_count{kind="tcp"} 11.0' in text(ours)


FWMARK = 0x2A5


def kernel_fwmark(port: int) -> str | None:
    """The fwmark the kernel shows (ss -e, sock_diag) for our SYN-SENT connection to
    127.0.0.1:port, or None without one: what routing and filtering see."""
    out = subprocess.run(["ss", "-tnie", "state", "syn-sent", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(lines) == 1, out
    mark = re.search(r"fwmark:(0x[0-9a-f]+)", lines[0])
    return mark.group(1) if mark else None


def test_scheduled_tcp_checks_connect_with_the_probe_fwmark():
    """A probe's fwmark is on its socket before the SYN leaves (the scheduler's engine):
    the kernel shows the mark on the connection while it is being made."""
    require_root()  # SO_MARK needs CAP_NET_ADMIN

    async def scenario():
        results: list[Result] = []
        prober = health._TcpProber(asyncio.get_running_loop(),
                                   lambda verdict, result, started: results.append(result))
        try:
            with hanging_port() as port:
                for mark in (FWMARK, 0):
                    p = Probe(**{**probe(port=port, timeout_ms=1000).__dict__, "fwmark": mark})
                    assert prober.start(Verdict(p), time.monotonic())
                    (sock, _, _), = prober._pending.values()
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == mark
                    assert kernel_fwmark(port) == (hex(mark) if mark else None)
                    prober.expire(math.inf)
        finally:
            prober.close()
        assert [r.reason for r in results] == ["timeout", "timeout"]

    asyncio.run(scenario())


def test_task_probes_connect_with_the_probe_fwmark():
    """TCP, HTTP and HTTPS checks run as tasks connect with the probe's fwmark too (seen
    by the kernel on the connection being made), and answer as unmarked ones do."""
    require_root()

    async def scenario():
        channels = GrpcChannels()
        with hanging_port() as port:
            for kind in ("tcp", "http", "https"):
                p = Probe(**{**probe(kind, port=port, timeout_ms=2000).__dict__,
                             "fwmark": FWMARK})
                task = asyncio.create_task(run_probe(p, channels))
                await asyncio.sleep(0.05)
                assert kernel_fwmark(port) == hex(FWMARK), kind
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        servers = Listeners()
        good = await servers.http(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        result = await run_probe(Probe(**{**probe("http", port=good, body="ok").__dict__,
                                          "fwmark": FWMARK}), channels)
        assert result.ok, result
        assert servers.requests[-1].startswith(b"GET / HTTP/1.1\r\n")
        servers.close()

    asyncio.run(scenario())


def test_a_failing_apply_is_retried_and_a_failing_notify_stops_no_check(monkeypatch):
    monkeypatch.setattr(health.checker, "APPLY_RETRY_S", 0.05)
    calls: list[dict] = []

    def apply(healthy):
        calls.append(healthy)
        if len(calls) == 1:
            raise RuntimeError("maps full")

    def notify(event):
        raise RuntimeError("watcher broke")

    async def scenario():
        checker = HealthChecker(apply, notify, 0.01)
        with socket.socket() as listener:  # up at the first check: a change to apply
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            key = VipKey("10.200.0.10", listener.getsockname()[1], "tcp")
            check = HealthCheck(kind="tcp", interval_ms=100, timeout_ms=50)
            checker.update(DesiredState({key: vip(key, BackendSpec("127.0.0.1"),
                                                  check=check)}), {})
            batches = asyncio.create_task(checker.run_batches())
            await await_for(lambda: len(calls) >= 2, 1.0, "a second apply")
            await await_for(lambda: checker.checks_run >= 3, 1.0, "checks going on")
        assert not batches.done()
        batches.cancel()
        await checker.close()

    asyncio.run(scenario())
    assert list(calls[0].values()) == [True]
    assert calls[1] == calls[0]  # the same verdicts, handed over again


# --- through the real lbd in a lab --------------------------------------------------------


GRPC_PORT = 50051
GRPC_SERVICE = "xdplb.test.Backend"
INTERVAL_MS, TIMEOUT_MS, RISE, FALL = 200, 100, 2, 2
TIMING = ["--check-interval", str(INTERVAL_MS), "--check-timeout", str(TIMEOUT_MS),
          "--rise", str(RISE), "--fall", str(FALL)]
RING = ["--ring-size", "4099"]
VIP = "10.200.0.10"
VIP_TCP, VIP_HTTP, VIP_GRPC = f"{VIP}:80/tcp", f"{VIP}:81/tcp", f"{VIP}:82/tcp"
FLAP_S = 10.0


def _sizes():
    from xdplb.datapath import MapSizes

    return MapSizes(max_vips=8, max_backends=32, ring_entries=8 * 4099, conn_entries=65536)


class Servers:
    """One backend_server per backend namespace (HTTP on 80, gRPC on GRPC_PORT),
    stopped and started by the tests, failing on demand through its control file."""

    def __init__(self, topo, workdir: Path):
        self.topo, self.workdir = topo, workdir
        self.procs: list[subprocess.Popen | None] = [None] * len(topo.backends)

    def control(self, i: int) -> Path:
        return self.workdir / f"control{i}"

    def start(self, i: int) -> float:
        """Starts backend i's server; returns when it printed that it listens."""
        proc = self.topo.backends[i].popen(
            [sys.executable, "-m", "xdplb_lab.backend_server", "--name", f"backend{i}",
             "--port", "80", "--grpc-port", str(GRPC_PORT), "--grpc-service", GRPC_SERVICE,
             "--control", str(self.control(i))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs[i] = proc
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        listening = time.monotonic()
        assert "listening" in line, f"backend{i} server did not start: {line!r}"
        return listening

    def stop(self, i: int) -> float:
        """Kills backend i's server; returns once it is gone (its sockets closed)."""
        proc = self.procs[i]
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: see Lab.popen
        proc.wait(timeout=10)
        self.procs[i] = None
        return time.monotonic()

    def running(self, i: int) -> bool:
        return self.procs[i] is not None and self.procs[i].poll() is None

    def set_mode(self, i: int, mode: str) -> float:
        self.control(i).write_text(mode)
        return time.monotonic()

    def reset(self) -> None:
        for i in range(len(self.procs)):
            self.set_mode(i, "ok")
            if not self.running(i):
                self.start(i)

    def requests(self, i: int) -> int:
        """GETs backend i's server answered (other than this count)."""
        with self.topo.backends[i].socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(("::1", 80))
            sock.sendall(b"GET /_requests HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return int(data.split(b"\r\n\r\n", 1)[1])


class Rings:
    """lbd's pinned maps, read the way the datapath reads them."""

    def __init__(self, lbd):
        self.maps, self.sizes = lbd.maps(), lbd.sizes

    def view(self, vip_text: str) -> tuple[set[str], set[str]]:
        """(backends in the VIP's ring, backends marked available)."""
        from xdplb import structs as s
        from xdplb.reconciler import state_key

        meta = next((m for k, m in self.maps.vips.items() if str(state_key(k)) == vip_text),
                    None)
        if meta is None:
            return set(), set()
        table = self.maps.backends.read_array(self.sizes.max_backends)
        names = {i: str(b.addr.address()) for i, b in enumerate(table)
                 if i and b.vip_id == meta.vip_id and any(bytes(b))}
        ring = np.frombuffer(self.maps.ring.read_array(self.sizes.ring_entries),
                             dtype=np.uint32)[meta.ring_offset:meta.ring_offset + meta.ring_size]
        ring = ring & s.RING_BACKEND_MASK  # without the unsettled bit
        in_ring = {names[int(i)] for i in np.unique(ring) if int(i) in names}
        available = {a for i, a in names.items() if table[i].flags & s.BACKEND_F_AVAILABLE}
        return in_ring, available

    def serving(self, vip_text: str, address: str) -> bool | None:
        """True: in the ring and available; False: neither; None: half-way."""
        in_ring, available = self.view(vip_text)
        if (address in in_ring) != (address in available):
            return None
        return address in in_ring

    def close(self) -> None:
        self.maps.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_root()
    from xdplb.datapath import Decapsulator
    from xdplb_lab import lab as labmod
    from xdplb_lab.daemon import LabLbd

    with labmod.Lab(prefix="xthc") as lab:
        topo = labmod.build_lb_lab(lab, n_backends=3)
        decap = Decapsulator()  # one compile, attached to every backend (4 s each saved)
        for i, host in enumerate(topo.backends):
            decap.accept(labmod.backend_v4(i))
            decap.attach("eth0", netns=host.name)
        workdir = tmp_path_factory.mktemp("health")
        servers = Servers(topo, workdir)
        servers.reset()
        lbd = LabLbd(topo, workdir / "lbd", sizes=_sizes())
        rings = None
        try:  # and whatever happens, Lab.close kills every process and removes it all
            lbd.start()
            rings = Rings(lbd)
            yield topo, lbd, servers, rings
        finally:
            if rings is not None:
                rings.close()
            lbd.close()


@pytest.fixture
def lbd(lab):
    """lbd with an empty state and every backend server running and healthy."""
    _, daemon, servers, _ = lab
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
    servers.reset()
    apply_doc(daemon, EMPTY_STATE)
    return daemon



def backend_status(lbd, vip_text: str) -> dict[str, dict]:
    listing = json.loads(ok(lbd, "backend", "list", vip_text, "-o", "json"))
    return {b["address"]: b["status"] for b in listing["backends"]}


def vip_modes(lbd) -> dict[str, str]:
    status = json.loads(ok(lbd, "status", "-o", "json"))
    return {v["vip"]: v["status"]["mode"] for v in status.get("vip_status", [])}


def ok_all(lbd, *commands: list[str]) -> None:
    """Several lbctl commands at once (each one is a process start: about 0.5 s)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        list(pool.map(lambda args: ok(lbd, *args), commands))


def add_vip_with_backends(lbd, vip_text: str, backends: list[str], *vip_options: str,
                          backend_options: tuple[str, ...] = ()) -> None:
    ok(lbd, "vip", "add", vip_text, *RING, *vip_options)
    ok_all(lbd, *(["backend", "add", vip_text, a, *backend_options] for a in backends))


def add_checked_vips(lbd, backends: list[str]) -> None:
    """Three VIPs on the same servers: a TCP check per backend (lbctl backend add
    --check ...), an HTTP and a gRPC check as the VIPs' defaults."""
    ok_all(lbd, ["vip", "add", VIP_TCP, *RING],
           ["vip", "add", VIP_HTTP, *RING, "--check", "http", "--check-port", "80",
            "--check-path", "/healthz", "--check-host", "health.test", "--check-body",
            "backend", *TIMING],
           ["vip", "add", VIP_GRPC, *RING, "--check", "grpc", "--check-port", str(GRPC_PORT),
            "--check-grpc-service", GRPC_SERVICE, *TIMING])
    ok_all(lbd, *(["backend", "add", vip_text, address, *extra]
                  for address in backends
                  for vip_text, extra in ((VIP_TCP, ["--check", "tcp", *TIMING]),
                                          (VIP_HTTP, []), (VIP_GRPC, []))))


def timed(rings: Rings, vips: list[str], address: str, serving: bool, since: float,
          timeout: float) -> dict[str, float]:
    """Seconds from `since` until `address` is (serving) or is not (not serving)
    in each VIP's ring, and marked so, polled every 10 ms."""
    took: dict[str, float] = {}
    deadline = since + timeout
    while len(took) < len(vips):
        now = time.monotonic()
        for vip_text in vips:
            if vip_text not in took and rings.serving(vip_text, address) is serving:
                took[vip_text] = now - since
        if now > deadline:
            raise AssertionError(f"{address} {'in' if serving else 'out of'} rings: only "
                                 f"{took} within {timeout} s")
        time.sleep(0.01)
    return took


MEASURED: dict[str, object] = {}  # printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def report_measurements():
    yield
    if MEASURED:
        print("\nhealth timings:", json.dumps(MEASURED, indent=1, default=str))


DOWN_BOUND_S = FALL * INTERVAL_MS / 1000 + TIMEOUT_MS / 1000
# The rise-th success is reached when its check finishes, which may take up to the
# timeout (a gRPC check's channel setup takes tens of ms on a loaded machine).
UP_BOUND_S = RISE * INTERVAL_MS / 1000 + TIMEOUT_MS / 1000
# 20 ms: ready/kill lag; and a check may start up to two scheduler ticks early (it is
# due a tick early, and what is due within a tick starts with it).
DOWN_FLOOR_S = (FALL - 1) * INTERVAL_MS / 1000 * (1 - JITTER) - 0.02 - 2 * TICK_S
UP_FLOOR_S = (RISE - 1) * INTERVAL_MS / 1000 * (1 - JITTER) - 0.02 - 2 * TICK_S


@pytest.mark.netns
def test_stopped_backend_leaves_rings_within_fall_interval_timeout_and_returns(lab, lbd):
    topo, _, servers, rings = lab
    backends = topo.backend_v4
    add_checked_vips(lbd, backends)
    vips = [VIP_TCP, VIP_HTTP, VIP_GRPC]
    for vip_text in vips:
        assert rings.view(vip_text) == (set(backends), set(backends))
    victim = backends[1]
    wall_killed = time.time()
    killed = servers.stop(1)
    down = timed(rings, vips, victim, False, killed, 5)
    for vip_text in vips:  # the others never left
        assert rings.view(vip_text) == ({backends[0], backends[2]},) * 2
    status = {v: backend_status(lbd, v)[victim] for v in vips}
    ready = servers.start(1)
    up = timed(rings, vips, victim, True, ready, 5)
    MEASURED["stop/start"] = {
        "down_s": down, "down_bound_s": DOWN_BOUND_S, "up_s": up, "up_bound_s": UP_BOUND_S,
        "allowance_s": ALLOWANCE_S}
    for vip_text in vips:
        assert DOWN_FLOOR_S <= down[vip_text] <= DOWN_BOUND_S + ALLOWANCE_S, (vip_text, down)
        assert UP_FLOOR_S <= up[vip_text] <= UP_BOUND_S + ALLOWANCE_S, (vip_text, up)
        assert rings.view(vip_text) == (set(backends), set(backends))
    # What lbctl showed while it was down: health, last result, latency, since, check.
    assert {v: s["health"] for v, s in status.items()} == dict.fromkeys(vips, "down")
    assert not any(s["healthy"] or s["available"] for s in status.values())
    assert status[VIP_TCP]["last_result"] == "refused"
    assert status[VIP_HTTP]["last_result"] == "refused"
    assert status[VIP_GRPC]["last_result"] == "grpc UNAVAILABLE"
    assert status[VIP_TCP]["check"] == f"tcp {victim}:80"
    assert status[VIP_HTTP]["check"] == f"http {victim}:80/healthz"
    assert status[VIP_GRPC]["check"] == f"grpc {victim}:{GRPC_PORT} service '{GRPC_SERVICE}'"
    for s in status.values():
        assert wall_killed <= s["since"] <= time.time()
        assert 0 <= s.get("check_latency_ms", 0) < TIMEOUT_MS + 50
    after = backend_status(lbd, VIP_HTTP)[victim]
    assert (after["health"], after["last_result"], after["available"]) == ("up", "ok", True)
    assert after["check_latency_ms"] > 0
    # Every transition is in lbd's log, with its reason.
    log = lbd.log_text()
    assert re.search(rf"tcp {re.escape(victim)}:80 is down: refused \(2 failures in a row\)"
                     rf".* event=health backend={re.escape(victim)}", log)
    assert f"http {victim}:80/healthz is up: ok (2 successes in a row)" in log
    assert f"service '{GRPC_SERVICE}' is down: grpc UNAVAILABLE (2 failures in a row)" in log
    table = ok(lbd, "backend", "list", VIP_GRPC)
    assert re.search(rf"{re.escape(victim)}\s.*\bup\b.*\bok [0-9.]+ms", table), table


@pytest.mark.netns
def test_http_503_and_grpc_not_serving_count_as_down(lab, lbd):
    topo, _, servers, rings = lab
    backends = topo.backend_v4
    add_checked_vips(lbd, backends)
    victim = backends[2]
    failing = servers.set_mode(2, "fail")
    down = timed(rings, [VIP_HTTP, VIP_GRPC], victim, False, failing, 5)
    assert rings.serving(VIP_TCP, victim)  # it still accepts connections
    status = {v: backend_status(lbd, v)[victim] for v in (VIP_TCP, VIP_HTTP, VIP_GRPC)}
    recovering = servers.set_mode(2, "ok")
    up = timed(rings, [VIP_HTTP, VIP_GRPC], victim, True, recovering, 5)
    MEASURED["503/NOT_SERVING"] = {"down_s": down, "up_s": up}
    for vip_text in (VIP_HTTP, VIP_GRPC):
        assert DOWN_FLOOR_S <= down[vip_text] <= DOWN_BOUND_S + ALLOWANCE_S, down
        assert UP_FLOOR_S <= up[vip_text] <= UP_BOUND_S + ALLOWANCE_S, up
    assert (status[VIP_TCP]["health"], status[VIP_TCP]["last_result"]) == ("up", "ok")
    assert (status[VIP_HTTP]["health"], status[VIP_HTTP]["last_result"]) == ("down",
                                                                            "status 503")
    assert (status[VIP_GRPC]["health"], status[VIP_GRPC]["last_result"]) == ("down",
                                                                            "NOT_SERVING")


@pytest.mark.netns
def test_flows_of_a_failed_backend_move_and_no_other_flow_does(lab, lbd):
    """Three phases of scapy flows, each counted to the last packet at the backends
    before the next: before the failure, during it (until lbd took the backend out),
    and after it."""
    from tests.flows import BackendCounters, FlowTraffic

    topo, _, servers, rings = lab
    backends = topo.backend_v4
    add_vip_with_backends(lbd, VIP_TCP, backends, backend_options=("--check", "tcp", *TIMING))
    flows = FlowTraffic(topo, VIP, 80, sports=list(range(43000, 43090)))
    counters = BackendCounters(topo, VIP, 80)

    def counted() -> list[Counter]:
        counters.settle(sum(flows.sent.values()), timeout=20)
        assert counters.total() == sum(flows.sent.values()), "packets lost"
        return [Counter(c) for c in counters.counts]

    try:
        flows.send_rounds(20, 0.02)
        before = counted()
        stop = threading.Event()
        during = threading.Thread(target=flows.send_rounds, args=(100_000, 0.02, stop))
        during.start()
        try:
            killed = servers.stop(1)
            timed(rings, [VIP_TCP], backends[1], False, killed, 5)
        finally:
            stop.set()
            during.join(timeout=10)
        failure = counted()
        flows.send_rounds(30, 0.02)
        after = counted()
    finally:
        counters.close()
    first = {sport: [i for i, c in enumerate(before) if c[sport]] for sport in flows.sports}
    assert all(len(on) == 1 for on in first.values()), first
    healthy = [s for s in flows.sports if first[s] != [1]]
    failed = [s for s in flows.sports if first[s] == [1]]
    moved = [s for s in healthy if counters.backends_of(s) != first[s]]
    assert moved == []  # flows of healthy backends kept their backend: 0 moved
    assert len(failed) >= 10  # a third of 90 flows, give or take
    landed = Counter()
    for sport in failed:
        later = [i for i in range(3) if after[i][sport] - failure[i][sport]]
        assert len(later) == 1 and later[0] != 1, f"flow {sport} went to {later}"
        assert set(counters.backends_of(sport)) <= {1, later[0]}  # never split elsewhere
        landed[later[0]] += 1
    for sport in flows.sports:  # and every packet arrived somewhere
        assert sum(c[sport] for c in after) == flows.sent[sport]
    MEASURED["traffic"] = {"flows": len(flows.sports), "on_failed_backend": len(failed),
                           "moved_from_healthy": len(moved), "failed_flows_landed_on":
                           {f"backend{i}": n for i, n in sorted(landed.items())},
                           "packets": sum(flows.sent.values())}


def ring_rewrite_bound(interval_s: float, timeout_s: float) -> int:
    """The most ring rewrites a backend flapping at every check (rise = fall = 1)
    can cause, from the damping constants: the transitions before it is held
    down each flip whether it serves (the last one only if it is a down: the
    backend starts up, so odd transitions are downs), none while held down
    (the penalty stays above REUSE while it flaps every check), and one more
    when it is released. Transitions are at most interval + timeout apart."""
    n = transitions_to_hold_down(interval_s + timeout_s, DAMPING_HALF_LIFE_CHECKS * interval_s)
    return (n if n % 2 else n - 1) + 1


@pytest.mark.netns
def test_flapping_backend_rewrites_the_ring_a_bounded_number_of_times(lab, lbd):
    topo, _, servers, rings = lab
    backends = topo.backend_v4
    interval, timeout = 0.1, 0.05
    flap_check = ["--check", "http", "--check-port", "80", "--check-path", "/flap",
                  "--check-interval", "100", "--check-timeout", "50", "--rise", "1",
                  "--fall", "1"]
    vip_text = f"{VIP}:83/tcp"
    add_vip_with_backends(lbd, vip_text, backends, *flap_check)
    assert rings.view(vip_text) == (set(backends), set(backends))
    victim = backends[0]
    log_start = len(lbd.log_text())
    servers.set_mode(0, "flap")  # every other answer is a 503
    started = time.monotonic()
    seen_in_ring = []
    while time.monotonic() - started < FLAP_S:
        seen_in_ring.append((time.monotonic() - started, rings.serving(vip_text, victim)))
        time.sleep(0.05)
    settled = servers.set_mode(0, "ok")
    held = backend_status(lbd, vip_text)[victim]
    hold_bound = DAMPING_HALF_LIFE_CHECKS * interval * math.log2(DAMPING_MAX / DAMPING_REUSE)
    back = timed(rings, [vip_text], victim, True, settled,
                 hold_bound + 2 * interval + ALLOWANCE_S + 1)[vip_text]
    log = lbd.log_text()[log_start:]
    transitions = len(re.findall(rf"http {re.escape(victim)}:80/flap is (?:up|down): "
                                 r"(?:ok|status 503) \(1 ", log))
    rewrites = log.count(f"ring of {vip_text}:")
    health_reconciles = len(re.findall(r"info health: wrote", log))
    bound = ring_rewrite_bound(interval, timeout)
    MEASURED["flapping"] = {
        "flap_s": FLAP_S, "interval_s": interval, "transitions": transitions,
        "ring_rewrites": rewrites, "health_reconciles": health_reconciles,
        "rewrite_bound": bound, "back_after_settling_s": back, "hold_bound_s": hold_bound}
    assert lbd.proc.poll() is None  # no crash
    assert transitions >= 0.8 * FLAP_S / interval  # it really flapped at (nearly) every check
    assert bound == 4
    assert 1 <= rewrites <= bound
    assert health_reconciles <= bound
    assert "held down for" in log and "released from the flapping hold-down" in log
    assert held["health"] == "held-down" and not held["available"]
    # The first check after settling, the hold-down at most, the check that releases it.
    assert back <= hold_bound + 2 * interval + ALLOWANCE_S
    # Held down from the fourth transition on (within its first second) to the end.
    assert not any(serving for t, serving in seen_in_ring if t > 1.0), seen_in_ring
    final = backend_status(lbd, vip_text)[victim]
    assert (final["health"], final["last_result"], final["available"]) == ("up", "ok", True)
    assert rings.view(vip_text) == (set(backends), set(backends))
    for other in backends[1:]:  # its neighbours never noticed
        assert backend_status(lbd, vip_text)[other]["health"] == "up"


@pytest.mark.netns
def test_panic_threshold_and_fail_open_fail_closed(lab, lbd):
    topo, _, servers, rings = lab
    backends = topo.backend_v4
    panic, open_, closed = f"{VIP}:84/tcp", f"{VIP}:85/tcp", f"{VIP}:86/tcp"
    check = ["--check", "tcp", "--check-port", "80", *TIMING]
    ok_all(lbd, ["vip", "add", panic, *RING, *check, "--panic-threshold", "0.5"],
           ["vip", "add", open_, *RING, *check, "--when-none-healthy", "all"],
           ["vip", "add", closed, *RING, *check, "--when-none-healthy", "drop"])
    ok_all(lbd, *(["backend", "add", v, a] for v in (panic, open_, closed) for a in backends))
    everyone = (set(backends), set(backends))
    limit = DOWN_BOUND_S + ALLOWANCE_S + 1
    vips = (panic, open_, closed)

    def settle(modes: tuple[str, str, str], views: tuple) -> None:
        """Until the rings hold `views` (read every 10 ms), then `lbctl status` says `modes`."""
        wait_for(lambda: tuple(rings.view(v) for v in vips) == views, limit, what=str(views))
        wait_for(lambda: vip_modes(lbd) == dict(zip(vips, modes, strict=True)), 2, poll=0.05,
                 what=str(modes))

    some = ({backends[1], backends[2]},) * 2
    servers.stop(0)  # 2 of 3 up: above the threshold
    settle(("normal",) * 3, (some,) * 3)
    servers.stop(1)  # 1 of 3 < 0.5: panic spreads flows over everyone again
    last = ({backends[2]},) * 2
    settle(("panic", "normal", "normal"), (everyone, last, last))
    text = ok(lbd, "status")
    assert re.search(rf"{re.escape(panic)}\s+panic\s+1\s+3\s", text), text
    servers.stop(2)  # none healthy: fail-open uses all, fail-closed (drop) none
    nobody = (set(), set())
    settle(("fail-closed", "fail-open", "fail-closed"), (nobody, everyone, nobody))
    status = json.loads(ok(lbd, "status", "-o", "json"))
    healthy = {v["vip"]: v["status"].get("healthy_backends", 0) for v in status["vip_status"]}
    assert healthy == dict.fromkeys(vips, 0)
    text = ok(lbd, "status")
    assert re.search(rf"{re.escape(open_)}\s+fail-open\s+0\s+3\s", text), text
    assert re.search(rf"{re.escape(closed)}\s+fail-closed\s+0\s+3\s", text), text
    for i in range(3):
        servers.start(i)
    settle(("normal",) * 3, (everyone,) * 3)


@pytest.mark.netns
def test_identical_checks_on_several_vips_run_once(lab, lbd):
    topo, _, servers, _ = lab
    backend = topo.backend_v4[0]
    check = ["--check", "http", "--check-port", "80", "--check-path", "/shared",
             "--check-interval", "100", "--check-timeout", "50"]
    ok_all(lbd, *(["vip", "add", f"{VIP}:{port}/tcp", *RING, *check] for port in (87, 88, 89)))
    ok_all(lbd, *(["backend", "add", f"{VIP}:{port}/tcp", backend] for port in (87, 88, 89)))
    window = 2.0
    first, started = servers.requests(0), time.monotonic()
    time.sleep(window)
    checks = servers.requests(0) - first
    elapsed = time.monotonic() - started
    MEASURED["shared"] = {"vips": 3, "checks": checks, "window_s": elapsed}
    # One loop: one check per 90..100 ms (three would make three times as many).
    assert elapsed / 0.1 - 2 <= checks <= elapsed / (0.1 * (1 - JITTER)) + 2
    statuses = [backend_status(lbd, f"{VIP}:{p}/tcp")[backend] for p in (87, 88, 89)]
    assert len({s["since"] for s in statuses}) == 1  # one verdict, shown on each VIP


# --- checks through the VIP ----------------------------------------------------------------


VIP_VIA = f"{VIP}:80/tcp"  # checked through the tunnel
VIP_OWN = f"{VIP}:83/tcp"  # the same backends checked at their own address


def backend_lo(topo, i: int, action: str) -> float:
    """Adds or removes the VIP on backend i's loopback; returns when it was done."""
    topo.backends[i].run(["ip", "addr", action, f"{VIP}/32", "dev", "lo"])
    return time.monotonic()


@pytest.mark.netns
def test_check_through_the_vip_sees_a_broken_vip_path_that_the_own_address_check_cannot(
        lab, lbd):
    """The same backends on two VIPs: checked through the tunnel to VIP:80 on one,
    at their own address on the other. With the VIP taken off two backends'
    loopbacks (their own addresses still answer), only the checks through the VIP
    (TCP for one, HTTP for the other) take them down, within fall x interval +
    timeout; back on, they return within rise x interval + timeout. The third backend, and
    every own-address check, stay up throughout."""
    topo, _, _, rings = lab
    backends = topo.backend_v4
    via = ["--check", "http", "--check-path", "/healthz", "--check-via", "vip", *TIMING]
    own = ["--check", "http", "--check-port", "80", "--check-path", "/healthz", *TIMING]
    add_vip_with_backends(lbd, VIP_VIA, backends, *via)
    add_vip_with_backends(lbd, VIP_OWN, backends, *own)
    # backend 0 through the VIP with a plain TCP check (the scheduler's own connects)
    ok(lbd, "backend", "set", VIP_VIA, backends[0], "--check", "tcp")
    for vip_text in (VIP_VIA, VIP_OWN):
        timed(rings, [vip_text], backends[2], True, time.monotonic(), 5)
        assert rings.view(vip_text) == (set(backends), set(backends))
    status = backend_status(lbd, VIP_VIA)
    assert status[backends[1]]["check"] == f"http {VIP}:80/healthz through the tunnel to " \
                                           f"{backends[1]}"
    assert status[backends[0]]["check"] == f"tcp {VIP}:80 through the tunnel to {backends[0]}"
    assert {s["health"] for s in status.values()} == {"up"}
    victims = backends[:2]
    down, up = {}, {}
    try:
        for i in (0, 1):
            broken = backend_lo(topo, i, "del")
            down[victims[i]] = timed(rings, [VIP_VIA], victims[i], False, broken, 5)[VIP_VIA]
        time.sleep(FALL * INTERVAL_MS / 1000)  # the own-address checks had their chances
        assert rings.view(VIP_VIA) == ({backends[2]},) * 2
        assert rings.view(VIP_OWN) == (set(backends), set(backends))
        for victim in victims:
            status = {v: backend_status(lbd, v)[victim] for v in (VIP_VIA, VIP_OWN)}
            assert (status[VIP_VIA]["health"], status[VIP_VIA]["last_result"]) == (
                "down", "timeout")
            assert (status[VIP_OWN]["health"], status[VIP_OWN]["last_result"]) == ("up", "ok")
        for i in (0, 1):
            restored = backend_lo(topo, i, "add")
            up[victims[i]] = timed(rings, [VIP_VIA], victims[i], True, restored, 5)[VIP_VIA]
    finally:
        for i in (0, 1):
            with contextlib.suppress(subprocess.CalledProcessError):
                backend_lo(topo, i, "add")  # already there after a pass: refused, fine
    for victim in victims:
        assert DOWN_FLOOR_S <= down[victim] <= DOWN_BOUND_S + ALLOWANCE_S, down
        assert UP_FLOOR_S <= up[victim] <= UP_BOUND_S + ALLOWANCE_S, up
    assert rings.view(VIP_VIA) == (set(backends), set(backends))
    assert rings.view(VIP_OWN) == (set(backends), set(backends))
    victim = victims[1]
    MEASURED["through the VIP"] = {"down_s": down, "down_bound_s": DOWN_BOUND_S,
                                   "up_s": up, "up_bound_s": UP_BOUND_S}
    log = lbd.log_text()
    assert "checks through the VIP: tc egress program attached" in log
    assert re.search(rf"through the tunnel to {re.escape(victim)} is down: timeout "
                     rf"\(2 failures in a row\).* event=health backend={re.escape(victim)}", log)
    # Re-added, the backend has another entry, so another mark: its check follows.
    index = backend_index(lbd, VIP_VIA, victim)
    ok(lbd, "backend", "del", VIP_VIA, victim)
    ok(lbd, "backend", "add", VIP_VIA, victim)
    assert backend_index(lbd, VIP_VIA, victim) != index
    timed(rings, [VIP_VIA], victim, True, time.monotonic(), 2)
    assert backend_status(lbd, VIP_VIA)[victim]["last_result"] == "ok"


@pytest.mark.netns
def test_checks_through_the_vip_go_on_after_lbd_is_killed_and_restarted(lab, lbd):
    """kill -9, then a new lbd: it finds the backend entries (same indexes, so the
    same marks) in the pinned maps, replaces the tc program, and its checks
    through the VIP see a broken VIP path as before."""
    topo, _, _, rings = lab
    backends = topo.backend_v4
    add_vip_with_backends(lbd, VIP_VIA, backends, "--check", "tcp", "--check-via", "vip",
                          *TIMING)
    timed(rings, [VIP_VIA], backends[2], True, time.monotonic(), 5)
    indexes = [backend_index(lbd, VIP_VIA, a) for a in backends]
    lbd.kill(signal.SIGKILL)
    lbd.start()
    assert [backend_index(lbd, VIP_VIA, a) for a in backends] == indexes
    assert rings.view(VIP_VIA) == (set(backends), set(backends))
    assert lbd.log_text().count("checks through the VIP: tc egress program attached") >= 2
    try:
        broken = backend_lo(topo, 2, "del")
        down = timed(rings, [VIP_VIA], backends[2], False, broken, 5)[VIP_VIA]
        assert down <= DOWN_BOUND_S + ALLOWANCE_S, down
        restored = backend_lo(topo, 2, "add")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            backend_lo(topo, 2, "add")
    timed(rings, [VIP_VIA], backends[2], True, restored, 5)
    assert rings.view(VIP_VIA) == (set(backends), set(backends))


def backend_index(lbd, vip_text: str, address: str) -> int:
    listing = json.loads(ok(lbd, "backend", "list", vip_text, "-o", "json"))
    return next(b["status"]["index"] for b in listing["backends"] if b["address"] == address)


@pytest.mark.netns
@pytest.mark.parametrize(("args", "message"), [
    (["vip", "add", f"{VIP}:84/tcp", "--check", "grpc", "--check-via", "vip"],
     f"vip ({VIP}:84/tcp).check.via: a grpc check cannot go through the VIP (the gRPC client "
     "cannot mark its connections)"),
    (["vip", "add", f"{VIP}/tcp", "--check", "tcp", "--check-via", "vip"],
     f"vip ({VIP}/tcp).check.port: a port-less VIP's check needs a port"),
    (["vip", "add", f"{VIP}:84/udp", "--check", "tcp", "--check-via", "vip"],
     f"vip ({VIP}:84/udp).check.via: checks through the VIP speak TCP"),
    (["vip", "add", f"{VIP}:84/tcp", "--check-port", "8080", "--check-via", "vip"],
     f"vip ({VIP}:84/tcp).check.port: a check through the VIP goes to the VIP's port 84"),
    (["backend", "add", VIP_OWN, "10.100.10.2", "--check", "grpc", "--check-via", "vip"],
     "backend.check.via: a grpc check cannot go through the VIP"),
    (["vip", "set", VIP_OWN, "--check-via", "vip"],
     f"VIP {VIP_OWN}.check.port: a check through the VIP goes to the VIP's port 83"),
])
def test_checks_through_the_vip_refused_with_the_field_and_nothing_changed(lbd, args, message):
    ok(lbd, "vip", "add", VIP_OWN, *RING, "--check", "tcp", "--check-port", "80")
    before = ok(lbd, "export")
    result = lbd.lbctl(*args)
    assert result.returncode == 1, result.stdout
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert ok(lbd, "export") == before
