"""The desired state: what the operator asked for, validated, in one model.

VIPs (address, port or all ports, protocol, hash mode, encapsulation, ring
size, default health check, panic threshold), their backends (address,
weight, drained, health check) and the limits the maps impose. Every input
(API, `lbctl apply`, the state file) changes it through `apply_changes`,
which works on a copy, validates the result whole and returns it, or raises
StateError naming what and why with the state untouched.

Everything here is plain data: frozen dataclasses, canonical address
strings, and a dict form (`to_dict`/`from_dict`) that is both the state file
and the `lbctl apply` file format.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from xdplb import maglev

FORMAT_VERSION = 1
PROTOCOLS = ("tcp", "udp")
HASH_MODES = ("5tuple", "source")
ENCAPSULATIONS = ("ipip", "gue")
CHECK_KINDS = ("none", "tcp", "http", "https", "grpc")
CHECK_VIAS = ("backend", "vip")  # probe the backend's own address, or the VIP through the tunnel
WHEN_NONE_HEALTHY = ("drop", "all")
LOAD_SOURCES = ("none", "prometheus", "push")
MAX_WEIGHT = 10_000
DEFAULT_WEIGHT = 100

# Every string has a character set and a length, every list a count, every number
# a range (docs/limits): nothing an operator sends can reach a socket, a log line or
# a file with CR, LF or NUL in it, nor grow the state past what the API can answer.
MAX_ADDRESS_TEXT = 64  # "[ffff:...:255.255.255.255]:65535/udp" is 56
MAX_PATH = 1024
MAX_HOST = 255
MAX_BODY = 256
MAX_GRPC_SERVICE = 256
MAX_METRIC = 200
MAX_LABELS = 1024
MAX_STATUS_CODES = 16
# The largest gRPC message lbd and lbctl send or take (the library's default is 4 MiB).
MAX_MESSAGE_BYTES = 256 << 20
# The state as compact JSON: its export and listings stay far inside the API's
# message limit, whatever the map sizes allow (tests/test_limits.py measures it).
MAX_STATE_BYTES = 8 << 20
# An apply document as sent (any formatting): more than the largest state exported.
MAX_DOCUMENT_BYTES = 32 << 20
_HTTP_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
_HTTP_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_GRPC_SERVICE = re.compile(r"[A-Za-z0-9_./-]*")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class StateError(ValueError):
    """A change was refused; the message says what and why."""


class NotFound(StateError):
    """The change names a VIP or backend that does not exist."""


class AlreadyExists(StateError):
    """The change adds a VIP or backend that exists already."""


class LimitExceeded(StateError):
    """The result would not fit the maps."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxlong = 2, 6, 6, 40


def shown(value: object) -> str:
    """repr() for a message, bounded: a value from a request may be megabytes long or
    deeply nested, and what it says goes into logs and answers."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return f"<{type(value).__name__} too large to show>"


def _fail(where: str, message: str) -> StateError:
    return StateError(f"{where}: {message}" if where else message)


def _text(where: str, value: object, limit: int, pattern: re.Pattern[str] | None = None,
          what: str = "") -> str:
    """A string of at most `limit` characters, without control characters, matching
    `pattern` whole when one is given ("" always passes: empty means unset)."""
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {shown(value)}")
    if len(value) > limit:
        raise _fail(where, f"{len(value)} characters, more than the limit of {limit}")
    if _CONTROL.search(value):
        raise _fail(where, f"{shown(value)} holds a control character (CR, LF, NUL, ...)")
    if value and pattern is not None and not pattern.fullmatch(value):
        raise _fail(where, f"{shown(value)} is not {what}")
    return value


def _one_of(where: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _fail(where, f"{shown(value)} is not one of {', '.join(choices)}")


# --- addresses and VIP keys ---------------------------------------------------


def canonical_address(text: object, where: str = "address") -> str:
    """The canonical text of a unicast IP address usable as a VIP or backend."""
    if not isinstance(text, str):
        raise _fail(where, f"must be an IP address string, got {shown(text)}")
    if len(text) > MAX_ADDRESS_TEXT:
        raise _fail(where, f"{len(text)} characters: no address is that long")
    if "%" in text:
        # ipaddress keeps a zone id in the address's identity, the datapath has no
        # zones: fd00::1%eth0 would be a second key for the address fd00::1.
        raise _fail(where, f"{shown(text)} has a zone id (%...): VIPs and backends are "
                           "global addresses; leave the zone out")
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise _fail(where, f"{shown(text)} is not an IPv4 or IPv6 address") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        kind = ("unspecified" if ip.is_unspecified else
                "multicast" if ip.is_multicast else "loopback")
        raise _fail(where, f"{ip} is a {kind} address")
    if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
        raise _fail(where, f"{ip} is the broadcast address")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        raise _fail(where, f"{ip} is IPv4-mapped: write the IPv4 address {ip.ipv4_mapped}")
    return str(ip)


def is_ipv6(address: str) -> bool:
    return ":" in address


def ip_sort_key(address: str) -> tuple[int, int]:
    """Orders addresses IPv4 first, then numerically (ipaddress refuses mixed comparisons)."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _ipv6_with_port(host: str) -> bool:
    """Whether `host` reads as an IPv6 address once a trailing :PORT is cut off."""
    head, _, tail = host.rpartition(":")
    return tail.isdigit() and _is_ipv6(head)


