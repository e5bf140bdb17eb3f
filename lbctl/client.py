"""Reaching lbd: where to connect, how, and what to say when a call fails.

lbd listens on a unix socket by default (mode 0600: the file's permissions are
the access control) or on TCP with TLS. Plaintext TCP is allowed only to a
loopback address, where nothing crosses a network.

Every failure of a call becomes an LbdError whose text is the one line lbctl
prints after "lbctl: ": the daemon's own message when it refused the request,
or "cannot reach lbd at TARGET: REASON" when no daemon answered.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# gRPC's C core logs failed handshakes and connects to stderr by itself, and
# reads this only when first imported. lbctl says what failed in one line;
# GRPC_VERBOSITY set by the user still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
from google.protobuf.message import Message

from xdplb.state import MAX_MESSAGE_BYTES
from xdplb.v1 import lb_pb2_grpc

DEFAULT_SOCKET = "/run/xdplb/lbd.sock"
DEFAULT_TIMEOUT_S = 10.0


class EndpointError(ValueError):
    """Connection options that do not fit together: a usage error."""


class LbdError(Exception):
    """A call failed; str(error) is the line to show the user."""


@dataclass(frozen=True)
class Endpoint:
    """Where lbd is and how to talk to it."""

    target: str  # the gRPC target: unix:///abs/path or host:port
    credentials: grpc.ChannelCredentials | None = field(default=None, compare=False)
    socket_path: str | None = None  # for unix sockets: lets failures name the cause
    tls_files: dict = field(default_factory=dict, compare=False)  # ca/cert/key/insecure given

    def open_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)


# The largest state lbd accepts lists and exports within this (xdplb.state limits).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def choose_endpoint(*, socket_path: str, address: str | None = None, ca: str | None = None,
                    cert: str | None = None, key: str | None = None, insecure: bool = False,
                    socket_given: bool = False) -> Endpoint:
    """The endpoint the global options name: the unix socket unless --address is given.

    `socket_given` says --socket was on the command line (not a default or
    LBCTL_SOCKET), where it contradicts --address."""
    if address is None:
        if ca or cert or key or insecure:
            raise EndpointError("--ca, --cert, --key and --insecure need --address")
        return unix_endpoint(socket_path)
    if socket_given:
        raise EndpointError("give --socket or --address, not both")
    return tcp_endpoint(address, ca=ca, cert=cert, key=key, insecure=insecure)


def unix_endpoint(path: str) -> Endpoint:
    """The endpoint of lbd's unix socket; a relative path is taken from the cwd."""
    absolute = os.path.abspath(path)
    return Endpoint(target="unix://" + absolute, socket_path=absolute)


def tcp_endpoint(address: str, *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, insecure: bool = False) -> Endpoint:
    """The endpoint of lbd's TCP listener: TLS (mutual with cert and key) unless
    `insecure`, which only a loopback address may use."""
    host, port = parse_host_port(address)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if insecure:
        if ca or cert or key:
            raise EndpointError("--insecure cannot be combined with --ca, --cert or --key")
        if not is_loopback(host):
            raise EndpointError(f"--insecure is allowed only with a loopback --address "
                                f"(127.0.0.0/8, ::1, localhost), not {address}")
        return Endpoint(target=target, tls_files={"insecure": True})
    if bool(cert) != bool(key):
        raise EndpointError("--cert and --key go together (mutual TLS needs both)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "--ca"), private_key=_read_pem(key, "--key"),
        certificate_chain=_read_pem(cert, "--cert"))
    return Endpoint(target=target, credentials=credentials,
                    tls_files={"ca": ca, "cert": cert, "key": key})


def parse_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` into (host, port)."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port2>\d+)",
                         address.strip())
    if not match:
        raise EndpointError(f"--address {address!r}: expected HOST:PORT or [IPV6]:PORT, "
                            "e.g. 127.0.0.1:50051")
    host = match["v6"] or match["host"]
    port = int(match["port"] or match["port2"])
    if not 1 <= port <= 65535:
        raise EndpointError(f"--address {address!r}: port {port} is not in 1..65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve anywhere


def _read_pem(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None  # --ca absent: the system's root certificates
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as exc:
        raise EndpointError(f"{option} {path}: {exc.strerror}") from None


class LbdClient:
    """Calls lbd's LoadBalancer service, each call with the same deadline.

    The channel opens on the first call, so commands that fail on usage never
    touch the network."""

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT_S):
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        """Call RPC `method` (e.g. "ListVips"); raises LbdError on any failure."""
        if self._stub is None:
            self._channel = self.endpoint.open_channel()
            self._stub = lb_pb2_grpc.LoadBalancerStub(self._channel)
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise LbdError(describe_rpc_error(error, self.endpoint, self.timeout)) from None

    def for_endpoint(self, host: str) -> LbdClient:
        """A client of another lbd: a socket path, or HOST:PORT with this one's TLS files."""
        if host.startswith("/") or host.startswith("."):
            return LbdClient(unix_endpoint(host), self.timeout)
        tls = self.endpoint.tls_files
        return LbdClient(tcp_endpoint(host, **tls), self.timeout)

    def stream(self, method: str, request: Message) -> Iterator[Any]:
        """A server-streaming RPC, without a deadline (it runs until stopped)."""
        if self._stub is None:
            self._channel = self.endpoint.open_channel()
            self._stub = lb_pb2_grpc.LoadBalancerStub(self._channel)
        try:
            yield from getattr(self._stub, method)(request)
        except grpc.RpcError as error:
            raise LbdError(describe_rpc_error(error, self.endpoint, self.timeout)) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None


def describe_rpc_error(error: grpc.RpcError, endpoint: Endpoint, timeout: float) -> str:
    """The one line that explains a failed call."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith("etcd"):
        return details.splitlines()[0]  # lbd answered: the fleet's store did not
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach lbd at {endpoint.target}: {_unreachable_reason(details, endpoint)}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"lbd at {endpoint.target} did not answer within {timeout:g} s (--timeout)"
    if details:
        return details.splitlines()[0]
    return code.name.lower() if code is not None else str(error)


def _unreachable_reason(details: str, endpoint: Endpoint) -> str:
    # gRPC's own text repeats the address and nests status names; for a unix
    # socket the file itself says more plainly what is wrong.
    if endpoint.socket_path is not None:
        local = _socket_problem(endpoint.socket_path)
        if local:
            return local
    reason = details.split("last error: ", 1)[-1]
    reason = re.sub(r"^[A-Z_]+: ", "", reason)  # a status name
    reason = re.sub(r"^(ipv4|ipv6|unix):\S+: ", "", reason)  # the address again
    reason = reason.removesuffix(": OK")  # a status some TLS failures end with
    return reason.splitlines()[0] if reason else "unavailable"


def _socket_problem(path: str) -> str | None:
    try:
        status = os.stat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISSOCK(status.st_mode):
        return "not a socket"
    if not os.access(path, os.R_OK | os.W_OK):
        return (f"Permission denied (socket mode {stat.S_IMODE(status.st_mode):04o}, "
                f"owner uid {status.st_uid})")
    return None
