"""The balancer in a real topology: native XDP on an LB namespace's veth,
scapy frames from a client namespace arriving encapsulated at the predicted
backend, then real TCP through the VIP answered directly by the backends."""

from __future__ import annotations

import ctypes as ct
import select
import socket
import time
import uuid
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import Programmer, make_config, require_root
from xdplb import structs as s

pytestmark = pytest.mark.netns

ETH_P_ALL = 0x0003
N_BACKENDS = 3
RING = [1, 2, 3] * 33 + [1, 2]  # 101 slots, a prime


@pytest.fixture(scope="module")
def lab():
    require_root()
    from xdplb.datapath import Balancer, MapSizes
    from xdplb_lab import lab as labmod

    pin_dir = Path("/sys/fs/bpf/xdplb") / f"test-{uuid.uuid4().hex[:10]}"
    with labmod.Lab(prefix="xlt") as lab_:
        topo = labmod.build_lb_lab(lab_, n_backends=N_BACKENDS)
        sizes = MapSizes(max_vips=8, max_backends=16, ring_entries=8 * 101, conn_entries=4096)
        bal = Balancer(sizes, pin_dir=pin_dir)
        try:
            cfg = make_config()
            cfg.nexthop_mac[:] = [int(x, 16) for x in topo.lb_nexthop_mac.split(":")]
            bal.write_config(cfg)
            prog = Programmer(bal)
            for i in range(N_BACKENDS):
                prog.backend(i + 1, topo.backend_v4[i] if i % 2 == 0 else topo.backend_v6[i])
            vip4_udp = prog.vip(topo.vip_v4, 53, s.IPPROTO_UDP, RING)
            vip4 = prog.vip(topo.vip_v4, 80, s.IPPROTO_TCP, RING)
            for i in range(N_BACKENDS):  # the IPv6 VIP is served by IPv6 backends only
                prog.backend(10 + i, topo.backend_v6[i])
            vip6 = prog.vip(topo.vip_v6, 80, s.IPPROTO_TCP, [10, 11, 12] * 33 + [10, 11])
            bal.attach(topo.lb_iface.name, netns=topo.lb.name)
            yield topo, bal, prog, {"udp4": vip4_udp, "tcp4": vip4, "tcp6": vip6}
        finally:
            bal.close()
            bal.unpin()


def test_program_is_attached_natively(lab):
    from xdplb.datapath import attached_prog_id

    topo, *_ = lab
    assert attached_prog_id(topo.lb_iface.name, netns=topo.lb.name) > 0
    out = topo.lb.run(["ip", "-d", "link", "show", topo.lb_iface.name]).stdout
    assert "xdp " in out or "prog/xdp" in out
    assert "xdpgeneric" not in out


def _sniffers(topo):
    socks = []
    for host in topo.backends:
        sock = host.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("eth0", 0))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _drain(socks, want: int, timeout: float = 5.0) -> list[list[bytes]]:
    """Frames received per backend until `want` tunnel frames arrived (bounded)."""
    got: list[list[bytes]] = [[] for _ in socks]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < want and time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.2)
        for sock in ready:
            frame = sock.recv(4096)
            if _is_tunnel(frame):
                got[socks.index(sock)].append(frame)
    return got


def _is_tunnel(frame: bytes) -> bool:
    pkt = Ether(frame)
    return (IP in pkt and pkt[IP].proto == 4) or (IPv6 in pkt and pkt[IPv6].nh == 4)


