"""QUIC VIPs in the datapath, under BPF_PROG_TEST_RUN, byte-exact.

A UDP VIP flagged QUIC (structs.quic_vip_flags: server-ID length 2, rotation
codepoint 1 here) sends a packet whose destination connection ID carries a
QUIC-LB server ID to that server's backend entry (the quic_servers array),
whatever its 4-tuple and without reading or writing the connection table.
Every other packet takes the 5-tuple path exactly as on a plain UDP VIP, and
is counted by why: Initial and 0-RTT, other versions, other configurations
(rotation 0b111 among them), connection IDs shorter than a server ID, short
headers without the fixed bit, server IDs no backend of the VIP has, a
backend that is down, an entry being rewritten. Every truncation of the
header is tried.
"""

from __future__ import annotations

import ctypes as ct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, nonzero
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import XDP_TX

VIP4, VIP6 = "10.200.0.10", "fd00:200::10"
CLIENT4, CLIENT6 = "10.100.1.2", "fd00:100:1::2"
MOVED4, MOVED6 = "10.100.9.7", "fd00:100:9::7"  # the client after migrating
BACKENDS = {1: "10.100.10.2", 2: "10.100.11.2", 3: "fd00:100:12::2"}
RING = [1] * 13  # the 5-tuple path always says backend 1
SID_LEN, ROTATION = 2, 1
SERVER_IDS = {0x0B: 2, 0x0C: 3}  # server ID -> backend entry (of the v4 VIP); IDs < 64
# (the test balancer has 64 backend entries), written in SID_LEN octets
PORT = 443
V1, V2 = 0x00000001, 0x6B3343CF
NONCE = bytes.fromhex("c0ffee0123")


def cid(server_id: int, rotation: int = ROTATION, sid_len: int = SID_LEN) -> bytes:
    """A QUIC-LB plaintext connection ID: first octet (rotation, length of the
    rest), server ID, nonce."""
    rest = server_id.to_bytes(sid_len, "big") + NONCE
    return bytes([rotation << 5 | len(rest)]) + rest


def short_header(dcid: bytes, first: int = 0x41) -> bytes:
    return bytes([first]) + dcid + b"\x00\x00\x01" + b"protected payload"


def long_header(dcid: bytes, version: int = V1, packet_type: int = 2) -> bytes:
    """A long header of `packet_type` (the two type bits), DCID, an 8-octet SCID."""
    first = 0xC0 | packet_type << 4
    return (bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
            + bytes([8]) + b"clientsc" + b"\x00" + b"\x40\x20" + b"p" * 32)


def frame(payload: bytes, src: str = CLIENT4, sport: int = 50000, vip: str = VIP4,
          dport: int = PORT) -> bytes:
    ip = IPv6(src=src, dst=vip) if ":" in vip else IP(src=src, dst=vip, flags="DF")
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / ip / UDP(sport=sport, dport=dport)
                 / payload)


@pytest.fixture
def quic(bal, prog):
    for index, addr in BACKENDS.items():
        prog.backend(index, addr)
    flags = s.quic_vip_flags(SID_LEN, ROTATION)
    v4 = prog.vip(VIP4, PORT, s.IPPROTO_UDP, RING, flags=flags)
    v6 = prog.vip(VIP6, PORT, s.IPPROTO_UDP, RING, flags=flags)
    for server_id, backend in SERVER_IDS.items():
        bal.quic_servers.put(server_id, v4.vip_id, backend)
    bal.quic_servers.put(0x21, v6.vip_id, 3)
    yield v4, v6


def sent_to(bal, data: bytes, backend: int, src: str = CLIENT4, sport: int = 50000,
            vip: str = VIP4, dport: int = PORT) -> None:
    out = bal.test_run(data)
    h = s.flow_hash(src, vip, sport, dport, s.IPPROTO_UDP)
    assert out.verdict == XDP_TX
    assert out.data == encapsulated(data[14:], BACKENDS[backend], h, df=":" not in vip)


def test_a_short_header_goes_to_its_server_id_backend_exactly(bal, quic):
    data = frame(short_header(cid(0x0B)))
    sent_to(bal, data, 2)
    assert nonzero(bal.counters()) == {"tx_forwarded": 1}  # no table read, no new flow
    assert nonzero(bal.quic_counters()) == {"routed": 1}
    assert list(bal.conns.items()) == []


def test_a_migrated_client_keeps_its_backend_whatever_its_address_and_port(bal, quic):
    dcid = cid(0x0C)
    for src, sport in ((CLIENT4, 50000), (CLIENT4, 61234), (MOVED4, 50000), (MOVED4, 7)):
        sent_to(bal, frame(short_header(dcid), src=src, sport=sport), 3, src=src, sport=sport)
    assert nonzero(bal.quic_counters()) == {"routed": 4}


def test_ipv6_vip_routes_by_its_own_server_ids(bal, quic):
    data = frame(short_header(cid(0x21)), src=CLIENT6, vip=VIP6)
    sent_to(bal, data, 3, src=CLIENT6, vip=VIP6)
    # The v4 VIP's server ID is not the v6 VIP's: the 5-tuple path.
    other = frame(short_header(cid(0x0B)), src=CLIENT6, vip=VIP6)
    sent_to(bal, other, 1, src=CLIENT6, vip=VIP6)
    assert nonzero(bal.quic_counters()) == {"routed": 1, "unknown_server": 1}


@pytest.mark.parametrize(("version", "packet_type"), [(V1, 2), (V2, 3)])
def test_a_handshake_packet_goes_by_its_server_chosen_cid(bal, quic, version, packet_type):
    sent_to(bal, frame(long_header(cid(0x0B), version, packet_type)), 2)
    assert nonzero(bal.quic_counters()) == {"routed": 1}


