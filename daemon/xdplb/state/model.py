"""The desired state's data model (health checks, load feedback, backends, VIPs) and
its dict form, which is both the state file and the `lbctl apply` document."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdplb import maglev
from xdplb.state.addresses import (
    VipKey,
    canonical_address,
    ip_sort_key,
    is_ipv6,
)
from xdplb.state.quic import (
    MAX_SERVER_ID,
    QuicConfig,
    quic_from_dict,
    quic_to_dict,
    validate_server_ids,
)
from xdplb.state.rules import (
    _GRPC_SERVICE,
    _HTTP_HOST,
    _HTTP_PATH,
    _METRIC_NAME,
    CHECK_KINDS,
    CHECK_VIAS,
    DEFAULT_WEIGHT,
    ENCAPSULATIONS,
    FORMAT_VERSION,
    HASH_MODES,
    HEALTH_SCOPES,
    LOAD_SOURCES,
    MAX_BODY,
    MAX_GRPC_SERVICE,
    MAX_HEALTH_QUORUM,
    MAX_HOST,
    MAX_LABELS,
    MAX_METRIC,
    MAX_PATH,
    MAX_STATUS_CODES,
    MAX_WEIGHT,
    WHEN_NONE_HEALTHY,
    LimitExceeded,
    NotFound,
    StateError,
    _fail,
    _int_in,
    _one_of,
    _text,
    shown,
)

# --- health checks ------------------------------------------------------------


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
        if self.via == "vip" and self.kind == "h3":
            raise _fail(f"{where}.via", "an h3 check speaks QUIC over UDP, and checks "
                                        "through the VIP speak TCP: use via \"backend\"")
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
    server_id: int = 0  # a QUIC VIP's backend: its QUIC-LB server ID (0: none yet)

    def validate(self, where: str) -> None:
        canonical_address(self.address, f"{where}.address")
        _int_in(f"{where}.weight", self.weight, 0, MAX_WEIGHT)
        _int_in(f"{where}.server_id", self.server_id, 0, MAX_SERVER_ID)
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
    quic: QuicConfig | None = None  # a UDP VIP carrying QUIC: route by server ID
    # "host": this host's checks decide; "fleet": a quorum of the fleet's hosts does
    # (xdplb.fleet), health_quorum hosts (0: a majority of those reporting).
    health_scope: str = "host"
    health_quorum: int = 0

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
        _one_of(f"{where}.health_scope", self.health_scope, HEALTH_SCOPES)
        if not isinstance(self.health_quorum, int) or isinstance(self.health_quorum, bool) \
                or not 0 <= self.health_quorum <= MAX_HEALTH_QUORUM:
            raise _fail(f"{where}.health_quorum", f"must be 0 (a majority) or a number of hosts "
                                                  f"1..{MAX_HEALTH_QUORUM}, got "
                                                  f"{shown(self.health_quorum)}")
        if self.quic is not None:
            if self.key.protocol != "udp":
                raise _fail(f"{where}.quic", "QUIC runs over UDP: a tcp VIP cannot be one")
            self.quic.validate(f"{where}.quic")
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
        validate_server_ids(self.vips.values(), limits.max_backends)
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
    if backend.server_id:
        out["server_id"] = backend.server_id
    return out


def backend_from_dict(data: object, where: str, vip_check: HealthCheck) -> BackendSpec:
    obj = StrictTable(data, where)
    address = canonical_address(obj.take("address", str, None), f"{where}.address")
    weight = obj.take("weight", int, DEFAULT_WEIGHT)
    drained = obj.take("drained", bool, False)
    check_data = obj.take("check", dict, None)
    server_id = obj.take("server_id", int, 0)
    obj.done()
    check = None if check_data is None else check_from_dict(check_data, f"{where}.check",
                                                           vip_check)
    backend = BackendSpec(address, weight, drained, check, server_id)
    backend.validate(where)
    return backend


def vip_to_dict(vip: VipSpec) -> dict[str, Any]:
    out = {
        "vip": str(vip.key), "hash": vip.hash, "encap": vip.encap, "ring_size": vip.ring_size,
        "check": check_to_dict(vip.check), "panic_threshold": vip.panic_threshold,
        "when_none_healthy": vip.when_none_healthy,
        "capacity": dataclasses.asdict(vip.capacity), "slow_start_s": vip.slow_start_s,
    }
    if vip.quic is not None:
        out["quic"] = quic_to_dict(vip.quic)
    if vip.health_scope != "host" or vip.health_quorum:
        out["health_scope"], out["health_quorum"] = vip.health_scope, vip.health_quorum
    out["backends"] = [backend_to_dict(vip.backends[a]) for a in sorted(
        vip.backends, key=ip_sort_key)]
    return out


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
        quic=_quic_of(obj.take("quic", dict, None), f"{where}.quic"),
        health_scope=obj.take("health_scope", str, "host"),
        health_quorum=obj.take("health_quorum", int, 0),
    )
    obj.done()
    vip.validate(where)
    return vip


def _quic_of(data: dict[str, Any] | None, where: str) -> QuicConfig | None:
    return None if data is None else quic_from_dict(StrictTable(data, where), where)


def default_vip(key: VipKey, **options: Any) -> VipSpec:
    """A new VIP with defaults; a port-less VIP has no default check port."""
    if "check" not in options and key.port == 0:
        options["check"] = NO_CHECK
    return VipSpec(key=key, **options)
