"""Health checking: lbd's check loops decide who gets traffic.

One asyncio scheduler runs every check. A check is identified by what it
probes and how (kind, address, port, HTTP/gRPC details, timing, rise/fall),
so identical checks of a backend serving several VIPs run once and share
their verdict. Each check follows HAProxy's rise/fall rule: `fall`
consecutive failures take an up backend down, `rise` consecutive successes
bring a down one up. A backend nobody has checked yet takes the verdict of
its first check, so a new backend gets traffic once it has answered once
and never before.

Verdict changes are not applied one by one: they are collected and handed
to the controller in batches (at most one reconcile per batch interval),
and a backend that keeps flapping is held down by a damping penalty that
grows with every transition and decays with time, so neither a flapping
backend nor a storm of failures can thrash the rings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xdplb.state import DesiredState, HealthCheck, VipKey

log = logging.getLogger("xdplb.health")

MemberId = tuple[VipKey, str]
HTTP_READ_LIMIT = 64 * 1024
JITTER = 0.1  # each interval is stretched or shrunk by up to 10%
MAX_CONCURRENT_PROBES = 1024

# Flap damping (after BGP route-flap damping): every transition adds a penalty
# that halves every DAMPING_HALF_LIFE_S; above SUPPRESS the backend is held
# down until the penalty decays below REUSE.
DAMPING_PENALTY = 1000.0
DAMPING_SUPPRESS = 3000.0
DAMPING_REUSE = 1500.0
DAMPING_HALF_LIFE_S = 15.0
DAMPING_MAX = 12000.0  # caps the hold-down at three half-lives past REUSE


@dataclass(frozen=True)
class Probe:
    """What is checked and how: the identity under which checks are shared."""

    kind: str
    address: str
    port: int
    path: str
    host: str
    expect_status: tuple[int, ...]
    body: str
    grpc_service: str
    interval_ms: int
    timeout_ms: int
    rise: int
    fall: int

    @classmethod
    def of(cls, check: HealthCheck, address: str, vip_port: int) -> Probe:
        return cls(check.kind, address, check.port or vip_port, check.path, check.host,
                   check.expect_status, check.body, check.grpc_service, check.interval_ms,
                   check.timeout_ms, check.rise, check.fall)

    def describe(self) -> str:
        where = f"[{self.address}]" if ":" in self.address else self.address
        extra = f"{self.path}" if self.kind in ("http", "https") else (
            f" service {self.grpc_service!r}" if self.kind == "grpc" else "")
        return f"{self.kind} {where}:{self.port}{extra}"


@dataclass(frozen=True)
class Result:
    ok: bool
    reason: str  # "ok", "timeout", "refused", "status 503", "NOT_SERVING", ...
    latency_s: float


# --- the probes ---------------------------------------------------------------------------


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ssl.SSLError):
        return f"tls: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


async def _probe_tcp(probe: Probe) -> str:
    _, writer = await asyncio.open_connection(probe.address, probe.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "ok"


_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname = False
_NO_VERIFY.verify_mode = ssl.CERT_NONE  # a backend is probed by address, not by name


async def _probe_http(probe: Probe) -> str:
    tls = _NO_VERIFY if probe.kind == "https" else None
    reader, writer = await asyncio.open_connection(probe.address, probe.port, ssl=tls)
    try:
        host = probe.host or (f"[{probe.address}]" if ":" in probe.address else probe.address)
        writer.write(f"GET {probe.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xdplb-lbd\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read(HTTP_READ_LIMIT)
        while len(response) < HTTP_READ_LIMIT and (chunk := await reader.read(
                HTTP_READ_LIMIT - len(response))):
            response += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return _judge_http(probe, response)


def _judge_http(probe: Probe, response: bytes) -> str:
    status_line = response.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return f"bad response {status_line[:40]!r}"
    status = int(parts[1])
    if status not in probe.expect_status:
        return f"status {status}"
    body = response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""
    if probe.body and probe.body.encode() not in body:
        return f"body lacks {probe.body!r}"
    return "ok"


class GrpcChannels:
    """One channel per gRPC check target, kept between checks."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}

    def get(self, address: str, port: int) -> grpc.aio.Channel:
        key = (address, port)
        if key not in self._channels:
            host = f"[{address}]" if ":" in address else address
            self._channels[key] = grpc.aio.insecure_channel(f"{host}:{port}")
        return self._channels[key]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def _probe_grpc(probe: Probe, channels: GrpcChannels) -> str:
    stub = health_pb2_grpc.HealthStub(channels.get(probe.address, probe.port))
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=probe.grpc_service),
                                 timeout=probe.timeout_ms / 1000)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        return f"grpc {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "ok"


async def run_probe(probe: Probe, channels: GrpcChannels) -> Result:
    """One check, bounded by its timeout; never raises."""
    started = time.monotonic()
    try:
        if probe.kind == "tcp":
            coro = _probe_tcp(probe)
        elif probe.kind in ("http", "https"):
            coro = _probe_http(probe)
        elif probe.kind == "grpc":
            coro = _probe_grpc(probe, channels)
        else:
            return Result(True, "ok", 0.0)
        reason = await asyncio.wait_for(coro, probe.timeout_ms / 1000)
    except Exception as exc:
        reason = _connect_reason(exc)
    return Result(reason == "ok", reason, time.monotonic() - started)


# --- verdicts -------------------------------------------------------------------------------


