"""Health checking: lbd's check loops decide who gets traffic.

One asyncio scheduler runs every check. A check is identified by what it
probes and how (kind, address, port, HTTP/gRPC details, timing, rise/fall),
so identical checks of a backend serving several VIPs run once and share
their verdict. Each check follows HAProxy's rise/fall rule: `fall`
consecutive failures take an up backend down, `rise` consecutive successes
bring a down one up. A backend nobody has checked yet takes the verdict of
its first check, so a new backend gets traffic once it has answered once
and never before.

Checks never come later than their interval says: each wait is shortened by
a random jitter of up to 10%, never lengthened, so a dead backend is judged
down within fall x interval + timeout of its death, and a revived one up
within rise x interval (plus the time its last check takes).

Verdict changes are not applied one by one: they are collected and handed
to the controller in batches (at most one reconcile per batch interval),
and a backend that keeps flapping is held down by a damping penalty that
grows with every transition and decays with time, so neither a flapping
backend nor a storm of failures can thrash the rings. Every verdict change,
hold-down and release is reported (logged and published) with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xdplb.state import DesiredState, HealthCheck, VipKey

log = logging.getLogger("xdplb.health")

MemberId = tuple[VipKey, str]
HTTP_READ_LIMIT = 64 * 1024
JITTER = 0.1  # each wait is shortened by up to 10% (never lengthened)
MAX_CONCURRENT_PROBES = 1024
APPLY_RETRY_S = 1.0  # after `apply` failed, the next attempt waits at least this long

# Flap damping (after BGP route-flap damping): every transition adds a penalty
# that halves every DAMPING_HALF_LIFE_CHECKS check intervals (15 s at the
# default 2 s interval); above SUPPRESS the backend is held down until the
# penalty decays below REUSE. Time is counted in check intervals so that a
# backend flapping at every check is treated alike whatever its interval:
# the fourth transition in quick succession holds it down, and it stays held
# down while it keeps flapping (the penalty then stays above REUSE).
DAMPING_PENALTY = 1000.0
DAMPING_SUPPRESS = 3000.0
DAMPING_REUSE = 1500.0
DAMPING_HALF_LIFE_CHECKS = 7.5
DAMPING_MAX = 12000.0  # caps the hold-down at three half-lives past REUSE

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, no TIME_WAIT


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
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed early"
    return type(exc).__name__


async def _probe_tcp(probe: Probe) -> str:
    """A connect, then a reset: no request, no TIME_WAIT left on either side."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in probe.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        await loop.sock_connect(sock, (probe.address, probe.port))
    finally:
        sock.close()
    return "ok"


_NO_VERIFY = ssl.create_default_context()
_NO_VERIFY.check_hostname = False
_NO_VERIFY.verify_mode = ssl.CERT_NONE  # a backend is probed by address, not by name


