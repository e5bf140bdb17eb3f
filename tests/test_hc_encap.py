"""The tc egress program of health checks through the tunnel
(bpf/balancer.c xdplb_hc_encap), through BPF_PROG_TEST_RUN with the skb's
mark set: a marked check packet leaves exactly as the XDP balancer would
send a client's packet of the same flow to the mark's backend; anything
unmarked is untouched; a mark naming no backend of the packet's VIP is
dropped and counted."""

from __future__ import annotations

import ctypes as ct
import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import LB_MAC, make_config, nonzero, require_root
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import HC_MARK_BASE, HealthMarks

TC_ACT_OK, TC_ACT_SHOT = 0, 2
ROUTER_MAC = "02:00:00:00:00:77"  # what the host's own routing chose; replaced by the next hop
LB4, LB6 = "10.100.0.2", "fd00:100::2"
VIP4, VIP6 = "10.200.0.10", "fd00:200::10"
BE4, BE6 = "10.100.10.2", "fd00:100:10::2"
VIP_ID = 3


def mark(index: int) -> int:
    return HealthMarks().mark(index)


def check4(dport=80, flags="S", dst=VIP4, **ip) -> bytes:
    return bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IP(src=LB4, dst=dst, flags="DF", **ip)
                 / TCP(sport=41000, dport=dport, flags=flags, window=64240))


def check6(dport=443, flags="S") -> bytes:
    return bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IPv6(src=LB6, dst=VIP6)
                 / TCP(sport=41000, dport=dport, flags=flags))


def put_backend(bal, index: int, addr: str, *, vip_id: int = VIP_ID,
                available: bool = True) -> None:
    flags = (s.BACKEND_F_AVAILABLE if available else 0) | (
        s.BACKEND_F_IPV6 if ":" in addr else 0)
    bal.backends.put(ct.c_uint32(index), s.Backend(addr=s.Addr16.of(addr), flags=flags,
                                                   vip_id=vip_id))


@pytest.fixture
def hc(prog):
    """The programmer, with the tc program's counters cleared."""
    prog.bal.hc_stats.clear(0)
    yield prog
    prog.bal.hc_stats.clear(0)


def vip(hc, addr: str, port: int, proto: int = s.IPPROTO_TCP, flags: int = 0,
        addr_flags: int = 0):
    """A VIP whose id is VIP_ID (the programmer numbers VIPs from 1)."""
    hc._next_vip = VIP_ID
    return hc.vip(addr, port, proto, [1, 1, 1], flags=flags, addr_flags=addr_flags)


def test_unmarked_packets_are_untouched(bal, hc):
    put_backend(bal, 1, BE4)
    vip(hc, VIP4, 80)
    frame = check4()
    for other in (0, 1, HC_MARK_BASE ^ 0x10000, 0xFFFFFFFF):
        out = bal.hc_test_run(frame, other)
        assert (out.verdict, out.data) == (TC_ACT_OK, frame)
    assert nonzero(bal.hc_counters()) == {}


def test_ipv4_in_ipv4_exact_frame(bal, hc):
    put_backend(bal, 5, BE4, available=False)  # a down backend is checked all the same
    vip(hc, VIP4, 80)
    frame = check4(tos=0x10)
    out = bal.hc_test_run(frame, mark(5))
    h = s.flow_hash(LB4, VIP4, 41000, 80, s.IPPROTO_TCP)
    assert out.verdict == TC_ACT_OK
    assert out.data == encapsulated(frame[14:], BE4, h, tos=0x10, df=True)
    assert nonzero(bal.hc_counters()) == {"encapsulated": 1}
    assert nonzero(bal.counters()) == {}  # the XDP balancer's counters are its own


def test_ipv6_in_ipv6_exact_frame(bal, hc):
    put_backend(bal, 6, BE6)
    vip(hc, VIP6, 443)
    frame = check6()
    out = bal.hc_test_run(frame, mark(6))
    h = s.flow_hash(LB6, VIP6, 41000, 443, s.IPPROTO_TCP)
    assert out.verdict == TC_ACT_OK
    assert out.data == encapsulated(frame[14:], BE6, h)
    assert nonzero(bal.hc_counters()) == {"encapsulated": 1}


def test_ipv4_in_ipv6_exact_frame(bal, hc):
    put_backend(bal, 7, BE6)
    vip(hc, VIP4, 80)
    frame = check4(flags="A")
    out = bal.hc_test_run(frame, mark(7))
    h = s.flow_hash(LB4, VIP4, 41000, 80, s.IPPROTO_TCP)
    assert out.verdict == TC_ACT_OK
    assert out.data == encapsulated(frame[14:], BE6, h, df=True)