@dataclass
class Verdict:
    """A check's rise/fall state machine, its damping, and what it last saw."""

    probe: Probe
    up: bool | None = None  # None: never checked
    streak: int = 0  # consecutive results that disagree with `up`
    last: Result | None = None
    since: float = field(default_factory=time.time)
    penalty: float = 0.0
    penalty_at: float = field(default_factory=time.monotonic)
    suppressed: bool = False
    transitions: int = 0

    def observe(self, result: Result, now: float) -> bool:
        """Takes one result; True when the verdict changed."""
        self.last = result
        if self.up is None:
            self.up, self.since = result.ok, time.time()
            return True
        if result.ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.probe.rise if result.ok else self.probe.fall):
            return False
        self.up, self.streak, self.since = result.ok, 0, time.time()
        self.transitions += 1
        self._add_penalty(now)
        return True

    def _decayed(self, now: float) -> float:
        return self.penalty * math.pow(0.5, (now - self.penalty_at) / DAMPING_HALF_LIFE_S)

    def _add_penalty(self, now: float) -> None:
        self.penalty = min(self._decayed(now) + DAMPING_PENALTY, DAMPING_MAX)
        self.penalty_at = now
        if self.penalty >= DAMPING_SUPPRESS and not self.suppressed:
            self.suppressed = True
            log.warning("%s flaps: held down until it settles", self.probe.describe())

    def serving(self, now: float) -> bool:
        """Whether traffic may go to it: up, and not held down for flapping."""
        if self.suppressed and self._decayed(now) < DAMPING_REUSE:
            self.suppressed = False
            log.info("%s settled: no longer held down", self.probe.describe())
        return bool(self.up) and not self.suppressed

    def reason(self) -> str:
        if self.last is None:
            return "not checked yet"
        return "flapping: held down" if self.suppressed else self.last.reason


# --- the scheduler --------------------------------------------------------------------------


Apply = Callable[[dict[MemberId, bool]], None]
Notify = Callable[[str, str], None]  # (message, backend address)


class HealthChecker:
    """Runs every check of the desired state and reports verdicts in batches."""

    def __init__(self, apply: Apply, notify: Notify, batch_interval_s: float = 0.2):
        self.apply, self.notify = apply, notify
        self.batch_interval_s = batch_interval_s
        self.members: dict[MemberId, Probe | None] = {}  # None: kind none, always up
        self.verdicts: dict[Probe, Verdict] = {}
        self._tasks: dict[Probe, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self.channels = GrpcChannels()
        self.checks_run = 0

    def update(self, state: DesiredState, known: Mapping[MemberId, bool]) -> None:
        """Follows the desired state: new checks start, unused ones stop. A new check
        of a backend whose health is `known` (a restart: the maps' marks; a changed
        check: the old verdict) starts from it rather than from "unchecked"."""
        members: dict[MemberId, Probe | None] = {}
        for key, vip in state.vips.items():
            for address, backend in vip.backends.items():
                check = vip.check_for(backend)
                members[(key, address)] = (None if check.kind == "none"
                                           else Probe.of(check, address, key.port))
        self.members = members
        wanted = {p for p in members.values() if p is not None}
        for probe in wanted - set(self._tasks):
            verdict = Verdict(probe)
            seeded = [known[m] for m, p in members.items() if p == probe and m in known]
            if seeded:
                verdict.up = all(seeded)
            self.verdicts[probe] = verdict
            self._tasks[probe] = asyncio.create_task(self._loop(probe))
        for probe in set(self._tasks) - wanted:
            self._tasks.pop(probe).cancel()
            self.verdicts.pop(probe, None)

    def healthy(self) -> dict[MemberId, bool]:
        now = time.monotonic()
        out = {}
        for member, probe in self.members.items():
            if probe is None:
                out[member] = True
            else:
                verdict = self.verdicts.get(probe)
                out[member] = bool(verdict and verdict.serving(now))
        return out

    def unchecked(self) -> list[Probe]:
        return [p for p, v in self.verdicts.items() if v.up is None]

    async def first_verdicts(self) -> None:
        """Until every check has a verdict, bounded by the slowest check's timeout."""
        pending = self.unchecked()
        if not pending:
            return
        deadline = time.monotonic() + max(p.timeout_ms for p in pending) / 1000 + 1.0
        while self.unchecked() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def verdict_of(self, member: MemberId) -> Verdict | None:
        probe = self.members.get(member)
        return self.verdicts.get(probe) if probe else None

    async def _loop(self, probe: Probe) -> None:
        interval = probe.interval_ms / 1000
        verdict = self.verdicts[probe]
        if verdict.up is not None:  # known already: spread checks over the interval
            await asyncio.sleep(random.uniform(0, interval))
        while self.verdicts.get(probe) is verdict:
            due = time.monotonic() + interval * random.uniform(1 - JITTER, 1 + JITTER)
            async with self._limit:
                result = await run_probe(probe, self.channels)
            self.checks_run += 1
            self._judge(verdict, result)
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def _judge(self, verdict: Verdict, result: Result) -> None:
        now = time.monotonic()
        was_serving = verdict.serving(now)
        if verdict.observe(result, now):
            state = "up" if verdict.up else "down"
            line = f"{verdict.probe.describe()} is {state}: {result.reason}"
            self.notify(line, verdict.probe.address)
        if was_serving != verdict.serving(now):
            self._wake.set()

    async def run_batches(self) -> None:
        """Hands verdict changes to `apply`, at most once per batch interval."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.apply(self.healthy())
            await asyncio.sleep(self.batch_interval_s)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        await self.channels.close()

