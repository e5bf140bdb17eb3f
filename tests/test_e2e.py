"""End-to-end tests on one lab: the real lbd, configured with the real lbctl,
forwarding scapy flows and real TCP from the client to three DSR backends.

Every choice the balancer makes is predicted exactly: the ring is
`maglev.build_ring` of the VIP's backends (what lbd realises), and a flow's
slot is `structs.ring_slot(structs.flow_hash(...))`. So the tests assert per
flow, not just on totals:

* thousands of scapy flows (TCP, UDP, IPv4, IPv6, a port-less VIP) each reach
  exactly the predicted backend with every packet, and the split over the
  backends passes a chi-square test against the ring's shares;
* real HTTP through the VIPs is answered by the predicted backend, directly
  (DSR): the LB counts exactly the client's packets and sees none of the replies;
* while long-lived connections carry requests, a backend is added, one drained,
  one reweighted and one fails: established connections keep their backend,
  whether their ring slot is settled (their packets skip the flow table) or
  changed (the table keeps them), and new connections move exactly as
  `maglev.diff_positions` says.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import require_root
from tests.lbd_helpers import apply_doc, empty_for_each_test, ok
from xdplb import maglev
from xdplb import structs as s
from xdplb.datapath import MapSizes
from xdplb.reconciler import read_view

pytestmark = pytest.mark.netns

RING_SIZE = maglev.DEFAULT_SIZE
SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=6 * RING_SIZE, conn_entries=65536)
TRAFFIC_PORT = 8080  # test 3's own servers: failing one leaves the port-80 servers alone
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
CONVERGE_TIMEOUT_S = 15.0  # lbd realising a change (a tcp check needs a probe or two)


# --- the lab: one per module ----------------------------------------------------------


@dataclass
class E2eLab:
    topo: Any  # xdplb_lab.lab.LbLab
    lbd: Any  # xdplb_lab.daemon.LabLbd
    traffic_servers: list[subprocess.Popen[Any]]  # backend i's server on TRAFFIC_PORT


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    require_root()
    from xdplb_lab import lab as labmod
    from xdplb_lab.daemon import LabLbd

    with labmod.Lab(prefix="xte2e") as lab:
        decaps: list[Any] = []
        lbd = None
        try:
            topo = labmod.build_lb_lab(lab, n_backends=3)
            decaps = labmod.start_http_backends(topo)
            servers = [start_traffic_server(host, i) for i, host in enumerate(topo.backends)]
            for host in topo.backends:
                labmod.wait_port(host, TRAFFIC_PORT, ip="::1")
            # Sweeps every second, so the changes under traffic meet settled slots.
            lbd = LabLbd(topo, tmp_path_factory.mktemp("lbd"), sizes=SIZES,
                         config_extra="[flows]\nsettle_interval_s = 1\n")
            lbd.start()
            yield E2eLab(topo, lbd, servers)
        finally:
            if lbd is not None:
                lbd.close()
            for decap in decaps:
                with contextlib.suppress(Exception):
                    decap.close()


def start_traffic_server(host, i: int) -> subprocess.Popen[Any]:
    """Backend i's HTTP server on TRAFFIC_PORT (the lab kills it on close)."""
    return host.popen([sys.executable, "-m", "xdplb_lab.backend_server", "--name", f"backend{i}",
                       "--port", str(TRAFFIC_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def lbd(e2e):
    """lbd running with an empty state before each test, and left empty after it."""
    yield from empty_for_each_test(e2e.lbd)


# --- lbctl and the maps ---------------------------------------------------------------




def maps_view(lbd) -> dict[str, Any]:
    maps = lbd.maps()
    try:
        return read_view(maps)
    finally:
        maps.close()


def vip_rings(lbd) -> dict[str, list[str | None]]:
    return {name: vip["ring"] for name, vip in maps_view(lbd)["vips"].items()}


def expect_rings(lbd, wanted: dict[str, dict[str, int]],
                 timeout: float = CONVERGE_TIMEOUT_S) -> dict[str, maglev.Ring]:
    """Waits (bounded) until each named VIP's ring in lbd's maps is exactly
    `maglev.build_ring(weights)`; returns those rings for predictions."""
    rings = {name: maglev.build_ring(weights, RING_SIZE) for name, weights in wanted.items()}
    owners = {name: ring.owners() for name, ring in rings.items()}
    deadline = time.monotonic() + timeout
    while True:
        realised = vip_rings(lbd)
        if all(realised.get(name) == want for name, want in owners.items()):
            return rings
        if time.monotonic() > deadline:
            wrong = sorted(n for n, want in owners.items() if realised.get(n) != want)
            shares = {n: dict(Counter(realised.get(n) or [])) for n in wrong}
            pytest.fail(f"rings of {wrong} never became build_ring({wanted}) in {timeout} s; "
                        f"maps hold shares {shares}\n{lbd.log_tail()}")
        time.sleep(0.1)


def traffic_stats(lbd) -> dict[tuple[str, str], tuple[int, int]]:
    """(packets, bytes) per (VIP, backend) from `lbctl stats`; backend "" is the VIP's total."""
    doc = json.loads(ok(lbd, "stats", "-o", "json"))
    return {(t["vip"], t.get("backend", "")): (int(t.get("packets", 0)), int(t.get("bytes", 0)))
            for t in doc.get("traffic", [])}


def datapath_events(lbd) -> dict[str, int]:
    doc = json.loads(ok(lbd, "stats", "-o", "json"))
    return {c["name"]: int(c.get("value", 0)) for c in doc.get("counters", [])}


def unsettled_positions(lbd, vip: str) -> int:
    return int(json.loads(ok(lbd, "vip", "show", vip, "-o", "json"))["status"]
               .get("unsettled_positions", 0))


def wait_settled(lbd, vip: str, timeout: float = CONVERGE_TIMEOUT_S) -> None:
    """Until a sweep has settled every slot of the VIP (none is held by a flow)."""
    deadline = time.monotonic() + timeout
    while unsettled_positions(lbd, vip):
        if time.monotonic() > deadline:
            pytest.fail(f"{vip}: {unsettled_positions(lbd, vip)} ring positions still "
                        f"unsettled after {timeout} s\n{lbd.log_tail()}")
        time.sleep(0.2)


def grown(after: dict, before: dict, key: tuple[str, str]) -> tuple[int, int]:
    (p1, b1), (p0, b0) = after.get(key, (0, 0)), before.get(key, (0, 0))
    return p1 - p0, b1 - b0


# --- predictions ----------------------------------------------------------------------


def predict(ring: maglev.Ring, owners: Sequence[str | None], src: str, dst: str,
            sport: int, dport: int, proto: int) -> str | None:
    """The backend the balancer picks for a new flow (5-tuple hash VIPs)."""
    return owners[s.ring_slot(s.flow_hash(src, dst, sport, dport, proto), ring.size)]


def predicted_moves(old: maglev.Ring, new: maglev.Ring, slots: dict[int, int]) -> set[int]:
    """The flows (by key) whose slot changed owner between two rings."""
    moved = set(maglev.diff_positions(old, new).tolist())
    return {key for key, slot in slots.items() if slot in moved}


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with integer df: the regularised upper
    gamma Q(df/2, x/2), by Q(a+1, h) = Q(a, h) + h^a e^-h / Gamma(a+1) from
    Q(1, h) = e^-h (even df) or Q(1/2, h) = erfc(sqrt(h)) (odd df)."""
    h = x / 2
    a, q = (1.0, math.exp(-h)) if df % 2 == 0 else (0.5, math.erfc(math.sqrt(h)))
    while a < df / 2:
        q += math.exp(a * math.log(h) - h - math.lgamma(a + 1)) if h > 0 else 0.0
        a += 1
    return q


def backend_name(topo, address: str) -> str:
    """A lab backend's HTTP answer (its name) from either of its addresses."""
    for i in range(len(topo.backends)):
        if address in (topo.backend_v4[i], topo.backend_v6[i]):
            return f"backend{i}"
    raise AssertionError(f"{address} is no backend of the lab")


# --- packet sockets -------------------------------------------------------------------

Flow = tuple[int, bytes, bytes, int, int]  # proto, src, dst (packed addresses), sport, dport


def parse_flow(frame: bytes) -> Flow | None:
    """The L3/L4 identity of an untagged Ethernet frame; ports 0 for non-TCP/UDP."""
    if len(frame) < 34:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800:
        l4 = 14 + (frame[14] & 0x0F) * 4
        proto, src, dst = frame[23], frame[26:30], frame[30:34]
    elif ethertype == 0x86DD and len(frame) >= 54:
        l4 = 54
        proto, src, dst = frame[20], frame[22:38], frame[38:54]
    else:
        return None
    sport = dport = 0
    if proto in (s.IPPROTO_TCP, s.IPPROTO_UDP) and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
    return proto, bytes(src), bytes(dst), sport, dport


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ns_socket(host, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket created in `host`'s namespace, like `host.socket()`, without a fork.

    `Host.socket` (pyroute2) forks a helper per socket, ~10 ms each and a fork
    of a process whose capture threads are running; the change test makes over
    a thousand connections. setns(CLONE_NEWNET) moves only the calling thread,
    which switches back before anything else runs on it.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{host.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(family, type, proto)
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


class Tap:
    """Packet sockets on (host, interface) pairs; counts the frames `keep` accepts
    (and their bytes, Ethernet header included), per tap and per flow.
    direction: "in" skips what the host sends, "out" keeps only it."""

    def __init__(self, ends: Sequence[tuple[Any, str]], direction: str = "in",
                 keep: Callable[[Flow], bool] = lambda flow: True):
        self.direction, self.keep = direction, keep
        self.counts: list[Counter[Flow]] = [Counter() for _ in ends]
        self.bytes: list[Counter[Flow]] = [Counter() for _ in ends]
        self.matched = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        try:
            for host, ifname in ends:
                sock = ns_socket(host, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                self._socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
                sock.bind((ifname, 0))
                sock.setblocking(False)
        except BaseException:
            self._close_socks()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        index = {sock.fileno(): i for i, sock in enumerate(self._socks)}
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.05)
            for sock in ready:
                i = index[sock.fileno()]
                while True:
                    try:
                        frame, meta = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    outgoing = meta[2] == socket.PACKET_OUTGOING
                    if outgoing != (self.direction == "out"):
                        continue
                    flow = parse_flow(frame)
                    if flow is not None and self.keep(flow):
                        with self._lock:
                            self.counts[i][flow] += 1
                            self.bytes[i][flow] += len(frame)
                            self.matched += 1

    def snapshot(self) -> list[Counter[Flow]]:
        with self._lock:
            return [Counter(c) for c in self.counts]

    def byte_snapshot(self) -> list[Counter[Flow]]:
        with self._lock:
            return [Counter(c) for c in self.bytes]

    def wait_matched(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.matched < total:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _close_socks(self) -> None:
        for sock in self._socks:
            sock.close()

    def close(self) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join(timeout=5)
        self._close_socks()


# --- 1. thousands of scapy flows --------------------------------------------------------

FLOWS_PER_VIP = 2000
PACKETS_PER_FLOW = 3
CHUNK = 250  # frames sent before waiting for the backends to have counted them
ALPHA = 1e-6  # chi-square significance: a split this unlikely under the shares fails


@dataclass
class FlowVip:
    name: str  # as lbctl writes it
    address: str
    port: int  # 0: port-less, the flows' destination ports vary
    proto: int
    v6: bool
    weights: list[int]  # per lab backend
    sport_base: int


def flow_vips() -> list[FlowVip]:
    return [
        FlowVip("10.200.0.10:80/tcp", "10.200.0.10", 80, s.IPPROTO_TCP, False,
                [100, 100, 100], 20000),
        FlowVip("10.200.0.10:53/udp", "10.200.0.10", 53, s.IPPROTO_UDP, False,
                [100, 200, 300], 22000),
        FlowVip("[fd00:200::10]:80/tcp", "fd00:200::10", 80, s.IPPROTO_TCP, True,
                [100, 100, 100], 24000),
        FlowVip("fd00:200::10/udp", "fd00:200::10", 0, s.IPPROTO_UDP, True,
                [300, 100, 200], 26000),
    ]


def build_frames(topo, vip: FlowVip) -> dict[Flow, bytes]:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    src = topo.client_if.ipv6 if vip.v6 else topo.client_if.ipv4
    eth = Ether(src=topo.client_if.mac, dst=topo.router_client_if.mac)
    ip = IPv6(src=src, dst=vip.address, hlim=64) if vip.v6 else IP(src=src, dst=vip.address,
                                                                    ttl=64)
    frames = {}
    for i in range(FLOWS_PER_VIP):
        sport = vip.sport_base + i
        dport = vip.port or 1024 + (i * 7919) % 60000  # port-less: any destination port
        l4 = (TCP(sport=sport, dport=dport, flags="A", seq=1000, ack=1)
              if vip.proto == s.IPPROTO_TCP else UDP(sport=sport, dport=dport))
        key = (vip.proto, packed(src), packed(vip.address), sport, dport)
        frames[key] = bytes(eth / ip / l4 / b"xdplb-e2e-flow")
    return frames


def test_thousands_of_scapy_flows_each_reach_the_predicted_backend(e2e, lbd):
    """2000 flows per VIP (IPv4 TCP, IPv4 UDP, IPv6 TCP, port-less IPv6 UDP with
    varying destination ports), 3 packets each, established-looking (no SYN),
    counted per flow by packet sockets on the backends' eth0 (after decapsulation).

    Exact: every flow reaches exactly one backend, with all its packets, and
    that backend is `ring.owners()[ring_slot(flow_hash(5-tuple))]` for the ring
    `build_ring(weights)` that the maps are first checked to hold.

    Statistical: per VIP, the flow counts per backend are tested against the
    ring's shares (n * positions / M) with Pearson's chi-square, k-1 degrees of
    freedom, and fail if the p-value is below ALPHA = 1e-6 (for 3 backends the
    critical value is -2 ln 1e-6 = 27.6; a binomial 5-sigma bound per backend
    is about as strict). The ports are fixed, so the verdict is deterministic.
    """
    topo = e2e.topo
    vips = flow_vips()
    doc = {"version": 1, "vips": [
        {"vip": v.name, "check": {"kind": "none"},
         "backends": [{"address": (topo.backend_v6 if v.v6 else topo.backend_v4)[i],
                       "weight": w} for i, w in enumerate(v.weights)]}
        for v in vips]}
    apply_doc(lbd, doc)
    weights = {v.name: {(topo.backend_v6 if v.v6 else topo.backend_v4)[i]: w
                        for i, w in enumerate(v.weights)} for v in vips}
    rings = expect_rings(lbd, weights)

    frames: dict[Flow, bytes] = {}
    expected: dict[Flow, int] = {}  # flow -> predicted backend index
    for v in vips:
        vip_frames = build_frames(topo, v)
        frames.update(vip_frames)
        owners = rings[v.name].owners()
        addresses = topo.backend_v6 if v.v6 else topo.backend_v4
        for key in vip_frames:
            src = socket.inet_ntop(socket.AF_INET6 if v.v6 else socket.AF_INET, key[1])
            owner = predict(rings[v.name], owners, src, v.address, key[3], key[4], v.proto)
            expected[key] = addresses.index(owner)
    assert len(frames) == FLOWS_PER_VIP * len(vips)

    tap = Tap([(host, "eth0") for host in topo.backends], "in", keep=frames.__contains__)
    sent = 0
    deadline = time.monotonic() + 60
    try:
        sender = ns_socket(topo.client, socket.AF_PACKET, socket.SOCK_RAW)
        with sender:
            sender.bind((topo.client_if.name, 0))
            order = list(frames.values())
            for _ in range(PACKETS_PER_FLOW):
                for start in range(0, len(order), CHUNK):
                    for frame in order[start:start + CHUNK]:
                        sender.send(frame)
                        sent += 1
                    # self-clocked: a lost frame costs time only up to the deadline
                    tap.wait_matched(sent, max(0.0, min(2.0, deadline - time.monotonic())))
        tap.wait_matched(sent, max(0.0, deadline - time.monotonic()))
        time.sleep(0.2)  # anything beyond the expected total would show up now
        counts = tap.snapshot()
    finally:
        tap.close()

    problems = []
    for key, want in expected.items():
        where = {i: c[key] for i, c in enumerate(counts) if c[key]}
        if where != {want: PACKETS_PER_FLOW}:
            problems.append(f"{key[0]} sport {key[3]} dport {key[4]}: predicted backend{want}, "
                            f"packets per backend {where}")
    assert not problems, f"{len(problems)} of {len(expected)} flows wrong:\n" + "\n".join(
        problems[:15])
    assert sum(sum(c.values()) for c in counts) == len(frames) * PACKETS_PER_FLOW
    measured = {key: i for i, c in enumerate(counts) for key in c}

    for v in vips:
        ring = rings[v.name]
        addresses = topo.backend_v6 if v.v6 else topo.backend_v4
        shares = ring.shares()
        observed = Counter(i for key, i in measured.items() if key[2] == packed(v.address)
                           and key[0] == v.proto)
        n = sum(observed.values())
        assert n == FLOWS_PER_VIP
        expected_counts = [n * shares[addresses[i]] / ring.size for i in range(len(addresses))]
        stat = sum((observed[i] - e) ** 2 / e for i, e in enumerate(expected_counts))
        p = chi2_sf(stat, len(addresses) - 1)
        assert p >= ALPHA, (f"{v.name}: flows per backend {dict(observed)} against expected "
                            f"{[round(e, 1) for e in expected_counts]}: chi-square {stat:.1f}, "
                            f"p = {p:.2g} < {ALPHA}")


# --- 2. real TCP, answered directly ----------------------------------------------------

HTTP_FLOWS = 30


def _read_response(sock: socket.socket, until_eof: bool) -> str:
    """One HTTP response's body: by Content-Length, then (if asked) up to EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response ({data[:60]!r})")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if match is None:
        raise ConnectionError(f"response without Content-Length: {head[:80]!r}")
    while len(body) < int(match.group(1)):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    if until_eof:
        while sock.recv(4096):
            pass
    return body.decode().strip()


def http_from(topo, vip: str, port: int, sport: int, timeout: float = 5.0) -> str:
    """One request on a new connection bound to client source port `sport`; the body.

    The client ends with a reset (SO_LINGER 0) after the server's FIN, so neither
    side keeps a TIME_WAIT for this 4-tuple and the same source port can be used
    again at once."""
    v6 = ":" in vip
    family = socket.AF_INET6 if v6 else socket.AF_INET
    sock = ns_socket(topo.client, family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((topo.client_if.ipv6 if v6 else topo.client_if.ipv4, sport))
        sock.connect((vip, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        body = _read_response(sock, until_eof=True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return body
    finally:
        sock.close()


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_real_tcp_is_answered_directly_by_the_predicted_backend(e2e, lbd, v6):
    """30 HTTP requests, each on a connection from a chosen client source port.

    Each answer names the backend `build_ring` + `flow_hash` predicts for that
    port. DSR: packet sockets on the client count every packet it sent to the
    VIP; the LB's per-backend counters (`lbctl stats`) grow by exactly the
    client's packets (and bytes) of the flows predicted for that backend, and
    the VIP's total by all of them, so no reply was counted; and a packet socket on the
    LB's interface sees no frame addressed to the client (replies go from the
    backends through the router straight to the client; the LB's own XDP_TX
    output is invisible to it, anything else reaching the LB would not be).
    """
    topo = e2e.topo
    vip_addr = topo.vip_v6 if v6 else topo.vip_v4
    vip = f"[{vip_addr}]:80/tcp" if v6 else f"{vip_addr}:80/tcp"
    backends = topo.backend_v6 if v6 else topo.backend_v4
    client = topo.client_if.ipv6 if v6 else topo.client_if.ipv4
    ok(lbd, "vip", "add", vip, "--check", "none")
    for address in backends:
        ok(lbd, "backend", "add", vip, address)
    ring = expect_rings(lbd, {vip: dict.fromkeys(backends, 100)})[vip]
    owners = ring.owners()
    sports = [(35000 if v6 else 34000) + i for i in range(HTTP_FLOWS)]
    predicted = {p: predict(ring, owners, client, vip_addr, p, 80, s.IPPROTO_TCP)
                 for p in sports}
    assert len(set(predicted.values())) == len(backends), "pick ports that reach every backend"

    client_key, vip_key = packed(client), packed(vip_addr)
    to_client = {packed(topo.client_if.ipv4), packed(topo.client_if.ipv6)}
    client_tap = Tap([(topo.client, topo.client_if.name)], "out",
                     keep=lambda f: f[1] == client_key and f[2] == vip_key and f[4] == 80
                     and f[3] in predicted)
    lb_addr = topo.lb_iface.ipv6 if v6 else topo.lb_iface.ipv4
    control = (s.IPPROTO_UDP, client_key, packed(lb_addr), 40999, 9)
    lb_tap = Tap([(topo.lb, topo.lb_iface.name)], "in",
                 keep=lambda f: f[2] in to_client or f[1] == vip_key or f == control)
    try:
        before = traffic_stats(lbd)
        answers = {p: http_from(topo, vip_addr, 80, p) for p in sports}
        # A positive control: a datagram to the LB's own address does reach this tap.
        with ns_socket(topo.client, socket.AF_INET6 if v6 else socket.AF_INET,
                       socket.SOCK_DGRAM) as udp:
            udp.bind((client, 40999))
            udp.sendto(b"control", (lb_addr, 9))
        assert lb_tap.wait_matched(1, timeout=5), "the LB's packet socket saw nothing"
        # Settled: the client's tap and the LB's VIP counter agree and stay put
        # (the last packets may still be on their way; the taps count in a thread).
        deadline = time.monotonic() + 10
        last = None
        while True:
            time.sleep(0.2)
            sent, sent_bytes = client_tap.snapshot()[0], client_tap.byte_snapshot()[0]
            after = traffic_stats(lbd)
            now = (sum(sent.values()), grown(after, before, (vip, ""))[0])
            if (now == last and now[0] == now[1]) or time.monotonic() > deadline:
                break
            last = now
        seen_at_lb = lb_tap.snapshot()[0]
    finally:
        client_tap.close()
        lb_tap.close()

    assert answers == {p: backend_name(topo, predicted[p]) for p in sports}
    per_backend: dict[str, tuple[int, int]] = {}
    for b in backends:
        flows = [f for f in sent if predicted[f[3]] == b]
        per_backend[b] = (sum(sent[f] for f in flows), sum(sent_bytes[f] for f in flows))
    assert sum(sent.values()) >= HTTP_FLOWS * 5  # SYN, ACK, request, ACK of FIN, RST
    assert {b: grown(after, before, (vip, b)) for b in backends} == per_backend
    assert grown(after, before, (vip, "")) == (sum(sent.values()), sum(sent_bytes.values()))
    assert seen_at_lb.pop(control) == 1
    assert not seen_at_lb, f"frames to the client or from the VIP crossed the LB: {seen_at_lb}"


# --- 3. changes under traffic -------------------------------------------------------------

LONG_LIVED = 60  # half opened before the backend is added, half after
PROBES = 200  # new connections whose backend is measured in every state
KEEPER_INTERVAL_S = 0.2
KEEPER_MAX_S = 120.0


class LongLived:
    """Keep-alive HTTP connections from the client to a VIP, each from a chosen
    source port; a thread sends one request on each in turn, round after round,
    and records who answered or the first error. Bounded in time."""

    def __init__(self, topo, vip: str, port: int):
        self.topo, self.vip, self.port = topo, vip, port
        self.socks: dict[int, socket.socket] = {}
        self.answers: dict[int, Counter[str]] = {}
        self.errors: dict[int, str] = {}
        self.rounds = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, sports: Iterable[int]) -> dict[int, str]:
        """Connects each port and makes its first request; the first answers."""
        first = {}
        for sport in sports:
            sock = ns_socket(self.topo.client, socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                sock.bind((self.topo.client_if.ipv4, sport))
                sock.connect((self.vip, self.port))
                first[sport] = self._request(sock)
            except BaseException:
                sock.close()
                raise
            with self._lock:
                self.socks[sport] = sock
                self.answers[sport] = Counter([first[sport]])
        return first

    @staticmethod
    def _request(sock: socket.socket) -> str:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
        return _read_response(sock, until_eof=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + KEEPER_MAX_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                live = [(p, sock) for p, sock in self.socks.items() if p not in self.errors]
            for sport, sock in live:
                try:
                    answer = self._request(sock)
                except OSError as exc:  # also ConnectionError, TimeoutError
                    with self._lock:
                        self.errors[sport] = f"{type(exc).__name__}: {exc}"
                    continue
                with self._lock:
                    self.answers[sport][answer] += 1
            with self._lock:
                self.rounds += 1
            self._stop.wait(KEEPER_INTERVAL_S)

    def wait_rounds(self, n: int, timeout: float = 20.0) -> None:
        """Until `n` more full rounds ran (so every connection was used after now)."""
        target = self.rounds + n + 1  # the round in progress may have started before now
        deadline = time.monotonic() + timeout
        while self.rounds < target:
            assert self._thread is not None and self._thread.is_alive(), "keeper stopped"
            assert time.monotonic() < deadline, f"keeper made no {n} rounds in {timeout} s"
            time.sleep(0.02)

    def state(self) -> tuple[dict[int, Counter[str]], dict[int, str]]:
        with self._lock:
            return {p: Counter(c) for p, c in self.answers.items()}, dict(self.errors)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sock in self.socks.values():
            sock.close()


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_changes_under_traffic_move_only_the_flows_the_ring_moves(e2e, lbd):
    """VIP 10.200.0.10:8080/tcp with a fast tcp check (200 ms, fall 2, rise 1)
    starts with backends 0 and 1. 30 keep-alive connections are opened, then
    backend 2 is added and 30 more are opened; a thread sends a request on each
    connection every ~0.2 s throughout. Then backend 0 is drained, backend 1 is
    reweighted to 300, and backend 2's server is killed (its check fails).

    After each change, once the maps hold `build_ring` of the new effective
    weights (and mark the drained backend still available, the failed one not),
    and after two more full rounds of requests:

    * every established connection still answers, always from the backend it
      first reached, including those whose ring slot moved, those on the drained
      backend (the connection table keeps them), and, after the failure, all but
      those on the failed backend, which all fail (their server is gone);
    * 200 new connections (the same 200 source ports in every state, ended with
      a reset so no TIME_WAIT stands in the way) each reach the predicted
      backend, so none reaches a drained or failed one, and exactly the ports
      whose ring slot is in `maglev.diff_positions(old, new)` changed backend.
    """
    topo = e2e.topo
    vip_addr, port = topo.vip_v4, TRAFFIC_PORT
    vip = f"{vip_addr}:{port}/tcp"
    b0, b1, b2 = topo.backend_v4
    client = topo.client_if.ipv4
    ok(lbd, "vip", "add", vip, "--check", "tcp", "--check-interval", "200",
       "--check-timeout", "150", "--rise", "1", "--fall", "2")
    for address in (b0, b1):
        ok(lbd, "backend", "add", vip, address)
    weights = {b0: 100, b1: 100}
    ring = expect_rings(lbd, {vip: weights})[vip]
    wait_settled(lbd, vip)  # from here on established packets may skip the table

    probe_ports = [45000 + i for i in range(PROBES)]
    slots = {p: s.ring_slot(s.flow_hash(client, vip_addr, p, port, s.IPPROTO_TCP), RING_SIZE)
             for p in probe_ports}

    def predicted(ring: maglev.Ring, ports: Iterable[int]) -> dict[int, str]:
        owners = ring.owners()
        return {p: backend_name(topo, predict(ring, owners, client, vip_addr, p, port,
                                              s.IPPROTO_TCP)) for p in ports}

    def probe_all() -> dict[int, str]:
        return {p: http_from(topo, vip_addr, port, p) for p in probe_ports}

    keeper = LongLived(topo, vip_addr, port)
    try:
        first_ports = list(range(43000, 43000 + LONG_LIVED // 2))
        home = keeper.open(first_ports)  # sport -> the backend that must keep answering
        assert home == predicted(ring, first_ports)
        seen = probe_all()
        assert seen == predicted(ring, probe_ports)
        keeper.start()

        def kill_backend2() -> None:
            _kill_group(e2e.traffic_servers[2])

        # (what, how, the effective weights after it, backends new connections must avoid)
        steps: list[tuple[str, Callable[[], Any], dict[str, int], tuple[str, ...]]] = [
            ("add backend2", lambda: ok(lbd, "backend", "add", vip, b2),
             {b0: 100, b1: 100, b2: 100}, ()),
            ("drain backend0", lambda: ok(lbd, "backend", "set", vip, b0, "--drain"),
             {b0: 0, b1: 100, b2: 100}, ("backend0",)),
            ("reweight backend1", lambda: ok(lbd, "backend", "set", vip, b1, "--weight", "300"),
             {b0: 0, b1: 300, b2: 100}, ("backend0",)),
            ("fail backend2", kill_backend2, {b0: 0, b1: 300, b2: 0}, ("backend0", "backend2")),
        ]
        failed: str | None = None
        for label, change, new_weights, avoided in steps:
            change()
            if label.startswith("fail"):
                failed = "backend2"
            new_ring = expect_rings(lbd, {vip: new_weights})[vip]
            # Connections a new flow from the same port would no longer reach: only
            # the connection table keeps them where they are.
            sticky = {p for p, b in predicted(new_ring, home).items()
                      if b != home[p] and home[p] != failed}
            assert sticky, f"{label}: no established connection's slot moved; pick other ports"
            available = {b for b, flags in maps_view(lbd)["vips"][vip]["backends"].items()
                         if flags & s.BACKEND_F_AVAILABLE}
            # Drained stays available (its flows stay), failed does not (they re-choose).
            assert available == {b for b in (b0, b1, b2)
                                 if b in new_weights and not (failed and b == b2)}, label
            events = datapath_events(lbd)
            keeper.wait_rounds(2)
            settled = datapath_events(lbd)["conn_settled"] - events["conn_settled"]
            assert settled > 0, f"{label}: no established packet took a settled slot"
            answers, errors = keeper.state()
            broken = {p: e for p, e in errors.items() if home[p] != failed}
            assert not broken, f"{label}: established connections failed: {broken}"
            wandered = {p: dict(a) for p, a in answers.items() if set(a) != {home[p]}}
            assert not wandered, f"{label}: connections answered by another backend: {wandered}"
            if failed:
                on_failed = {p for p, b in home.items() if b == failed}
                assert on_failed, "some connections should have been on the failed backend"
                assert set(errors) == on_failed, f"{label}: on the failed backend {on_failed}"

            now = probe_all()
            assert now == predicted(new_ring, probe_ports), f"{label}: new connections"
            moved = {p for p in probe_ports if now[p] != seen[p]}
            assert moved == predicted_moves(ring, new_ring, slots), f"{label}: moved flows"
            assert moved, f"{label}: no probe moved; pick more probes"
            reached = set(now.values()) & set(avoided)
            assert not reached, f"{label}: new connections reach {reached}"
            ring, seen = new_ring, now

            if label == "add backend2":
                more = list(range(43000 + LONG_LIVED // 2, 43000 + LONG_LIVED))
                answered = keeper.open(more)
                assert answered == predicted(ring, more)
                home.update(answered)
                assert "backend2" in home.values()
        assert len(home) == LONG_LIVED
    finally:
        keeper.close()
        _restart_traffic_server(e2e, 2)


def _restart_traffic_server(e2e: E2eLab, i: int) -> None:
    """Leaves the module's lab as the fixture made it."""
    from xdplb_lab.lab import wait_port

    proc = e2e.traffic_servers[i]
    if proc.poll() is None:
        return
    host = e2e.topo.backends[i]
    e2e.traffic_servers[i] = start_traffic_server(host, i)
    wait_port(host, TRAFFIC_PORT, ip="::1")