@pytest.mark.parametrize("backend", [BE4, BE6])
def test_gue_exact_frame(bal, hc, backend):
    put_backend(bal, 8, backend)
    vip(hc, VIP4, 80, flags=s.VIP_F_GUE)
    frame = check4()
    out = bal.hc_test_run(frame, mark(8))
    h = s.flow_hash(LB4, VIP4, 41000, 80, s.IPPROTO_TCP)
    assert out.verdict == TC_ACT_OK
    assert out.data == encapsulated(frame[14:], backend, h, gue=True, df=True)


def test_source_hash_vip_uses_the_source_hash(bal, hc):
    put_backend(bal, 9, BE4)
    vip(hc, VIP4, 80, flags=s.VIP_F_HASH_SRC_ONLY)
    frame = check4()
    out = bal.hc_test_run(frame, mark(9))
    assert out.data == encapsulated(frame[14:], BE4, s.source_hash(LB4), df=True)


def test_portless_vip_takes_checks_on_any_port(bal, hc):
    put_backend(bal, 10, BE4)
    vip(hc, VIP4, 0, addr_flags=s.VIP_ADDR_F_PORTLESS_TCP)
    frame = check4(dport=8080)
    out = bal.hc_test_run(frame, mark(10))
    h = s.flow_hash(LB4, VIP4, 41000, 8080, s.IPPROTO_TCP)
    assert (out.verdict, out.data) == (TC_ACT_OK, encapsulated(frame[14:], BE4, h, df=True))


def test_marks_naming_no_backend_of_the_vip_are_dropped_and_counted(bal, hc):
    put_backend(bal, 11, BE4)
    put_backend(bal, 12, BE4, vip_id=VIP_ID + 1)  # a backend entry of another VIP
    put_backend(bal, 14, BE4)
    vip(hc, VIP4, 80)
    frame = check4()
    cases = [
        mark(13),                 # a free entry (all zeros)
        HC_MARK_BASE,             # index 0: reserved, "no backend"
        HC_MARK_BASE | 0xFFFF,    # beyond the backends map
        mark(12),                 # an entry of another VIP
    ]
    for m in cases:
        assert bal.hc_test_run(frame, m).verdict == TC_ACT_SHOT
    assert bal.hc_test_run(check4(dst="10.200.0.99"), mark(11)).verdict == TC_ACT_SHOT  # no VIP
    assert bal.hc_test_run(check4(dport=81), mark(11)).verdict == TC_ACT_SHOT  # other port
    assert nonzero(bal.hc_counters()) == {"drop_unknown": len(cases) + 2}
    # IPv6 inside IPv4 is never produced
    put_backend(bal, 15, BE4)
    vip(hc, VIP6, 443)
    assert bal.hc_test_run(check6(), mark(15)).verdict == TC_ACT_SHOT
    assert bal.hc_counters()["drop_unknown"] == len(cases) + 3


def test_unparsable_and_too_big_marked_packets_are_dropped(bal, hc):
    put_backend(bal, 1, BE4)
    vip(hc, VIP4, 80, proto=s.IPPROTO_TCP)
    arp = bytes(Ether(src=LB_MAC, dst=ROUTER_MAC, type=0x0806)) + bytes(28)
    assert bal.hc_test_run(arp, mark(1)).verdict == TC_ACT_SHOT
    udp = bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IP(src=LB4, dst=VIP4) / UDP(dport=80))
    assert bal.hc_test_run(udp, mark(1)).verdict == TC_ACT_SHOT  # no UDP VIP there
    big = bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IP(src=LB4, dst=VIP4)
                / TCP(dport=80, flags="PA") / bytes(1500 - 40))
    assert bal.hc_test_run(big, mark(1)).verdict == TC_ACT_SHOT  # 1500 + 20 > MTU
    bal.write_config(make_config(mtu=1520))
    assert bal.hc_test_run(big, mark(1)).verdict == TC_ACT_OK
    assert nonzero(bal.hc_counters()) == {"drop_unparsed": 1, "drop_unknown": 1,
                                          "drop_too_big": 1, "encapsulated": 1}


def test_unconfigured_datapath_drops_marked_packets(bal, hc):
    put_backend(bal, 1, BE4)
    vip(hc, VIP4, 80)
    bal.write_config(s.LbConfig())
    assert bal.hc_test_run(check4(), mark(1)).verdict == TC_ACT_SHOT
    assert nonzero(bal.hc_counters()) == {"drop_unknown": 1}


