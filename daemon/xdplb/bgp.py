"""Announcing VIPs over BGP through BIRD (Debian's bird2).

BIRD runs beside lbd and owns the BGP sessions; lbd tells it which VIP
prefixes to announce by writing two small files of static routes that
BIRD's configuration includes (one for IPv4, one for IPv6), then asking
BIRD to reload (`birdc configure`, which keeps established sessions). Why
BIRD: it is packaged by Debian, reloads atomically and keeps sessions up
across reloads, and its include-file interface needs no client library.
An example BIRD configuration is in docs/bgp.md.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xdplb.store import write_atomically

BIRDC_TIMEOUT_S = 5.0
# `show protocols`: Name Proto Table State Since Info; Since is a time, or a date and a time.
_PROTOCOL_LINE = re.compile(
    r"^(?P<name>\S+)\s+BGP\s+\S+\s+(?P<state>\S+)\s+"
    r"(?:\d{4}-\d\d-\d\d\s+)?\S+\s*(?P<info>.*)$")


class AnnounceError(RuntimeError):
    """BIRD could not be told; the message says why."""


@dataclass(frozen=True)
class BgpSession:
    name: str
    state: str  # BIRD's protocol state: up, start, down
    info: str  # Established, Active, Connect, ...


@dataclass(frozen=True)
class BgpState:
    enabled: bool
    sessions: list[BgpSession] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    error: str = ""


def host_prefix(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{32 if ip.version == 4 else 128}"


def route_lines(prefixes: Iterable[str], version: int) -> str:
    lines = [f"route {p} blackhole;" for p in sorted(prefixes, key=_prefix_key)
             if ipaddress.ip_network(p).version == version]
    return "# written by lbd: the VIPs this host announces\n" + "\n".join(lines) + "\n"


def _prefix_key(prefix: str) -> tuple[int, int]:
    net = ipaddress.ip_network(prefix)
    return net.version, int(net.network_address)


class BirdAnnouncer:
    """Writes include files of static routes and makes BIRD reload them."""

    def __init__(self, include_dir: Path, socket: Path, birdc: str = "birdc"):
        self.include_dir = include_dir
        self.socket = socket
        self.birdc = birdc
        self.announced: set[str] = set()
        self.last_error = ""

    @property
    def files(self) -> tuple[Path, Path]:
        return self.include_dir / "vips4.conf", self.include_dir / "vips6.conf"

    def prepare(self) -> None:
        """Creates the include files (empty) so BIRD's configuration parses before
        lbd has announced anything."""
        self.include_dir.mkdir(parents=True, exist_ok=True)
        for path, version in zip(self.files, (4, 6), strict=True):
            if not path.exists():
                write_atomically(path, route_lines((), version))

    def announce(self, prefixes: set[str]) -> bool:
        """Makes BIRD announce exactly `prefixes`; False when nothing changed."""
        if prefixes == self.announced and not self.last_error:
            return False
        self.include_dir.mkdir(parents=True, exist_ok=True)
        for path, version in zip(self.files, (4, 6), strict=True):
            write_atomically(path, route_lines(prefixes, version))
        try:
            out = self._birdc("configure")
        except AnnounceError as exc:
            self.last_error = str(exc)
            raise
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            self.last_error = f"birdc configure: {out.strip().splitlines()[-1:]}"
            raise AnnounceError(self.last_error)
        self.announced, self.last_error = set(prefixes), ""
        return True

    def _birdc(self, *command: str) -> str:
        argv = [self.birdc, "-s", str(self.socket), *command]
        try:
            result = subprocess.run(argv, capture_output=True, text=True,
                                    timeout=BIRDC_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AnnounceError(f"{' '.join(argv)}: {exc}") from None
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
            raise AnnounceError(f"{' '.join(argv)}: {reason}")
        return result.stdout

    def sessions(self) -> list[BgpSession]:
        """BIRD's BGP protocols and their states (`birdc show protocols`)."""
        out = self._birdc("show", "protocols")
        return [BgpSession(m["name"], m["state"], m["info"].strip())
                for m in map(_PROTOCOL_LINE.match, out.splitlines()) if m]

    def status(self) -> BgpState:
        try:
            sessions = self.sessions()
        except AnnounceError as exc:
            return BgpState(True, [], sorted(self.announced, key=_prefix_key), str(exc))
        return BgpState(True, sessions, sorted(self.announced, key=_prefix_key),
                        self.last_error)
