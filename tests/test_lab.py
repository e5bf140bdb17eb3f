"""Tests for the network-namespace lab (xdplb_lab.lab). They need root; nothing else is skipped.

Other runs (other engineers, a demo lab) may create namespaces concurrently, so "nothing left
behind" is checked against the run ids these tests created rather than a global diff.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2 import netns
from pyroute2.netlink.exceptions import NetlinkError

from xdplb_lab import lab as L
from xdplb_lab import netns as N

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

HTTP_PORT = 8080


def our_netns(runid: str) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(f"{runid}-")]


def root_links_text() -> str:
    """`ip -o link` of the root namespace; a veth with a peer in our ns names it there."""
    return subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout


def assert_nothing_left(runid: str) -> None:
    assert our_netns(runid) == []
    assert not (L.MARKER_DIR / runid).exists()
    text = root_links_text()
    assert f"link-netns {runid}-" not in text
    assert runid not in text


def pid_dead(pid: int, timeout: float = 3.0) -> bool:
    """True once pid is gone or a zombie (dead, waiting for a reaper that is not us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if N._proc_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def new_lab() -> Iterator[Callable[..., L.Lab]]:
    """Factory for labs that are always closed and checked for leftovers afterwards."""
    labs: list[L.Lab] = []

    def make(**kw: object) -> L.Lab:
        kw.setdefault("prefix", "xt")
        lab = L.Lab(**kw)  # type: ignore[arg-type]
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
    for lab in labs:
        assert_nothing_left(lab.runid)


@pytest.fixture
def lbl(new_lab: Callable[..., L.Lab]) -> L.LbLab:
    return L.build_lb_lab(new_lab(), n_backends=3)


def ping(host: L.Host, ip: str) -> subprocess.CompletedProcess[str]:
    return host.run(["ping", "-n", "-c", "1", "-W", "1", ip], check=False, timeout=10)


def assert_pings(lbl: L.LbLab) -> None:
    targets = [*lbl.backend_v4, *lbl.backend_v6, L.LB_V4, L.LB_V6]
    results = {ip: ping(lbl.client, ip) for ip in targets}
    failed = {ip: r.stdout + r.stderr for ip, r in results.items() if r.returncode != 0}
    assert failed == {}
    assert all(" 1 received" in r.stdout for r in results.values())


# --------------------------------------------------------------------------- topology


def test_client_reaches_backends_and_lb(lbl: L.LbLab) -> None:
    assert_pings(lbl)


def test_topology_facts(lbl: L.LbLab) -> None:
    assert lbl.lb_iface.name == "eth1"
    assert lbl.lb_iface.ifindex == lbl.lb.ifindex("eth1")
    assert lbl.lb_iface.mac == lbl.lb.mac("eth1")
    assert lbl.lb_nexthop_mac == lbl.router.mac("eth1")
    assert lbl.lb_iface.ipv4 == L.LB_V4 and lbl.lb_iface.ipv6 == L.LB_V6
    assert lbl.backend_v4 == L.BACKEND_V4[:3] == ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
    assert lbl.backend_v6 == L.BACKEND_V6[:3]
    assert [i.ipv4 for i in lbl.router_backend_ifs] == ["10.100.10.1", "10.100.11.1", "10.100.12.1"]
    assert [i.name for i in lbl.router_backend_ifs] == ["ethB0", "ethB1", "ethB2"]
    assert lbl.backend_macs == [b.mac("eth0") for b in lbl.backends]
    assert lbl.router_backend_macs == [lbl.router.mac(f"ethB{i}") for i in range(3)]


def test_datapath_settings(lbl: L.LbLab) -> None:
    router = lbl.router.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
    assert router == "1"
    gro = lbl.router.run(["ethtool", "-k", "eth1"]).stdout
    assert "generic-receive-offload: on" in gro
    tx = lbl.client.run(["ethtool", "-k", "eth0"]).stdout
    assert "tx-checksumming: off" in tx
    lo = lbl.backends[0].run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
    assert f"{L.VIP_V4}/32" in lo and f"{L.VIP_V6}/128" in lo
    assert L.VIP_V4 not in lbl.lb.run(["ip", "-o", "addr"]).stdout
    neigh = lbl.router.run(["ip", "neigh", "show", "dev", "eth1"]).stdout
    assert f"{L.LB_V4} lladdr {lbl.lb_iface.mac} PERMANENT" in neigh


def test_enable_gro_helper(lbl: L.LbLab) -> None:
    L.enable_gro(lbl.router, "ethB0")
    assert "generic-receive-offload: on" in lbl.router.run(["ethtool", "-k", "ethB0"]).stdout


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_dsr_return_path(lbl: L.LbLab, v6: bool) -> None:
    """A backend answering from the VIP reaches the client (router must not rp_filter it)."""
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    client_ip, vip = (L.CLIENT_V6, L.VIP_V6) if v6 else (L.CLIENT_V4, L.VIP_V4)
    with (
        lbl.client.socket(fam, socket.SOCK_DGRAM) as rx,
        lbl.backends[1].socket(fam, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((client_ip, 9999))
        rx.settimeout(2)
        tx.bind((vip, 5555))
        tx.sendto(b"dsr", (client_ip, 9999))
        data, src = rx.recvfrom(100)
    assert data == b"dsr"
    assert src[:2] == (vip, 5555)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_server_on_backend(lbl: L.LbLab, tmp_path: Path, v6: bool) -> None:
    payload = secrets.token_hex(32).encode()
    (tmp_path / "hello.txt").write_bytes(payload)
    addr = lbl.backend_v6[0] if v6 else lbl.backend_v4[0]
    argv = [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", addr]
    lbl.backends[0].popen([*argv, "--directory", str(tmp_path)], stderr=subprocess.DEVNULL)
    L.wait_port(lbl.backends[0], HTTP_PORT, ip=addr, timeout=10)
    body = http_get(lbl.client, addr, "/hello.txt")
    assert body == payload


def http_get(host: L.Host, ip: str, path: str, timeout: float = 5.0) -> bytes:
    """One bounded HTTP/1.0 GET from inside `host`; returns the body."""
    deadline = time.monotonic() + timeout
    with host.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.settimeout(timeout)
        s.connect((ip, HTTP_PORT))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
        chunks = []
        while time.monotonic() < deadline and (chunk := s.recv(65536)):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body


def test_custom_topology_with_host_helpers(new_lab: Callable[..., L.Lab]) -> None:
    lab = new_lab()
    a, b, c = lab.add_host("a"), lab.add_host("b"), lab.add_host("c")
    a_if, b_if = lab.connect(a, b, "eth0", "eth0")
    assert (a_if.host, b_if.host) == (a, b)
    assert b.iface("eth0") == L.Iface(b, "eth0", b_if.ifindex, b_if.mac)
    c_if, b2_if = lab.connect(c, b, "eth0", "eth1")
    a.addr_add("eth0", "192.0.2.1/24")
    b.addr_add("eth0", "192.0.2.254/24")
    b.addr_add("eth1", "198.51.100.254/24")
    c.addr_add("eth0", "198.51.100.1/24")
    a.neigh_add("eth0", "192.0.2.254", b_if.mac)
    a.route_add("198.51.100.0/24", "192.0.2.254", "eth0")
    c.route_add("default", "198.51.100.254", "eth0")
    b.sysctl("net.ipv4.ip_forward", 1)
    assert b.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    r = ping(a, "198.51.100.1")
    assert r.returncode == 0, r.stdout + r.stderr
    neigh = a.run(["ip", "neigh", "show", "dev", "eth0"]).stdout
    assert f"192.0.2.254 lladdr {b_if.mac} PERMANENT" in neigh
    assert c_if.name == "eth0" and b2_if.name == "eth1"


def test_wait_port_times_out(new_lab: Callable[..., L.Lab]) -> None:
    host = new_lab().add_host("h")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        L.wait_port(host, 9, timeout=0.3)
    assert time.monotonic() - start < 3


def test_host_run_raises_with_stderr(new_lab: Callable[..., L.Lab]) -> None:
    host = new_lab().add_host("h")
    with pytest.raises(L.CommandError, match="stderr: boom"):
        host.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert host.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    assert host.run(["cat"], input="hi").stdout == "hi"


# --------------------------------------------------------------------------- lifecycle


def test_close_removes_everything_even_on_exception(tmp_path: Path) -> None:
    before = set(netns.listnetns())
    with pytest.raises(RuntimeError, match="inside the with"), L.Lab(prefix="xt") as lab:
        lbl = L.build_lb_lab(lab, n_backends=2)
        names = {h.name for h in lab.hosts}
        assert names <= set(netns.listnetns())
        procs = [
            lbl.backends[0].popen(["sleep", "60"]),
            # ignores SIGTERM and has a child of its own: needs SIGKILL to the whole group
            lbl.client.popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"]),
        ]
        # a process not started through popen still pins the namespace; close must kill it
        stray = int(lbl.router.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout)
        raise RuntimeError("inside the with")
    after = set(netns.listnetns())
    assert not names & after
    assert {n for n in after - before if n.startswith(lab.runid)} == set()
    assert all(p.poll() is not None for p in procs)
    assert pid_dead(stray)
    assert_nothing_left(lab.runid)


def test_close_is_idempotent_and_survives_missing_namespace() -> None:
    lab = L.Lab(prefix="xt")
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.connect(a, b, "eth0", "eth0")
    netns.remove(a.name)  # someone removed it behind our back
    lab.close()
    lab.close()
    assert_nothing_left(lab.runid)
    with pytest.raises(L.LabError):
        lab.add_host("c")


def test_close_after_partial_setup_failure() -> None:
    with pytest.raises(ValueError), L.Lab(prefix="xt") as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.connect(a, b, "eth0", "an-interface-name-too-long")
    assert_nothing_left(lab.runid)
    with pytest.raises(NetlinkError), L.Lab(prefix="xt") as lab2:
        a, b = lab2.add_host("a"), lab2.add_host("b")
        lab2.connect(a, b, "eth0", "eth0")
        lab2.connect(a, b, "eth0", "eth1")  # eth0 exists in a: netlink error mid-build
    assert_nothing_left(lab2.runid)


def test_two_labs_do_not_collide(new_lab: Callable[..., L.Lab]) -> None:
    one, two = new_lab(), new_lab()
    assert one.runid != two.runid
    lbl1, lbl2 = L.build_lb_lab(one, n_backends=1), L.build_lb_lab(two, n_backends=1)
    assert not {h.name for h in one.hosts} & {h.name for h in two.hosts}
    assert_pings(lbl1)
    assert_pings(lbl2)
    for name in [*our_netns(one.runid), *our_netns(two.runid)]:
        assert len(name) <= 32
    one.close()
    assert our_netns(one.runid) == []
    assert_pings(lbl2)  # closing one lab leaves the other intact


# --------------------------------------------------------------------------- remove_stale

CRASHING_RUN = textwrap.dedent(
    """
    import os, subprocess, sys
    from xdplb_lab.lab import Lab
    lab = Lab(prefix=sys.argv[1])
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.connect(a, b, "eth0", "eth0")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    orphan = a.popen(["sleep", "60"], **quiet)  # must not hold our stdout pipe open
    print(lab.runid, orphan.pid, flush=True)
    os._exit(0)  # crash: no close(), no atexit
    """
)


def crash_a_run(prefix: str) -> tuple[str, int]:
    """Run a lab in a child that dies without cleaning up; returns (run id, orphan pid)."""
    out = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, prefix],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_remove_stale_removes_dead_runs_only(new_lab: Callable[..., L.Lab]) -> None:
    prefix = "s" + secrets.token_hex(2)  # private prefix: never touch anybody else's runs
    live = new_lab(prefix=prefix)
    live_host = live.add_host("a")
    try:
        dead_runid, orphan = crash_a_run(prefix)
        assert len(our_netns(dead_runid)) == 2
        assert N._proc_start_time(orphan) is not None
        removed = L.remove_stale(prefix)
        assert sorted(removed) == [f"{dead_runid}-a", f"{dead_runid}-b"]
        assert_nothing_left(dead_runid)
        assert pid_dead(orphan)
        assert our_netns(live.runid) == [live_host.name]
        assert (L.MARKER_DIR / live.runid).exists()
        assert L.remove_stale(prefix) == []
    finally:
        _cleanup_prefix(prefix, keep=live.runid)


def _cleanup_prefix(prefix: str, keep: str) -> None:
    """Safety net if remove_stale misbehaved: drop this test's dead run by hand."""
    names = [n for n in netns.listnetns() if n.startswith(prefix) and not n.startswith(keep)]
    N._kill_ns_processes(names)
    for name in names:
        netns.remove(name)
    for marker in L.MARKER_DIR.glob(f"{prefix}*"):
        if marker.name != keep:
            marker.unlink(missing_ok=True)


def test_remove_stale_needs_prefix() -> None:
    with pytest.raises(ValueError):
        L.remove_stale("")
