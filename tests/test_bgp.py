"""BGP scale-out in the multi-host lab (xdplb_lab.bgp): two LB hosts, each with
its own BIRD and lbd, behind a router whose BIRD merges their announcements
into ECMP routes hashed on the 5-tuple.

What is shown: each lbd announces every VIP with a healthy backend (/32 and
/128) and withdraws it when it has none or is deleted; the router learns each
VIP from both hosts; flows spread over both hosts and a flow reaches the same
backend whichever host it crosses (identical state, identical rings); drain-host
takes a host out of the ECMP group and says when it carries no new flow; when an
LB host dies the router withdraws its routes, flows move to the other host and
keep their backends, and a long-lived TCP connection survives. Status, metrics
and `lbctl compare` report sessions, announcements and ring fingerprints.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import pytest
from pyroute2 import netns
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import require_root
from xdplb import structs as s

pytestmark = pytest.mark.netns

VIP4, VIP6 = "10.200.0.10", "fd00:200::10"
KEY4, KEY6 = f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"
P4, P6 = f"{VIP4}/32", f"{VIP6}/128"
BOTH = {"lb1", "lb2"}
CHECK_MS = 300  # health checks every 300 ms, rise 2, fall 2
ETH_P_ALL = 0x0003


# --- the lab -------------------------------------------------------------------------------


def birdc_wrapper(path: Path) -> Path:
    """A birdc that fails `configure` while a file named fail-configure sits next to the
    socket it is given: a BIRD that does not take a reconfiguration, on demand."""
    from xdplb_lab.bgp import BIRDC

    path.write_text(f"""#!/bin/sh
# birdc -s SOCKET COMMAND...
if [ "$1" = "-s" ] && [ "$3" = "configure" ] && \\
   [ -e "$(dirname "$2")/fail-configure" ]; then
  echo "birdc: simulated failure: BIRD did not answer" >&2
  exit 1
fi
exec {BIRDC} "$@"
""")
    path.chmod(0o755)
    return path


CLIENT_PORTS = (50000, 60999)  # the client kernel's ephemeral ports; crafted flows stay below


@pytest.fixture(scope="module")
def bgp_lab(tmp_path_factory):
    require_root()
    from xdplb_lab import bgp as lab_bgp
    from xdplb_lab.lab import Lab

    workdir = tmp_path_factory.mktemp("bgp")
    lab = Lab(prefix="xtbgp")
    topo = None
    try:
        topo = lab_bgp.build_bgp_lab(lab, workdir, birdc=str(birdc_wrapper(
            workdir / "birdc")))
        lab_bgp.start_bgp_lab(topo)
        # The tests craft flows from the client's address with source ports 42000..46999;
        # the client's own connections (KeepAlive, http_get) take theirs above, so a late
        # segment of one never counts as a crafted flow's.
        topo.client.sysctl("net.ipv4.ip_local_port_range", f"{CLIENT_PORTS[0]} {CLIENT_PORTS[1]}")
        lab_bgp.apply_everywhere(topo, lab_bgp.lab_document(topo, CHECK_MS))
        yield topo
    finally:
        if topo is not None:
            topo.close()
        else:
            lab.close()
    assert_nothing_left(lab.runid, workdir)


def assert_nothing_left(runid: str, workdir: Path) -> None:
    """No namespace, marker, pin dir, lbd lock file or process of the run is left."""
    from xdplb.datapath import PIN_ROOT
    from xdplb.lbd import LOCK_DIR
    from xdplb_lab.lab import MARKER_DIR

    assert [n for n in netns.listnetns() if n.startswith(f"{runid}-")] == []
    assert not (MARKER_DIR / runid).exists()
    pins = sorted(p.name for p in PIN_ROOT.iterdir()) if PIN_ROOT.is_dir() else []
    assert [p for p in pins if p == runid or p.startswith(f"{runid}-")] == []
    assert sorted(LOCK_DIR.glob(f"{runid}-*")) == []
    assert no_process_mentions(str(workdir)) == []


def no_process_mentions(text: str, timeout: float = 5.0) -> list[int]:
    """[] once no process's command line mentions `text` (a process killed a moment ago
    may take a little while to go)."""
    deadline = time.monotonic() + timeout
    while (found := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def topo(bgp_lab):
    """The lab as every test starts: both LB hosts up and announcing, the same state."""
    restore_baseline(bgp_lab)
    return bgp_lab


def restore_baseline(topo) -> None:
    from xdplb_lab import bgp as lab_bgp

    for lb in topo.lbs:
        (lb.bird.workdir / "fail-configure").unlink(missing_ok=True)
        if not lb.bird.running or lb.lbd.proc is None or lb.lbd.proc.poll() is not None:
            topo.restore_lb(lb)
    for lb in topo.lbs:
        if status(lb)["host_drained"]:
            ok(lb, "drain-host", "--undo")
    lab_bgp.apply_everywhere(topo, lab_bgp.lab_document(topo, CHECK_MS))
    topo.wait_established()
    for prefix in (P4, P6):
        topo.wait_paths(prefix, BOTH)


def ok(lb, *args: str, timeout: float = 30.0) -> str:
    result = lb.lbctl(*args, timeout=timeout)
    assert result.returncode == 0, f"{lb.role}: lbctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def status(lb) -> dict:
    return json.loads(ok(lb, "status", "-o", "json"))


def metrics(lb) -> dict[str, float]:
    """lbd's Prometheus metrics (inside its namespace): sample line -> value."""
    with lb.host.socket() as sock:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", 9640))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: lab\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    body = data.decode().split("\r\n\r\n", 1)[1]
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def include_file(lb, version: int) -> str:
    return (lb.include_dir / f"vips{version}.conf").read_text()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


