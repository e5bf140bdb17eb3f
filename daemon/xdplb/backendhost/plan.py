"""What a backend host should look like: from a TOML file and the command line.

    interfaces = ["eth0"]                  # where tunnel packets arrive
    tunnel_addresses = ["10.0.1.5"]        # this host's addresses the LBs encapsulate to
    vips = ["10.200.0.10:80/tcp"]          # as lbctl names them; or a bare address
    gue_port = 6080                        # GUE decapsulated on this UDP port (0: off)
    xdp_mode = "native"                    # or "generic"
    clamp_mss = false                      # lower the return routes' advmss to fit the tunnel
    name = "default"                       # pins in /sys/fs/bpf/xdplb-backend/NAME
    state_dir = "/var/lib/xdplb-backend"   # what setup changed: NAME.json there
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xdplb.datapath import DECAP_PIN_ROOT
from xdplb.datapath.decap import MAX_DECAP_ADDRS
from xdplb.state import StateError, StrictTable, VipKey, canonical_address, shown

DEFAULT_STATE_DIR = Path("/var/lib/xdplb-backend")
XDP_MODES = ("native", "generic")
MAX_VIPS = 4096


class PlanError(ValueError):
    """The plan is refused: every problem, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, order=True)
class VipTarget:
    """A VIP this host serves: its address, and its port and protocol when given
    (the doctor then looks for a listener)."""

    address: str
    port: int = 0  # 0: any port, or not said
    protocol: str = ""  # tcp | udp | "" (a bare address)

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    @classmethod
    def parse(cls, text: str) -> VipTarget:
        if isinstance(text, str) and "/" not in text:
            return cls(canonical_address(text, "VIP"))
        key = VipKey.parse(text)
        return cls(key.address, key.port, key.protocol)

    def __str__(self) -> str:
        if not self.protocol:
            return self.address
        return str(VipKey(self.address, self.port, self.protocol))


@dataclass(frozen=True)
class BackendPlan:
    interfaces: tuple[str, ...] = ()
    tunnel_addresses: tuple[str, ...] = ()
    vips: tuple[VipTarget, ...] = ()
    gue_port: int = 6080
    xdp_mode: str = "native"
    clamp_mss: bool = False
    name: str = "default"
    state_dir: Path = DEFAULT_STATE_DIR
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def pin_dir(self) -> Path:
        return DECAP_PIN_ROOT / self.name

    @property
    def record_path(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    def vip_addresses(self) -> list[str]:
        return sorted({v.address for v in self.vips}, key=_address_order)

    def validate(self) -> None:
        problems = list(self.problems) + self._own_problems()
        if problems:
            raise PlanError(problems)

    def _own_problems(self) -> list[str]:
        found = []
        # A field whose every item was refused has been told about already.
        told = {name for name in ("interfaces", "tunnel_addresses", "vips")
                if any(f"{name}[" in problem for problem in self.problems)}
        if not self.interfaces and "interfaces" not in told:
            found.append("interfaces: at least one is needed (--interface IFNAME)")
        if not self.tunnel_addresses and "tunnel_addresses" not in told:
            found.append("tunnel_addresses: at least one is needed (--tunnel-address ADDR): "
                         "the addresses LB hosts encapsulate to")
        if len(self.tunnel_addresses) > MAX_DECAP_ADDRS:
            found.append(f"tunnel_addresses: {len(self.tunnel_addresses)}, at most "
                         f"{MAX_DECAP_ADDRS}")
        if not self.vips and "vips" not in told:
            found.append("vips: at least one is needed (--vip VIP)")
        if len(self.vips) > MAX_VIPS:
            found.append(f"vips: {len(self.vips)}, at most {MAX_VIPS}")
        if not 0 <= self.gue_port <= 65535:
            found.append(f"gue_port: {self.gue_port} must be 0 (off) or a UDP port")
        if self.xdp_mode not in XDP_MODES:
            found.append(f"xdp_mode: {shown(self.xdp_mode)} is not one of native, generic")
        if not self.name or "/" in self.name or self.name.startswith("."):
            found.append(f"name: {shown(self.name)} must be a plain file name")
        if not self.state_dir.is_absolute():
            found.append(f"state_dir: {self.state_dir} must be an absolute path")
        return found


def _address_order(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _addresses(values: list[Any], where: str, problems: list[str]) -> tuple[str, ...]:
    found = []
    for i, value in enumerate(values):
        try:
            found.append(canonical_address(value, f"{where}[{i}]"))
        except StateError as exc:
            problems.append(str(exc))
    return tuple(sorted(set(found), key=_address_order))


def _vips(values: list[Any], where: str, problems: list[str]) -> tuple[VipTarget, ...]:
    found = []
    for i, value in enumerate(values):
        try:
            found.append(VipTarget.parse(value))
        except StateError as exc:
            problems.append(f"{where}[{i}]: {exc}")
    return tuple(sorted(set(found)))


def read_plan(path: Path | None, overrides: dict[str, Any]) -> BackendPlan:
    """The file (if any), then the command line: lists given there are added to the
    file's, scalars replace them. Refuses (PlanError) with every problem at once."""
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PlanError([f"{path}: {exc}"]) from None
    table = StrictTable(data, "", problems)
    interfaces = table.take("interfaces", list, []) + list(overrides.get("interfaces", ()))
    plan = BackendPlan(
        interfaces=tuple(dict.fromkeys(str(i) for i in interfaces)),
        tunnel_addresses=_addresses(
            table.take("tunnel_addresses", list, []) + list(overrides.get("tunnel_addresses",
                                                                           ())),
            "tunnel_addresses", problems),
        vips=_vips(table.take("vips", list, []) + list(overrides.get("vips", ())), "vips",
                   problems),
        gue_port=table.take("gue_port", int, 6080),
        xdp_mode=table.take("xdp_mode", str, "native"),
        clamp_mss=table.take("clamp_mss", bool, False),
        name=table.take("name", str, "default"),
        state_dir=Path(table.take("state_dir", str, str(DEFAULT_STATE_DIR))))
    table.done()
    scalars = {k: v for k, v in overrides.items()
               if k in ("gue_port", "xdp_mode", "clamp_mss", "name", "state_dir")
               and v is not None}
    if "state_dir" in scalars:
        scalars["state_dir"] = Path(scalars["state_dir"])
    where = f"{path}: " if path is not None else ""
    plan = replace(plan, **scalars, problems=tuple(where + p for p in problems))
    if any(not isinstance(i, str) or not i for i in plan.interfaces):
        raise PlanError([f"{where}interfaces: must be interface names"])
    return plan