# --- a real TCP exchange through the tunnel, in a namespace lab -----------------------------


def _get_marked(host, vip: str, mark_value: int, timeout: float = 2.0) -> str:
    """An HTTP GET from `host` to vip:80 on a socket carrying `mark_value`; the body."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with host.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark_value)
        sock.settimeout(timeout)
        sock.connect((vip, 80))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1].strip()


@pytest.mark.netns
def test_real_tcp_exchanges_through_the_tunnel_reach_the_marked_backend():
    """The lb host's own marked connections to the VIP, with checksums left to the
    device as the stack leaves them on a veth, complete at the backend the mark
    names (each backend answers with its name) for IPIP, IP6IP6, 4in6 and GUE;
    the backends answer from the VIP straight to the lb host. Detaching leaves
    no qdisc behind."""
    require_root()
    from xdplb.datapath import (
        Balancer,
        MapSizes,
        detach_tc_egress,
        tc_egress_programs,
    )
    from xdplb.reconciler import DatapathSettings, Reconciler
    from xdplb.state import BackendSpec, DesiredState, HealthCheck, VipKey, VipSpec
    from xdplb_lab import lab as labmod

    with labmod.Lab(prefix="xthe") as lab:
        topo = labmod.build_lb_lab(lab, n_backends=2)
        labmod.start_http_backends(topo)
        bal = Balancer(MapSizes(max_vips=8, max_backends=32, ring_entries=8 * 101,
                                conn_entries=4096))
        try:
            reconciler = Reconciler(bal)
            cases = {  # VIP -> (encapsulation, backend addresses)
                VipKey(topo.vip_v4, 80, "tcp"): ("ipip", topo.backend_v4),
                VipKey(topo.vip_v6, 80, "tcp"): ("ipip", topo.backend_v6),
                VipKey(topo.vip_v4, 0, "tcp"): ("gue", topo.backend_v6),  # 4in6 in GUE
            }

            def state(key):
                encap, addresses = cases[key]
                return VipSpec(key, encap=encap, ring_size=101, backends={
                    a: BackendSpec(a) for a in addresses}, check=HealthCheck(port=80))

            settings = DatapathSettings(nexthop_mac=topo.lb_nexthop_mac)
            lb, ifname = topo.lb, topo.lb_iface.name
            bal.attach_health_encap(ifname, netns=lb.name)
            bal.attach_health_encap(ifname, netns=lb.name)  # again: replaced, not added
            assert tc_egress_programs(ifname, netns=lb.name) == ["xdplb_hc_encap"]
            for key in cases:
                desired = DesiredState({key: state(key)})
                reconciler.reconcile(desired, None, settings)
                for i, address in enumerate(cases[key][1]):
                    mark_value = mark(reconciler.member_index(key, address))
                    assert _get_marked(lb, key.address, mark_value) == f"backend{i}", key
            # 4in6 without GUE, IPv4 in IPv4 with GUE
            for key, encap, addresses in ((VipKey(topo.vip_v4, 80, "tcp"), "ipip",
                                           topo.backend_v6),
                                          (VipKey(topo.vip_v4, 80, "tcp"), "gue",
                                           topo.backend_v4)):
                cases[key] = (encap, addresses)
                reconciler.reconcile(DesiredState({key: state(key)}), None, settings)
                for i, address in enumerate(addresses):
                    mark_value = mark(reconciler.member_index(key, address))
                    assert _get_marked(lb, key.address, mark_value) == f"backend{i}", key
            counters = bal.hc_counters()
            assert counters["encapsulated"] > 0
            assert nonzero(counters).keys() == {"encapsulated"}
            # Unmarked, the lb host's connection leaves as it is: the router sends it
            # back to the VIP's announcer, this lb, whose XDP program balances it.
            bal.attach(ifname, netns=lb.name)
            forwarded = bal.counters()["tx_forwarded"]
            assert _get_marked(lb, topo.vip_v4, 0) in ("backend0", "backend1")
            assert bal.counters()["tx_forwarded"] > forwarded
            assert bal.hc_counters() == counters
            # a mark of no backend: the connection fails, nothing reaches anyone
            with pytest.raises(OSError):
                _get_marked(lb, topo.vip_v4, mark(31), timeout=0.5)
            assert bal.hc_counters()["drop_unknown"] > 0
        finally:
            detach_tc_egress(topo.lb_iface.name, netns=topo.lb.name)
            qdiscs = topo.lb.run(["tc", "qdisc", "show", "dev", topo.lb_iface.name]).stdout
            bal.close()
        assert "clsact" not in qdiscs
