"""Half-open check replies through BPF_PROG_TEST_RUN, byte-exact: a SYN-ACK with the
probe's cookie is recorded and answered with the exact RST; a RST is recorded;
another cookie, port or address passes untouched and is not recorded."""

from __future__ import annotations

import ctypes as ct

import pytest
from scapy.layers.inet import IP, TCP, IPOption_RR
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import nonzero
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import XDP_DROP, XDP_PASS, XDP_TX

ROUTER_MAC, LB_MAC = "02:00:00:00:00:09", "02:00:00:00:00:02"
LB4, LB6 = "10.100.2.2", "fd00:100:2::2"
BACKEND4, BACKEND6 = "10.100.10.2", "fd00:100:10::2"
SLOT, COOKIE, PORT = 5, 0x8000_1234, 8080
PROBE_PORT = s.SYN_PORT_BASE + SLOT


def arm(bal, slot: int = SLOT, address: str = BACKEND4, port: int = PORT,
        cookie: int = COOKIE) -> None:
    bal.syn_probes.arm([slot], [s.Addr16.of(address)], [s.port_be(port)], [":" in address],
                       [cookie])


def outcome(bal, slot: int = SLOT) -> int:
    return bal.syn_probes.outcomes(slot + 1)[slot].outcome


def reply(flags: str, ack: int = COOKIE + 1, src: str = BACKEND4, sport: int = PORT,
          dport: int = PROBE_PORT, ip_options: list | None = None) -> bytes:
    dst = LB6 if ":" in src else LB4
    ip = IPv6(src=src, dst=dst, hlim=63) if ":" in src else IP(
        src=src, dst=dst, ttl=63, id=4321, options=ip_options or [])
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=0x0BAD_F00D, ack=ack, window=65160,
              options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)] if "S" in flags else [])
    return bytes(Ether(src=ROUTER_MAC, dst=LB_MAC) / ip / tcp)


def expected_rst(backend: str = BACKEND4, port: int = PORT) -> bytes:
    if ":" in backend:
        ip = IPv6(src=LB6, dst=backend, hlim=64, tc=0, fl=0)
    else:
        ip = IP(src=LB4, dst=backend, ttl=64, id=0, flags="DF", tos=0)
    return bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / ip / TCP(
        sport=PROBE_PORT, dport=port, flags="R", seq=COOKIE + 1, ack=0, window=0))


@pytest.mark.parametrize("backend", [BACKEND4, BACKEND6], ids=["ipv4", "ipv6"])
def test_a_syn_ack_with_the_cookie_is_recorded_and_answered_with_the_exact_rst(bal, backend):
    arm(bal, address=backend)
    assert outcome(bal) == s.SYN_PENDING
    out = bal.test_run(reply("SA", src=backend))
    assert out.verdict == XDP_TX
    assert out.data == expected_rst(backend)
    assert outcome(bal) == s.SYN_OPEN
    assert nonzero(bal.syn_probes.counters()) == {"open": 1}


def test_ipv4_options_of_the_syn_ack_are_not_carried_into_the_rst(bal):
    arm(bal)
    out = bal.test_run(reply("SA", ip_options=[IPOption_RR(routers=["1.2.3.4"])]))
    assert out.verdict == XDP_TX
    assert out.data == expected_rst()


@pytest.mark.parametrize("backend", [BACKEND4, BACKEND6], ids=["ipv4", "ipv6"])
def test_a_rst_with_the_cookie_is_recorded_and_goes_no_further(bal, backend):
    arm(bal, address=backend)
    out = bal.test_run(reply("RA", src=backend))
    assert out.verdict == XDP_DROP
    assert outcome(bal) == s.SYN_REFUSED
    assert nonzero(bal.syn_probes.counters()) == {"refused": 1}


@pytest.mark.parametrize(("what", "frame"), [
    ("another cookie", reply("SA", ack=COOKIE + 2)),
    ("a stale cookie", reply("SA", ack=COOKIE)),
    ("another backend port", reply("SA", sport=PORT + 1)),
    ("another backend address", reply("SA", src="10.100.10.3")),
    ("the other family", reply("SA", src=BACKEND6)),
    ("another probe port", reply("SA", dport=PROBE_PORT + 1)),
    ("a RST with another cookie", reply("RA", ack=COOKIE + 7)),
])
def test_a_reply_no_probe_expects_passes_untouched_and_is_not_recorded(bal, what, frame):
    arm(bal)
    out = bal.test_run(frame)
    assert out.verdict == XDP_PASS, what
    assert out.data == frame
    assert outcome(bal) == s.SYN_PENDING
    assert nonzero(bal.syn_probes.counters()) == {"unmatched": 1}
    assert bal.counters()["pass_not_vip"] == 1


