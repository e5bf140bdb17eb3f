"""The probes: one check of one backend, over TCP, HTTP(S) or gRPC (the I/O)."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xdplb import httpget
from xdplb.state import HealthCheck

log = logging.getLogger("xdplb.health")

HTTP_READ_LIMIT = 64 * 1024
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
        extra = f"{self.path}" if self.kind in ("http", "https", "h3") else (
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


async def _probe_http(probe: Probe) -> str:
    tls = _NO_VERIFY if probe.kind == "https" else None
    # SNI: the Host header's name (none is sent for an address)
    server_hostname = (probe.host or probe.address) if tls else None
    sock = None
    if probe.fwmark:  # the socket is made here, so it is marked before it connects
        sock = check_socket(probe)
        try:
            await asyncio.get_running_loop().sock_connect(sock, probe.sockaddr)
        except BaseException:
            sock.close()
            raise
    host = probe.host or (f"[{probe.address}]" if ":" in probe.address else probe.address)
    # Stop as soon as the response says enough: a server that ignores
    # "Connection: close" must not turn every check into a timeout.
    response = await httpget.get(probe.address, probe.port, probe.path, host=host,
                                 limit=HTTP_READ_LIMIT, want_body=bool(probe.body),
                                 sock=sock, tls=tls, server_hostname=server_hostname)
    return _judge_http(probe, response.raw)


def _judge_http(probe: Probe, response: bytes) -> str:
    answer = httpget.Response(response)
    status = answer.status
    if status is None:
        line = answer.status_line
        return f"bad response {line[:40]!r}" if line else "empty response"
    return _judge_status(probe, status, answer.body)


def _judge_status(probe: Probe, status: int, body: bytes) -> str:
    if status not in probe.expect_status:
        return f"status {status}"
    if probe.body and probe.body.encode() not in body:
        return f"body lacks {probe.body!r}"
    return "ok"


async def _probe_h3(probe: Probe) -> str:
    from xdplb.health import h3probe  # aioquic, imported once an h3 check runs

    host = probe.host or (f"[{probe.address}]" if ":" in probe.address else probe.address)
    status, body = await h3probe.get(probe.address, probe.port, probe.path, host,
                                     probe.fwmark)
    return _judge_status(probe, status, body)


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
            elif probe.kind == "h3":
                reason = await _probe_h3(probe)
            elif probe.kind == "tcp-syn":  # the checker sends these itself (syn_prober)
                reason = "tcp-syn: no balancer to catch the replies"
            else:
                reason = f"unknown check kind {probe.kind!r}"
    except Exception as exc:
        reason = connect_reason(exc)
        if probe.kind == "grpc":
            channels.discard(probe)
    return Result(reason == "ok", reason, time.monotonic() - started)