def _ambiguous_without_brackets(address: str) -> bool:
    """Whether the unbracketed text of this IPv6 address also reads as ADDRESS:PORT."""
    return ":" in address and _ipv6_with_port(address)


@dataclass(frozen=True, order=True)
class VipKey:
    """What a VIP answers: address, port (0 = every port) and protocol."""

    address: str
    port: int
    protocol: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", canonical_address(self.address, "VIP address"))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not (
                0 <= self.port <= 65535):
            raise _fail("VIP port", f"must be an integer 1..65535 (0: every port), "
                                    f"got {shown(self.port)}")
        _one_of("VIP protocol", self.protocol, PROTOCOLS)

    @classmethod
    def parse(cls, text: str) -> VipKey:
        """`10.0.0.10:80/tcp`, `[2001:db8::10]:443/udp`, or port-less `10.0.0.10/tcp`."""
        usage = (f"VIP {shown(text)}: expected ADDRESS[:PORT]/PROTOCOL, e.g. 10.0.0.10:80/tcp, "
                 "[2001:db8::10]:443/udp or 10.0.0.10/tcp")
        if not isinstance(text, str):
            raise StateError(f"VIP {shown(text)}: expected ADDRESS[:PORT]/PROTOCOL as a string")
        if len(text) > MAX_ADDRESS_TEXT:
            raise StateError(f"VIP {shown(text)}: {len(text)} characters, no VIP is that long")
        host, slash, protocol = text.strip().rpartition("/")
        if not slash or not host:
            raise StateError(usage)
        port_text: str | None = None
        if host.startswith("["):
            address, bracket, rest = host[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise StateError(usage)
            port_text = rest[1:] if rest else None
        elif host.count(":") == 1:
            address, _, port_text = host.partition(":")
        else:
            address = host  # IPv4 alone, or a bare IPv6 address: port-less
            if host.count(":") > 1 and _ipv6_with_port(host):
                if _is_ipv6(host):  # fd00::1:80 is an address, and fd00::1 port 80
                    head, _, tail = host.rpartition(":")
                    raise StateError(f"VIP {shown(text)} is ambiguous: write [{head}]:{tail}/"
                                     f"{protocol} for port {tail}, or [{host}]/{protocol} "
                                     "for every port of that address")
                raise StateError(f"VIP {shown(text)}: put an IPv6 address in brackets: "
                                 "[ADDR]:PORT/PROTO")
        port = 0
        if port_text is not None:
            if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
                raise StateError(f"VIP {shown(text)}: port {shown(port_text)} is not in 1..65535 "
                                 "(leave it out for every port)")
            port = int(port_text)
        return cls(address, port, protocol.lower())

    @property
    def ipv6(self) -> bool:
        return is_ipv6(self.address)

    def __str__(self) -> str:
        bracket = self.ipv6 and (self.port or _ambiguous_without_brackets(self.address))
        host = f"[{self.address}]" if bracket else self.address
        return f"{host}:{self.port}/{self.protocol}" if self.port else f"{host}/{self.protocol}"


# --- health checks ------------------------------------------------------------


def _int_in(where: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _fail(where, f"must be an integer {low}..{high}, got {shown(value)}")
    return value


@dataclass(frozen=True)
class HealthCheck:
    """How to tell whether a backend serves: HAProxy's rise/fall semantics."""

    kind: str = "tcp"
    port: int = 0  # 0: the VIP's port
    path: str = "/"
    host: str = ""  # HTTP Host header; empty: the backend address
    expect_status: tuple[int, ...] = (200,)
    body: str = ""  # a substring the HTTP body must contain; empty: any body
    grpc_service: str = ""
    interval_ms: int = 2000
    timeout_ms: int = 1000
    rise: int = 2
    fall: int = 3
    # "vip": connect to the VIP, the packets encapsulated to this backend as the
    # balancer would (bpf/hc_encap.h), proving what clients get
    via: str = "backend"

    def validate(self, where: str) -> None:
        _one_of(f"{where}.kind", self.kind, CHECK_KINDS)
        _one_of(f"{where}.via", self.via, CHECK_VIAS)
        if self.via == "vip" and self.kind == "grpc":
            raise _fail(f"{where}.via", "a grpc check cannot go through the VIP (the gRPC "
                                        "client cannot mark its connections); use via "
                                        "\"backend\", or a tcp or http check")
        _int_in(f"{where}.port", self.port, 0, 65535)
        _int_in(f"{where}.interval_ms", self.interval_ms, 100, 3_600_000)
        _int_in(f"{where}.timeout_ms", self.timeout_ms, 10, 3_600_000)
        if self.timeout_ms > self.interval_ms:
            raise _fail(f"{where}.timeout_ms", f"{self.timeout_ms} exceeds interval_ms "
                                               f"{self.interval_ms}")
        _int_in(f"{where}.rise", self.rise, 1, 100)
        _int_in(f"{where}.fall", self.fall, 1, 100)
        _http_path(f"{where}.path", self.path)
        if not self.expect_status or not isinstance(self.expect_status, tuple):
            raise _fail(f"{where}.expect_status", "must list at least one status code")
        if len(self.expect_status) > MAX_STATUS_CODES:
            raise _fail(f"{where}.expect_status", f"{len(self.expect_status)} codes, more than "
                                                  f"the limit of {MAX_STATUS_CODES}")
        for code in self.expect_status:
            _int_in(f"{where}.expect_status", code, 100, 599)
        _text(f"{where}.host", self.host, MAX_HOST, _HTTP_HOST, "a host name or address, "
              "with an optional :port")
        _text(f"{where}.body", self.body, MAX_BODY)
        _text(f"{where}.grpc_service", self.grpc_service, MAX_GRPC_SERVICE, _GRPC_SERVICE,
              "a gRPC service name (letters, digits, _ . / -)")


def _http_path(where: str, value: object) -> None:
    _text(where, value, MAX_PATH)
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail(where, f"must start with '/', got {shown(value)}")
    if not _HTTP_PATH.fullmatch(value):
        raise _fail(where, f"an HTTP path holds only letters, digits and "
                           f"-._~!$&'()*+,;=:@%/? (%-encode the rest), got {shown(value)}")


NO_CHECK = HealthCheck(kind="none")


def _float_in(where: str, value: object, low: float, high: float, *,
              low_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        low < value if low_open else low <= value) and value <= high
    if not ok:
        bound = f"({low}" if low_open else f"[{low}"
        raise _fail(where, f"must be a number in {bound}, {high}], got {shown(value)}")
    return float(value)


@dataclass(frozen=True)
class Capacity:
    """Load feedback: a backend's load against `target` scales its weight.

    effective weight = weight x factor, the factor following target / load
    (smoothed, clamped to [min_factor, max_factor], changed only past the
    hysteresis), with ring positions rewritten by adaptation capped at
    churn_budget of the ring per churn_window_s."""

    source: str = "none"  # none | prometheus (lbd polls) | push (reports to the API)
    metric: str = ""  # the Prometheus metric, e.g. inference_queue_depth
    labels: str = ""  # optional exact label matches, e.g. model="llama",gpu="0"
    port: int = 0  # the backend's metrics port (source prometheus)
    path: str = "/metrics"
    target: float = 0.0  # the load a backend should carry at its configured weight
    interval_ms: int = 5000
    timeout_ms: int = 1000
    smoothing: float = 0.3  # EWMA weight of each new sample
    min_factor: float = 0.1
    max_factor: float = 2.0
    hysteresis: float = 0.1  # relative factor change below which nothing moves
    churn_budget: float = 0.05  # fraction of the ring adaptation may rewrite per window
    churn_window_s: float = 10.0
    stale_after_ms: int = 15000  # older load: the configured weight applies

    def validate(self, where: str) -> None:
        """Every field is checked whatever the source (an unused one is persisted too);
        a source needs its own: a target, and for prometheus a metric and a port."""
        _one_of(f"{where}.source", self.source, LOAD_SOURCES)
        _text(f"{where}.metric", self.metric, MAX_METRIC, _METRIC_NAME, "a metric name")
        _text(f"{where}.labels", self.labels, MAX_LABELS)
        parse_label_matchers(self.labels, f"{where}.labels")
        _int_in(f"{where}.port", self.port, 0, 65535)
        _http_path(f"{where}.path", self.path)
        if self.source == "prometheus":
            if not self.metric:
                raise _fail(f"{where}.metric", "'' is not a metric name")
            _int_in(f"{where}.port", self.port, 1, 65535)
        if self.source != "none" or self.target:
            _float_in(f"{where}.target", self.target, 0.0, 1e12, low_open=True)
        _int_in(f"{where}.interval_ms", self.interval_ms, 100, 3_600_000)
        _int_in(f"{where}.timeout_ms", self.timeout_ms, 10, self.interval_ms)
        _float_in(f"{where}.smoothing", self.smoothing, 0.0, 1.0, low_open=True)
        _float_in(f"{where}.min_factor", self.min_factor, 0.0, 1.0, low_open=True)
        _float_in(f"{where}.max_factor", self.max_factor, 1.0, 10.0)
        _float_in(f"{where}.hysteresis", self.hysteresis, 0.0, 0.9)
        _float_in(f"{where}.churn_budget", self.churn_budget, 0.0, 1.0, low_open=True)
        _float_in(f"{where}.churn_window_s", self.churn_window_s, 1.0, 3600.0)
        _int_in(f"{where}.stale_after_ms", self.stale_after_ms, self.interval_ms, 86_400_000)


_LABEL_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*')


def parse_label_matchers(text: str, where: str = "labels") -> dict[str, str]:
    """`model="llama",gpu="0"` as a dict; empty text, no matchers."""
    if not isinstance(text, str):
        raise _fail(where, "must be a string like model=\"llama\"")
    matchers: dict[str, str] = {}
    rest = text.strip()
    while rest:
        match = _LABEL_MATCHER.match(rest)
        if not match:
            raise _fail(where, f"{shown(text)}: expected name=\"value\" pairs separated by commas")
        matchers[match[1]] = match[2].replace('\\"', '"').replace("\\\\", "\\")
        rest = rest[match.end():]
        if rest.startswith(","):
            rest = rest[1:]
        elif rest:
            raise _fail(where, f"{shown(text)}: expected a comma after {match[0].strip()}")
    return matchers


NO_CAPACITY = Capacity()


# --- backends and VIPs ----------------------------------------------------------


@dataclass(frozen=True)
class BackendSpec:
    """One backend of one VIP. Weight 0 or drained: no new flows, while
    established flows keep it through the connection table."""

    address: str
    weight: int = DEFAULT_WEIGHT
    drained: bool = False
    check: HealthCheck | None = None  # None: the VIP's default check

    def validate(self, where: str) -> None:
        canonical_address(self.address, f"{where}.address")
        _int_in(f"{where}.weight", self.weight, 0, MAX_WEIGHT)
        if not isinstance(self.drained, bool):
            raise _fail(f"{where}.drained", f"must be true or false, got {shown(self.drained)}")
        if self.check is not None:
            self.check.validate(f"{where}.check")

    @property
    def ring_weight(self) -> int:
        """The weight the ring is built with: 0 when drained."""
        return 0 if self.drained else self.weight


@dataclass(frozen=True)
class VipSpec:
    key: VipKey
    hash: str = "5tuple"
    encap: str = "ipip"
    ring_size: int = maglev.DEFAULT_SIZE
    check: HealthCheck = field(default_factory=HealthCheck)
    panic_threshold: float = 0.0  # 0: off
    when_none_healthy: str = "drop"
    capacity: Capacity = NO_CAPACITY
    slow_start_s: float = 0.0  # a backend added or back up ramps to its weight over this
    backends: Mapping[str, BackendSpec] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        _one_of(f"{where}.hash", self.hash, HASH_MODES)
        _one_of(f"{where}.encap", self.encap, ENCAPSULATIONS)
        if not isinstance(self.ring_size, int) or isinstance(self.ring_size, bool) or not (
                3 <= self.ring_size <= maglev.MAX_SIZE and maglev.is_prime(self.ring_size)):
            raise _fail(f"{where}.ring_size", f"{shown(self.ring_size)} is not a prime in "
                                              f"3..{maglev.MAX_SIZE} (e.g. 65537, 655373)")
        self.check.validate(f"{where}.check")
        if self.check.kind != "none" and self.check.port == 0 and self.key.port == 0:
            raise _fail(f"{where}.check.port", "a port-less VIP's check needs a port")
        self._validate_via(self.check, f"{where}.check")
        if not isinstance(self.panic_threshold, int | float) or isinstance(
                self.panic_threshold, bool) or not 0.0 <= self.panic_threshold <= 1.0:
            raise _fail(f"{where}.panic_threshold",
                        f"must be a fraction 0..1 (0: off), got {shown(self.panic_threshold)}")
        self.capacity.validate(f"{where}.capacity")
        _float_in(f"{where}.slow_start_s", self.slow_start_s, 0.0, 3600.0)
        _one_of(f"{where}.when_none_healthy", self.when_none_healthy, WHEN_NONE_HEALTHY)
        for address, backend in self.backends.items():
            bwhere = f"{where} backend {address}"
            backend.validate(bwhere)
            if address != canonical_address(address, bwhere):
                raise _fail(bwhere, f"write it as {canonical_address(address)}")
            if address != backend.address:
                raise _fail(bwhere, f"listed under {address} but has address {backend.address}")
            if self.key.ipv6 and not is_ipv6(address):
                raise _fail(bwhere, "an IPv6 VIP needs IPv6 backends (IPv6 cannot be "
                                    "encapsulated in IPv4)")
            check = self.check_for(backend)
            if check.kind != "none" and check.port == 0 and self.key.port == 0:
                raise _fail(f"{bwhere}.check.port", "a port-less VIP's checks need a port")
            if backend.check is not None:
                self._validate_via(check, f"{bwhere}.check")
        if len(self.backends) >= self.ring_size:
            raise _fail(f"{where}.backends", f"{len(self.backends)} backends do not fit a ring "
                                             f"of {self.ring_size}: use a larger ring_size")

    def _validate_via(self, check: HealthCheck, where: str) -> None:
        """A check through the VIP connects to a port this VIP forwards, over TCP."""
        if check.kind == "none" or check.via != "vip":
            return
        if self.key.protocol != "tcp":
            raise _fail(f"{where}.via", f"checks through the VIP speak TCP; {self.key} is a "
                                        f"{self.key.protocol} VIP: use via \"backend\"")
        if self.key.port and check.port not in (0, self.key.port):
            raise _fail(f"{where}.port", f"a check through the VIP goes to the VIP's port "
                                         f"{self.key.port} (set 0 or {self.key.port}, or "
                                         f"use via \"backend\")")

    def check_for(self, backend: BackendSpec) -> HealthCheck:
        return backend.check or self.check

    def vip_check_ports(self) -> set[int]:
        """Ports this port-less VIP's checks through the VIP connect to."""
        checks = [self.check_for(b) for b in self.backends.values()] + [self.check]
        return {c.port for c in checks if c.kind != "none" and c.via == "vip"}

    def ring_weights(self) -> dict[str, int]:
        return {address: b.ring_weight for address, b in self.backends.items()}


@dataclass(frozen=True)
class Limits:
    """What the maps hold (datapath.MapSizes): index 0 of each is reserved."""

    max_vips: int = 511
    max_backends: int = 4095  # backend entries, one per (VIP, backend)
    ring_entries: int = 64 * 65537

    @classmethod
    def of_map_sizes(cls, sizes: Any) -> Limits:
        return cls(max_vips=sizes.max_vips - 1, max_backends=sizes.max_backends - 1,
                   ring_entries=sizes.ring_entries)


@dataclass(frozen=True)
class DesiredState:
    vips: Mapping[VipKey, VipSpec] = field(default_factory=dict)

    def validate(self, limits: Limits) -> None:
        for key, vip in self.vips.items():
            if key != vip.key:
                raise _fail(f"VIP {key}", f"listed under {key} but is {vip.key}")
            vip.validate(f"VIP {key}")
        if len(self.vips) > limits.max_vips:
            raise LimitExceeded(f"{len(self.vips)} VIPs exceed the limit of {limits.max_vips} "
                             "(map size max_vips)")
        for key, vip in self.vips.items():
            if key.port:
                continue
            for port in sorted(vip.vip_check_ports()):
                other = VipKey(key.address, port, key.protocol)
                if other in self.vips:
                    raise _fail(f"VIP {key}.check.port",
                                f"a check through the VIP to port {port} would reach VIP "
                                f"{other}, not this one: use another port or via "
                                "\"backend\"")
        members = sum(len(v.backends) for v in self.vips.values())
        if members > limits.max_backends:
            raise LimitExceeded(f"{members} backends (counted per VIP) exceed the limit of "
                             f"{limits.max_backends} (map size max_backends)")
        ring_total = sum(v.ring_size for v in self.vips.values())
        if ring_total > limits.ring_entries:
            raise LimitExceeded(f"rings need {ring_total} entries in total, more than the "
                             f"{limits.ring_entries} of map size ring_entries")

    def vip(self, key: VipKey) -> VipSpec:
        try:
            return self.vips[key]
        except KeyError:
            raise NotFound(f"VIP {key}: no such VIP") from None

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION,
                "vips": [vip_to_dict(self.vips[k]) for k in sorted(self.vips)]}

    @classmethod
    def from_dict(cls, data: object, where: str = "state",
                  problems: list[str] | None = None) -> DesiredState:
        """The state a document describes. With `problems`, every VIP is read and
        each refusal (one per VIP at most) is appended there instead of raised."""
        obj = StrictTable(data, where, problems)
        version = obj.take("version", int, FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise _fail(f"{where}.version", f"format {version} is not supported "
                                            f"(this lbd reads {FORMAT_VERSION})")
        vips: dict[VipKey, VipSpec] = {}
        for i, item in enumerate(obj.take("vips", list, [])):
            try:
                vip = vip_from_dict(item, f"{where}.vips[{i}]")
                if vip.key in vips:
                    raise _fail(f"{where}.vips[{i}]", f"VIP {vip.key} is listed twice")
            except StateError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
                continue
            vips[vip.key] = vip
        obj.done()
        return cls(vips)


# --- the dict form ---------------------------------------------------------------


class StrictTable:
    """Reads one table of the dict form strictly: types checked, unknown keys refused.

    By default the first problem raises StateError. Given a `problems` list
    (lbd --check-config), each problem is appended to it instead and reading
    goes on with the default, so one pass reports them all."""

    def __init__(self, data: object, where: str, problems: list[str] | None = None):
        self.where, self.seen, self.problems = where, set(), problems
        self.data: dict[str, Any] = {}
        if isinstance(data, dict):
            self.data = data
        else:
            self._problem(_fail(where, f"must be a table/object, got {type(data).__name__}"))

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if (kind is not bool and isinstance(value, bool)) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self._problem(_fail(f"{self.where}.{name}", f"must be {names}, got {shown(value)}"))
            return default
        return value

    def done(self) -> None:
        for key in sorted(set(self.data) - self.seen, key=str):
            hint = did_you_mean(key, self.seen)
            self._problem(_fail(self.where, f"unknown key {shown(key)}{hint}"))

    def _problem(self, error: StateError) -> None:
        if self.problems is None:
            raise error
        self.problems.append(str(error))


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {shown(close[0])}?)" if close else ""


_CHECK_DEFAULTS = HealthCheck()


def check_to_dict(check: HealthCheck) -> dict[str, Any]:
    out = dataclasses.asdict(check)
    out["expect_status"] = list(check.expect_status)
    return out


def check_from_dict(data: object, where: str, base: HealthCheck = _CHECK_DEFAULTS) -> HealthCheck:
    obj = StrictTable(data, where)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(HealthCheck):
        current = getattr(base, f.name)
        if f.name == "expect_status":
            codes = obj.take(f.name, list, list(current))
            values[f.name] = tuple(codes)
        else:
            values[f.name] = obj.take(f.name, type(current), current)
    obj.done()
    if "timeout_ms" not in obj.data and values["timeout_ms"] > values["interval_ms"]:
        # A timeout nobody asked for follows a shorter interval rather than refuse it.
        values["timeout_ms"] = values["interval_ms"]
    check = HealthCheck(**values)
    check.validate(where)
    return check


def capacity_from_dict(data: object, where: str,
                       base: Capacity = NO_CAPACITY) -> Capacity:
    if data is None:
        return base
    obj = StrictTable(data, where)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Capacity):
        current = getattr(base, f.name)
        kind = (int, float) if isinstance(current, float) else type(current)
        value = obj.take(f.name, kind, current)
        values[f.name] = float(value) if isinstance(current, float) else value
    obj.done()
    capacity = Capacity(**values)
    capacity.validate(where)
    return capacity


