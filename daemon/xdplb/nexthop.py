"""The L2 next hop for encapsulated packets, from the kernel's routing and
neighbour tables (pyroute2), so lbd follows a router change by itself."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

# Neighbour states whose link-layer address can be used.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT
_PROBE_PORT = 9  # discard: a datagram to it only makes the kernel resolve the neighbour


class NexthopError(RuntimeError):
    """No usable next hop; the message says which step failed."""


@dataclass(frozen=True)
class Nexthop:
    mac: str
    gateway: str
    interface: str

    def describe(self) -> str:
        return f"{self.mac} ({self.gateway} on {self.interface})"


def _default_gateway(ipr: IPRoute) -> tuple[str, int]:
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_default_routes(family=family):
            gateway = route.get_attr("RTA_GATEWAY")
            if gateway:
                return gateway, route.get_attr("RTA_OIF")
    raise NexthopError("no default route with a gateway; set nexthop.via or nexthop.mac")


def _route_to(ipr: IPRoute, address: str) -> int:
    try:
        route = ipr.route("get", dst=address)[0]
    except Exception as exc:
        raise NexthopError(f"no route to next hop {address}: {exc}") from None
    return route.get_attr("RTA_OIF")


def _neighbour_mac(ipr: IPRoute, address: str, ifindex: int) -> str | None:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    for neigh in ipr.get_neighbours(family=family, ifindex=ifindex):
        if neigh.get_attr("NDA_DST") == address and neigh["state"] & _NUD_USABLE:
            return neigh.get_attr("NDA_LLADDR")
    return None


def _provoke_resolution(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"", (address, _PROBE_PORT))


def resolve(via: str = "", timeout: float = 3.0) -> Nexthop:
    """The MAC of `via` (default: the default route's gateway), resolving it if needed."""
    with IPRoute() as ipr:
        if via:
            gateway, ifindex = via, _route_to(ipr, via)
        else:
            gateway, ifindex = _default_gateway(ipr)
        ifname = ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        deadline = time.monotonic() + timeout
        while True:
            mac = _neighbour_mac(ipr, gateway, ifindex)
            if mac:
                return Nexthop(mac, gateway, ifname)
            if time.monotonic() >= deadline:
                raise NexthopError(f"next hop {gateway} on {ifname}: no neighbour entry "
                                   f"after {timeout:.0f} s (is it up?)")
            _provoke_resolution(gateway)
            time.sleep(0.1)


def interface_addresses(interfaces: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses on these interfaces (link-local ones left out): what a host's
    fleet report names it by."""
    found: list[str] = []
    with IPRoute() as ipr:
        for name in interfaces:
            indexes = ipr.link_lookup(ifname=name)
            if not indexes:
                continue
            for message in ipr.get_addr(index=indexes[0]):
                address = message.get_attr("IFA_ADDRESS")
                if address and not address.startswith("fe80:"):
                    found.append(address)
    return tuple(found)