def test_scapy_flows_arrive_encapsulated_at_the_predicted_backend(lab):
    topo, _, prog, vips = lab
    vip = vips["udp4"]
    sniffers = _sniffers(topo)
    sender = topo.client.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sender.bind(("eth0", 0))
    client_mac, router_mac = topo.client_if.mac, topo.router_client_if.mac
    flows = [(topo.client_if.ipv4, 20000 + i) for i in range(60)]
    inner_by_port = {}
    try:
        for src, sport in flows:
            inner = IP(src=src, dst=topo.vip_v4, ttl=64) / UDP(sport=sport, dport=53) / b"q"
            inner_by_port[sport] = inner
            sender.send(bytes(Ether(src=client_mac, dst=router_mac) / inner))
        received = _drain(sniffers, want=len(flows))
    finally:
        sender.close()
        for sock in sniffers:
            sock.close()

    expected = [0] * N_BACKENDS
    for src, sport in flows:
        expected[vip.backend_for(src, sport) - 1] += 1
    assert [len(frames) for frames in received] == expected
    for i, frames in enumerate(received):
        for frame in frames:
            pkt = Ether(frame)
            outer = pkt[IP] if pkt.type == 0x0800 else pkt[IPv6]
            inner = IP(bytes(outer.payload))
            sent = inner_by_port[inner[UDP].sport]
            assert prog.backend_addrs[vip.backend_for(sent.src, sent[UDP].sport)] == outer.dst
            # The router decremented the outer TTL; the inner packet is intact
            # except for the TTL the router forwarding the client's frame took.
            sent_at_lb = IP(bytes(sent))
            sent_at_lb.ttl -= 1
            del sent_at_lb.chksum
            assert bytes(inner) == bytes(IP(bytes(sent_at_lb)))
            assert (outer.ttl if pkt.type == 0x0800 else outer.hlim) == 63
            assert outer.dst in (topo.backend_v4[i], topo.backend_v6[i])


@pytest.fixture(scope="module")
def servers(lab):
    from xdplb_lab.lab import start_http_backends

    topo, *_ = lab
    decaps = start_http_backends(topo)
    yield decaps
    for decap in decaps:
        decap.close()


def _http(topo, family: int, vip: str, sport: int, body: bytes = b"") -> str:
    src = topo.client_if.ipv4 if family == socket.AF_INET else topo.client_if.ipv6
    sock = topo.client.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
        sock.connect((vip, 80))
        method = "POST" if body else "GET"
        head = f"{method} / HTTP/1.1\r\nHost: vip\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks).decode().split("\r\n\r\n", 1)[1].strip()
    finally:
        sock.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_real_tcp_through_the_vip_is_answered_by_the_predicted_backend(lab, servers, family):
    topo, _, prog, vips = lab
    vip = vips["tcp4" if family == socket.AF_INET else "tcp6"]
    src = topo.client_if.ipv4 if family == socket.AF_INET else topo.client_if.ipv6
    base = 31000 if family == socket.AF_INET else 32000
    for sport in range(base, base + 12):
        answer = _http(topo, family, vip.addr, sport)
        index = vip.backend_for(src, sport)
        backend = prog.backend_addrs[index]
        position = (topo.backend_v4 + topo.backend_v6).index(backend) % N_BACKENDS
        assert answer == f"backend{position}"


def test_large_upload_finds_the_path_mtu_through_the_balancer(lab, servers):
    """A 20 kB POST: full-size segments are too big once encapsulated, the
    balancer answers with fragmentation-needed, the client's stack lowers its
    MSS and the upload completes."""
    topo, bal, *_ = lab
    before = bal.counters()["tx_icmp_too_big"]
    answer = _http(topo, socket.AF_INET, topo.vip_v4, 33000, body=b"x" * 20000)
    assert answer.endswith(" 20000")
    assert bal.counters()["tx_icmp_too_big"] > before


def test_ping_of_the_vip_is_answered_by_the_lb(lab):
    topo, bal, *_ = lab
    before = bal.counters()["tx_icmp_echo_reply"]
    topo.client.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", topo.vip_v4])
    topo.client.run(["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", topo.vip_v6])
    assert bal.counters()["tx_icmp_echo_reply"] == before + 4


def test_pinned_maps_are_reused_by_a_new_balancer(lab):
    """A restarted daemon builds a new Balancer on the same pin directory: it
    must see the same VIPs and recorded flows, and the counters keep going."""
    from xdplb.datapath import Balancer

    _, bal, *_ = lab
    again = Balancer(bal.sizes, pin_dir=bal.pin_dir)
    try:
        assert set(map(bytes, again.vips.keys())) == set(map(bytes, bal.vips.keys()))
        assert len(list(again.conns.keys())) == len(list(bal.conns.keys())) > 0
        assert again.counters() == bal.counters()
        again.backends.put(ct.c_uint32(15), s.Backend(flags=s.BACKEND_F_AVAILABLE))
        assert bal.backends.get(ct.c_uint32(15)).flags == s.BACKEND_F_AVAILABLE
    finally:
        again.backends.put(ct.c_uint32(15), s.Backend())
        again.close()