def backend_to_dict(backend: BackendSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"address": backend.address, "weight": backend.weight,
                           "drained": backend.drained}
    if backend.check is not None:
        out["check"] = check_to_dict(backend.check)
    return out


def backend_from_dict(data: object, where: str, vip_check: HealthCheck) -> BackendSpec:
    obj = StrictTable(data, where)
    address = canonical_address(obj.take("address", str, None), f"{where}.address")
    weight = obj.take("weight", int, DEFAULT_WEIGHT)
    drained = obj.take("drained", bool, False)
    check_data = obj.take("check", dict, None)
    obj.done()
    check = None if check_data is None else check_from_dict(check_data, f"{where}.check",
                                                           vip_check)
    backend = BackendSpec(address, weight, drained, check)
    backend.validate(where)
    return backend


def vip_to_dict(vip: VipSpec) -> dict[str, Any]:
    return {
        "vip": str(vip.key), "hash": vip.hash, "encap": vip.encap, "ring_size": vip.ring_size,
        "check": check_to_dict(vip.check), "panic_threshold": vip.panic_threshold,
        "when_none_healthy": vip.when_none_healthy,
        "capacity": dataclasses.asdict(vip.capacity), "slow_start_s": vip.slow_start_s,
        "backends": [backend_to_dict(vip.backends[a]) for a in sorted(
            vip.backends, key=ip_sort_key)],
    }


