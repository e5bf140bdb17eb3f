"""xdplb-backend on a bare backend (addressed and routed, serving HTTP, nothing
else): setup alone makes it serve through the VIP, again it changes nothing,
the doctor passes and names each broken condition in turn, the self-test
probes decapsulation and the stack's answer, bad plans and unsafe hosts are
refused without a change, and teardown leaves the host as it was.

The tool runs inside the backend's network namespace (nsenter --net: it pins in
the host's bpffs, as on a real host), with an instance name of this run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lbd_helpers import lab_with_lbd, ok
from xdplb.datapath import DECAP_PIN_ROOT, MapSizes

pytestmark = pytest.mark.netns

SIZES = MapSizes(max_vips=4, max_backends=16, ring_entries=4 * 1009, conn_entries=4096)
VIP4, VIP6 = "10.200.0.10", "fd00:200::10"
TCP4, TCP6 = f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"


class Backend:
    """The lab's one backend and the tool run in it."""

    def __init__(self, topo, workdir: Path):
        self.topo, self.host = topo, topo.backends[0]
        self.v4, self.v6 = topo.backend_v4[0], topo.backend_v6[0]
        self.name = topo.lab.runid
        self.state_dir = workdir / "backend-state"

    def tool(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.host.run([sys.executable, "-m", "xdplb.backendhost.cli", *args],
                             check=False, share_mounts=True, timeout=60)

    def instance(self) -> list[str]:
        return ["--name", self.name, "--state-dir", str(self.state_dir)]

    def plan(self) -> list[str]:
        return ["--interface", "eth0", "--tunnel-address", self.v4, "--tunnel-address",
                self.v6, "--vip", TCP4, "--vip", TCP6, "--clamp-mss", *self.instance()]

    def setup(self) -> list[str]:
        result = self.tool("setup", *self.plan())
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    def doctor(self, *extra: str) -> tuple[int, dict[str, str], str]:
        """(exit code, check name -> status, the checks as JSON)."""
        result = self.tool("doctor", *self.instance(), "--sample", "0.2", "-o", "json",
                           *extra)
        assert result.stdout, result.stderr
        checks = json.loads(result.stdout)
        marks = {c["name"]: c["status"] for c in checks}
        assert len(marks) == len(checks), "check names are unique"
        return result.returncode, marks, result.stdout

    def sh(self, *argv: str) -> str:
        return self.host.run(list(argv)).stdout

    def snapshot(self) -> dict[str, str]:
        """What setup may touch: addresses, routes, XDP, the sysctls, the pins."""
        sysctls = [f"net.ipv4.conf.{i}.{n}" for i in ("all", "eth0")
                   for n in ("rp_filter", "arp_ignore", "arp_announce")]
        return {"lo": self.sh("ip", "-br", "addr", "show", "lo"),
                "routes": self.sh("ip", "route") + self.sh("ip", "-6", "route", "show",
                                                           "default"),
                "xdp": "xdp" if "xdp" in self.sh("ip", "link", "show", "eth0") else "none",
                "sysctls": self.sh("sysctl", *sysctls),
                "pins": str((DECAP_PIN_ROOT / self.name).exists())}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("backendhost")
    with lab_with_lbd("xtbkh", workdir / "lbd", SIZES, n_backends=1,
                      bare_backends=True) as (topo, lbd):
        backend = Backend(topo, workdir)
        # A host with strict reverse-path filtering, as many distributions ship.
        for scope in ("all", "eth0"):
            backend.host.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 1)
        pristine = backend.snapshot()
        for vip, address in ((TCP4, backend.v4), (TCP6, backend.v6)):
            ok(lbd, "vip", "add", vip, "--ring-size", "1009", "--check", "tcp")
            ok(lbd, "backend", "add", vip, address)
        try:
            yield topo, lbd, backend, pristine
        finally:
            backend.tool("teardown", *backend.instance())


def served_through_the_vip(topo, address: str) -> str:
    from xdplb_lab.lab import http_get

    deadline = time.monotonic() + 20
    while True:
        try:
            return http_get(topo, address)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_bare_backend_does_not_answer_through_the_vip(lab):
    topo, _, backend, _ = lab
    with pytest.raises(OSError):
        from xdplb_lab.lab import http_get

        http_get(topo, VIP4, timeout=1.0)
    code, marks, out = backend.doctor("--interface", "eth0", "--tunnel-address", backend.v4,
                                      "--vip", TCP4)
    assert code == 1, out
    assert marks["eth0: decapsulator"] == "fail" and marks["VIP 10.200.0.10"] == "fail", out