def _http_complete(probe: Probe, response: bytes) -> bool:
    """Whether `response` holds all the check needs: the status line and headers, and,
    when a body substring is expected, the body as far as Content-Length says."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    if not probe.body:
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False  # no length: the server's close ends the body


async def _probe_http(probe: Probe) -> str:
    tls = _NO_VERIFY if probe.kind == "https" else None
    reader, writer = await asyncio.open_connection(
        probe.address, probe.port, ssl=tls,
        server_hostname=(probe.host or None) if tls else None)  # SNI: the Host header's name
    try:
        host = probe.host or (f"[{probe.address}]" if ":" in probe.address else probe.address)
        writer.write(f"GET {probe.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xdplb-lbd\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        # Stop as soon as the response says enough: a server that ignores
        # "Connection: close" must not turn every check into a timeout.
        response = b""
        while len(response) < HTTP_READ_LIMIT and not _http_complete(probe, response):
            chunk = await reader.read(HTTP_READ_LIMIT - len(response))
            if not chunk:
                break
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
        return f"bad response {status_line[:40]!r}" if status_line else "empty response"
    status = int(parts[1])
    if status not in probe.expect_status:
        return f"status {status}"
    body = response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""
    if probe.body and probe.body.encode() not in body:
        return f"body lacks {probe.body!r}"
    return "ok"


class GrpcChannels:
    """One channel per gRPC check, kept between checks while they succeed.

    A channel whose check failed is dropped: gRPC's reconnect backoff (1 s,
    growing to 2 minutes) would otherwise keep a revived backend "unavailable"
    long after it answers again; the next check connects afresh instead."""

    def __init__(self) -> None:
        self._channels: dict[Probe, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, probe: Probe) -> grpc.aio.Channel:
        channel = self._channels.get(probe)
        if channel is None:
            host = f"[{probe.address}]" if ":" in probe.address else probe.address
            channel = grpc.aio.insecure_channel(f"{host}:{probe.port}")
            self._channels[probe] = channel
        return channel

    def discard(self, probe: Probe) -> None:
        channel = self._channels.pop(probe, None)
        if channel is not None:
            task = asyncio.ensure_future(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def __len__(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        for probe in list(self._channels):
            self.discard(probe)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _probe_grpc(probe: Probe, channels: GrpcChannels) -> str:
    stub = health_pb2_grpc.HealthStub(channels.get(probe))
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=probe.grpc_service),
                                 timeout=probe.timeout_ms / 1000)
    except grpc.aio.AioRpcError as exc:
        channels.discard(probe)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timeout"
        return f"grpc {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return "ok"


async def run_probe(probe: Probe, channels: GrpcChannels) -> Result:
    """One check, bounded by its timeout; never raises (but can be cancelled)."""
    if probe.kind == "none":
        return Result(True, "ok", 0.0)
    started = time.monotonic()
    try:
        async with asyncio.timeout(probe.timeout_ms / 1000):
            if probe.kind == "tcp":
                reason = await _probe_tcp(probe)
            elif probe.kind in ("http", "https"):
                reason = await _probe_http(probe)
            elif probe.kind == "grpc":
                reason = await _probe_grpc(probe, channels)
            else:
                reason = f"unknown check kind {probe.kind!r}"
    except Exception as exc:
        reason = _connect_reason(exc)
        if probe.kind == "grpc":
            channels.discard(probe)
    return Result(reason == "ok", reason, time.monotonic() - started)


# --- verdicts -------------------------------------------------------------------------------


@dataclass
class Verdict:
    """A check's rise/fall state machine, its damping, and what it last saw.

    Times given as `now` are time.monotonic() seconds; `since` is wall-clock time."""

    probe: Probe
    up: bool | None = None  # None: never checked
    streak: int = 0  # consecutive results that disagree with `up`
    last: Result | None = None
    since: float = field(default_factory=time.time)
    penalty: float = 0.0
    penalty_at: float = 0.0
    suppressed: bool = False
    transitions: int = 0

    @property
    def half_life_s(self) -> float:
        return DAMPING_HALF_LIFE_CHECKS * self.probe.interval_ms / 1000

    def observe(self, result: Result, now: float) -> bool:
        """Takes one result; True when the verdict (up/down) changed."""
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
        self.penalty = min(self.decayed(now) + DAMPING_PENALTY, DAMPING_MAX)
        self.penalty_at = now
        if self.penalty >= DAMPING_SUPPRESS:
            self.suppressed = True
        return True

    def decayed(self, now: float) -> float:
        """The penalty as it stands at `now`."""
        return self.penalty * math.pow(0.5, (now - self.penalty_at) / self.half_life_s)

    def release(self, now: float) -> bool:
        """Ends a hold-down once the penalty decayed below REUSE; True when it did."""
        if self.suppressed and self.decayed(now) < DAMPING_REUSE:
            self.suppressed = False
            return True
        return False

    def held_for(self, now: float) -> float:
        """Seconds until the penalty falls below REUSE (0 when it is there already)."""
        penalty = self.decayed(now)
        return 0.0 if penalty < DAMPING_REUSE else self.half_life_s * math.log2(
            penalty / DAMPING_REUSE)

    def serving(self) -> bool:
        """Whether traffic may go to it: up, and not held down for flapping."""
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
        self.batches_applied = 0

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
            self.channels.discard(probe)

    def healthy(self) -> dict[MemberId, bool]:
        out = {}
        for member, probe in self.members.items():
            if probe is None:
                out[member] = True
            else:
                verdict = self.verdicts.get(probe)
                out[member] = bool(verdict and verdict.serving())
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
            due = time.monotonic() + interval * (1 - JITTER * random.random())
            async with self._limit:
                result = await run_probe(probe, self.channels)
            self.checks_run += 1
            try:
                self._judge(verdict, result, time.monotonic())
            except Exception:  # nothing may silence this check for good
                log.exception("%s: judging a result failed", probe.describe())
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def _judge(self, verdict: Verdict, result: Result, now: float) -> None:
        """One result: verdict, hold-down and release reported; the batcher woken when
        whether the backend may serve changed."""
        was_serving = verdict.serving()
        what = verdict.probe.describe()
        if verdict.release(now):
            state = "up" if verdict.up else "down"
            self._tell(f"{what} is {state}: released from the flapping hold-down (penalty "
                       f"below {DAMPING_REUSE:.0f})", verdict.probe)
        first = verdict.up is None
        was_suppressed = verdict.suppressed
        if verdict.observe(result, now):
            state = "up" if verdict.up else "down"
            if first:
                why = "first check"
            else:
                n = verdict.probe.rise if verdict.up else verdict.probe.fall
                noun = "success" if verdict.up else "failure"
                plural = ("es" if verdict.up else "s") if n > 1 else ""
                why = f"{n} {noun}{plural} in a row"
            line = f"{what} is {state}: {result.reason} ({why})"
            if verdict.suppressed and not was_suppressed:
                line += (f"; flapping ({verdict.transitions} transitions): held down for "
                         f"{verdict.held_for(now):.1f} s or more")
            elif verdict.suppressed and verdict.up:
                line += "; still held down for flapping"
            self._tell(line, verdict.probe)
        if was_serving != verdict.serving():
            self._wake.set()

    def _tell(self, line: str, probe: Probe) -> None:
        try:
            self.notify(line, probe.address)
        except Exception:  # the verdict stands and is applied all the same
            log.exception("reporting %r failed", line)

    async def run_batches(self) -> None:
        """Hands verdict changes to `apply`, at most once per batch interval."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pause = self.batch_interval_s
            try:
                self.apply(self.healthy())
                self.batches_applied += 1
            except Exception:  # the checks go on; the verdicts are handed over again
                log.exception("applying health verdicts failed; retrying")
                self._wake.set()
                pause = max(pause, APPLY_RETRY_S)
            await asyncio.sleep(pause)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.channels.close()