def vip_from_dict(data: object, where: str) -> VipSpec:
    obj = StrictTable(data, where)
    text = obj.take("vip", str, None)
    if text is None:
        raise _fail(f"{where}.vip", "missing (e.g. vip = \"10.0.0.10:80/tcp\")")
    try:
        key = VipKey.parse(text)
    except StateError as exc:
        raise _fail(f"{where}.vip", str(exc)) from None
    where = f"{where} ({key})"
    check_data = obj.take("check", dict, None)
    check = _CHECK_DEFAULTS if check_data is None else check_from_dict(check_data,
                                                                      f"{where}.check")
    if check_data is None and key.port == 0:
        check = NO_CHECK  # nothing to connect to by default
    backends: dict[str, BackendSpec] = {}
    for i, item in enumerate(obj.take("backends", list, [])):
        backend = backend_from_dict(item, f"{where}.backends[{i}]", check)
        if backend.address in backends:
            raise _fail(f"{where}.backends[{i}]", f"backend {backend.address} is listed twice")
        backends[backend.address] = backend
    vip = VipSpec(
        key=key,
        hash=obj.take("hash", str, "5tuple"),
        encap=obj.take("encap", str, "ipip"),
        ring_size=obj.take("ring_size", int, maglev.DEFAULT_SIZE),
        check=check,
        panic_threshold=float(obj.take("panic_threshold", (int, float), 0.0)),
        when_none_healthy=obj.take("when_none_healthy", str, "drop"),
        capacity=capacity_from_dict(obj.take("capacity", dict, None), f"{where}.capacity"),
        slow_start_s=float(obj.take("slow_start_s", (int, float), 0.0)),
        backends=backends,
    )
    obj.done()
    vip.validate(where)
    return vip


