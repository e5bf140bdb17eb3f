"""Health checking: lbd's check loops decide who gets traffic.

One scheduler in lbd's event loop runs every check: a heap of due times
and a single timer. TCP checks are non-blocking connects watched by one
epoll, ended with a reset (no task, no TIME_WAIT), their sockets reused for
later checks (see _TcpProber); HTTP(S) and gRPC checks
run as tasks, gRPC over a channel kept per check. A check is identified by
what it probes and how (kind, address, port, HTTP/gRPC details, timing, rise/fall),
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
backend nor a storm of failures can thrash the rings (the penalty's
half-life is counted in check intervals). Every verdict change, hold-down
and release is reported (logged and published) with its reason.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import functools
import heapq
import itertools
import logging
import math
import os
import random
import select
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

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
    # Checks through the VIP (HealthCheck.via "vip"): `address` is the VIP, every
    # socket carries `fwmark`, which names the backend's entry to the tc program
    # that encapsulates the packets to it, and `backend` is the backend's address.
    fwmark: int = 0
    backend: str = ""

    @classmethod
    def of(cls, check: HealthCheck, address: str, vip_port: int, vip: str = "",
           fwmark: int = 0) -> Probe:
        if check.via == "vip":
            if not (vip and fwmark):
                raise ValueError(f"a check of {address} through the VIP needs the VIP and "
                                 "the backend's mark")
            return cls(check.kind, vip, check.port or vip_port, check.path, check.host,
                       check.expect_status, check.body, check.grpc_service, check.interval_ms,
                       check.timeout_ms, check.rise, check.fall, fwmark, address)
        return cls(check.kind, address, check.port or vip_port, check.path, check.host,
                   check.expect_status, check.body, check.grpc_service, check.interval_ms,
                   check.timeout_ms, check.rise, check.fall)

    @functools.cached_property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    @functools.cached_property
    def sockaddr(self) -> tuple[str, int]:
        return (self.address, self.port)

    @functools.cached_property
    def socket_kind(self) -> tuple[int, int]:
        """What a check socket of this probe is made with (family, fwmark): sockets of
        one kind are interchangeable, so the TCP engine reuses them across probes. Any
        other per-probe socket option (a bind, a device) must join this key."""
        return (self.family, self.fwmark)

    def describe(self) -> str:
        where = f"[{self.address}]" if ":" in self.address else self.address
        extra = f"{self.path}" if self.kind in ("http", "https") else (
            f" service {self.grpc_service!r}" if self.kind == "grpc" else "")
        via = f" through the tunnel to {self.backend}" if self.backend else ""
        return f"{self.kind} {where}:{self.port}{extra}{via}"


class Result(NamedTuple):
    """One check's outcome (a tuple: made for every check, so made cheaply)."""

    ok: bool
    reason: str  # "ok", "timeout", "refused", "status 503", "NOT_SERVING", ...
    latency_s: float


# --- the probes ---------------------------------------------------------------------------


def connect_reason(exc: BaseException) -> str:
    """A failed connection in a word or two: timeout, refused, reset, tls: ..."""
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


def check_socket(probe: Probe) -> socket.socket:
    """A non-blocking TCP socket for one check of `probe`, marked with its fwmark (if any)
    before it connects."""
    sock = socket.socket(probe.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        if probe.fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, probe.fwmark)
    except BaseException:
        sock.close()
        raise
    return sock


