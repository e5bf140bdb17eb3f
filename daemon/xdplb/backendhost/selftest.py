"""`xdplb-backend doctor --self-test`: an encapsulated probe addressed to this
host must be decapsulated and answered.

Two halves, because a host cannot make a frame arrive on its own uplink:
1. the decapsulator attached to each interface is run (BPF_PROG_TEST_RUN, the
   live program and its maps) on a TCP SYN to each VIP, encapsulated to each
   tunnel address in every way an LB may (IPIP, 4in6, IP6IP6, and GUE when on):
   it must pass exactly the inner packet up, addresses and MACs intact;
2. that inner SYN is handed to this host's stack through a temporary tun
   device (as if from a client routed there): a SYN-ACK from VIP:port must come
   back, which proves the VIP is local and something listens. An RST then
   closes the half-open connection. The tun device and its route vanish with
   the probe.
The reverse-path and ARP settings of the real interface are the doctor's
other checks.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

from xdplb import datapath
from xdplb.backendhost import hostnet
from xdplb.backendhost.doctor import Check
from xdplb.backendhost.plan import BackendPlan, VipTarget

PROBE_CLIENT = {4: "198.51.100.7", 6: "2001:db8::7"}  # documentation addresses
PROBE_LB = {4: "192.0.2.1", 6: "2001:db8:ffff::1"}  # the outer source
PROBE_SPORT = 47_999
ANSWER_TIMEOUT_S = 2.0
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
ETH_P = {4: 0x0800, 6: 0x86DD}
PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP = 4, 41, 6, 17
SYN, RST, ACK = 0x02, 0x04, 0x10


# --- packets ----------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def ip_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    if ipaddress.ip_address(src).version == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64,
                             proto, 0, ipaddress.ip_address(src).packed,
                             ipaddress.ip_address(dst).packed)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64,
                       ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + payload


def tcp_segment(src: str, dst: str, sport: int, dport: int, flags: int, seq: int = 1,
                ack: int = 0) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    csum = _checksum(_pseudo(src, dst, PROTO_TCP, len(header)) + header)
    return header[:16] + struct.pack("!H", csum) + header[18:]


def syn(vip: VipTarget, port: int) -> bytes:
    client = PROBE_CLIENT[vip.version]
    return ip_packet(client, vip.address, PROTO_TCP,
                     tcp_segment(client, vip.address, PROBE_SPORT, port, SYN))


def encapsulations(inner: bytes, tunnel: str, gue_port: int) -> Iterator[tuple[str, bytes]]:
    """(name, outer IP packet) for every way an LB encapsulates `inner` to `tunnel`."""
    outer_v = ipaddress.ip_address(tunnel).version
    inner_v = inner[0] >> 4
    if inner_v == 6 and outer_v == 4:
        return  # an IPv6 VIP is never sent to an IPv4 address
    lb = PROBE_LB[outer_v]
    name = {(4, 4): "IPIP", (4, 6): "4in6", (6, 6): "IP6IP6"}[(inner_v, outer_v)]
    yield name, ip_packet(lb, tunnel, PROTO_IPIP if inner_v == 4 else PROTO_IPV6, inner)
    if gue_port:
        udp = struct.pack("!HHHH", 50_000, gue_port, 8 + len(inner), 0) + inner
        csum = _checksum(_pseudo(lb, tunnel, PROTO_UDP, len(udp)) + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
        yield f"GUE ({name})", ip_packet(lb, tunnel, PROTO_UDP, udp)


def ethernet(dst_mac: bytes, src_mac: bytes, packet: bytes) -> bytes:
    return dst_mac + src_mac + struct.pack("!H", ETH_P[packet[0] >> 4]) + packet


# --- half 1: the attached program -------------------------------------------------------


def _mac(ipr: object, name: str) -> bytes:
    msg = ipr.get_links(hostnet.link_index(ipr, name))[0]
    return bytes.fromhex((msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00")
                         .replace(":", ""))


def decapsulation_checks(plan: BackendPlan) -> Iterator[Check]:
    peer = bytes.fromhex("02005e000001")
    with hostnet.netlink() as ipr:
        for ifname in plan.interfaces:
            link = hostnet.link(ipr, ifname)
            if not link.xdp_prog_id:
                yield Check(f"self-test {ifname}", "fail", "no program attached to run")
                continue
            mac = _mac(ipr, ifname)
            with datapath.program_by_id(link.xdp_prog_id) as fd:
                yield from _run_probes(plan, ifname, fd, mac, peer)


def _run_probes(plan: BackendPlan, ifname: str, fd: int, mac: bytes,
                peer: bytes) -> Iterator[Check]:
    for vip in plan.vips:
        inner = syn(vip, vip.port or 80)
        for tunnel in plan.tunnel_addresses:
            for name, outer in encapsulations(inner, tunnel, plan.gue_port):
                result = datapath.prog_test_run(fd, ethernet(mac, peer, outer))
                expected = ethernet(mac, peer, inner)
                what = f"self-test {ifname}: {name} to {tunnel} for {vip}"
                if result.verdict == datapath.XDP_PASS and result.data == expected:
                    yield Check(what, "ok", "decapsulated to exactly the inner packet")
                else:
                    verdict = datapath.VERDICTS.get(result.verdict, result.verdict)
                    yield Check(what, "fail", f"{verdict}, {len(result.data)} bytes out "
                                              f"(expected PASS of {len(expected)})",
                                "xdplb-backend setup again (the program or its addresses "
                                "are not what the plan says)")


# --- half 2: the stack answers ----------------------------------------------------------


@contextmanager
def probe_tun(client: str) -> Iterator[int]:
    """A tun device (gone when its fd closes) with a route to `client` through it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        ifr = struct.pack("16sH", b"xdpbprobe%d", IFF_TUN | IFF_NO_PI)
        name = fcntl.ioctl(fd, TUNSETIFF, ifr)[:16].rstrip(b"\0").decode()
        with hostnet.netlink() as ipr:
            index = hostnet.link_index(ipr, name)
            ipr.link("set", index=index, state="up")
            if ipaddress.ip_address(client).version == 4:
                hostnet.write_sysctl(f"net.ipv4.conf.{name}.rp_filter", 0)
            ipr.route("add", dst=f"{client}/{hostnet.prefix_len(client)}", oif=index)
        yield fd
    finally:
        os.close(fd)