def default_vip(key: VipKey, **options: Any) -> VipSpec:
    """A new VIP with defaults; a port-less VIP has no default check port."""
    if "check" not in options and key.port == 0:
        options["check"] = NO_CHECK
    return VipSpec(key=key, **options)


# --- changes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One requested change. `apply` works on the dict copy that apply_changes owns."""

    kind: ClassVar[str] = ""

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _existing(vips: Mapping[VipKey, VipSpec], key: VipKey) -> VipSpec:
    if key not in vips:
        raise NotFound(f"VIP {key}: no such VIP")
    return vips[key]


def _existing_backend(vip: VipSpec, address: str) -> BackendSpec:
    address = canonical_address(address, "backend address")
    if address not in vip.backends:
        raise NotFound(f"VIP {vip.key}: no backend {address}")
    return vip.backends[address]


@dataclass(frozen=True)
class AddVip(Change):
    vip: VipSpec
    kind: ClassVar[str] = "vip-add"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        if self.vip.key in vips:
            raise AlreadyExists(f"VIP {self.vip.key}: already exists")
        vips[self.vip.key] = self.vip

    def describe(self) -> str:
        return (f"add VIP {self.vip.key} (hash {self.vip.hash}, encap {self.vip.encap}, "
                f"ring {self.vip.ring_size}, {len(self.vip.backends)} backends)")


