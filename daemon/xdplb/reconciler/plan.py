"""What each VIP should look like: the runtime facts, the datapath settings, a VIP's
plan (health and panic rules), and the map keys and flags it is written with."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from xdplb import structs as s
from xdplb.state import MemberId, VipKey, VipSpec

PROTO_NUMBERS = {"tcp": s.IPPROTO_TCP, "udp": s.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


class ReconcileError(RuntimeError):
    """The maps cannot be made to match the desired state (e.g. ring space fragmented)."""


@dataclass(frozen=True)
class Runtime:
    """Facts that are not the operator's to set: health and load-derived weights."""

    healthy: Mapping[MemberId, bool] = field(default_factory=dict)  # missing: healthy
    weights: Mapping[MemberId, int] = field(default_factory=dict)  # missing: configured


@dataclass(frozen=True)
class DatapathSettings:
    """The config map's content, apart from the clock."""

    nexthop_mac: str
    mtu: int = 1500
    gue_port: int = 6080
    encap_source_v4: str = "172.16.0.0/16"  # outer sources: host bits from the flow hash
    encap_source_v6: str = "fd00:ec::/112"
    max_new_flows_per_cpu: int = 0  # 0: record every new flow
    settled_refresh_s: int = 8  # a power of two; 0: every packet reads the flow table

    def __post_init__(self) -> None:
        self.to_lb_config(0)  # every field checked once, where it is converted

    def to_lb_config(self, now_s: int) -> s.LbConfig:
        if not 576 <= self.mtu <= 9216:
            raise ValueError(f"mtu {self.mtu}: must be 576..9216")
        if not 1 <= self.gue_port <= 65535:
            raise ValueError(f"gue_port {self.gue_port}: must be 1..65535")
        if not 0 <= self.max_new_flows_per_cpu < 2**32:
            raise ValueError(f"max_new_flows_per_cpu {self.max_new_flows_per_cpu}: out of range")
        refresh = self.settled_refresh_s
        if refresh and not (2 <= refresh <= 1024 and refresh & (refresh - 1) == 0):
            raise ValueError(f"settled_refresh_s {refresh}: must be 0 or a power of two "
                             "2..1024")
        mac = self.nexthop_mac.replace(":", "")
        if len(mac) != 12 or any(c not in "0123456789abcdefABCDEF" for c in mac):
            raise ValueError(f"nexthop_mac {self.nexthop_mac!r}: not a MAC address")
        cfg = s.LbConfig(mtu=self.mtu, gue_port=s.port_be(self.gue_port),
                         flags=s.CONFIG_F_READY, now_s=now_s,
                         max_new_flows_per_cpu=self.max_new_flows_per_cpu,
                         settled_refresh_s=refresh)
        cfg.nexthop_mac[:] = bytes.fromhex(mac)
        net4 = ipaddress.IPv4Network(self.encap_source_v4)
        cfg.encap_src4 = s.be_u32(net4.network_address.packed)
        cfg.encap_src4_hostmask = s.be_u32(net4.hostmask.packed)
        net6 = ipaddress.IPv6Network(self.encap_source_v6)
        if net6.prefixlen < 96:
            raise ValueError(f"encap_source_v6 {net6}: the prefix must be /96 or longer")
        cfg.encap_src6 = s.Addr16.of(net6.network_address)
        cfg.encap_src6_hostmask = s.be_u32(net6.hostmask.packed[12:])
        return cfg


# --- what each VIP should look like -------------------------------------------------


@dataclass(frozen=True)
class VipPlan:
    """The realisation of one VIP: who is in its ring, who is marked available."""

    ring_weights: dict[str, int]
    available: dict[str, bool]
    mode: str  # normal | panic | fail-open | fail-closed
    healthy: int
    serving: int  # backends with a non-zero weight


def plan_vip(vip: VipSpec, runtime: Runtime) -> VipPlan:
    """Health and panic rules applied to one VIP: a pure function."""
    weights, healthy = {}, {}
    for address, backend in vip.backends.items():
        member = (vip.key, address)
        weights[address] = 0 if backend.drained else runtime.weights.get(member, backend.weight)
        healthy[address] = runtime.healthy.get(member, True)
    serving = [a for a, w in weights.items() if w > 0]
    up = [a for a in serving if healthy[a]]
    mode = "normal"
    if serving and not up:
        mode = "fail-open" if vip.when_none_healthy == "all" else "fail-closed"
    elif serving and vip.panic_threshold and len(up) / len(serving) < vip.panic_threshold:
        mode = "panic"
    everyone = mode in ("panic", "fail-open")
    ring = {a: (w if everyone or healthy[a] else 0) for a, w in weights.items()}
    available = {a: everyone or healthy[a] for a in weights}
    return VipPlan(ring, available, mode, len(up), len(serving))


def vip_flags(vip: VipSpec) -> int:
    quic = (s.quic_vip_flags(vip.quic.server_id_len, vip.quic.rotation)
            if vip.quic is not None else 0)
    return ((s.VIP_F_HASH_SRC_ONLY if vip.hash == "source" else 0)
            | (s.VIP_F_GUE if vip.encap == "gue" else 0) | quic)


def portless_flag(key: VipKey) -> int:
    if key.port:
        return 0
    return s.VIP_ADDR_F_PORTLESS_TCP if key.protocol == "tcp" else s.VIP_ADDR_F_PORTLESS_UDP


def map_key(key: VipKey) -> s.VipKey:
    return s.VipKey(addr=s.Addr16.of(key.address), port=s.port_be(key.port),
                    proto=PROTO_NUMBERS[key.protocol])


def state_key(key: s.VipKey) -> VipKey | None:
    """The VIP a map key names, None for an entry no desired state could produce."""
    try:
        return VipKey(str(key.addr.address()), s.port_be(key.port), PROTO_NAMES[key.proto])
    except (KeyError, ValueError):
        return None
