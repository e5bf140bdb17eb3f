"""Half-open (tcp-syn) checks with the real lbd in a namespace lab: real listeners on
the backends, replies caught by the balancer on the LB's interface.

A stopped listener is down within fall x interval + timeout (a RST: refused), a
silent drop within the same bound (timeouts), a restart brings it back; the LB
host's own TCP stack sends no RST (its counter does not move, and every SYN-ACK a
backend sends gets exactly one RST, the balancer's); tcp-syn and tcp verdicts of
the same backends agree through a scripted sequence of failures."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections import Counter

import pytest

from tests.lbd_helpers import apply_doc, empty_for_each_test, lab_with_lbd, ok
from xdplb import structs as s
from xdplb.datapath import MapSizes

VIP_SYN, VIP_TCP, VIP_SYN6 = "10.200.0.10", "10.200.0.11", "fd00:200::10"
INTERVAL_MS, TIMEOUT_MS, RISE, FALL = 300, 200, 2, 2
# + the verdict batch (0.2 s) and this test polling through lbctl (a process each)
DOWN_BOUND_S = FALL * INTERVAL_MS / 1000 + TIMEOUT_MS / 1000 + 0.8
UP_BOUND_S = RISE * INTERVAL_MS / 1000 + TIMEOUT_MS / 1000 + 0.8
SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=8 * 65537, conn_entries=4096)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with lab_with_lbd("xtsyn", tmp_path_factory.mktemp("lbd"), SIZES) as (topo, lbd):
        yield topo, lbd


@pytest.fixture
def lab(site):
    topo, lbd = site
    yield from ((topo, x) for x in empty_for_each_test(lbd))
    for i, host in enumerate(topo.backends):
        host.run(["ip", "route", "del", "blackhole", f"{topo.lb_iface.ipv4}/32"], check=False)
        start_server(topo, i)


def check(kind: str) -> dict:
    return {"kind": kind, "port": 80, "interval_ms": INTERVAL_MS, "timeout_ms": TIMEOUT_MS,
            "rise": RISE, "fall": FALL}


def document(topo, kinds=("tcp-syn",)) -> dict:
    vips = {"tcp-syn": VIP_SYN, "tcp": VIP_TCP}
    return {"version": 1, "vips": [
        {"vip": f"{vips[kind]}:80/tcp", "check": check(kind),
         "backends": [{"address": a} for a in topo.backend_v4]} for kind in kinds]}


def health(lbd, vip: str = VIP_SYN) -> dict[str, tuple[str, str]]:
    key = f"[{vip}]:80/tcp" if ":" in vip else f"{vip}:80/tcp"
    shown = json.loads(ok(lbd, "vip", "show", key, "-o", "json"))
    return {b["address"]: (b["status"]["health"], b["status"]["last_result"])
            for b in shown["backends"]}


def wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:.2f} s: {what}")


def start_server(topo, i: int) -> None:
    from xdplb_lab.lab import wait_port

    host = topo.backends[i]
    if host.run(["ss", "-Hltn", "sport = :80"]).stdout.strip():
        return
    host.popen([sys.executable, "-m", "xdplb_lab.backend_server", "--name", f"backend{i}",
                "--port", "80"])
    wait_port(host, 80, ip="::1")


def stop_server(topo, i: int) -> None:
    from xdplb_lab.lab import stop_backend_server

    stop_backend_server(topo, i)
    wait_for(lambda: not topo.backends[i].run(["ss", "-Hltn", "sport = :80"]).stdout.strip(),
             5, "the listener is gone")


def lb_stack_resets(topo) -> int:
    """RSTs the LB host's own TCP stack has sent (Tcp: OutRsts)."""
    lines = topo.lb.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    names, values = (line.split() for line in lines if line.startswith("Tcp:"))
    return int(values[names.index("OutRsts")])


class BackendTap:
    """On a backend's eth0: SYN-ACKs it sends to the probe ports, RSTs it receives
    on port 80 from the LB host."""

    def __init__(self, host, lb_address: str):
        self.counts: Counter = Counter()
        self.lb = socket.inet_aton(lb_address)
        self.sock = host.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.sock.recv(2048)
            except TimeoutError:
                continue
            if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            src, dst = frame[26:30], frame[30:34]
            at = 14 + (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, at)
            flags = frame[at + 13]
            if src != self.lb and dst == self.lb and sport == 80 and flags & 0x12 == 0x12 \
                    and s.SYN_PORT_BASE <= dport < s.SYN_PORT_BASE + s.SYN_PORTS:
                self.counts["syn-ack"] += 1
            elif src == self.lb and dport == 80 and flags & 0x04:
                self.counts["rst"] += 1

    def close(self) -> Counter:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        return self.counts


