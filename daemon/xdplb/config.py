"""lbd's configuration: a TOML file, then command-line overrides.

Everything has a default except the interfaces, so `lbd --interface eth0`
runs. A bad file is refused at start with the file, the key and the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xdplb.datapath import PIN_ROOT, DatapathError, HealthMarks, MapSizes
from xdplb.fleet.settings import FleetConfig, fleet_from_table
from xdplb.hooks import HooksConfig, hooks_from_table
from xdplb.reconciler import DatapathSettings
from xdplb.state import StateError, StrictTable, shown

DEFAULT_SOCKET = Path("/run/xdplb/lbd.sock")
DEFAULT_STATE_DIR = Path("/var/lib/xdplb")
XDP_MODES = ("native", "generic")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """The configuration is refused; the message names the file, key and reason.

    `problems` holds every refusal found (one line each), so an operator fixes
    them in one go."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class _Problems(list[str]):
    """Refusals collected while reading and validating a configuration."""

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        try:
            yield
        except (ConfigError, StateError, DatapathError) as exc:
            self.extend(getattr(exc, "problems", [str(exc)]))


@dataclass(frozen=True)
class NexthopConfig:
    mac: str = ""  # empty: resolved from the routing and neighbour tables
    via: str = ""  # the gateway to resolve; empty: the default route's
    refresh_s: float = 5.0


@dataclass(frozen=True)
class ApiConfig:
    socket: Path = DEFAULT_SOCKET
    listen: str = ""  # HOST:PORT for a TCP listener (TLS unless insecure on loopback)
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""  # given: clients must present a certificate it signed
    insecure: bool = False


@dataclass(frozen=True)
class BgpConfig:
    enabled: bool = False
    bird_socket: str = "/run/bird/bird.ctl"
    include_dir: str = "/run/xdplb/bird"  # BIRD's config includes vips4.conf and vips6.conf
    birdc: str = "birdc"


@dataclass(frozen=True)
class FlowsConfig:
    """The flow table's upkeep (daemon/xdplb/reconciler/reconciler.py settle)."""

    settled_refresh_s: int = 8  # see DatapathSettings; 0: every packet reads the table
    idle_timeout_s: int = 3600  # entries idle longer are removed by the sweep; 0: never
    settle_interval_s: float = 10.0  # how often the table is swept and slots settled
    # A flow is active while its last packet is at most this old (the sweep counts them).
    active_window_s: int = 60

    def validate(self) -> None:
        if self.idle_timeout_s and not 10 <= self.idle_timeout_s <= 28800:
            # last_seen is kept modulo 2^16 s and the sweep reads ages as signed 16-bit
            # numbers: an entry must be swept before its age passes 32767 s.
            raise ConfigError(f"flows.idle_timeout_s: {self.idle_timeout_s} must be 0 (never) "
                              "or 10..28800 seconds")
        if not 1 <= self.settle_interval_s <= 3600:
            raise ConfigError(f"flows.settle_interval_s: {self.settle_interval_s} must be "
                              "1..3600 seconds")
        # A flow on a settled slot refreshes its stamp in one second of every
        # settled_refresh_s it sends in, at random: a window of 4 periods misses
        # at most (1 - 1/period)^(4 period) of the flows that send every second
        # (1.4% at 8 s; 0.03% at the default 60 s).
        low = max(1, 4 * self.settled_refresh_s)
        if not low <= self.active_window_s <= 3600:
            raise ConfigError(f"flows.active_window_s: {self.active_window_s} must be "
                              f"{low}..3600 seconds (at least 4 x flows.settled_refresh_s)")