@pytest.mark.parametrize(("version", "packet_type", "name"), [
    (V1, 0, "v1 Initial"), (V1, 1, "v1 0-RTT"), (V2, 1, "v2 Initial"), (V2, 2, "v2 0-RTT")])
def test_initial_and_0rtt_take_the_5tuple_path_and_are_recorded(bal, quic, version,
                                                                  packet_type, name):
    sent_to(bal, frame(long_header(cid(0x0B), version, packet_type)), 1)
    assert nonzero(bal.quic_counters()) == {"client_cid": 1}, name
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_miss": 1, "new_flows": 1}
    assert len(list(bal.conns.items())) == 1


@pytest.mark.parametrize(("payload", "reason"), [
    (long_header(cid(0x0B), version=0xFF00001D), "other_version"),  # a draft version
    (long_header(cid(0x0B), version=0), "other_version"),  # version negotiation
    (short_header(cid(0x0B, rotation=7)), "other_config"),  # unroutable codepoint
    (short_header(cid(0x0B, rotation=0)), "other_config"),
    (short_header(cid(0x0B), first=0x01), "not_quic"),  # no fixed bit
    (b"", "not_quic"),
    (short_header(cid(0x0D)), "unknown_server"),
    (short_header(cid(0x0000)), "unknown_server"),
    (short_header(cid(0xFFFF)), "unknown_server"),  # past the array
    (short_header(cid(0x40)), "unknown_server"),
    (long_header(cid(0x0B)[:2]), "short_cid"),  # a DCID of 2 octets: no whole server ID
    (long_header(b""), "short_cid"),
])
def test_what_is_not_routable_takes_the_5tuple_path_counted_by_reason(bal, quic, payload,
                                                                       reason):
    sent_to(bal, frame(payload), 1)
    assert nonzero(bal.quic_counters()) == {reason: 1}


def test_every_truncation_of_a_header_takes_the_5tuple_path(bal, quic):
    """Each prefix of a short and of a Handshake header that stops before the
    server ID's last octet: never routed, never dropped."""
    for whole, needed in ((short_header(cid(0x0B)), 1 + 1 + SID_LEN),
                          (long_header(cid(0x0B)), 6 + 1 + SID_LEN)):
        for cut in range(needed):
            bal.reset_counters()
            sent_to(bal, frame(whole[:cut]), 1)
            assert bal.quic_counters()["routed"] == 0, (whole[:cut].hex(), cut)
        bal.reset_counters()
        sent_to(bal, frame(whole[:needed]), 2)
        assert nonzero(bal.quic_counters()) == {"routed": 1}


def test_a_down_backend_falls_back_and_comes_back(bal, prog, quic):
    prog.backend(2, BACKENDS[2], available=False)
    sent_to(bal, frame(short_header(cid(0x0B))), 1)
    assert nonzero(bal.quic_counters()) == {"server_down": 1}
    prog.backend(2, BACKENDS[2])
    sent_to(bal, frame(short_header(cid(0x0B))), 2)


def test_an_entry_being_rewritten_is_never_used(bal, quic):
    """An odd seq (a writer between its updates) sends the packet down the 5-tuple
    path; a new table repairs the entry left so."""
    v4, _ = quic
    torn = s.QuicServer(seq=7, vip_id=v4.vip_id, backend=2)
    bal.quic_servers.array.put(ct.c_uint32(0x0B), torn)
    sent_to(bal, frame(short_header(cid(0x0B))), 1)
    assert nonzero(bal.quic_counters()) == {"busy": 1}
    from xdplb.datapath.quic import QuicServerTable

    repaired = QuicServerTable(bal.quic_servers.array, bal.sizes.max_backends)
    assert bal.quic_servers.array.get(ct.c_uint32(0x0B)).seq == 8
    assert repaired.get(0x0B) == (v4.vip_id, 2)
    sent_to(bal, frame(short_header(cid(0x0B))), 2)


@pytest.mark.parametrize("sid_len", [1, 3, 8])
def test_every_server_id_length_is_read_whole(bal, prog, sid_len):
    for index, addr in BACKENDS.items():
        prog.backend(index, addr)
    dport = 8000 + sid_len
    vip = prog.vip(VIP4, dport, s.IPPROTO_UDP, RING, flags=s.quic_vip_flags(sid_len, 6))
    bal.quic_servers.put(0x21, vip.vip_id, 2)
    dcid = cid(0x21, rotation=6, sid_len=sid_len)
    sent_to(bal, frame(short_header(dcid), dport=dport), 2, dport=dport)
    # One octet short of the server ID: not routed.
    cut = short_header(dcid)[:1 + sid_len]
    sent_to(bal, frame(cut, dport=dport), 1, dport=dport)
    assert nonzero(bal.quic_counters()) == {"routed": 1, "short_cid": 1}
    if sid_len > 1:  # a server ID whose leading octet is not zero is past the array
        high = b"\x01" + dcid[2:]
        sent_to(bal, frame(short_header(dcid[:1] + high), dport=dport), 1, dport=dport)
        assert bal.quic_counters()["unknown_server"] == 1


def test_a_plain_udp_vip_never_reads_connection_ids(bal, prog):
    for index, addr in BACKENDS.items():
        prog.backend(index, addr)
    vip = prog.vip(VIP4, PORT, s.IPPROTO_UDP, RING)
    bal.quic_servers.put(0x0B, vip.vip_id, 2)
    sent_to(bal, frame(short_header(cid(0x0B))), 1)
    assert nonzero(bal.quic_counters()) == {}


def test_the_table_refuses_server_ids_out_of_range(bal):
    for bad in (0, bal.sizes.max_backends):
        with pytest.raises(ValueError, match="server ID"):
            bal.quic_servers.put(bad, 1, 1)