async def _probe_tcp(probe: Probe) -> str:
    """A connect, then a reset: no request, no TIME_WAIT left on either side."""
    loop = asyncio.get_running_loop()
    sock = check_socket(probe)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        await loop.sock_connect(sock, probe.sockaddr)
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
    # SNI: the Host header's name (none is sent for an address)
    server_hostname = (probe.host or probe.address) if tls else None
    if probe.fwmark:  # the socket is made here, so it is marked before it connects
        sock = check_socket(probe)
        try:
            await asyncio.get_running_loop().sock_connect(sock, probe.sockaddr)
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=tls, server_hostname=server_hostname)
        except BaseException:
            sock.close()
            raise
    else:
        reader, writer = await asyncio.open_connection(
            probe.address, probe.port, ssl=tls, server_hostname=server_hostname)
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
        self._channels: dict[Probe, tuple[grpc.aio.Channel, health_pb2_grpc.HealthStub]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def stub(self, probe: Probe) -> health_pb2_grpc.HealthStub:
        kept = self._channels.get(probe)
        if kept is None:
            host = f"[{probe.address}]" if ":" in probe.address else probe.address
            channel = grpc.aio.insecure_channel(f"{host}:{probe.port}")
            kept = self._channels[probe] = (channel, health_pb2_grpc.HealthStub(channel))
        return kept[1]

    def discard(self, probe: Probe) -> None:
        kept = self._channels.pop(probe, None)
        if kept is not None:
            channel = kept[0]
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
    try:
        reply = await channels.stub(probe).Check(
            health_pb2.HealthCheckRequest(service=probe.grpc_service),
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
        reason = connect_reason(exc)
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
    active: bool = True  # False once its check is removed: its scheduled runs are dropped

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


# --- TCP checks without a task each ------------------------------------------------------


def _errno_reason(err: int) -> str:
    return {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
            errno.ETIMEDOUT: "timeout"}.get(err) or os.strerror(err).lower()


_SOCK_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_ERR_OR_HUP = select.EPOLLERR | select.EPOLLHUP
_ONE_WRITABLE = select.EPOLLOUT | select.EPOLLONESHOT
MAX_IDLE_SOCKETS = 256  # per (family, fwmark): connected-and-reset sockets kept for reuse


_AF_UNSPEC_ADDRESS = struct.pack("H14x", socket.AF_UNSPEC)


def _libc_connect() -> Callable[[int, bytes, int], int] | None:
    """The C library's connect(fd, address, length), for connect(fd, AF_UNSPEC), which
    Python's socket.connect refuses on an AF_INET(6) socket; None where it cannot be had
    (then every check gets a new socket)."""
    try:
        import ctypes

        connect = ctypes.CDLL(None, use_errno=True).connect
    except (ImportError, OSError, AttributeError):
        return None
    connect.restype = ctypes.c_int  # arguments: int, bytes and int convert as they are
    return connect


class _TcpProber:
    """Non-blocking connects watched by one epoll (itself watched by the event loop):
    a TCP check costs a few dict operations, no task, future or timer.

    A socket whose connect succeeded is dissolved with connect(AF_UNSPEC), which resets
    the connection as a close with SO_LINGER 0 would (RST, no TIME_WAIT, the local port
    released), and is kept for a later check: Linux lets a TCP socket connect again
    after that, keeping its options (SO_LINGER, SO_MARK) and its place in the epoll
    (armed one-shot, re-armed per connect). So a check costs three system calls
    (connect, epoll_ctl, the resetting connect) instead of five (socket, setsockopt,
    connect, epoll_ctl, close) and no socket allocated or freed; every check is still a
    new connection (new port, full handshake) judged the same way. A socket whose
    check failed or timed out is closed; sockets are the C type (_socket.socket), so
    nothing of socket.socket's Python layer runs per check. Results go to
    `done(verdict, result, started)`; `expire` times out the overdue."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 done: Callable[[Verdict, Result, float], None]):
        self._loop, self._done = loop, done
        self._epoll = select.epoll()
        self._pending: dict[int, tuple[_socket.socket, Verdict, float]] = {}
        # One queue per timeout value: deadlines in each come in order.
        self._deadlines: dict[float, deque[tuple[float, int, tuple]]] = {}
        self._idle: dict[tuple[int, int], list[_socket.socket]] = {}
        self._connect = _libc_connect()
        loop.add_reader(self._epoll.fileno(), self._ready)

    def _new_socket(self, probe: Probe) -> _socket.socket:
        sock = _socket.socket(probe.family, _SOCK_NONBLOCKING_STREAM)
        try:
            if probe.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, probe.fwmark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self, verdict: Verdict, now: float) -> bool:
        """Starts a check; False when no socket could be had (retry later)."""
        probe = verdict.probe
        idle = self._idle.get(probe.socket_kind)
        sock = idle.pop() if idle else None
        if sock is not None:
            try:
                if sock.connect_ex(probe.sockaddr) != errno.EINPROGRESS:
                    raise OSError
                self._epoll.modify(sock.fileno(), _ONE_WRITABLE)
            except OSError:
                sock.close()  # judged on a new socket below, exactly as without reuse
                sock = None
        if sock is None:
            try:
                sock = self._new_socket(probe)
            except OSError as exc:  # EMFILE and the like: a fault of ours, not the backend's
                log.warning("%s: no socket for a check: %s", probe.describe(), exc)
                return False
            try:
                err = sock.connect_ex(probe.sockaddr)
            except OSError as exc:  # an address the kernel refuses outright
                err = exc.errno or errno.EINVAL
            if err != errno.EINPROGRESS:
                sock.close()
                self._done(verdict, Result(err == 0, "ok" if err == 0 else _errno_reason(err),
                                           time.monotonic() - now), now)
                return True
            self._epoll.register(sock.fileno(), _ONE_WRITABLE)
        fd = sock.fileno()
        entry = self._pending[fd] = (sock, verdict, now)
        timeout = probe.timeout_ms / 1000
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = deque()
        queue.append((now + timeout, fd, entry))
        return True

    def _ready(self) -> None:
        events = self._epoll.poll(0)
        now = time.monotonic()
        pending, done, connect = self._pending, self._done, self._connect
        for fd, event in events:
            entry = pending.pop(fd, None)
            if entry is None:
                continue
            sock, verdict, started = entry
            # SO_ERROR only when the connect failed: a success is EPOLLOUT alone.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if event & _ERR_OR_HUP else 0
            if err:
                sock.close()
                done(verdict, Result(False, _errno_reason(err), now - started), started)
                continue
            kind = verdict.probe.socket_kind
            idle = self._idle.get(kind)
            if idle is None:
                idle = self._idle[kind] = []
            if (connect is not None and len(idle) < MAX_IDLE_SOCKETS
                    and connect(fd, _AF_UNSPEC_ADDRESS, 16) == 0):
                idle.append(sock)  # reset; its next connect is a new connection
            else:
                sock.close()  # with SO_LINGER 0: a reset; closing also leaves the epoll
            done(verdict, Result(True, "ok", now - started), started)

    def expire(self, now: float) -> None:
        pending = self._pending
        for queue in self._deadlines.values():
            while queue and queue[0][0] <= now:
                _, fd, entry = queue.popleft()
                if pending.get(fd) is not entry:
                    continue  # answered already (its socket may serve another check now)
                del pending[fd]
                entry[0].close()
                self._done(entry[1], Result(False, "timeout", now - entry[2]), entry[2])

    def next_deadline(self) -> float:
        return min((q[0][0] for q in self._deadlines.values() if q), default=math.inf)

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        for sock, _, _ in self._pending.values():
            sock.close()
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
        self._pending.clear()
        self._deadlines.clear()
        self._idle.clear()
        self._epoll.close()


# --- the scheduler --------------------------------------------------------------------------


Apply = Callable[[dict[MemberId, bool]], None]
Notify = Callable[[str, str], None]  # (message, backend address)
Observe = Callable[[str, float], None]  # (check kind, latency in seconds), every check
TICK_S = 0.002  # the scheduler's timer granularity: checks due within it start together
MAX_STARTS_PER_TICK = 256  # then the event loop gets a turn
_random = random.random


class HealthChecker:
    """Runs every check of the desired state and reports verdicts in batches.

    One scheduler: a heap of (due time, verdict) and one event-loop timer for
    the earliest. A check's next run is due `interval` after its start, less
    a jitter of up to 10%; TCP checks run through _TcpProber, HTTP(S) and gRPC
    checks as tasks. At most MAX_CONCURRENT_PROBES run at once."""

    def __init__(self, apply: Apply, notify: Notify, batch_interval_s: float = 0.2,
                 observe: Observe | None = None):
        self.apply, self.notify, self.observe = apply, notify, observe
        self.batch_interval_s = batch_interval_s
        self.members: dict[MemberId, Probe | None] = {}  # None: kind none, always up
        self.verdicts: dict[Probe, Verdict] = {}
        self._wake = asyncio.Event()
        self.channels = GrpcChannels()
        self.checks_run = 0
        self.batches_applied = 0
        self._due: list[tuple[float, int, Verdict]] = []
        self._order = itertools.count()  # ties in the heap: first pushed, first run
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._running = 0
        self._tasks: dict[Probe, asyncio.Task[None]] = {}  # HTTP(S) and gRPC checks in flight
        self._tcp: _TcpProber | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def update(self, state: DesiredState, known: Mapping[MemberId, bool],
               marks: Mapping[MemberId, int] | None = None) -> None:
        """Follows the desired state: new checks start, unused ones stop. A new check
        of a backend whose health is `known` (a restart: the maps' marks; a changed
        check: the old verdict) starts from it rather than from "unchecked", its first
        run somewhere in its first interval; an unknown one is checked at once.
        `marks` are the socket marks of checks through the VIP, by member."""
        marks = marks or {}
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        members: dict[MemberId, Probe | None] = {}
        wanted: dict[Probe, list[MemberId]] = {}  # each check and whom it serves
        for key, vip in state.vips.items():
            for address, backend in vip.backends.items():
                check = vip.check_for(backend)
                probe = None if check.kind == "none" else Probe.of(
                    check, address, key.port, key.address, marks.get((key, address), 0))
                members[(key, address)] = probe
                if probe is not None:
                    wanted.setdefault(probe, []).append((key, address))
        self.members = members
        now = time.monotonic()
        for probe in wanted.keys() - self.verdicts.keys():
            verdict = Verdict(probe)
            seeded = [known[m] for m in wanted[probe] if m in known]
            first = now
            if seeded:
                verdict.up = all(seeded)
                first += random.uniform(0, probe.interval_ms / 1000)
            self.verdicts[probe] = verdict
            heapq.heappush(self._due, (first, next(self._order), verdict))
        for probe in self.verdicts.keys() - wanted.keys():  # their heap entries are skipped
            self.verdicts.pop(probe).active = False
            task = self._tasks.pop(probe, None)
            if task is not None:
                task.cancel()
            self.channels.discard(probe)
        self._arm(now)

    def healthy(self) -> dict[MemberId, bool]:
        return {member: self.serving(member) for member in self.members}

    def serving(self, member: MemberId) -> bool:
        """Whether the current verdict lets this backend serve (no check: it may)."""
        probe = self.members.get(member)
        if probe is None:
            return True
        verdict = self.verdicts.get(probe)
        return bool(verdict and verdict.serving())

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

    @property
    def in_flight(self) -> int:
        return self._running

    # -- the scheduler --

    def _arm(self, now: float) -> None:
        """Sets the timer for the earliest due check or TCP deadline, if sooner than set."""
        if self._loop is None or self._closed:
            return
        runnable = self._due and self._running < MAX_CONCURRENT_PROBES
        at = min(self._due[0][0] if runnable else math.inf,
                 self._tcp.next_deadline() if self._tcp else math.inf)
        if at == math.inf or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        at = max(at, now + TICK_S) if at > now else now
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._run_due)

    def _run_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = time.monotonic()
        if self._tcp is not None:
            self._tcp.expire(now)
        started, due = 0, self._due
        horizon = now + TICK_S  # due within a tick: now (their due times allow for it)
        while due and due[0][0] <= horizon and started < MAX_STARTS_PER_TICK:
            verdict = due[0][2]
            if not verdict.active:
                heapq.heappop(due)  # its check was removed
                continue
            if self._running >= MAX_CONCURRENT_PROBES:
                break  # a finishing check re-arms the timer
            heapq.heappop(due)
            if not self._start(verdict, now):
                heapq.heappush(due, (now + 0.1, next(self._order), verdict))
            started += 1
        self._arm(now)  # with more due already, the timer fires a tick later

    def _start(self, verdict: Verdict, now: float) -> bool:
        probe = verdict.probe
        if probe.kind == "tcp":
            if self._tcp is None:
                assert self._loop is not None
                self._tcp = _TcpProber(self._loop, self._finish)
            self._running += 1
            if not self._tcp.start(verdict, now):
                self._running -= 1
                return False
            return True
        self._running += 1
        task = asyncio.create_task(self._check(verdict, now))
        task.add_done_callback(functools.partial(self._check_done, verdict, now))
        self._tasks[probe] = task
        return True

    async def _check(self, verdict: Verdict, started: float) -> None:
        self._finish(verdict, await run_probe(verdict.probe, self.channels), started)

    def _check_done(self, verdict: Verdict, started: float, task: asyncio.Task[None]) -> None:
        if self._tasks.get(verdict.probe) is task:
            del self._tasks[verdict.probe]
        if task.cancelled():  # its check was removed (or lbd stops)
            self._running -= 1
        elif (exc := task.exception()) is not None:  # run_probe does not raise: a bug
            log.error("%s: the check failed: %r", verdict.probe.describe(), exc)
            self._finish(verdict, Result(False, f"check failed: {exc!r}", 0.0), started)

    def _finish(self, verdict: Verdict, result: Result, started: float) -> None:
        """A check's result: judged, and its next run scheduled."""
        self._running -= 1
        self.checks_run += 1
        if self._closed or not verdict.active:
            return  # removed while it ran
        now = time.monotonic()
        probe = verdict.probe
        try:
            if result.ok == verdict.up and not verdict.suppressed:
                # Most results: what the verdict says already, and nothing held down.
                # observe() would only clear the streak; there is nothing to report.
                verdict.last, verdict.streak = result, 0
            else:
                self._judge(verdict, result, now)
            if self.observe is not None:
                self.observe(probe.kind, result.latency_s)
        except Exception:  # nothing may silence this check for good
            log.exception("%s: judging a result failed", probe.describe())
        # Never later than the interval: the timer's tick is taken off the jitter's range.
        interval = probe.interval_ms / 1000
        due = started + interval * (1 - JITTER * _random()) - TICK_S
        if due < now:
            due = now
        heapq.heappush(self._due, (due, next(self._order), verdict))
        if due < self._timer_at or self._running == MAX_CONCURRENT_PROBES - 1:
            self._arm(now)

    def _judge(self, verdict: Verdict, result: Result, now: float) -> None:
        """One result: verdict, hold-down and release reported; the batcher woken when
        whether the backend may serve changed."""
        was_serving = verdict.serving()
        if verdict.release(now):
            state = "up" if verdict.up else "down"
            self._tell(f"{verdict.probe.describe()} is {state}: released from the flapping "
                       f"hold-down (penalty below {DAMPING_REUSE:.0f})", verdict.probe)
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
            line = f"{verdict.probe.describe()} is {state}: {result.reason} ({why})"
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
            self.notify(line, probe.backend or probe.address)
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
        """Stops every check; the last verdicts stay readable."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._due.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            self._running -= len(self._tcp)
            self._tcp.close()
            self._tcp = None
        await self.channels.close()