def test_a_stopped_listener_is_down_within_the_bound_and_a_restart_brings_it_back(lab):
    """IPv4 and IPv6 backends of one server: both go down (refused) and come back."""
    topo, lbd = lab
    doc = document(topo)
    doc["vips"].append({"vip": f"[{VIP_SYN6}]:80/tcp", "check": check("tcp-syn"),
                        "backends": [{"address": a} for a in topo.backend_v6]})
    apply_doc(lbd, doc)
    for vip in (VIP_SYN, VIP_SYN6):
        wait_for(lambda v=vip: {h for h, _ in health(lbd, v).values()} == {"up"},
                 UP_BOUND_S + 1, f"every backend of {vip} up by tcp-syn")
    targets = {VIP_SYN: topo.backend_v4[1], VIP_SYN6: topo.backend_v6[1]}
    stopped = time.monotonic()
    stop_server(topo, 1)
    for vip, target in targets.items():
        wait_for(lambda v=vip, t=target: health(lbd, v)[t][0] == "down", DOWN_BOUND_S,
                 f"{target} down after the stop")
    took = time.monotonic() - stopped
    for vip, target in targets.items():
        assert health(lbd, vip)[target] == ("down", "refused")
        assert {a for a, (h, _) in health(lbd, vip).items() if h == "up"} == set(
            health(lbd, vip)) - {target}
    restarted = time.monotonic()
    start_server(topo, 1)
    for vip, target in targets.items():
        wait_for(lambda v=vip, t=target: health(lbd, v)[t][0] == "up", UP_BOUND_S,
                 f"{target} up after the restart")
    print(f"tcp-syn: down {took:.2f} s after the listener stopped (bound {DOWN_BOUND_S:.2f}), "
          f"up {time.monotonic() - restarted:.2f} s after it returned")


def test_a_silent_drop_is_down_by_timeout_and_the_lb_stack_sends_no_reset(lab):
    topo, lbd = lab
    apply_doc(lbd, document(topo))
    wait_for(lambda: {h for h, _ in health(lbd).values()} == {"up"}, UP_BOUND_S + 1,
             "every backend up by tcp-syn")
    resets = lb_stack_resets(topo)
    taps = [BackendTap(host, topo.lb_iface.ipv4) for host in topo.backends]
    time.sleep(2.0)  # about six checks of each backend
    target_host, target = topo.backends[0], topo.backend_v4[0]
    target_host.run(["ip", "route", "add", "blackhole", f"{topo.lb_iface.ipv4}/32"])
    wait_for(lambda: health(lbd)[target][0] == "down", DOWN_BOUND_S, "down by timeout")
    assert health(lbd)[target] == ("down", "timeout")
    counts = [tap.close() for tap in taps]
    for i, seen in enumerate(counts):
        assert seen["syn-ack"] >= 5, (i, seen)
        assert seen["rst"] == seen["syn-ack"], (i, seen)  # the balancer's, one each
    assert lb_stack_resets(topo) == resets


def test_tcp_syn_and_tcp_verdicts_agree_through_a_scripted_sequence_of_failures(lab):
    topo, lbd = lab
    apply_doc(lbd, document(topo, ("tcp-syn", "tcp")))
    steps = [
        ("all up", lambda: None),
        ("backend1 stopped", lambda: stop_server(topo, 1)),
        ("backend2 silently dropped", lambda: topo.backends[2].run(
            ["ip", "route", "add", "blackhole", f"{topo.lb_iface.ipv4}/32"])),
        ("backend1 back", lambda: start_server(topo, 1)),
        ("backend2 back", lambda: topo.backends[2].run(
            ["ip", "route", "del", "blackhole", f"{topo.lb_iface.ipv4}/32"])),
    ]
    for name, action in steps:
        action()
        time.sleep(max(DOWN_BOUND_S, UP_BOUND_S))
        syn = {a: h for a, (h, _) in health(lbd, VIP_SYN).items()}
        tcp = {a: h for a, (h, _) in health(lbd, VIP_TCP).items()}
        assert syn == tcp, f"{name}: tcp-syn {syn}, tcp {tcp}"
        assert set(syn.values()) <= {"up", "down"}, name


def test_a_check_through_the_vip_tunnels_its_syn_and_rst_and_sees_a_stopped_listener(lab):
    """via = "vip": the SYN reaches the VIP through the tunnel to each backend (tc), the
    SYN-ACK returns directly, the balancer tunnels the RST to the same backend: no
    half-open connection is left on any backend, and a stopped listener is down."""
    topo, lbd = lab
    doc = document(topo)
    doc["vips"][0]["check"]["via"] = "vip"
    apply_doc(lbd, doc)
    wait_for(lambda: {h for h, _ in health(lbd).values()} == {"up"}, UP_BOUND_S + 1,
             "every backend up through the VIP")
    time.sleep(1.0)  # a few more checks of each
    for host in topo.backends:
        assert host.run(["ss", "-Htn", "state", "syn-recv"]).stdout.strip() == "", host
    target = topo.backend_v4[2]
    stop_server(topo, 2)
    wait_for(lambda: health(lbd)[target][0] == "down", DOWN_BOUND_S, "down through the VIP")
    assert health(lbd)[target] == ("down", "refused")
    start_server(topo, 2)
    wait_for(lambda: health(lbd)[target][0] == "up", UP_BOUND_S, "up through the VIP")
