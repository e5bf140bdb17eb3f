"""The balancer's behaviours, each with scapy-built frames through
BPF_PROG_TEST_RUN, asserting the exact bytes that come out and the counters."""

from __future__ import annotations

import ctypes as ct
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from tests.conftest import CLIENT_MAC, LB_MAC, make_config, nonzero
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import XDP_DROP, XDP_PASS, XDP_TX

VIP4, VIP6 = "10.200.0.10", "fd00:200::10"
CLIENT4, CLIENT6 = "10.100.1.2", "fd00:100:1::2"
BE4 = ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
BE6 = ["fd00:100:10::2", "fd00:100:11::2", "fd00:100:12::2"]
RING = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]  # 13 slots, a prime


def eth() -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def tcp4(sport=40000, dport=80, flags="S", dst=VIP4, src=CLIENT4, **ip) -> Ether:
    return eth() / IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=flags)


def tcp6(sport=40000, dport=443, flags="S", dst=VIP6, src=CLIENT6) -> Ether:
    return eth() / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)


def l3(frame: Ether) -> bytes:
    return bytes(frame)[14:]


@pytest.fixture
def v4(prog):
    for i, addr in enumerate(BE4, start=1):
        prog.backend(i, addr)
    return prog.vip(VIP4, 80, s.IPPROTO_TCP, RING)


@pytest.fixture
def v6(prog):
    for i, addr in enumerate(BE6, start=4):
        prog.backend(i, addr)
    return prog.vip(VIP6, 443, s.IPPROTO_TCP, [4, 5, 6, 4, 5, 6, 4, 5, 6, 4, 5])


def test_ipv4_in_ipv4_exact_frame(bal, prog, v4):
    frame = tcp4()
    out = bal.test_run(bytes(frame))
    backend = prog.backend_addrs[v4.backend_for(CLIENT4, 40000)]
    h = s.flow_hash(CLIENT4, VIP4, 40000, 80, s.IPPROTO_TCP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(l3(frame), backend, h)
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "new_flows": 1}