def answer_check(vip: VipTarget) -> Check:
    what = f"self-test answer from {vip}"
    client = PROBE_CLIENT[vip.version]
    try:
        with probe_tun(client) as fd:
            os.write(fd, syn(vip, vip.port))
            answer = _await_answer(fd, vip)
            if answer is not None and answer & SYN:  # close it: RST at the acked seq (2)
                os.write(fd, ip_packet(client, vip.address, PROTO_TCP, tcp_segment(
                    client, vip.address, PROBE_SPORT, vip.port, RST, seq=2)))
    except OSError as exc:
        return Check(what, "fail", f"the probe could not run: {exc}")
    if answer is None:
        return Check(what, "fail", f"no answer in {ANSWER_TIMEOUT_S:g} s to a SYN from "
                                   f"{client}", "see the VIP and listener checks above")
    if answer & SYN and answer & ACK:
        return Check(what, "ok", f"SYN-ACK from {vip.address}:{vip.port}")
    return Check(what, "fail", "refused (RST): nothing accepts connections on the VIP's port",
                 "start the service, bound to the VIP or to 0.0.0.0 / [::]")


def _await_answer(fd: int, vip: VipTarget) -> int | None:
    """The TCP flags of the VIP's answer to the probe, None if none came."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            return None
        packet = os.read(fd, 65535)
        segment = _tcp_from(packet, vip.address)
        if segment and struct.unpack("!HH", segment[:4]) == (vip.port, PROBE_SPORT):
            return segment[13]
    return None


def _tcp_from(packet: bytes, source: str) -> bytes | None:
    """The TCP segment of an IP packet from `source`, None for anything else."""
    version = packet[0] >> 4 if packet else 0
    if (version == 4 and len(packet) >= 40 and packet[9] == PROTO_TCP
            and str(ipaddress.IPv4Address(packet[12:16])) == source):
        return packet[(packet[0] & 0x0F) * 4:]
    if (version == 6 and len(packet) >= 60 and packet[6] == PROTO_TCP
            and str(ipaddress.IPv6Address(packet[8:24])) == source):
        return packet[40:]
    return None


def self_test(plan: BackendPlan) -> list[Check]:
    checks = list(decapsulation_checks(plan))
    for vip in plan.vips:
        if vip.protocol == "tcp" and vip.port:
            checks.append(answer_check(vip))
        else:
            checks.append(Check(f"self-test answer from {vip}", "warn",
                                "not probed: only TCP VIPs with a port are"))
    return checks