@dataclass(frozen=True)
class DaemonConfig:
    interfaces: tuple[str, ...] = ()
    xdp_mode: str = "native"
    name: str = "default"  # instance name: its maps are pinned under PIN_ROOT/name
    state_dir: Path = DEFAULT_STATE_DIR
    log_format: str = "text"
    detach_on_exit: bool = False
    metrics_listen: str = "127.0.0.1:9640"  # empty: no metrics endpoint
    nexthop: NexthopConfig = field(default_factory=NexthopConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    bgp: BgpConfig = field(default_factory=BgpConfig)
    maps: MapSizes = field(default_factory=MapSizes)
    # Socket marks of health checks through the VIP: fwmark | backend index.
    health_marks: HealthMarks = field(default_factory=HealthMarks)
    # The datapath settings other than the next hop, which lbd resolves.
    mtu: int = 1500
    gue_port: int = 6080
    encap_source_v4: str = "172.16.0.0/16"
    encap_source_v6: str = "fd00:ec::/112"
    max_new_flows_per_cpu: int = 0
    flows: FlowsConfig = field(default_factory=FlowsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)  # etcd: off (local file)

    @property
    def pin_dir(self) -> Path:
        return PIN_ROOT / self.name

    def datapath_settings(self, nexthop_mac: str) -> DatapathSettings:
        return DatapathSettings(
            nexthop_mac=nexthop_mac, mtu=self.mtu, gue_port=self.gue_port,
            encap_source_v4=self.encap_source_v4, encap_source_v6=self.encap_source_v6,
            max_new_flows_per_cpu=self.max_new_flows_per_cpu,
            settled_refresh_s=self.flows.settled_refresh_s)

    def validate(self) -> None:
        """Raises ConfigError naming every problem, if there is any."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems), problems)

    def problems(self) -> list[str]:
        """Every refusal of this configuration, one line each ("key: reason")."""
        found = _Problems()
        for check in self._checks():
            with found.checking():
                check()
        return found

    def _checks(self) -> list[Callable[[], object]]:
        return [
            self._validate_basics, self._validate_nexthop, self._validate_bgp,
            self._validate_api, self._validate_marks, self.flows.validate,
            self._validate_datapath_settings, self._validate_hooks, self._validate_fleet,
        ]

    def _validate_fleet(self) -> None:
        problems = self.fleet.problems()
        if problems:
            raise ConfigError(problems[0], problems)

    def _validate_hooks(self) -> None:
        problems = self.hooks.problems()
        if problems:
            raise ConfigError(problems[0], problems)

    def _validate_basics(self) -> None:
        found = _Problems()
        with found.checking():
            if not self.interfaces:
                raise ConfigError("interfaces: at least one is needed (--interface IFNAME)")
        with found.checking():
            if self.xdp_mode not in XDP_MODES:
                raise ConfigError(f"xdp_mode: {shown(self.xdp_mode)} is not one of native, generic")
        with found.checking():
            if self.log_format not in LOG_FORMATS:
                raise ConfigError(f"log_format: {shown(self.log_format)} is not one of text, json")
        with found.checking():
            if not self.name or "/" in self.name or self.name.startswith("."):
                raise ConfigError(f"name: {shown(self.name)} must be a plain file name")
        with found.checking():
            if self.metrics_listen:
                split_host_port(self.metrics_listen, "metrics.listen")
        if found:
            raise ConfigError("; ".join(found), found)

    def _validate_nexthop(self) -> None:
        if self.nexthop.mac:
            _check_mac(self.nexthop.mac)
        if self.nexthop.via:
            _check_ip(self.nexthop.via, "nexthop.via")
        if not 0.5 <= self.nexthop.refresh_s <= 3600:
            raise ConfigError("nexthop.refresh_s: must be 0.5..3600 seconds")

    def _validate_bgp(self) -> None:
        for key in ("bird_socket", "include_dir"):
            if self.bgp.enabled and not Path(getattr(self.bgp, key)).is_absolute():
                raise ConfigError(f"bgp.{key}: {getattr(self.bgp, key)} must be an absolute path")

    def _validate_marks(self) -> None:
        try:
            self.health_marks.validate(self.maps.max_backends)
        except DatapathError as exc:
            raise ConfigError(f"health.{exc}") from None

    def _validate_datapath_settings(self) -> None:
        try:
            # nexthop.mac has its own check: a placeholder keeps it from being told twice
            self.datapath_settings("02:00:00:00:00:00")
        except ValueError as exc:
            if str(exc).startswith("settled_refresh_s"):
                raise ConfigError(f"flows.{exc}") from None
            raise ConfigError(f"datapath: {exc}") from None

    def _validate_api(self) -> None:
        api = self.api
        if not api.socket.is_absolute():
            raise ConfigError(f"api.socket: {api.socket} must be an absolute path")
        if not api.listen:
            for key in ("tls_cert", "tls_key", "client_ca", "insecure"):
                if getattr(api, key):
                    raise ConfigError(f"api.{key}: only means something with api.listen")
            return
        host, _ = split_host_port(api.listen, "api.listen")
        has_tls = bool(api.tls_cert or api.tls_key)
        if has_tls and not (api.tls_cert and api.tls_key):
            raise ConfigError("api.tls_cert and api.tls_key: give both or neither")
        if api.client_ca and not has_tls:
            raise ConfigError("api.client_ca: mutual TLS needs api.tls_cert and api.tls_key")
        if has_tls and api.insecure:
            raise ConfigError("api.insecure: contradicts api.tls_cert; choose one")
        if not has_tls and not api.insecure:
            raise ConfigError(f"api.listen {api.listen}: a TCP listener needs TLS "
                              "(api.tls_cert, api.tls_key), or --insecure on loopback")
        if api.insecure and not _is_loopback(host):
            raise ConfigError(f"api.listen {api.listen}: plaintext is refused on a "
                              "non-loopback address; use TLS")
        for key in ("tls_cert", "tls_key", "client_ca"):
            path = getattr(api, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"api.{key}: {path} is not a readable file")


def _check_mac(mac: str) -> None:
    digits = mac.replace(":", "")
    if len(digits) != 12 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ConfigError(f"nexthop.mac: {shown(mac)} is not a MAC address")


def _check_ip(text: str, key: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{key}: {shown(text)} is not an IP address") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {shown(text)} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    return host, int(port)


def _read_tables(data: dict[str, Any], defaults: DaemonConfig,
                 problems: list[str]) -> DaemonConfig:
    top = StrictTable(data, "", problems)
    values: dict[str, Any] = {}
    for name, kind in (("xdp_mode", str), ("name", str), ("log_format", str),
                       ("detach_on_exit", bool), ("mtu", int), ("gue_port", int),
                       ("encap_source_v4", str), ("encap_source_v6", str),
                       ("max_new_flows_per_cpu", int)):
        values[name] = top.take(name, kind, getattr(defaults, name))
    interfaces = top.take("interfaces", list, list(defaults.interfaces))
    if not all(isinstance(i, str) and i for i in interfaces):
        problems.append("interfaces: must be a list of interface names")
        interfaces = list(defaults.interfaces)
    values["interfaces"] = tuple(interfaces)
    values["state_dir"] = Path(top.take("state_dir", str, str(defaults.state_dir)))
    values["nexthop"] = _section(top, "nexthop", defaults.nexthop,
                                 {"mac": str, "via": str, "refresh_s": (int, float)})
    api = _section(top, "api", defaults.api, {
        "socket": str, "listen": str, "tls_cert": str, "tls_key": str, "client_ca": str,
        "insecure": bool})
    values["api"] = replace(api, socket=Path(api.socket))
    values["bgp"] = _section(top, "bgp", defaults.bgp, {
        "enabled": bool, "bird_socket": str, "include_dir": str, "birdc": str})
    metrics = StrictTable(top.take("metrics", dict, {}), "metrics", problems)
    values["metrics_listen"] = metrics.take("listen", str, defaults.metrics_listen)
    metrics.done()
    values["maps"] = _maps(top, defaults.maps, problems)
    values["flows"] = _section(top, "flows", defaults.flows, {
        "settled_refresh_s": int, "idle_timeout_s": int, "settle_interval_s": (int, float),
        "active_window_s": int})
    health = StrictTable(top.take("health", dict, {}), "health", problems)
    values["health_marks"] = HealthMarks(
        base=health.take("fwmark", int, defaults.health_marks.base),
        mask=health.take("fwmark_mask", int, defaults.health_marks.mask))
    health.done()
    values["hooks"] = hooks_from_table(StrictTable(top.take("hooks", dict, {}), "hooks",
                                                   problems))
    values["fleet"] = fleet_from_table(StrictTable(top.take("fleet", dict, {}), "fleet",
                                                   problems))
    top.done()
    return replace(defaults, **values)


def _section(top: StrictTable, name: str, default: Any, kinds: dict[str, Any]) -> Any:
    table = StrictTable(top.take(name, dict, {}), name, top.problems)
    values = {key: table.take(key, kind, getattr(default, key)) for key, kind in kinds.items()}
    table.done()
    if "socket" in values:
        values["socket"] = str(values["socket"])
    return replace(default, **values)


def _maps(top: StrictTable, default: MapSizes, problems: list[str]) -> MapSizes:
    table = StrictTable(top.take("maps", dict, {}), "maps", problems)
    values = {key: table.take(key, int, getattr(default, key))
              for key in ("max_vips", "max_backends", "ring_entries", "conn_entries")}
    table.done()
    try:
        return MapSizes(**values)
    except Exception as exc:  # "map size max_vips=0: must..." -> "maps.max_vips: must..., got 0"
        problems.append(re.sub(r"^map size (\w+)=(.*?): (.*)$", r"maps.\1: \3, got \2",
                               str(exc)))
        return default


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        problems.append(f"cannot read it: {exc}")
    except UnicodeDecodeError as exc:
        problems.append(f"not UTF-8 text: {exc}")
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"not valid TOML: {exc}")
    return None


def load_config(path: Path | None, overrides: dict[str, Any]) -> DaemonConfig:
    """The file (if any), then the command line's overrides, validated. A refusal
    (ConfigError) names every problem, each as "WHERE: key: reason"."""
    config = DaemonConfig()
    where = f"config {path}" if path else "command line"
    problems: list[str] = []
    data = {} if path is None else _read_toml(path, problems)
    if data is not None:  # an unreadable file: the defaults' problems would only add noise
        config = _apply_overrides(_read_tables(data, config, problems), overrides)
        problems.extend(config.problems())
    if problems:
        lines = [f"{where}: {p.lstrip('.')}" for p in problems]
        raise ConfigError("\n".join(lines), lines)
    return config


def _apply_overrides(config: DaemonConfig, overrides: dict[str, Any]) -> DaemonConfig:
    api_keys = {"socket", "listen", "tls_cert", "tls_key", "client_ca", "insecure"}
    top = {k: v for k, v in overrides.items() if k not in api_keys and v not in (None, ())}
    api = {k: v for k, v in overrides.items() if k in api_keys and v not in (None, False)}
    if "socket" in api:
        api["socket"] = Path(api["socket"])
    if "interfaces" in top:
        top["interfaces"] = tuple(top["interfaces"])
    if "state_dir" in top:
        top["state_dir"] = Path(top["state_dir"])
    return replace(config, api=replace(config.api, **api), **top)