# --- frames, taps and connections ----------------------------------------------------------


def client_addr(vip: str) -> str:
    from xdplb_lab.lab import CLIENT_V4, CLIENT_V6

    return CLIENT_V6 if ":" in vip else CLIENT_V4


def flow_frame(src_mac: str, dst_mac: str, vip: str, sport: int) -> bytes:
    """A TCP segment of an established-looking flow from the client to vip:80."""
    ip = (IPv6(src=client_addr(vip), dst=vip) if ":" in vip
          else IP(src=client_addr(vip), dst=vip, ttl=64))
    return bytes(Ether(src=src_mac, dst=dst_mac) / ip
                 / TCP(sport=sport, dport=80, flags="A", seq=1000, ack=1) / b"xdplb-bgp")


def client_frames(topo, flows: Iterable[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """Frames the client sends to the router: the router's ECMP route picks the LB host."""
    return {(vip, sport): flow_frame(topo.client_if.mac, topo.router_client_if.mac, vip, sport)
            for vip, sport in flows}


def forced_frames(lb, flows: Iterable[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """Frames for the router's link to `lb`, addressed to its MAC: they cross that host."""
    return {(vip, sport): flow_frame(lb.router_iface.mac, lb.iface.mac, vip, sport)
            for vip, sport in flows}


class Sender:
    """Sends frames from one interface in rounds (one frame per flow per round), bounded in
    rounds and time; with `new_flows`, each round sends only the flows it returns."""

    def __init__(self, host, ifname: str, frames: dict, rounds: int, interval_s: float,
                 new_flows: Callable[[int], dict] | None = None):
        self.host, self.ifname, self.frames = host, ifname, dict(frames)
        self.rounds, self.interval_s, self.new_flows = rounds, interval_s, new_flows
        self.sent: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def _run(self) -> None:
        with self.host.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((self.ifname, 0))
            next_round = time.monotonic()
            for n in range(self.rounds):
                if self.stop.is_set():
                    return
                if self.new_flows is not None:
                    self.frames = self.new_flows(n)
                for key, frame in self.frames.items():
                    sock.send(frame)
                    self.sent[key] += 1
                next_round += self.interval_s
                time.sleep(max(0.0, next_round - time.monotonic()))


def parse_tcp(frame: bytes) -> tuple[str, str, int, int] | None:
    """(source, destination, sport, dport) of a TCP frame, IPv4 or IPv6; None otherwise."""
    if len(frame) < 54:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800 and frame[23] == 6:
        src, dst = frame[26:30], frame[30:34]
        offset = 14 + (frame[14] & 0x0F) * 4
        family = socket.AF_INET
    elif ethertype == 0x86DD and frame[20] == 6 and len(frame) >= 74:
        src, dst, offset, family = frame[22:38], frame[38:54], 54, socket.AF_INET6
    else:
        return None
    sport, dport = struct.unpack_from("!HH", frame, offset)
    return socket.inet_ntop(family, src), socket.inet_ntop(family, dst), sport, dport


class Taps:
    """Packet sockets counting client-to-VIP TCP frames by (label, vip, sport).

    A point is (label, host, ifname, outgoing): the router's links to the LB hosts are
    tapped on the way out (which LB host a flow crosses), the backends' eth0 on the way in
    (after the decapsulator: where the balancer sent the flow)."""

    def __init__(self, points: list[tuple[str, object, str, bool]], port: int = 80):
        self.port = port
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._socks = []
        for label, host, ifname, outgoing in points:
            sock = host.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind((ifname, 0))
            sock.setblocking(False)
            self._socks.append((sock, label, outgoing))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        by_fd = {sock.fileno(): (sock, label, outgoing) for sock, label, outgoing in self._socks}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(by_fd), [], [], 0.05)
            for fd in ready:
                sock, label, outgoing = by_fd[fd]
                while True:
                    try:
                        frame, meta = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if (meta[2] == socket.PACKET_OUTGOING) != outgoing:
                        continue
                    parsed = parse_tcp(frame)
                    if parsed and parsed[0] == client_addr(parsed[1]) and parsed[3] == self.port:
                        with self._lock:
                            self.counts[(label, parsed[1], parsed[2])] += 1

    def snapshot(self) -> Counter:
        with self._lock:
            return Counter(self.counts)

    def total(self, flows: Iterable[tuple[str, int]] | None = None) -> int:
        snap = self.snapshot()
        wanted = None if flows is None else set(flows)
        return sum(n for (_, vip, sport), n in snap.items()
                   if wanted is None or (vip, sport) in wanted)

    def settle(self, expected: int, flows: Iterable[tuple[str, int]], timeout: float = 5.0):
        flows = list(flows)
        deadline = time.monotonic() + timeout
        while self.total(flows) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # anything beyond the expected total would show up now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock, _, _ in self._socks:
            sock.close()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def labels_of(counts: Counter, vip: str, sport: int) -> set[str]:
    return {label for (label, v, p), n in counts.items() if v == vip and p == sport and n}


def router_taps(topo) -> Taps:
    return Taps([(lb.role, topo.router, lb.router_iface.name, True) for lb in topo.lbs])


def backend_taps(topo, port: int = 80) -> Taps:
    return Taps([(f"backend{i}", host, "eth0", False) for i, host in enumerate(topo.backends)],
                port)


class KeepAlive:
    """One long-lived HTTP/1.1 connection from the client's kernel TCP to a VIP."""

    def __init__(self, topo, vip: str):
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        self.sock = topo.client.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect((vip, 80))
        self.sport = self.sock.getsockname()[1]
        self._buffer = b""

    def get(self) -> str:
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
        while b"\r\n\r\n" not in self._buffer:
            self._read()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(self._buffer) < length:
            self._read()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return body.decode().strip()

    def _read(self) -> None:
        chunk = self.sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buffer += chunk

    def close(self) -> None:
        self.sock.close()


class RouteMonitor:
    """`ip -ts monitor route` in the router's namespace: when each change of the
    router's kernel routes reached user space (wall clock, taken by a process of its own,
    so no thread of this one delays it)."""

    def __init__(self, topo):
        self.events: list[tuple[float, str]] = []
        self.proc = topo.router.popen(["stdbuf", "-oL", "ip", "-ts", "monitor", "route"],
                                      stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # subscribed by now

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("["):  # [2026-11-27T10:12:53.424522] 10.200.0.10 via ...
                stamp, _, route = line.partition("] ")
                self.events.append((datetime.fromisoformat(stamp[1:]).timestamp(), route))

    def single_path_after(self, address: str, after: float, timeout: float = 10.0) -> float:
        """When the route to `address` first became a single path (`ADDRESS via ...`, not
        an ECMP route's `nexthop` list) after the wall-clock time `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, route in list(self.events):
                words = route.split()
                if when >= after and words[:2] == [address, "via"]:
                    return when
            time.sleep(0.01)
        raise AssertionError(f"no change of the route to {address} after {after}: "
                             f"{self.events}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)
        self._thread.join(timeout=5)

    def __enter__(self) -> RouteMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bird_reconfigured_at(lb, after: float) -> float:
    """When the LB host's BIRD last took lbd's files (`Reconfigured` in its log, wall
    clock, ms) at or after `after`: the moment its announcements changed."""
    times = []
    for line in lb.bird.log_path.read_text().splitlines():
        if line.endswith("<INFO> Reconfigured"):
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if when >= after - 0.001:
                times.append(when)
    assert times, f"{lb.role}: BIRD did not reconfigure after {after}"
    return min(times)


class Listener:
    """A TCP port that accepts (and closes) connections inside a namespace: what a
    health check needs to see a backend up. Closing it takes the backend down."""

    def __init__(self, host, port: int):
        self.sock = host.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", port))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def ring_backend(view: dict, key: str, vip: str, sport: int) -> str:
    """The backend address the VIP's ring (as read from an lbd's maps) gives a flow."""
    ring = view["vips"][key]["ring"]
    return ring[s.ring_slot(s.flow_hash(client_addr(vip), vip, sport, 80, 6), len(ring))]


def maps_view(lb) -> dict:
    from xdplb.reconciler import read_view

    maps = lb.lbd.maps()
    try:
        return read_view(maps)
    finally:
        maps.close()


def backend_label(topo, address: str) -> str:
    addresses = topo.backend_v6 if ":" in address else topo.backend_v4
    return f"backend{addresses.index(address)}"


# --- the make target -------------------------------------------------------------------------


def test_make_target_brings_the_lab_up_and_down(tmp_path):
    """`make bgp-lab` / `make bgp-lab-down` run `python -m xdplb_lab.bgp up|down`; here the
    same module runs with a test prefix and work directory, so a lab an operator left up
    is not touched."""
    require_root()
    from xdplb.datapath import PIN_ROOT

    dry = subprocess.run(["make", "-n", "bgp-lab", "bgp-lab-down"], capture_output=True,
                         text=True, timeout=30, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert "-m xdplb_lab.bgp up" in dry and "-m xdplb_lab.bgp down" in dry
    workdir = tmp_path / "lab"
    command = [sys.executable, "-m", "xdplb_lab.bgp", "--prefix", "xtbgm", "--workdir",
               str(workdir)]
    try:
        up = subprocess.run([*command[:3], "up", *command[3:]], capture_output=True, text=True,
                            timeout=180, check=False)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"router: {P4} is one ECMP route over lb1 and lb2" in up.stdout
        assert f"router: {P6} is one ECMP route over lb1 and lb2" in up.stdout
        runids = {n.split("-")[0] for n in netns.listnetns() if n.startswith("xtbgm")}
        assert len(runids) == 1
        runid = runids.pop()
        roles = {n.split("-", 1)[1] for n in netns.listnetns() if n.startswith(f"{runid}-")}
        assert roles == {"client", "router", "lb1", "lb2", "backend0", "backend1", "backend2"}
        assert (PIN_ROOT / f"{runid}-lb1").is_dir() and (PIN_ROOT / f"{runid}-lb2").is_dir()
        assert len(processes_mentioning(str(workdir))) >= 5  # 3 BIRDs, 2 lbds
    finally:
        down = subprocess.run([*command[:3], "down", *command[3:]], capture_output=True,
                              text=True, timeout=60, check=False)
    assert down.returncode == 0, down.stderr
    assert not workdir.exists()
    assert_nothing_left(runid, workdir)


# --- announcing -------------------------------------------------------------------------------


def test_router_learns_each_vip_from_both_lb_hosts_and_installs_one_ecmp_route(topo):
    assert topo.router_bird.route_sources(P4) == {"lb1v4", "lb2v4"}
    assert topo.router_bird.route_sources(P6) == {"lb1v6", "lb2v6"}
    route4 = json.loads(topo.router.run(["ip", "-j", "-4", "route", "show", P4]).stdout)
    route6 = json.loads(topo.router.run(["ip", "-j", "-6", "route", "show", P6]).stdout)
    for (route,), gateways in ((route4, [lb.v4 for lb in topo.lbs]),
                               (route6, [lb.v6 for lb in topo.lbs])):
        assert route["protocol"] == "bird"
        assert sorted(hop["gateway"] for hop in route["nexthops"]) == gateways
        assert sorted(hop["dev"] for hop in route["nexthops"]) == ["eth1", "eth2"]
    policy = topo.router.run(["cat", "/proc/sys/net/ipv4/fib_multipath_hash_policy",
                              "/proc/sys/net/ipv6/fib_multipath_hash_policy"]).stdout.split()
    assert policy == ["1", "1"]
    for lb in topo.lbs:  # what lbd gave its BIRD
        assert f"route {P4} blackhole;" in include_file(lb, 4)
        assert f"route {P6} blackhole;" in include_file(lb, 6)


def test_status_and_metrics_show_sessions_announcements_and_fingerprints(topo):
    fingerprints = []
    for lb in topo.lbs:
        st = status(lb)
        assert st["bgp"]["enabled"] is True
        assert st["bgp"]["error"] == ""
        assert {(x["name"], x["state"], x["info"]) for x in st["bgp"]["sessions"]} == {
            ("router4", "up", "Established"), ("router6", "up", "Established")}
        assert st["bgp"]["announced"] == [P4, P6]
        assert st["host_drained"] is False
        vips = {v["vip"]: v["status"] for v in st["vip_status"]}
        assert all(v["announced"] for v in vips.values())
        assert all(len(v["ring_fingerprint"]) == 64 for v in vips.values())
        fingerprints.append({k: v["ring_fingerprint"] for k, v in vips.items()})
        table = ok(lb, "status")
        assert "session    router4 up Established" in table
        assert f"announced  {P4}, {P6}" in table

        samples = metrics(lb)
        assert samples['xdplb_bgp_session_established{session="router4"}'] == 1
        assert samples['xdplb_bgp_session_established{session="router6"}'] == 1
        assert samples[f'xdplb_bgp_announced{{prefix="{P4}"}}'] == 1
        assert samples[f'xdplb_bgp_announced{{prefix="{P6}"}}'] == 1
        assert samples["xdplb_host_drained"] == 0
        for key, digest in fingerprints[-1].items():
            assert samples[f'xdplb_vip_ring_info{{fingerprint="{digest[:16]}",vip="{key}"}}'] == 1
    assert fingerprints[0] == fingerprints[1]


def test_lb_hosts_have_identical_rings_and_compare_names_a_host_that_differs(topo):
    lb1, lb2 = topo.lbs
    sockets = [str(lb1.lbd.socket), str(lb2.lbd.socket)]
    assert maps_view(lb1)["vips"] == maps_view(lb2)["vips"]
    same = lb1.lbctl("compare", *sockets, "-o", "json")
    assert same.returncode == 0, same.stderr
    table = json.loads(same.stdout)
    assert table["differing"] == []
    assert set(table["vips"]) == {KEY4, KEY6}

    ok(lb2, "backend", "set", KEY4, topo.backend_v4[0], "--weight", "200")
    differ = lb1.lbctl("compare", *sockets, "-o", "json")
    assert differ.returncode == 1
    assert json.loads(differ.stdout)["differing"] == [sockets[1]]
    assert f"lbctl: rings differ on {sockets[1]}" in differ.stderr
    rings = json.loads(differ.stdout)["vips"]
    assert rings[KEY4][sockets[0]] != rings[KEY4][sockets[1]]
    assert rings[KEY6][sockets[0]] == rings[KEY6][sockets[1]]

    ok(lb2, "backend", "set", KEY4, topo.backend_v4[0], "--weight", "100")
    assert lb1.lbctl("compare", *sockets).returncode == 0
    assert maps_view(lb1)["vips"] == maps_view(lb2)["vips"]


def test_a_vip_whose_backends_are_all_down_is_withdrawn_by_both_hosts(topo, tmp_path):
    from xdplb_lab import bgp as lab_bgp

    # A VIP pair on port 8081 whose backends answer only while the test listens there.
    doc = lab_bgp.lab_document(topo, CHECK_MS)
    check = dict(doc["vips"][0]["check"])
    extra = {"10.200.0.30": [topo.backend_v4[0], topo.backend_v4[1]],
             "fd00:200::30": [topo.backend_v6[0], topo.backend_v6[1]]}
    for vip, backends in extra.items():
        key = f"[{vip}]:8081/tcp" if ":" in vip else f"{vip}:8081/tcp"
        doc["vips"].append({"vip": key, "check": check,
                            "backends": [{"address": a} for a in backends]})
    prefixes = ["10.200.0.30/32", "fd00:200::30/128"]
    lab_bgp.apply_everywhere(topo, doc)  # every backend's first check fails: none announced
    for lb in topo.lbs:
        assert status(lb)["bgp"]["announced"] == [P4, P6]
    for prefix in prefixes:
        assert topo.vip_paths(prefix) == set()
        assert topo.router_bird.route_sources(prefix) == set()

    listeners = [Listener(topo.backends[i], 8081) for i in (0, 1)]
    try:
        for prefix in prefixes:
            topo.wait_paths(prefix, BOTH, timeout=10)
        assert topo.router_bird.route_sources(prefixes[0]) == {"lb1v4", "lb2v4"}
        assert topo.router_bird.route_sources(prefixes[1]) == {"lb1v6", "lb2v6"}

        listeners[0].close()  # one backend down: the VIPs still have a healthy one
        for lb in topo.lbs:
            wait_until(lambda lb=lb: all(
                v["status"]["healthy_backends"] == 1 for v in status(lb)["vip_status"]
                if v["vip"].endswith(":8081/tcp")), 10, f"{lb.role} sees backend0 down")
        for prefix in prefixes:
            assert topo.vip_paths(prefix) == BOTH

        listeners[1].close()  # none healthy: both hosts withdraw
        for prefix in prefixes:
            topo.wait_paths(prefix, set(), timeout=10)
            assert topo.router_bird.route_sources(prefix) == set()
        for lb in topo.lbs:
            st = status(lb)
            assert st["bgp"]["announced"] == [P4, P6]
            assert [v["status"]["announced"] for v in st["vip_status"]
                    if v["vip"].endswith(":8081/tcp")] == [False, False]
            assert "10.200.0.30/32" not in include_file(lb, 4)
        assert topo.vip_paths(P4) == BOTH and topo.vip_paths(P6) == BOTH
    finally:
        for listener in listeners:
            listener.close()


def test_a_deleted_vip_is_withdrawn(topo):
    keys = {"10.200.0.40:80/tcp": topo.backend_v4[0], "[fd00:200::40]:80/tcp":
            topo.backend_v6[0]}
    prefixes = ["10.200.0.40/32", "fd00:200::40/128"]
    for lb in topo.lbs:
        for key, backend in keys.items():
            ok(lb, "vip", "add", key, "--check-interval", str(CHECK_MS), "--check-timeout",
               "200")
            ok(lb, "backend", "add", key, backend)
    for prefix in prefixes:
        topo.wait_paths(prefix, BOTH, timeout=10)
    lb1, lb2 = topo.lbs
    for key in keys:
        ok(lb1, "vip", "del", key)
    for prefix in prefixes:
        topo.wait_paths(prefix, {"lb2"}, timeout=10)
    assert status(lb1)["bgp"]["announced"] == [P4, P6]
    for key in keys:
        ok(lb2, "vip", "del", key)
    for prefix in prefixes:
        topo.wait_paths(prefix, set(), timeout=10)
        assert topo.router_bird.route_sources(prefix) == set()


# --- flows across the LB hosts ----------------------------------------------------------------


def test_flows_spread_over_both_lb_hosts_and_each_stays_on_one_backend(topo):
    from xdplb_lab.lab import http_get

    flows = [(vip, sport) for vip in (VIP4, VIP6) for sport in range(42000, 42064)]
    before = {lb.role: json.loads(ok(lb, "stats", "-o", "json")) for lb in topo.lbs}
    with router_taps(topo) as via, backend_taps(topo) as landed:
        with Sender(topo.client, "eth0", client_frames(topo, flows), rounds=5,
                    interval_s=0.02) as sender:
            sender.thread.join(timeout=20)
        total = sum(sender.sent.values())
        assert total == len(flows) * 5
        landed.settle(total, flows)
        crossed, reached = via.snapshot(), landed.snapshot()
    for vip, sport in flows:
        hosts = labels_of(crossed, vip, sport)
        assert len(hosts) == 1, f"flow {vip}:{sport} crossed {hosts}"
        on = labels_of(reached, vip, sport)
        assert len(on) == 1, f"flow {vip}:{sport} reached {on}"
        assert reached[(on.pop(), vip, sport)] == 5, f"flow {vip}:{sport} lost packets"
    for vip in (VIP4, VIP6):
        per_host = Counter(labels_of(crossed, v, p).pop() for v, p in flows if v == vip)
        assert set(per_host) == BOTH, f"{vip}: flows crossed only {dict(per_host)}"
        per_backend = Counter(labels_of(reached, v, p).pop() for v, p in flows if v == vip)
        assert len(per_backend) == len(topo.backends)
    after = {lb.role: json.loads(ok(lb, "stats", "-o", "json")) for lb in topo.lbs}

    def vip_packets(stats: dict) -> int:
        return sum(t["packets"] for t in stats["traffic"] if not t.get("backend"))

    grew = {role: vip_packets(after[role]) - vip_packets(before[role]) for role in after}
    assert all(n > 0 for n in grew.values()), grew
    assert sum(grew.values()) == total

    # Real TCP from the client's kernel: every connection answered, through either host.
    answers = [http_get(topo, vip) for vip in (VIP4, VIP6) for _ in range(20)]
    assert all(a.startswith("backend") for a in answers)


def test_a_flow_reaches_the_same_backend_through_either_lb_host(topo):
    """Each flow is sent once through lb1 and once through lb2 (frames put on the
    router's link to each host): no shared connection table, the same ring decides."""
    views = [maps_view(lb) for lb in topo.lbs]
    assert views[0]["vips"] == views[1]["vips"]
    flows = [(vip, sport) for vip in (VIP4, VIP6) for sport in range(43000, 43048)]
    with backend_taps(topo) as landed:
        through = {}
        for lb in topo.lbs:
            with Sender(topo.router, lb.router_iface.name, forced_frames(lb, flows), rounds=2,
                        interval_s=0.01) as sender:
                sender.thread.join(timeout=20)
            landed.settle(2 * len(flows) * (1 + lb.index), flows)
            through[lb.role] = landed.snapshot()
    first, both = through["lb1"], through["lb2"]
    for vip, sport in flows:
        via_lb1 = labels_of(first, vip, sport)
        assert len(via_lb1) == 1, f"{vip}:{sport} through lb1 reached {via_lb1}"
        via_lb2 = labels_of(both - first, vip, sport)
        assert via_lb2 == via_lb1, f"{vip}:{sport}: lb1 sent it to {via_lb1}, lb2 to {via_lb2}"
        key = KEY6 if ":" in vip else KEY4
        assert via_lb1 == {backend_label(topo, ring_backend(views[0], key, vip, sport))}
        assert both[(via_lb1.pop(), vip, sport)] == 4
    used = {labels_of(first, v, p).pop() for v, p in flows}
    assert len(used) == len(topo.backends)


# --- draining a host --------------------------------------------------------------------------


def test_drain_host_withdraws_every_vip_and_reports_when_no_new_flow_arrives(topo):
    lb1, lb2 = topo.lbs

    # Still receiving new flows (sent straight to lb1, past the router's route): the
    # VIPs are withdrawn at once, and the wait says the host is not idle yet.
    fresh = iter(range(44000, 44400))
    with Sender(topo.router, lb1.router_iface.name, {}, rounds=200, interval_s=0.02,
                new_flows=lambda n: forced_frames(lb1, [(VIP4, next(fresh))])):
        busy = lb1.lbctl("drain-host", "--wait", "2", "--quiet", "1", timeout=30)
    assert busy.returncode == 1, busy.stdout + busy.stderr
    assert "still receiving new flows after" in busy.stdout
    for prefix in (P4, P6):
        topo.wait_paths(prefix, {"lb2"})
    ok(lb1, "drain-host", "--undo")
    for prefix in (P4, P6):
        topo.wait_paths(prefix, BOTH)

    # The client keeps opening new flows through the router: once the router has moved
    # them to lb2, lb1 sees no new flow and the wait ends with "drained".
    new_flows = iter(range(45000, 45800))
    with RouteMonitor(topo) as routes, router_taps(topo) as via, Sender(
            topo.client, "eth0", {}, rounds=400, interval_s=0.02,
            new_flows=lambda n: client_frames(topo, [(VIP4, next(new_flows)),
                                                      (VIP6, 45000 + n)])):
        time.sleep(0.3)
        started, started_wall = time.monotonic(), time.time()
        drained = lb1.lbctl("drain-host", "--wait", "20", "--quiet", "1", timeout=40)
        took = time.monotonic() - started
        moved = via.snapshot()
        time.sleep(0.3)
        later = via.snapshot() - moved
        withdrawn = bird_reconfigured_at(lb1, started_wall)
        changed = {vip: routes.single_path_after(vip, withdrawn) for vip in (VIP4, VIP6)}
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "no new flow for 1 s: drained" in drained.stdout
    assert took < 10
    print(f"\ndrain-host: lb1's BIRD withdrew the VIPs {withdrawn - started_wall:.2f} s after "
          f"the command started; ECMP route changed {(changed[VIP4] - withdrawn) * 1000:.1f} ms "
          f"(IPv4), {(changed[VIP6] - withdrawn) * 1000:.1f} ms (IPv6) after the withdrawal; "
          f"drain-host returned after {took:.1f} s")
    assert moved and {label for label, _, _ in later} == {"lb2"}

    assert topo.router_bird.route_sources(P4) == {"lb2v4"}
    assert topo.router_bird.route_sources(P6) == {"lb2v6"}
    st = status(lb1)
    assert st["host_drained"] is True
    assert st["bgp"]["announced"] == []
    assert {x["info"] for x in st["bgp"]["sessions"]} == {"Established"}
    assert not any(v["status"]["announced"] for v in st["vip_status"])
    assert "bgp        drained: every VIP withdrawn" in ok(lb1, "status")
    samples = metrics(lb1)
    assert samples["xdplb_host_drained"] == 1
    assert not any(name.startswith("xdplb_bgp_announced") for name in samples)
    assert status(lb2)["bgp"]["announced"] == [P4, P6]

    assert "host back in service: VIPs with a healthy backend are announced again" in ok(
        lb1, "drain-host", "--undo")
    for prefix in (P4, P6):
        topo.wait_paths(prefix, BOTH)
    assert status(lb1)["host_drained"] is False


# --- an LB host fails -------------------------------------------------------------------------


def test_lb_host_failure_moves_flows_to_the_other_host_and_keeps_their_backends(topo):
    conn4, conn6 = KeepAlive(topo, VIP4), KeepAlive(topo, VIP6)
    flows = [(vip, sport) for vip in (VIP4, VIP6) for sport in range(46000, 46024)]
    try:
        with router_taps(topo) as via, backend_taps(topo) as landed:
            backend4, backend6 = conn4.get(), conn6.get()
            assert backend4.startswith("backend") and backend6.startswith("backend")
            wait_until(lambda: labels_of(via.snapshot(), VIP4, conn4.sport), 5,
                       "the long-lived connection is seen on the router")
            (failing_role,) = labels_of(via.snapshot(), VIP4, conn4.sport)
            failing = next(lb for lb in topo.lbs if lb.role == failing_role)
            (other,) = (lb for lb in topo.lbs if lb is not failing)

            with RouteMonitor(topo) as routes, Sender(
                    topo.client, "eth0", client_frames(topo, flows), rounds=1000,
                    interval_s=0.01) as sender:
                time.sleep(0.5)
                before = via.snapshot()
                failed_wall = topo.fail_lb(failing)
                for prefix in (P4, P6):
                    topo.wait_paths(prefix, {other.role}, timeout=10)
                changed = {vip: routes.single_path_after(vip, failed_wall) for vip in (VIP4, VIP6)}
                time.sleep(0.1)  # frames sent before the change are counted by now
                moved = via.snapshot()
                time.sleep(0.5)
            sent = sum(sender.sent.values())
            landed.settle(sent, flows)
            after = via.snapshot() - moved
            reached = landed.snapshot()

            # the long-lived connections go on, on the same backends
            assert conn4.get() == backend4
            assert conn6.get() == backend6
            # the taps count on their own thread: wait for them to see the request
            wait_until(lambda: labels_of(via.snapshot() - moved, VIP4, conn4.sport), 5,
                       "the long-lived connection is seen on the router again")
            assert labels_of(via.snapshot() - moved, VIP4, conn4.sport) == {other.role}

        print(f"\nLB host {failing.role} failed (link down, lbd and BIRD killed): the "
              f"router's ECMP route changed {(changed[VIP4] - failed_wall) * 1000:.1f} ms "
              f"(IPv4), {(changed[VIP6] - failed_wall) * 1000:.1f} ms (IPv6) later; "
              f"{sent - landed.total(flows)} of {sent} flow packets lost")
        assert topo.router_bird.route_sources(P4) == {f"{other.role}v4"}
        assert topo.router_bird.route_sources(P6) == {f"{other.role}v6"}
        assert {label for label, _, _ in after} == {other.role}
        was_on_failing = [f for f in flows if labels_of(before, *f) == {failing.role}]
        assert was_on_failing, "no flow crossed the failing host"
        for vip, sport in flows:
            on = labels_of(reached, vip, sport)
            assert len(on) == 1, f"flow {vip}:{sport} reached {on}"
        for vip, sport in was_on_failing:
            assert labels_of(after, vip, sport) == {other.role}

        # The host comes back: announced again, the same rings, the connections still up.
        topo.restore_lb(failing)
        topo.wait_established()
        for prefix in (P4, P6):
            topo.wait_paths(prefix, BOTH)
        assert failing.lbctl("compare", *(str(lb.lbd.socket) for lb in topo.lbs)
                             ).returncode == 0
        assert conn4.get() == backend4
        assert conn6.get() == backend6
    finally:
        conn4.close()
        conn6.close()


# --- BIRD refusing a reconfiguration ------------------------------------------------------------


def fail_configure(lb, failing: bool) -> None:
    flag = lb.bird.workdir / "fail-configure"
    if failing:
        flag.touch()
    else:
        flag.unlink(missing_ok=True)


def test_drain_host_says_so_when_bird_did_not_take_the_withdrawal(topo):
    lb1 = topo.lbs[0]
    fail_configure(lb1, True)
    try:
        result = lb1.lbctl("drain-host")
        assert topo.vip_paths(P4) == BOTH  # BIRD still announces everything
        assert result.returncode == 1, (
            f"drain-host exited {result.returncode} saying {result.stdout.strip()!r} "
            "although BIRD still announces every VIP")
        assert "simulated failure" in result.stderr
    finally:
        fail_configure(lb1, False)


def test_a_withdrawal_bird_did_not_take_is_retried(topo):
    lb1 = topo.lbs[0]
    fail_configure(lb1, True)
    try:
        lb1.lbctl("drain-host")  # whatever it says (see the test above)
        time.sleep(1)
        assert topo.vip_paths(P4) == BOTH
        assert "simulated failure" in status(lb1)["bgp"]["error"]
    finally:
        fail_configure(lb1, False)
    # BIRD answers again: lbd must get the withdrawal through without anything else
    # changing (its BGP status refresh runs every 5 s).
    try:
        topo.wait_paths(P4, {"lb2"}, timeout=12)
    except TimeoutError as exc:
        raise AssertionError(
            f"lb1 is drained but BIRD still announces its VIPs 12 s after birdc works "
            f"again: {exc}; lbd status: {status(lb1)['bgp']}") from None
    assert status(lb1)["bgp"]["error"] == ""
