"""Builds the exact frames the balancer must emit, independently of its C code:
scapy computes every length and checksum, the flow hash comes from structs."""

from __future__ import annotations

import ipaddress
import struct

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from tests.conftest import ENCAP_SRC4, ENCAP_SRC6, GUE_PORT, LB_MAC, NEXTHOP_MAC


def _masked(base_word: bytes, mask_word: bytes, h: int) -> bytes:
    base = struct.unpack("=I", base_word)[0]
    mask = struct.unpack("=I", mask_word)[0]
    return struct.pack("=I", (base & ~mask & 0xFFFFFFFF) | (h & mask))


def encap_src4(h: int, hostmask: str = "0.0.255.255") -> str:
    packed = _masked(ipaddress.IPv4Address(ENCAP_SRC4).packed,
                     ipaddress.IPv4Address(hostmask).packed, h)
    return str(ipaddress.IPv4Address(packed))


def encap_src6(h: int, hostmask: str = "0.0.255.255") -> str:
    base = ipaddress.IPv6Address(ENCAP_SRC6).packed
    last = _masked(base[12:], ipaddress.IPv4Address(hostmask).packed, h)
    return str(ipaddress.IPv6Address(base[:12] + last))


def ip_id(h: int) -> int:
    """The outer IPv4 id: the hash's low 16 bits as stored by a native write."""
    return int.from_bytes(struct.pack("=H", h & 0xFFFF), "big")


def encapsulated(inner_l3: bytes, backend: str, h: int, *, tos: int = 0, df: bool = False,
                 gue: bool = False, vlan: int | None = None) -> bytes:
    """The frame the balancer sends to `backend` for the IP packet `inner_l3`."""
    inner_v6 = inner_l3[0] >> 4 == 6
    payload = Raw(inner_l3)
    if gue:
        payload = UDP(sport=0xC000 | (h & 0x3FFF), dport=GUE_PORT, len=len(inner_l3) + 8,
                      chksum=0) / payload
    proto = 17 if gue else (41 if inner_v6 else 4)
    if ipaddress.ip_address(backend).version == 6:
        outer = IPv6(tc=tos, fl=h & 0xFFFFF, nh=proto, hlim=64, src=encap_src6(h), dst=backend)
    else:
        outer = IP(tos=tos, id=ip_id(h), flags="DF" if df else 0, ttl=64, proto=proto,
                   src=encap_src4(h), dst=backend)
    eth = Ether(dst=NEXTHOP_MAC, src=LB_MAC)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    return bytes(eth / outer / payload)
