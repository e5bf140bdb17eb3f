"""Addresses and VIP keys: one canonical text for each datapath address."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from xdplb.state.rules import (
    MAX_ADDRESS_TEXT,
    PROTOCOLS,
    StateError,
    _fail,
    _one_of,
    shown,
)

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


# A backend of a VIP: (VIP, backend address). The unit of health, load and backend
# entries, since one address may serve several VIPs on different terms.
MemberId = tuple[VipKey, str]
