"""The [fleet] table of lbd's configuration: where the shared desired state lives."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from xdplb.state import StrictTable, shown

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_PREFIX = re.compile(r"^/[A-Za-z0-9._/-]{1,200}$")


class FleetConfigError(ValueError):
    """A refused [fleet] table; the message names the key."""


@dataclass(frozen=True)
class FleetConfig:
    etcd: tuple[str, ...] = ()  # empty: local-file mode (the default)
    prefix: str = "/xdplb"
    host: str = ""  # this host's name in the fleet; empty: the system's host name
    lease_ttl_s: int = 10  # a host whose lease lapsed this long ago counts as gone
    timeout_s: float = 5.0  # every etcd call's deadline
    ca: str = ""  # https endpoints: the CA that signed the members' certificates
    cert: str = ""  # client certificate and key (members with --client-cert-auth)
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)

    @property
    def host_name(self) -> str:
        return self.host or socket.gethostname()

    def problems(self) -> list[str]:
        found: list[str] = []
        for check in (self._check_endpoints, self._check_names, self._check_numbers,
                      self._check_tls):
            try:
                check()
            except FleetConfigError as exc:
                found.append(str(exc))
        return found

    def _check_endpoints(self) -> None:
        schemes = set()
        for url in self.etcd:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
                    not in ("", "/") or parts.port is None:
                raise FleetConfigError(f"fleet.etcd: {shown(url)} is not http(s)://HOST:PORT")
            schemes.add(parts.scheme)
        if len(schemes) > 1:
            raise FleetConfigError("fleet.etcd: mixes http and https endpoints; use one")

    def _check_names(self) -> None:
        if not _PREFIX.match(self.prefix) or self.prefix.endswith("/") or "//" in self.prefix:
            raise FleetConfigError(f"fleet.prefix: {shown(self.prefix)} must be an absolute "
                                   "key path like /xdplb/prod (no trailing /)")
        if self.enabled and not HOST_NAME.match(self.host_name):
            raise FleetConfigError(f"fleet.host: {shown(self.host_name)} is not a host name "
                                   "(letters, digits, . _ -; at most 63)")

    def _check_numbers(self) -> None:
        if not 2 <= self.lease_ttl_s <= 300:
            raise FleetConfigError(f"fleet.lease_ttl_s: {self.lease_ttl_s} must be 2..300")
        if not 0.5 <= self.timeout_s <= 60:
            raise FleetConfigError(f"fleet.timeout_s: {self.timeout_s} must be 0.5..60")

    def _check_tls(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise FleetConfigError("fleet.cert and fleet.key go together")
        tls = any(url.startswith("https:") for url in self.etcd)
        if (self.ca or self.cert) and not tls:
            raise FleetConfigError("fleet.ca/cert/key: the endpoints are http; use https://")
        for key in ("ca", "cert", "key"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise FleetConfigError(f"fleet.{key}: {path} is not a readable file")


def fleet_from_table(table: StrictTable) -> FleetConfig:
    default = FleetConfig()
    endpoints = table.take("etcd", list, [])
    if not all(isinstance(url, str) for url in endpoints):
        table.problems.append("fleet.etcd: must be a list of http(s)://HOST:PORT")
        endpoints = []
    config = FleetConfig(
        etcd=tuple(endpoints), prefix=table.take("prefix", str, default.prefix),
        host=table.take("host", str, default.host),
        lease_ttl_s=table.take("lease_ttl_s", int, default.lease_ttl_s),
        timeout_s=float(table.take("timeout_s", (int, float), default.timeout_s)),
        ca=table.take("ca", str, ""), cert=table.take("cert", str, ""),
        key=table.take("key", str, ""))
    table.done()
    return config