def test_setup_alone_makes_it_serve_through_the_vip_and_again_changes_nothing(lab):
    topo, _, backend, _ = lab
    assert backend.setup() == [
        f"done: decapsulating packets to {backend.v4}, {backend.v6} (IPIP, IP6IP6, 4in6, GUE "
        "on UDP 6080)",
        "done: eth0: decapsulator attached (native XDP)",
        f"done: {VIP4}/32 added to lo",
        f"done: {VIP6}/128 added to lo",
        "done: net.ipv4.conf.eth0.rp_filter = 2 (was 1)",
        "done: net.ipv4.conf.all.rp_filter = 2 (was 1)",
        "done: net.ipv4.conf.eth0.arp_ignore = 1 (was 0)",
        "done: net.ipv4.conf.eth0.arp_announce = 2 (was 0)",
        "done: IPv4 default route via eth0: advmss 1412 (segments of 1452 bytes, 1500 once "
        "encapsulated)",
        "done: IPv6 default route via eth0: advmss 1392 (segments of 1452 bytes, 1500 once "
        "encapsulated)",
    ]
    assert served_through_the_vip(topo, VIP4) == "backend0"
    assert served_through_the_vip(topo, VIP6) == "backend0"
    again = backend.setup()
    assert all(line.startswith("already: ") for line in again), again
    assert len(again) == 9  # each setting once; rp_filter's two keys are one setting
    assert served_through_the_vip(topo, VIP4) == "backend0"


def test_the_doctor_passes_and_sees_the_tunnel_traffic(lab):
    topo, _, backend, _ = lab
    import threading

    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            served_through_the_vip(topo, VIP4)
            time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        code, marks, out = backend.doctor("--self-test")
    finally:
        stop.set()
        sender.join(timeout=10)
    assert code == 0, out
    assert set(marks.values()) == {"ok"}, out
    assert len(marks) == 23, out  # decap 1, tunnel addresses 2, VIPs 2, sysctls 3,
    # listeners 2, return paths 2 + MTU 2, traffic 1, self-test 6 + 2 answers
    assert marks["self-test answer from 10.200.0.10:80/tcp"] == "ok"
    traffic = next(c for c in json.loads(out) if c["name"] == "tunnel traffic")
    assert re.fullmatch(r"[1-9][0-9]* packets decapsulated in 0.2 s \(.*\)",
                        traffic["detail"]), traffic
    text = backend.tool("doctor", *backend.instance(), "--sample", "0.2")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0] == "✓ eth0: decapsulator: attached (native XDP, prog " + \
        re.search(r"prog (\d+)", lines[0])[1] + ")"
    assert f"✓ VIP {VIP4}: on lo (/32)" in lines
    assert lines[-1] == "15 checks, 0 failed"


def _restart_server(topo) -> None:
    from xdplb_lab import lab as labmod

    labmod.start_http_backends(topo, decap=False)


