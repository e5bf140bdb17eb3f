"""Malformed input: every test packet truncated at every byte, and headers
that lie. The balancer must never transmit a malformed packet, never fail
verification, and its outcome counters must account for every packet."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from tests.conftest import CLIENT_MAC, LB_MAC
from xdplb import structs as s
from xdplb.datapath import XDP_DROP, XDP_PASS, XDP_TX

ETH_HLEN = 14
VIP4, VIP6, CLIENT4, CLIENT6 = "10.200.0.10", "fd00:200::10", "10.100.1.2", "fd00:100:1::2"

GOOD_FRAMES = {
    "tcp4": Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=VIP4) / TCP(
        sport=4000, dport=80, flags="S", options=[("MSS", 1460)]) / b"data",
    "udp4-vlan": Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=7) / IP(
        src=CLIENT4, dst=VIP4) / UDP(sport=4000, dport=53) / b"query",
    "tcp6": Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=VIP6) / TCP(
        sport=4000, dport=443, flags="A") / b"data",
    "echo4": Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=VIP4) / ICMP() / b"p",
    "echo6": Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=VIP6) / (
        ICMPv6EchoRequest(data=b"p")),
    "icmp-error4": Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.9.9.9", dst=VIP4) / ICMP(
        type=3, code=4) / IPerror(src=VIP4, dst=CLIENT4) / TCPerror(sport=80, dport=4000),
}


@pytest.fixture
def vips(prog):
    prog.backend(1, "10.100.10.2")
    prog.backend(2, "fd00:100:10::2")
    prog.vip(VIP4, 80, s.IPPROTO_TCP, [1, 1, 1])
    prog.vip(VIP4, 53, s.IPPROTO_UDP, [1, 1, 1])
    prog.vip(VIP6, 443, s.IPPROTO_TCP, [2, 2, 2])


def outcomes(bal) -> int:
    counters = bal.counters()
    return sum(counters[name] for name in s.OUTCOME_COUNTERS)


@pytest.mark.parametrize("name", sorted(GOOD_FRAMES))
def test_every_truncation_is_never_transmitted(bal, vips, name):
    frame = bytes(GOOD_FRAMES[name])
    assert bal.test_run(frame).verdict == XDP_TX  # the whole frame is good
    # BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, and
    # no NIC delivers one; every length from there on is tried.
    for cut in range(ETH_HLEN, len(frame)):
        out = bal.test_run(frame[:cut])
        assert out.verdict in (XDP_PASS, XDP_DROP), f"cut at {cut} was {out.verdict}"
        if out.verdict == XDP_PASS:
            assert out.data == frame[:cut]
    assert outcomes(bal) == len(frame) - ETH_HLEN + 1


def _tcp4_bytes(**ip) -> bytearray:
    return bytearray(bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=VIP4, **ip)
                           / TCP(sport=4000, dport=80, flags="S")))


def _patched(offset: int, value: int, width: int = 1) -> bytes:
    frame = _tcp4_bytes()
    frame[offset:offset + width] = value.to_bytes(width, "big")
    return bytes(frame)


LIARS = {
    "ihl-below-5": (_patched(14, 0x44), XDP_PASS, "pass_unparsed"),
    "ihl-past-end": (_patched(14, 0x4F), XDP_PASS, "pass_unparsed"),
    "version-6-in-ipv4-frame": (_patched(14, 0x65), XDP_PASS, "pass_unparsed"),
    "total-length-past-end": (_patched(16, 41, 2), XDP_PASS, "pass_unparsed"),
    "total-length-below-header": (_patched(16, 19, 2), XDP_PASS, "pass_unparsed"),
    "total-length-cuts-tcp": (_patched(16, 30, 2), XDP_DROP, "drop_malformed"),
    "tcp-doff-below-5": (_patched(14 + 20 + 12, 0x40), XDP_DROP, "drop_malformed"),
    "tcp-doff-past-end": (_patched(14 + 20 + 12, 0x60), XDP_DROP, "drop_malformed"),
    "udp-length-lies": (bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT4, dst=VIP4)
                              / UDP(sport=1, dport=53, len=200)), XDP_DROP, "drop_malformed"),
    "ipv6-payload-length-past-end": (
        bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=CLIENT6, dst=VIP6, plen=500)
              / TCP(sport=1, dport=443)), XDP_PASS, "pass_unparsed"),
}


@pytest.mark.parametrize("name", sorted(LIARS))
def test_lying_headers(bal, vips, name):
    frame, verdict, counter = LIARS[name]
    out = bal.test_run(frame)
    assert out.verdict == verdict
    if verdict == XDP_PASS:
        assert out.data == frame
    counters = {k: v for k, v in bal.counters().items() if v}
    assert counters == {counter: 1}


def test_random_corruption_never_transmits_garbage(bal, vips):
    """Flip bytes of good frames (deterministic seed): whatever comes out as
    XDP_TX must be a well-formed encapsulation of an intact inner packet."""
    import random

    rng = random.Random(1234)
    runs = 0
    for frame in GOOD_FRAMES.values():
        raw = bytes(frame)
        for _ in range(300):
            mutated = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(14, len(raw))] = rng.randrange(256)
            out = bal.test_run(bytes(mutated))
            runs += 1
            if out.verdict == XDP_TX:
                assert_wellformed_tx(out.data)
    assert outcomes(bal) == runs


def assert_wellformed_tx(data: bytes) -> None:
    pkt = Ether(data)
    if IP in pkt and pkt[IP].proto == 1 and pkt[IP].src == VIP4:
        return  # an echo reply or too-big answer; checksums checked below
    layer = pkt[IP] if IP in pkt else pkt[IPv6]
    rebuilt = layer.__class__(bytes(layer))
    if IP in pkt:
        del rebuilt.chksum
        assert IP(bytes(rebuilt)).chksum == pkt[IP].chksum
