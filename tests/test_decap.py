"""The backend-side decapsulator restores exactly the frame the client sent
(with the MACs of the last hop) for every encapsulation the balancer makes,
and leaves everything else alone."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from tests.conftest import require_root
from tests.packets import encapsulated

BACKEND4, BACKEND6 = "10.100.10.2", "fd00:100:10::2"
INNER4 = bytes(IP(src="10.100.1.2", dst="10.200.0.10") / TCP(sport=4000, dport=80, flags="S"))
INNER6 = bytes(IPv6(src="fd00:100:1::2", dst="fd00:200::10") / TCP(sport=4000, dport=443))


@pytest.fixture(scope="module")
def decap():
    require_root()
    from xdplb.datapath import Decapsulator

    program = Decapsulator(gue_port=6080)
    program.accept(BACKEND4)
    program.accept(BACKEND6)
    yield program
    program.close()


CASES = {
    "ipip": (INNER4, BACKEND4, False),
    "ip6ip6": (INNER6, BACKEND6, False),
    "4in6": (INNER4, BACKEND6, False),
    "gue4": (INNER4, BACKEND4, True),
    "gue6-in-6": (INNER6, BACKEND6, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("vlan", [None, 5])
def test_decapsulates_to_the_original_frame(decap, name, vlan):
    from xdplb.datapath import XDP_PASS

    inner, backend, gue = CASES[name]
    frame = encapsulated(inner, backend, 0x12345678, gue=gue, vlan=vlan)
    before = decap.counters()["decapsulated"]
    out = decap.test_run(frame)
    outer_eth = Ether(frame)
    eth = Ether(dst=outer_eth.dst, src=outer_eth.src)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    expected_type = 0x86DD if inner[0] >> 4 == 6 else 0x0800
    expected = bytes(eth)[:-2] + expected_type.to_bytes(2, "big") + inner
    assert (out.verdict, out.data) == (XDP_PASS, expected)
    assert decap.counters()["decapsulated"] == before + 1


@pytest.mark.parametrize("frame", [
    encapsulated(INNER4, "10.100.99.2", 1),                       # another host's tunnel
    bytes(Ether() / IP(dst=BACKEND4) / UDP(sport=1, dport=6081)),  # not the GUE port
    bytes(Ether() / IP(dst=BACKEND4) / TCP(dport=80)),             # ordinary traffic
    bytes(Ether() / IP(dst=BACKEND4, proto=4, flags="MF") / INNER4),  # fragmented tunnel
], ids=["other-address", "other-udp-port", "plain-tcp", "fragment"])
def test_leaves_other_packets_alone(decap, frame):
    from xdplb.datapath import XDP_PASS

    before = decap.counters()
    out = decap.test_run(frame)
    assert (out.verdict, out.data) == (XDP_PASS, frame)
    after = decap.counters()
    assert (after["passed"], after["decapsulated"]) == (
        before["passed"] + 1, before["decapsulated"])