BREAKS = {
    # name: (break it, repair it, the checks that must fail)
    "decapsulator detached": (["ip", "link", "set", "dev", "eth0", "xdpdrv", "off"], "setup",
                              {"eth0: decapsulator"}),
    "VIP off lo": (["ip", "addr", "del", f"{VIP4}/32", "dev", "lo"], "setup",
                   {"VIP 10.200.0.10"}),
    # The kernel takes the larger of `all` and the interface's own: both must be strict.
    "strict rp_filter": (["sysctl", "-w", "net.ipv4.conf.all.rp_filter=1",
                          "net.ipv4.conf.eth0.rp_filter=1"], "setup", {"eth0: rp_filter"}),
    "ARP answered for the VIP": (["sysctl", "-w", "net.ipv4.conf.eth0.arp_ignore=0"], "setup",
                                 {"eth0: arp_ignore"}),
    "ARP from the VIP": (["sysctl", "-w", "net.ipv4.conf.eth0.arp_announce=0"], "setup",
                         {"eth0: arp_announce"}),
    "no listener": ("stop-server", _restart_server,
                    {"VIP 10.200.0.10:80/tcp", "VIP [fd00:200::10]:80/tcp"}),
    # With its address goes the route through it: both come back, then setup's MSS.
    "tunnel address gone": (["ip", "addr", "del", "10.100.10.2/24", "dev", "eth0"],
                            ["sh", "-c", "ip addr add 10.100.10.2/24 dev eth0 && ip route add "
                             "default via 10.100.10.1 dev eth0 proto static"],
                            {"tunnel address 10.100.10.2", "replies from 10.200.0.10"}),
    "replies into a tunnel": (["sh", "-c", "ip tuntap add mode tun name xtun0 && "
                               "ip link set xtun0 up && "
                               "ip route add 198.51.100.1/32 dev xtun0"],
                              ["ip", "link", "del", "xtun0"], {"replies from 10.200.0.10"}),
    "MSS too big": (["ip", "route", "change", "default", "via", "10.100.10.1", "dev", "eth0",
                     "proto", "static"], "setup", {"IPv4 MTU headroom"}),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_the_doctor_names_each_broken_condition(lab, case):
    topo, _, backend, _ = lab
    breaking, repair, failing = BREAKS[case]
    if breaking == "stop-server":
        from xdplb_lab import lab as labmod

        labmod.stop_backend_server(topo, 0)
        time.sleep(0.5)
    else:
        backend.sh(*breaking)
    try:
        code, marks, out = backend.doctor()
        assert code == 1, out
        assert {name for name, mark in marks.items() if mark == "fail"} == failing, out
        assert all(c["fix"] for c in json.loads(out) if c["status"] == "fail"), out
    finally:
        if callable(repair):
            repair(topo)
        elif repair != "setup":
            backend.sh(*repair)
        backend.setup()
    code, marks, out = backend.doctor()
    assert code == 0 and "fail" not in marks.values(), out
    assert served_through_the_vip(topo, VIP4) == "backend0"


def test_the_self_test_fails_when_nothing_answers_on_the_vip(lab):
    topo, _, backend, _ = lab
    from xdplb_lab import lab as labmod

    labmod.stop_backend_server(topo, 0)
    time.sleep(0.5)
    try:
        code, marks, out = backend.doctor("--self-test")
    finally:
        _restart_server(topo)
    assert code == 1
    assert marks["self-test answer from 10.200.0.10:80/tcp"] == "fail", out
    answer = next(c for c in json.loads(out)
                  if c["name"] == "self-test answer from 10.200.0.10:80/tcp")
    assert answer["detail"].startswith("refused (RST)"), answer
    assert all(mark == "ok" for name, mark in marks.items()
               if name.startswith("self-test eth0")), out  # decapsulation still works


def test_bad_plans_and_unsafe_hosts_are_refused_changing_nothing(lab):
    _topo, _, backend, _ = lab
    before = backend.snapshot()
    bad = backend.tool("setup", "--interface", "eth0", "--tunnel-address", "10.1.1.300",
                       "--vip", "10.200.0.10:99999/tcp", "--xdp-mode", "native",
                       *backend.instance())
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "xdplb-backend: tunnel_addresses[0]: '10.1.1.300' is not an IPv4 or IPv6 address",
        "xdplb-backend: vips[0]: VIP '10.200.0.10:99999/tcp': port '99999' is not in 1..65535 "
        "(leave it out for every port)",
    ]
    elsewhere = backend.tool("setup", "--interface", "eth0", "--tunnel-address", "10.9.9.9",
                             "--vip", TCP4, *backend.instance())
    assert elsewhere.returncode == 1
    assert "tunnel address 10.9.9.9 is not an address of this host" in elsewhere.stderr
    missing = backend.tool("setup", "--interface", "eth9", "--tunnel-address", backend.v4,
                           "--vip", TCP4, *backend.instance())
    assert missing.returncode == 1 and "no interface 'eth9'" in missing.stderr
    assert backend.snapshot() == before


def test_another_xdp_program_is_never_replaced(lab):
    _topo, _, backend, _ = lab
    from xdplb_lab.programs import attach_pass

    backend.sh("ip", "link", "set", "dev", "eth0", "xdpdrv", "off")
    attach_pass("eth0", netns=backend.host.name)
    try:
        refused = backend.tool("setup", *backend.plan())
        assert refused.returncode == 1
        assert re.search(r"eth0 has another XDP program attached \(id \d+, 'xdplb_pass'\); "
                         "xdplb-backend will not replace it", refused.stderr), refused.stderr
        code, marks, out = backend.doctor()
        assert code == 1 and marks["eth0: decapsulator"] == "fail"
        assert "another XDP program is attached ('xdplb_pass'" in out
    finally:
        backend.sh("ip", "link", "set", "dev", "eth0", "xdpdrv", "off")
        backend.setup()


def test_teardown_leaves_the_host_as_it_was(lab):
    _topo, _, backend, pristine = lab
    result = backend.tool("teardown", *backend.instance())
    assert result.returncode == 0, result.stderr
    assert backend.snapshot() == pristine
    assert not (backend.state_dir / f"{backend.name}.json").exists()
    again = backend.tool("teardown", *backend.instance())
    assert again.returncode == 0
    assert again.stdout.startswith("already: nothing to undo")
    backend.setup()  # the module's fixture tears down once more on the way out