def test_ipv6_in_ipv6_exact_frame(bal, prog, v6):
    frame = tcp6()
    out = bal.test_run(bytes(frame))
    backend = prog.backend_addrs[v6.backend_for(CLIENT6, 40000)]
    h = s.flow_hash(CLIENT6, VIP6, 40000, 443, s.IPPROTO_TCP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(l3(frame), backend, h)


def test_ipv4_in_ipv6_exact_frame(bal, prog):
    prog.backend(7, BE6[0])
    prog.vip(VIP4, 80, s.IPPROTO_TCP, [7, 7, 7])
    frame = tcp4(tos=0xB8)
    out = bal.test_run(bytes(frame))
    h = s.flow_hash(CLIENT4, VIP4, 40000, 80, s.IPPROTO_TCP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(l3(frame), BE6[0], h, tos=0xB8)


@pytest.mark.parametrize("backend", [BE4[0], BE6[0]])
def test_gue_encapsulation_exact_frame(bal, prog, backend):
    prog.backend(1, backend)
    prog.vip(VIP4, 53, s.IPPROTO_UDP, [1, 1, 1], flags=s.VIP_F_GUE)
    frame = eth() / IP(src=CLIENT4, dst=VIP4, flags="DF") / UDP(sport=5353, dport=53) / b"q"
    out = bal.test_run(bytes(frame))
    h = s.flow_hash(CLIENT4, VIP4, 5353, 53, s.IPPROTO_UDP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(l3(frame), backend, h, gue=True, df=True)


def test_vlan_tag_is_kept_on_the_encapsulated_frame(bal, prog, v4):
    frame = Ether(src=CLIENT_MAC, dst=LB_MAC) / Dot1Q(vlan=42) / IP(src=CLIENT4, dst=VIP4) / TCP(
        sport=40000, dport=80, flags="S")
    out = bal.test_run(bytes(frame))
    backend = prog.backend_addrs[v4.backend_for(CLIENT4, 40000)]
    h = s.flow_hash(CLIENT4, VIP4, 40000, 80, s.IPPROTO_TCP)
    assert out.data == encapsulated(bytes(frame)[18:], backend, h, vlan=42)


def test_ipv4_options_are_parsed_and_kept(bal, prog, v4):
    frame = eth() / IP(src=CLIENT4, dst=VIP4, options=b"\x01\x01\x01\x00") / TCP(
        sport=40001, dport=80, flags="S")
    assert bytes(frame)[14] == 0x46  # IHL 6
    out = bal.test_run(bytes(frame))
    backend = prog.backend_addrs[v4.backend_for(CLIENT4, 40001)]
    h = s.flow_hash(CLIENT4, VIP4, 40001, 80, s.IPPROTO_TCP)
    assert out.data == encapsulated(l3(frame), backend, h)


def test_flow_hash_matches_python_for_many_flows(bal, prog):
    """The whole 32-bit hash shows in the outer source with an all-ones mask."""
    bal.write_config(make_config(hostmask4="255.255.255.255"))
    prog.backend(1, BE4[0])
    prog.vip(VIP4, 0, s.IPPROTO_UDP, [1, 1, 1], addr_flags=s.VIP_ADDR_F_PORTLESS_UDP)
    for n in range(200):
        sport, dport = 1024 + n * 37, 1 + n * 311
        frame = eth() / IP(src=f"192.0.2.{n}", dst=VIP4) / UDP(sport=sport, dport=dport)
        out = bal.test_run(bytes(frame))
        h = s.flow_hash(f"192.0.2.{n}", VIP4, sport, dport, s.IPPROTO_UDP)
        assert out.data[26:30] == h.to_bytes(4, "little")  # outer source = the hash


def test_non_vip_traffic_passes_untouched(bal, prog, v4):
    frames = [
        tcp4(dst="10.100.2.2", dport=22),    # the LB host's own SSH
        tcp4(dport=81),                      # the VIP address, a port with no VIP
        eth() / IP(src=CLIENT4, dst=VIP4) / UDP(sport=1, dport=80),  # other protocol
        Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(b"\0" * 28),
    ]
    for frame in frames:
        out = bal.test_run(bytes(frame))
        assert (out.verdict, out.data) == (XDP_PASS, bytes(frame))
    assert nonzero(bal.counters()) == {"pass_not_vip": 3, "pass_unparsed": 1}


def test_portless_vip_is_the_fallback(bal, prog):
    for i, addr in enumerate(BE4, start=1):
        prog.backend(i, addr)
    exact = prog.vip(VIP4, 80, s.IPPROTO_TCP, [1, 1, 1])
    prog.vip(VIP4, 0, s.IPPROTO_TCP, [2, 2, 2], addr_flags=s.VIP_ADDR_F_PORTLESS_TCP)
    out80 = Ether(bal.test_run(bytes(tcp4(dport=80))).data)
    out8080 = Ether(bal.test_run(bytes(tcp4(dport=8080))).data)
    assert out80[IP].dst == BE4[0]
    assert out8080[IP].dst == BE4[1]
    assert bal.vip_stats.read(exact.vip_id)["packets"] == 1


def test_established_flow_keeps_its_backend_when_the_ring_changes(bal, prog, v4):
    first = prog.backend_addrs[v4.backend_for(CLIENT4, 40000)]
    assert bal.test_run(bytes(tcp4(flags="S"))).verdict == XDP_TX
    other = next(i for i in (1, 2, 3) if prog.backend_addrs[i] != first)
    prog.set_ring(v4, [other] * len(RING))
    out = bal.test_run(bytes(tcp4(flags="A")))
    assert Ether(out.data)[IP].dst == first
    assert bal.counters()["conn_hit"] == 1
    # A new connection (SYN) follows the new ring.
    out = bal.test_run(bytes(tcp4(sport=40001, flags="S")))
    assert Ether(out.data)[IP].dst == prog.backend_addrs[other]


def test_flow_of_unavailable_backend_is_rechosen_and_rerecorded(bal, prog, v4):
    first_idx = v4.backend_for(CLIENT4, 40000)
    bal.test_run(bytes(tcp4(flags="S")))
    other = next(i for i in (1, 2, 3) if i != first_idx)
    prog.set_ring(v4, [other] * len(RING))
    prog.backend(first_idx, prog.backend_addrs[first_idx], available=False)
    out = bal.test_run(bytes(tcp4(flags="A")))
    assert Ether(out.data)[IP].dst == prog.backend_addrs[other]
    key = s.FlowKey(src=s.Addr16.of(CLIENT4), sport=s.port_be(40000), dport=s.port_be(80),
                    vip_id=v4.vip_id)
    assert bal.conns.get(key).backend == other
    counters = nonzero(bal.counters())
    assert counters == {"tx_forwarded": 2, "new_flows": 1, "conn_rechosen": 1}


def test_midflow_packet_without_entry_takes_the_ring_and_is_recorded(bal, prog, v4):
    out = bal.test_run(bytes(tcp4(flags="PA")))
    assert Ether(out.data)[IP].dst == prog.backend_addrs[v4.backend_for(CLIENT4, 40000)]
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_miss": 1, "new_flows": 1}
    assert len(list(bal.conns.keys())) == 1


def test_source_affinity_sends_all_flows_of_a_client_to_one_backend(bal, prog):
    for i, addr in enumerate(BE4, start=1):
        prog.backend(i, addr)
    vip = prog.vip(VIP4, 80, s.IPPROTO_TCP, RING, flags=s.VIP_F_HASH_SRC_ONLY)
    chosen = {Ether(bal.test_run(bytes(tcp4(sport=p))).data)[IP].dst for p in range(1000, 1040)}
    assert chosen == {prog.backend_addrs[vip.backend_for(CLIENT4, 0)]}


def test_empty_ring_drops_and_counts(bal, prog):
    prog.vip(VIP4, 80, s.IPPROTO_TCP, [0, 0, 0])
    out = bal.test_run(bytes(tcp4()))
    assert out.verdict == XDP_DROP
    assert nonzero(bal.counters()) == {"drop_no_backend": 1}


def test_unconfigured_lb_passes_vip_traffic(bal, prog, v4):
    bal.write_config(s.LbConfig())
    out = bal.test_run(bytes(tcp4()))
    assert (out.verdict, out.data) == (XDP_PASS, bytes(tcp4()))
    assert nonzero(bal.counters()) == {"pass_unconfigured": 1}


def test_ipv4_echo_request_to_vip_is_answered(bal, prog, v4):
    request = eth() / IP(src=CLIENT4, dst=VIP4, ttl=7, id=9) / ICMP(id=5, seq=3) / b"ping"
    out = bal.test_run(bytes(request))
    expected = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=VIP4, dst=CLIENT4, ttl=64, id=9) / ICMP(
        type=0, id=5, seq=3) / b"ping"
    assert (out.verdict, out.data) == (XDP_TX, bytes(expected))
    assert nonzero(bal.counters()) == {"tx_icmp_echo_reply": 1}


def test_ipv4_echo_request_with_options_is_answered(bal, prog, v4):
    request = eth() / IP(src=CLIENT4, dst=VIP4, ttl=7, id=9, options=b"\x01\x01\x01\x00") / (
        ICMP(id=5, seq=3) / b"ping")
    out = bal.test_run(bytes(request))
    expected = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(
        src=VIP4, dst=CLIENT4, ttl=64, id=9, options=b"\x01\x01\x01\x00") / ICMP(
        type=0, id=5, seq=3) / b"ping"
    assert (out.verdict, out.data) == (XDP_TX, bytes(expected))


@pytest.mark.parametrize("options", [b"", b"\x01\x01\x01\x00"])
def test_an_echo_request_with_a_wrong_header_checksum_is_not_answered(bal, prog, v4, options):
    """Found by the packet fuzzer: the reply kept the request's wrong checksum."""
    request = bytearray(bytes(eth() / IP(src=CLIENT4, dst=VIP4, options=options) / ICMP()))
    request[14 + 10] ^= 0x40  # the IPv4 header checksum
    out = bal.test_run(bytes(request))
    assert out.verdict == XDP_DROP
    assert nonzero(bal.counters()) == {"drop_malformed": 1}


def test_ipv6_echo_request_to_vip_is_answered(bal, prog, v6):
    request = eth() / IPv6(src=CLIENT6, dst=VIP6, hlim=9) / ICMPv6EchoRequest(id=5, seq=3,
                                                                            data=b"ping")
    out = bal.test_run(bytes(request))
    expected = Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64) / (
        ICMPv6EchoReply(id=5, seq=3, data=b"ping"))
    assert (out.verdict, out.data) == (XDP_TX, bytes(expected))


def test_icmp_error_goes_to_the_backend_that_owns_the_flow(bal, prog, v4):
    owner = v4.backend_for(CLIENT4, 40000)
    bal.test_run(bytes(tcp4(flags="S")))
    prog.set_ring(v4, [next(i for i in (1, 2, 3) if i != owner)] * len(RING))
    # A router between the backend and the client could not forward the
    # backend's reply (VIP -> client) and says so to the VIP.
    quoted = IPerror(src=VIP4, dst=CLIENT4) / TCPerror(sport=80, dport=40000, flags="SA")
    error = eth() / IP(src="10.100.1.1", dst=VIP4, flags="DF") / ICMP(
        type=3, code=4, nexthopmtu=1400) / quoted
    out = bal.test_run(bytes(error))
    h = s.flow_hash(CLIENT4, VIP4, 40000, 80, s.IPPROTO_TCP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(l3(error), prog.backend_addrs[owner], h, df=True)
    assert bal.counters()["tx_icmp_error_forwarded"] == 1


def test_icmpv6_error_without_a_recorded_flow_follows_the_ring(bal, prog, v6):
    quoted = IPerror6(src=VIP6, dst=CLIENT6) / TCPerror(sport=443, dport=40000)
    error = eth() / IPv6(src="fd00:100:1::1", dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / quoted
    out = bal.test_run(bytes(error))
    backend = prog.backend_addrs[v6.backend_for(CLIENT6, 40000)]
    h = s.flow_hash(CLIENT6, VIP6, 40000, 443, s.IPPROTO_TCP)
    assert out.data == encapsulated(l3(error), backend, h)
    assert list(bal.conns.keys()) == []  # errors record nothing


def _big_tcp4(df: bool) -> Ether:
    return eth() / IP(src=CLIENT4, dst=VIP4, flags="DF" if df else 0) / TCP(
        sport=40000, dport=80, flags="A") / (b"x" * (1500 - 40))


def test_too_big_ipv4_with_df_gets_fragmentation_needed(bal, prog, v4):
    frame = _big_tcp4(df=True)
    out = bal.test_run(bytes(frame))
    quote = l3(frame)[:128]
    expected = Ether(src=LB_MAC, dst=CLIENT_MAC) / IP(src=VIP4, dst=CLIENT4, ttl=64, id=0) / ICMP(
        type=3, code=4, nexthopmtu=1500 - 20) / Raw(quote)
    assert (out.verdict, out.data) == (XDP_TX, bytes(expected))
    assert nonzero(bal.counters()) == {"tx_icmp_too_big": 1, "conn_miss": 1, "new_flows": 1}


def test_too_big_ipv4_without_df_is_dropped_and_counted(bal, prog, v4):
    assert bal.test_run(bytes(_big_tcp4(df=False))).verdict == XDP_DROP
    assert bal.counters()["drop_too_big"] == 1


def test_too_big_ipv6_gets_packet_too_big(bal, prog, v6):
    frame = eth() / IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=443, flags="A") / (
        b"y" * (1500 - 60))
    out = bal.test_run(bytes(frame))
    expected = Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src=VIP6, dst=CLIENT6, hlim=64) / (
        ICMPv6PacketTooBig(mtu=1500 - 40)) / Raw(l3(frame)[:256])
    assert (out.verdict, out.data) == (XDP_TX, bytes(expected))


def test_largest_packet_that_fits_is_forwarded(bal, prog, v4):
    frame = eth() / IP(src=CLIENT4, dst=VIP4, flags="DF") / TCP(
        sport=40000, dport=80, flags="A") / (b"x" * (1500 - 20 - 40))
    assert bal.test_run(bytes(frame)).verdict == XDP_TX


@pytest.mark.parametrize("frame", [
    eth() / IP(src=CLIENT4, dst=VIP4, flags="MF") / TCP(sport=1, dport=80),
    eth() / IP(src=CLIENT4, dst=VIP4, frag=100) / Raw(b"z" * 16),
    eth() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(m=1) / TCP(sport=1, dport=443),
], ids=["v4-first-fragment", "v4-later-fragment", "v6-fragment"])
def test_fragments_to_a_vip_are_dropped_and_counted(bal, prog, v4, v6, frame):
    assert bal.test_run(bytes(frame)).verdict == XDP_DROP
    assert nonzero(bal.counters()) == {"drop_fragment": 1}


def test_new_flow_flood_does_not_evict_the_table(bal, prog, v4):
    """The limit counts per CPU and per second: the SYNs run on one CPU (a process
    the scheduler moved between runs once had 6 recorded, 5 on one CPU and 1 on the
    other), in a window of their own (the per-CPU state cleared first)."""
    bal.write_config(make_config(max_new_flows=5))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        bal._per_cpu("flood").clear(0)  # the first SYN opens a new window
        verdicts = [bal.test_run(bytes(tcp4(sport=2000 + i))).verdict for i in range(8)]
    finally:
        os.sched_setaffinity(0, allowed)
    assert verdicts == [XDP_TX] * 8  # still forwarded by the ring
    assert len(list(bal.conns.keys())) == 5
    counters = bal.counters()
    assert (counters["new_flows"], counters["new_flows_unrecorded"]) == (8, 3)


def test_per_vip_and_per_backend_counters(bal, prog, v4):
    frames = [tcp4(sport=3000 + i) for i in range(6)]
    per_backend: dict[int, list[int]] = {}
    for frame in frames:
        bal.test_run(bytes(frame))
        per_backend.setdefault(v4.backend_for(CLIENT4, frame[TCP].sport), []).append(len(frame))
    assert bal.vip_stats.read(v4.vip_id) == {
        "packets": 6, "bytes": sum(len(f) for f in frames)}
    for index in (1, 2, 3):
        sizes = per_backend.get(index, [])
        assert bal.backend_stats.read(index) == {"packets": len(sizes), "bytes": sum(sizes)}


def test_backend_table_rejects_index_beyond_capacity(bal):
    from xdplb.datapath import DatapathError

    with pytest.raises(DatapathError, match="update of backends"):
        bal.backends.put(ct.c_uint32(bal.sizes.max_backends), s.Backend())
    with pytest.raises(DatapathError, match="beyond ring_entries"):
        bal.write_ring([bal.sizes.ring_entries], [1])


def test_address_filter_false_positive_is_passed_not_dropped(bal, prog, v4):
    """A non-VIP address whose filter bit happens to be set must still be
    treated as the host's own traffic, fragments and all."""
    other = "10.100.2.2"
    bal.write_addr_filter([VIP4, other])
    frames = [tcp4(dst=other, dport=80), eth() / IP(src=CLIENT4, dst=other, flags="MF") / TCP()]
    for frame in frames:
        out = bal.test_run(bytes(frame))
        assert (out.verdict, out.data) == (XDP_PASS, bytes(frame))
    assert nonzero(bal.counters()) == {"pass_not_vip": 2}


def test_flow_records_the_control_plane_clock(bal, prog, v4):
    cfg = make_config()
    cfg.now_s = 1000
    bal.write_config(cfg)
    bal.test_run(bytes(tcp4(flags="S")))
    cfg.now_s = 1007
    bal.write_config(cfg)
    bal.test_run(bytes(tcp4(flags="A")))
    [(_, state)] = list(bal.conns.items())
    assert state.last_seen_s == 1007