@dataclass(frozen=True)
class RemoveVip(Change):
    key: VipKey
    kind: ClassVar[str] = "vip-del"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        _existing(vips, self.key)
        del vips[self.key]

    def describe(self) -> str:
        return f"remove VIP {self.key}"


VIP_SETTABLE = ("hash", "encap", "ring_size", "check", "panic_threshold", "when_none_healthy",
                "capacity", "slow_start_s")
BACKEND_SETTABLE = ("weight", "drained", "check")


def _check_fields(settings: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    for name in settings:
        if name not in allowed:
            raise StateError(f"{what}: {shown(name)} cannot be set "
                             f"(settable: {', '.join(allowed)})")


@dataclass(frozen=True)
class SetVip(Change):
    key: VipKey
    settings: Mapping[str, Any]
    kind: ClassVar[str] = "vip-set"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        _check_fields(self.settings, VIP_SETTABLE, f"VIP {self.key}")
        vips[self.key] = dataclasses.replace(_existing(vips, self.key), **self.settings)

    def describe(self) -> str:
        return f"set VIP {self.key} " + _describe_settings(self.settings)


@dataclass(frozen=True)
class AddBackend(Change):
    key: VipKey
    backend: BackendSpec
    kind: ClassVar[str] = "backend-add"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        address = canonical_address(self.backend.address, "backend address")
        if address in vip.backends:
            raise AlreadyExists(f"VIP {self.key}: backend {address} already exists")
        backend = dataclasses.replace(self.backend, address=address)
        vips[self.key] = dataclasses.replace(vip, backends={**vip.backends, address: backend})

    def describe(self) -> str:
        state = " drained" if self.backend.drained else ""
        return f"add backend {self.backend.address} weight {self.backend.weight}{state} " \
               f"to VIP {self.key}"


@dataclass(frozen=True)
class RemoveBackend(Change):
    key: VipKey
    address: str
    kind: ClassVar[str] = "backend-del"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        backend = _existing_backend(vip, self.address)
        rest = {a: b for a, b in vip.backends.items() if a != backend.address}
        vips[self.key] = dataclasses.replace(vip, backends=rest)

    def describe(self) -> str:
        return f"remove backend {self.address} from VIP {self.key}"


@dataclass(frozen=True)
class SetBackend(Change):
    key: VipKey
    address: str
    settings: Mapping[str, Any]
    kind: ClassVar[str] = "backend-set"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        backend = _existing_backend(vip, self.address)
        _check_fields(self.settings, BACKEND_SETTABLE, f"backend {backend.address}")
        updated = dataclasses.replace(backend, **self.settings)
        vips[self.key] = dataclasses.replace(
            vip, backends={**vip.backends, backend.address: updated})

    def describe(self) -> str:
        return f"set backend {self.address} of VIP {self.key} " + _describe_settings(
            self.settings)


def _describe_settings(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={'(check)' if k == 'check' else v}" for k, v in settings.items())


def apply_changes(state: DesiredState, changes: Iterable[Change],
                  limits: Limits) -> DesiredState:
    """The one way desired state changes: all of `changes` or none of them."""
    vips = dict(state.vips)
    for change in changes:
        change.apply(vips)
    new = DesiredState(vips)
    new.validate(limits)
    size = len(json.dumps(new.to_dict(), separators=(",", ":")))
    if size > MAX_STATE_BYTES:
        raise LimitExceeded(f"the state would take {size} bytes (compact JSON), more than "
                            f"the limit of {MAX_STATE_BYTES}: the API could not return it")
    return new


def diff(old: DesiredState, new: DesiredState) -> list[Change]:
    """The changes that turn `old` into `new` (what `lbctl apply` does)."""
    changes: list[Change] = []
    for key in sorted(set(old.vips) - set(new.vips)):
        changes.append(RemoveVip(key))
    for key in sorted(set(new.vips) - set(old.vips)):
        changes.append(AddVip(new.vips[key]))
    for key in sorted(set(old.vips) & set(new.vips)):
        changes.extend(_vip_diff(old.vips[key], new.vips[key]))
    return changes


def _vip_diff(old: VipSpec, new: VipSpec) -> list[Change]:
    changes: list[Change] = []
    settings = {name: getattr(new, name) for name in VIP_SETTABLE
                if getattr(old, name) != getattr(new, name)}
    if settings:
        changes.append(SetVip(new.key, settings))
    for address in sorted(set(old.backends) - set(new.backends), key=ip_sort_key):
        changes.append(RemoveBackend(new.key, address))
    for address in sorted(set(new.backends) - set(old.backends), key=ip_sort_key):
        changes.append(AddBackend(new.key, new.backends[address]))
    for address in sorted(set(old.backends) & set(new.backends), key=ip_sort_key):
        before, after = old.backends[address], new.backends[address]
        changed = {name: getattr(after, name) for name in BACKEND_SETTABLE
                   if getattr(before, name) != getattr(after, name)}
        if changed:
            changes.append(SetBackend(new.key, address, changed))
    return changes
