"""The host's network as a backend needs it: links, addresses, routes (pyroute2),
sysctls (/proc/sys) and listening sockets (/proc/net), all of the network
namespace the process runs in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

SYSCTL_ROOT = Path("/proc/sys")
# Link kinds that carry packets through a tunnel: replies must not leave through one.
TUNNEL_KINDS = frozenset({"ipip", "ip6tnl", "sit", "gre", "gretap", "ip6gre", "ip6gretap",
                          "vxlan", "geneve", "fou", "wireguard", "tun", "erspan", "vti",
                          "vti6", "xfrm"})
RTAX_MTU, RTAX_ADVMSS = "RTAX_MTU", "RTAX_ADVMSS"


class HostNetError(RuntimeError):
    pass


@contextmanager
def netlink() -> Iterator[Any]:
    with IPRoute() as ipr:
        yield ipr


def link_index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise HostNetError(f"no interface {name!r}")
    return found[0]


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str  # "" for a plain device (ethernet, veth's peer kind is "veth")
    mtu: int
    up: bool
    xdp_prog_id: int
    xdp_mode: str  # native | generic | offload | ""


def _xdp_mode(xdp: Any) -> str:
    """native | generic | offload | "" (none), from which program id the kernel reports."""
    if xdp is None:
        return ""
    for attr, mode in (("IFLA_XDP_DRV_PROG_ID", "native"), ("IFLA_XDP_SKB_PROG_ID", "generic"),
                       ("IFLA_XDP_HW_PROG_ID", "offload")):
        if xdp.get_attr(attr):
            return mode
    return ""


def link(ipr: Any, name_or_index: str | int) -> Link:
    index = name_or_index if isinstance(name_or_index, int) else link_index(ipr, name_or_index)
    msg = ipr.get_links(index)[0]
    info = msg.get_attr("IFLA_LINKINFO")
    xdp = msg.get_attr("IFLA_XDP")
    return Link(name=msg.get_attr("IFLA_IFNAME"), index=index,
                kind=(info.get_attr("IFLA_INFO_KIND") or "") if info else "",
                mtu=msg.get_attr("IFLA_MTU") or 0, up=bool(msg["flags"] & 1),
                xdp_prog_id=(xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp else 0,
                xdp_mode=_xdp_mode(xdp))


def prefix_len(address: str) -> int:
    return 32 if ipaddress.ip_address(address).version == 4 else 128


def addresses(ipr: Any, index: int | None = None) -> set[str]:
    """Every address of the host (or of one link), without its prefix length."""
    found = ipr.get_addr(index=index) if index is not None else ipr.get_addr()
    return {str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))) for a in found}


def add_address(ipr: Any, index: int, address: str) -> bool:
    """Adds address/32 (/128) to a link; False when it was already there."""
    if address in addresses(ipr, index):
        return False
    ipr.addr("add", index=index, address=address, prefixlen=prefix_len(address))
    return True


def remove_address(ipr: Any, index: int, address: str) -> bool:
    if address not in addresses(ipr, index):
        return False
    ipr.addr("del", index=index, address=address, prefixlen=prefix_len(address))
    return True


@dataclass(frozen=True)
class RouteChoice:
    """Where the kernel sends a packet to dst (from src): `ip route get`."""

    dst: str
    src: str
    oif: str
    kind: str  # the output link's kind
    gateway: str
    mtu: int  # the route's MTU, or the link's
    advmss: int  # 0: none set (the kernel derives it from the MTU)


def route_get(ipr: Any, dst: str, src: str | None = None) -> RouteChoice | None:
    """The kernel's route choice for dst, None when there is none (no packet is sent)."""
    try:
        found = ipr.route("get", dst=dst, **({"src": src} if src else {}))
    except NetlinkError:
        return None
    if not found:
        return None
    msg = found[0]
    oif = msg.get_attr("RTA_OIF")
    if not oif:
        return None
    out = link(ipr, oif)
    metrics = msg.get_attr("RTA_METRICS")
    mtu = (metrics.get_attr(RTAX_MTU) if metrics else None) or out.mtu
    advmss = (metrics.get_attr(RTAX_ADVMSS) if metrics else None) or 0
    return RouteChoice(dst=dst, src=src or "", oif=out.name, kind=out.kind,
                       gateway=msg.get_attr("RTA_GATEWAY") or "", mtu=mtu, advmss=advmss)


def default_routes(ipr: Any, family: int) -> list[Any]:
    """The main table's default routes of an address family (4 or 6)."""
    import socket

    af = socket.AF_INET if family == 4 else socket.AF_INET6
    return [r for r in ipr.get_routes(family=af, table=254)
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF")]


def route_advmss(route: Any) -> int:
    metrics = route.get_attr("RTA_METRICS")
    return (metrics.get_attr(RTAX_ADVMSS) if metrics else None) or 0


def set_route_advmss(ipr: Any, route: Any, advmss: int) -> None:
    """Rewrites one default route with another advmss (0: none), keeping its
    gateway, interface, protocol, priority and MTU."""
    import socket

    family = route["family"]
    metrics = route.get_attr("RTA_METRICS")
    mtu = metrics.get_attr(RTAX_MTU) if metrics is not None else None
    wanted = {name: value for name, value in (("mtu", mtu), ("advmss", advmss)) if value}
    spec: dict[str, Any] = {
        "dst": "0.0.0.0/0" if family == socket.AF_INET else "::/0", "table": 254,
        "oif": route.get_attr("RTA_OIF"), "family": family, "proto": route["proto"]}
    if wanted:
        spec["metrics"] = wanted
    for attr, key in (("RTA_GATEWAY", "gateway"), ("RTA_PRIORITY", "priority")):
        value = route.get_attr(attr)
        if value is not None:
            spec[key] = value
    ipr.route("replace", **spec)


def sysctl_path(key: str) -> Path:
    return SYSCTL_ROOT / key.replace(".", "/")


def read_sysctl(key: str) -> int:
    return int(sysctl_path(key).read_text().split()[0])


def write_sysctl(key: str, value: int) -> None:
    sysctl_path(key).write_text(f"{value}\n")


def effective_ipv4_conf(name: str, ifname: str) -> int:
    """The value the kernel uses for an interface: the larger of `all` and the
    interface's own (rp_filter, arp_ignore and arp_announce all work that way)."""
    return max(read_sysctl(f"net.ipv4.conf.all.{name}"),
               read_sysctl(f"net.ipv4.conf.{ifname}.{name}"))


@dataclass(frozen=True)
class Socket:
    protocol: str  # tcp | udp
    address: str
    port: int


def _proc_address(text: str, v6: bool) -> str:
    raw = bytes.fromhex(text)
    if v6:  # four host-order 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = ipaddress.IPv6Address(raw)
        return str(ip.ipv4_mapped or ip)
    return str(ipaddress.IPv4Address(raw[::-1]))


def bound_sockets(protocol: str) -> list[Socket]:
    """Listening TCP sockets, or bound UDP sockets, of this network namespace."""
    found = []
    for name, v6 in ((protocol, False), (protocol + "6", True)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if protocol == "tcp" and state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            found.append(Socket(protocol, _proc_address(address, v6), int(port, 16)))
    return found


def serves(sockets: list[Socket], address: str, port: int) -> Socket | None:
    """The socket that takes connections to address:port, if one does."""
    wildcards = {"0.0.0.0", "::"} if ipaddress.ip_address(address).version == 4 else {"::"}
    for sock in sockets:
        if sock.port == port and (sock.address == address or sock.address in wildcards):
            return sock
    return None