@pytest.mark.parametrize(("what", "frame"), [
    ("below the probe ports", reply("SA", dport=s.SYN_PORT_BASE - 1)),
    ("above the probe ports", reply("SA", dport=s.SYN_PORT_BASE + s.SYN_PORTS)),
    ("a bare SYN", reply("S")),
    ("a bare ACK", reply("A")),
    ("a RST without ACK", reply("R")),
])
def test_other_tcp_to_this_host_is_not_looked_at(bal, what, frame):
    arm(bal)
    out = bal.test_run(frame)
    assert (out.verdict, out.data) == (XDP_PASS, frame), what
    assert nonzero(bal.syn_probes.counters()) == {}
    assert outcome(bal) == s.SYN_PENDING


def test_a_probe_rearmed_with_a_new_cookie_ignores_the_old_ones_reply(bal):
    arm(bal)
    arm(bal, cookie=COOKIE + 100)
    assert bal.test_run(reply("SA")).verdict == XDP_PASS
    out = bal.test_run(reply("SA", ack=COOKIE + 101))
    assert out.verdict == XDP_TX
    assert outcome(bal) == s.SYN_OPEN


def test_a_slot_never_armed_matches_nothing(bal):
    frame = reply("SA", ack=1, src="0.0.0.0", sport=0)  # what an unarmed slot holds
    out = bal.test_run(frame)
    assert (out.verdict, out.data) == (XDP_PASS, frame)
    assert nonzero(bal.syn_probes.counters()) == {"unmatched": 1}


VIP4, VIP6 = "10.200.0.10", "fd00:200::10"


@pytest.mark.parametrize(("vip", "backend", "gue"), [
    (VIP4, BACKEND4, False), (VIP4, BACKEND4, True), (VIP6, BACKEND6, False),
    (VIP6, BACKEND4, True),
], ids=["ipv4-ipip", "ipv4-gue", "ipv6-in-ipv6", "ipv6-gue-over-ipv4"])
def test_the_rst_of_a_check_through_the_vip_is_tunnelled_to_its_backend(bal, prog, vip,
                                                                          backend, gue):
    """The SYN-ACK comes from the VIP (direct return); the RST goes to the VIP through
    the tunnel to the checked backend, exactly as a client's packet would."""
    index = 3
    meta = prog.vip(vip, PORT, s.IPPROTO_TCP, [index] * 7, flags=s.VIP_F_GUE if gue else 0)
    prog.backend(index, backend)
    entry = bal.backends.get(ct.c_uint32(index))
    entry.vip_id = meta.vip_id
    bal.backends.put(ct.c_uint32(index), entry)
    bal.syn_probes.arm([SLOT], [s.Addr16.of(vip)], [s.port_be(PORT)], [":" in vip], [COOKIE],
                       [index])
    out = bal.test_run(reply("SA", src=vip))
    assert out.verdict == XDP_TX
    lb = LB6 if ":" in vip else LB4
    rst_ip = IPv6(src=lb, dst=vip, hlim=64, tc=0, fl=0) if ":" in vip else IP(
        src=lb, dst=vip, ttl=64, id=0, flags="DF", tos=0)
    inner = bytes(rst_ip / TCP(sport=PROBE_PORT, dport=PORT, flags="R", seq=COOKIE + 1, ack=0,
                               window=0))
    h = s.flow_hash(lb, vip, PROBE_PORT, PORT, s.IPPROTO_TCP)
    assert out.data == encapsulated(inner, backend, h, df=":" not in vip, gue=gue)
    assert outcome(bal) == s.SYN_OPEN
    assert nonzero(bal.syn_probes.counters()) == {"open": 1}


def test_a_check_through_the_vip_whose_backend_left_the_vip_sends_no_rst(bal, prog):
    meta = prog.vip(VIP4, PORT, s.IPPROTO_TCP, [3] * 7)
    prog.backend(3, BACKEND4)  # vip_id 0: the entry serves no VIP (any more)
    assert meta.vip_id != 0
    bal.syn_probes.arm([SLOT], [s.Addr16.of(VIP4)], [s.port_be(PORT)], [False], [COOKIE], [3])
    out = bal.test_run(reply("SA", src=VIP4))
    assert out.verdict == XDP_DROP
    assert outcome(bal) == s.SYN_OPEN  # the port answered: recorded all the same
    assert nonzero(bal.syn_probes.counters()) == {"rst_error": 1}
