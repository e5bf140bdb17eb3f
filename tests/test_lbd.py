"""The real lbd in a lab's lb namespace, driven by the real lbctl.

Every lbctl command end to end, checked against the state file, the listing
and lbd's pinned maps; refusals leave both untouched; kill -9 loses no
packet of established flows; a corrupt state file stops lbd; only root
reaches the socket.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.flows import BackendCounters, FlowTraffic
from tests.lbd_helpers import lab_with_lbd, ok, running_and_empty
from xdplb import maglev
from xdplb import structs as s
from xdplb.datapath import MapSizes
from xdplb.reconciler import read_view

pytestmark = pytest.mark.netns

SIZES = MapSizes(max_vips=8, max_backends=16, ring_entries=4 * 65537, conn_entries=65536)
VIP4 = "10.200.0.10:80/tcp"
VIP6 = "[fd00:200::10]:80/tcp"
NOBODY = 65534


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_with_lbd("xtlbd", tmp_path_factory.mktemp("lbd"), SIZES) as (topo, lbd):
        yield topo, lbd


@pytest.fixture
def lbd(lab):
    """lbd running with an empty state before each test."""
    _, daemon = lab
    return running_and_empty(daemon)



def exported(lbd) -> dict:
    return json.loads(ok(lbd, "export"))


def maps_view(lbd) -> dict:
    maps = lbd.maps()
    try:
        return read_view(maps)
    finally:
        maps.close()


def backends_of(topo, n: int) -> list[str]:
    return topo.backend_v4[:n]


def expected_ring(weights: dict[str, int], size: int = 65537) -> list[str | None]:
    return maglev.build_ring(weights, size).owners()


# --- every command, end to end -----------------------------------------------------------


def test_vip_add_with_backends_is_realised_in_the_maps(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", VIP4)
    for address in backends_of(topo, 3):
        ok(lbd, "backend", "add", VIP4, address, "--weight", "100")
    view = maps_view(lbd)
    vip = view["vips"][VIP4]
    assert vip["flags"] == 0
    assert vip["ring"] == expected_ring(dict.fromkeys(backends_of(topo, 3), 100))
    flags = s.BACKEND_F_AVAILABLE
    assert vip["backends"] == dict.fromkeys(backends_of(topo, 3), flags)
    assert view["vip_addrs"] == {"10.200.0.10": 0}
    assert view["orphan_backends"] == []
    doc = exported(lbd)
    assert [v["vip"] for v in doc["vips"]] == [VIP4]
    assert [b["address"] for b in doc["vips"][0]["backends"]] == backends_of(topo, 3)


def test_vip_options_reach_the_vip_entry(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", VIP6, "--hash", "source", "--encap", "gue", "--ring-size", "4099")
    ok(lbd, "backend", "add", VIP6, topo.backend_v6[0])
    vip = maps_view(lbd)["vips"][VIP6]
    assert vip["flags"] == s.VIP_F_HASH_SRC_ONLY | s.VIP_F_GUE
    assert vip["ring"] == [topo.backend_v6[0]] * 4099
    assert vip["backends"] == {topo.backend_v6[0]: s.BACKEND_F_AVAILABLE | s.BACKEND_F_IPV6}
    ok(lbd, "vip", "set", VIP6, "--hash", "5tuple")
    assert maps_view(lbd)["vips"][VIP6]["flags"] == s.VIP_F_GUE


def test_portless_vip_sets_the_address_flag(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", "10.200.0.10/udp")
    ok(lbd, "backend", "add", "10.200.0.10/udp", topo.backend_v4[1])
    view = maps_view(lbd)
    assert view["vip_addrs"] == {"10.200.0.10": s.VIP_ADDR_F_PORTLESS_UDP}
    assert view["vips"]["10.200.0.10/udp"]["ring"] == [topo.backend_v4[1]] * 65537


def test_backend_set_weight_drain_undrain_and_del(lab, lbd):
    topo, _ = lab
    a, b, c = backends_of(topo, 3)
    ok(lbd, "vip", "add", VIP4)
    for address in (a, b, c):
        ok(lbd, "backend", "add", VIP4, address)
    ok(lbd, "backend", "set", VIP4, b, "--weight", "300")
    assert maps_view(lbd)["vips"][VIP4]["ring"] == expected_ring({a: 100, b: 300, c: 100})
    ok(lbd, "backend", "set", VIP4, a, "--drain")
    vip = maps_view(lbd)["vips"][VIP4]
    assert vip["ring"] == expected_ring({a: 0, b: 300, c: 100})
    assert vip["backends"][a] == s.BACKEND_F_AVAILABLE  # established flows keep it
    ok(lbd, "backend", "set", VIP4, a, "--undrain")
    assert maps_view(lbd)["vips"][VIP4]["ring"] == expected_ring({a: 100, b: 300, c: 100})
    ok(lbd, "backend", "del", VIP4, b)
    vip = maps_view(lbd)["vips"][VIP4]
    assert vip["ring"] == expected_ring({a: 100, c: 100})
    assert sorted(vip["backends"]) == [a, c]
    assert [x["weight"] for x in exported(lbd)["vips"][0]["backends"]] == [100, 100]


def test_vip_del_removes_entry_ring_and_address(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", VIP4)
    ok(lbd, "backend", "add", VIP4, topo.backend_v4[0])
    ok(lbd, "vip", "del", VIP4)
    view = maps_view(lbd)
    assert view["vips"] == {}
    assert view["vip_addrs"] == {}
    assert view["ring_entries_nonzero"] == 0
    assert not any(view["addr_filter"])
    assert view["orphan_backends"] == []
    assert exported(lbd) == {"version": 1, "vips": []}


def test_apply_dry_run_changes_nothing_and_apply_converges(lab, lbd, tmp_path):
    topo, _ = lab
    doc = {"version": 1, "vips": [
        {"vip": VIP4, "backends": [{"address": a, "weight": 50} for a in backends_of(topo, 2)]},
        {"vip": "10.200.0.10/udp", "backends": [{"address": topo.backend_v4[2]}]},
    ]}
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(doc))
    before = maps_view(lbd)
    dry = ok(lbd, "apply", "-f", str(path), "--dry-run")
    assert f"add VIP {VIP4}" in dry
    assert maps_view(lbd) == before
    assert exported(lbd)["vips"] == []
    ok(lbd, "apply", "-f", str(path))
    assert sorted(maps_view(lbd)["vips"]) == sorted([VIP4, "10.200.0.10/udp"])
    assert ok(lbd, "apply", "-f", str(path), "--dry-run").strip() == ""
    again = exported(lbd)
    export_path = tmp_path / "export.json"
    export_path.write_text(json.dumps(again))
    ok(lbd, "apply", "-f", str(export_path))
    assert exported(lbd) == again


def test_apply_reads_toml(lab, lbd, tmp_path):
    topo, _ = lab
    path = tmp_path / "lb.toml"
    path.write_text(f'version = 1\n[[vips]]\nvip = "{VIP4}"\nhash = "source"\n'
                    f'[[vips.backends]]\naddress = "{topo.backend_v4[0]}"\nweight = 7\n')
    ok(lbd, "apply", "-f", str(path))
    doc = exported(lbd)
    assert doc["vips"][0]["hash"] == "source"
    assert doc["vips"][0]["backends"][0]["weight"] == 7


def test_listing_and_stats_count_real_http_traffic(lab, lbd):
    topo, _ = lab
    from xdplb_lab.lab import http_get

    ok(lbd, "vip", "add", VIP4)
    for address in backends_of(topo, 3):
        ok(lbd, "backend", "add", VIP4, address)
    answers = [http_get(topo, "10.200.0.10") for _ in range(30)]
    assert all(a.startswith("backend") for a in answers)
    listing = json.loads(ok(lbd, "vip", "list", "-o", "json"))
    assert [v["vip"] for v in listing["vips"]] == [VIP4]
    backends = listing["vips"][0]["backends"]
    assert [b["address"] for b in backends] == backends_of(topo, 3)
    assert sum(b["status"]["ring_positions"] for b in backends) == 65537
    stats = json.loads(ok(lbd, "stats", VIP4, "-o", "json"))
    vip_total = [t for t in stats["traffic"] if not t.get("backend")]
    per_backend = [t for t in stats["traffic"] if t.get("backend")]
    assert vip_total[0]["packets"] >= 30 * 5  # SYN, ACK, request, ACK, FIN at least
    assert sum(t["packets"] for t in per_backend) == vip_total[0]["packets"]
    table = ok(lbd, "vip", "list")
    assert VIP4 in table and all(a in table for a in backends_of(topo, 3))


def test_status_reports_the_attachment_and_next_hop(lab, lbd):
    topo, _ = lab
    status = json.loads(ok(lbd, "status", "-o", "json"))
    assert status["interfaces"][0]["name"] == topo.lb_iface.name
    assert status["interfaces"][0]["prog_id"] > 0
    assert status["nexthop_mac"] == topo.lb_nexthop_mac
    assert status["max_vips"] == SIZES.max_vips - 1


def test_completion_script_is_printed(lbd):
    out = ok(lbd, "completion", "bash")
    assert "_LBCTL_COMPLETE" in out


# --- bad input: one clear line, exit code, nothing changed --------------------------------


def snapshot(lbd) -> tuple[dict, dict, bytes]:
    return exported(lbd), maps_view(lbd), lbd.state_file.read_bytes()


@pytest.fixture
def populated(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", VIP4)
    ok(lbd, "backend", "add", VIP4, topo.backend_v4[0])
    return lbd


REFUSALS = [
    (["vip", "add", "10.200.0.300:80/tcp"], 2, "not an IPv4 or IPv6 address"),
    (["vip", "add", "10.200.0.11:70000/tcp"], 2, "is not in 1..65535"),
    (["vip", "add", "10.200.0.11:0/tcp"], 2, "is not in 1..65535"),
    (["vip", "add", "10.200.0.11:80/sctp"], 2, "'sctp' is not one of tcp, udp"),
    (["vip", "add", VIP4], 1, f"VIP {VIP4}: already exists"),
    (["vip", "del", "10.200.0.99:80/tcp"], 1, "VIP 10.200.0.99:80/tcp: no such VIP"),
    (["backend", "add", "10.200.0.99:80/tcp", "10.100.10.2"], 1, "no such VIP"),
    (["backend", "del", VIP4, "10.100.99.2"], 1, f"VIP {VIP4}: no backend 10.100.99.2"),
    (["backend", "add", VIP4, "10.100.10.2"], 1, "backend 10.100.10.2 already exists"),
    (["backend", "set", VIP4, "10.100.10.2", "--weight", "10001"], 2, "10001"),
    (["backend", "set", VIP4, "10.100.10.2", "--weight", "-1"], 2, "-1"),
    (["vip", "set", VIP4, "--ring-size", "65536"], 2,
     "65536 is not a prime (nearest primes: 65521, 65537)"),
    (["vip", "add", "[fd00:200::10]:80/tcp", "--ring-size", "1000"], 2,
     "1000 is not a prime (nearest primes: 997, 1009)"),
]


@pytest.mark.parametrize(("args", "code", "message"), REFUSALS,
                         ids=[" ".join(r[0]) for r in REFUSALS])
def test_bad_input_is_refused_and_changes_nothing(populated, args, code, message):
    before = snapshot(populated)
    result = populated.lbctl(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or code == 2
    assert result.stdout == ""
    assert snapshot(populated) == before


def test_more_backends_than_the_maps_hold_is_refused(lab, lbd, tmp_path):
    limit = SIZES.max_backends - 1
    doc = {"version": 1, "vips": [{"vip": VIP4, "backends": [
        {"address": f"10.150.{i // 200}.{i % 200 + 1}"} for i in range(limit + 1)]}]}
    path = tmp_path / "too-many.json"
    path.write_text(json.dumps(doc))
    before = snapshot(lbd)
    result = lbd.lbctl("apply", "-f", str(path))
    assert result.returncode == 1
    assert f"{limit + 1} backends (counted per VIP) exceed the limit of {limit}" in result.stderr
    assert snapshot(lbd) == before


def test_unreachable_socket_is_a_clear_error(lbd, tmp_path):
    import subprocess

    from xdplb_lab.daemon import console_script

    missing = tmp_path / "nowhere.sock"
    result = subprocess.run([console_script("lbctl"), "--socket", str(missing), "status"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert f"cannot reach lbd at unix://{missing}" in result.stderr


# --- permissions ------------------------------------------------------------------------


def test_socket_is_0600_and_other_users_are_refused(populated):
    mode = os.stat(populated.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    before = snapshot(populated)
    result = populated.lbctl("vip", "del", VIP4, user=NOBODY)
    assert result.returncode == 1
    assert "cannot reach lbd" in result.stderr
    assert "Permission denied" in result.stderr or "permission" in result.stderr.lower()
    assert snapshot(populated) == before


# --- restarts ----------------------------------------------------------------------------


def test_kill_9_and_restart_lose_no_packet_of_established_flows(lab, lbd):
    topo, _ = lab
    ok(lbd, "vip", "add", VIP4)
    for address in backends_of(topo, 3):
        ok(lbd, "backend", "add", VIP4, address)
    state_before, maps_before = exported(lbd), maps_view(lbd)
    flows = FlowTraffic(topo, "10.200.0.10", 80, sports=list(range(41000, 41040)))
    counters = BackendCounters(topo, "10.200.0.10", 80)
    stop = threading.Event()
    sender = threading.Thread(target=flows.send_rounds, args=(3000, 0.01, stop))
    try:
        sender.start()
        assert lbd.kill(signal.SIGKILL) == -signal.SIGKILL
        lbd.start()  # compiles, finds the pinned maps, replaces the program
        ok(lbd, "status")
        stop.set()
        sender.join(timeout=60)
        assert not sender.is_alive()
        counters.settle(sum(flows.sent.values()))
    finally:
        stop.set()
        counters.close()
    assert sum(flows.sent.values()) >= 40 * 100  # traffic spanned the restart
    for sport, sent in flows.sent.items():
        on = counters.backends_of(sport)
        assert len(on) == 1, f"flow {sport} reached backends {on}"
        assert counters.counts[on[0]][sport] == sent, f"flow {sport}: lost packets"
    assert exported(lbd) == state_before
    assert maps_view(lbd) == maps_before


def test_corrupt_state_file_stops_lbd_and_is_left_untouched(lab, lbd):
    lbd.kill(signal.SIGTERM)
    original = lbd.state_file.read_bytes()
    corrupt = b'{"version": 1, "vips": [ {"vip": "10.200.0.10:80/tcp",'
    lbd.state_file.write_bytes(corrupt)
    try:
        proc = lbd.start(wait=False)
        assert proc.wait(timeout=60) == 1
        assert f"state file {lbd.state_file}: not valid JSON" in lbd.log_tail()
        assert lbd.state_file.read_bytes() == corrupt
    finally:
        lbd.state_file.write_bytes(original)
    lbd.start()


def test_sigterm_keeps_forwarding_and_restart_reuses_everything(lab, lbd):
    topo, _ = lab
    from xdplb_lab.lab import http_get

    ok(lbd, "vip", "add", VIP4)
    ok(lbd, "backend", "add", VIP4, topo.backend_v4[2])
    maps_before = maps_view(lbd)
    assert lbd.kill(signal.SIGTERM) == 0
    assert http_get(topo, "10.200.0.10") == "backend2"  # no daemon, still forwarding
    assert "the datapath keeps forwarding" in lbd.log_tail()
    lbd.start()
    assert maps_view(lbd) == maps_before
    assert Path(lbd.pin_dir).is_dir()


# --- drain until idle -------------------------------------------------------------------


def test_backend_drain_wait_reports_flows_until_idle(lab, lbd):
    """Draining keeps established flows on the backend (connection table) and
    `--wait` counts them down: busy while they send, idle once they stop."""
    topo, _ = lab
    backend = topo.backend_v4[0]
    ok(lbd, "vip", "add", VIP4, "--check", "none")
    ok(lbd, "backend", "add", VIP4, backend)
    flows = FlowTraffic(topo, "10.200.0.10", 80, sports=list(range(42000, 42025)))
    counters = BackendCounters(topo, "10.200.0.10", 80)
    try:
        flows.send_rounds(1, 0.0)  # 25 flows, all on the only backend, now in the table
        counters.settle(25)
    finally:
        counters.close()
    assert [sum(c.values()) for c in counters.counts] == [25, 0, 0]  # forwarded, so recorded
    stop = threading.Event()
    busy_sender = threading.Thread(target=flows.send_rounds, args=(400, 0.05, stop))
    busy_sender.start()
    try:
        busy = lbd.lbctl("backend", "drain", VIP4, backend, "--wait", "--timeout", "2",
                         "--active-within", "2")
    finally:
        stop.set()
        busy_sender.join(timeout=30)
    assert busy.returncode == 1, busy.stderr
    assert f"lbctl: {backend} still has 25 active flows after 2 s" in busy.stderr
    # Earlier tests' flows may still sit in the table under this backend index: the
    # total can be higher; the active ones are exactly this test's 25.
    progress = [line for line in busy.stdout.splitlines() if "connection table" in line]
    assert progress and all(line.endswith(", 25 active within 2 s") for line in progress)
    assert all(int(line.split()[1]) >= 25 for line in progress)
    assert maps_view(lbd)["vips"][VIP4]["ring"] == [None] * 65537  # drained: no new flows
    idle = lbd.lbctl("backend", "drain", VIP4, backend, "--wait", "--timeout", "20",
                     "--active-within", "2")
    assert idle.returncode == 0, idle.stderr
    lines = idle.stdout.splitlines()
    assert lines[-1] == f"{backend} is idle"
    assert lines[-2].endswith(" flows in the connection table, 0 active within 2 s")
    assert int(lines[-2].split()[1]) >= 25


# --- what an operator is shown is what the datapath holds ----------------------------------

LISTENER = ("import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 8081)); s.listen(128)\n"
            "time.sleep(300)\n")


def test_a_failing_backend_reads_down_only_once_the_ring_no_longer_names_it(lab, lbd):
    """Polls the backend's status as fast as the API answers while its check fails:
    no reading may say "down" (realised) while lbd's pinned ring still holds it, and
    a reading that says it is still leaving shows its ring positions."""
    from lbctl import output
    from lbctl.client import LbdClient, unix_endpoint
    from xdplb.v1 import lb_pb2
    from xdplb_lab import lab as labmod

    topo, _ = lab
    failing, others = topo.backend_v4[0], topo.backend_v4[1:3]
    listener = topo.backends[0].popen(["python3", "-c", LISTENER])
    labmod.wait_port(topo.backends[0], 8081, ip=failing)
    ok(lbd, "vip", "add", VIP4, "--check", "tcp", "--check-interval", "100", "--rise", "1",
       "--fall", "1")
    ok(lbd, "backend", "add", VIP4, failing, "--check-port", "8081")
    for address in others:
        ok(lbd, "backend", "add", VIP4, address)
    assert failing in maps_view(lbd)["vips"][VIP4]["ring"]
    client = LbdClient(unix_endpoint(str(lbd.socket)), 5.0)
    readings: list[tuple[str, bool, int]] = []
    try:
        listener.kill()
        listener.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            vip = output.message_to_json(client.call("GetVip", lb_pb2.VipRef(vip=VIP4)))
            status = next(b for b in vip["backends"] if b["address"] == failing)["status"]
            readings.append((status["health"], status["health_realised"],
                             status["ring_positions"]))
            if status["health"] == "down" and status["health_realised"]:
                assert failing not in maps_view(lbd)["vips"][VIP4]["ring"]
                break
    finally:
        client.close()
    assert readings[-1] == ("down", True, 0), readings[-10:]
    for health, realised, positions in readings:
        assert health == "up" or (health == "down" and (realised or positions > 0))
        assert realised or positions > 0  # not realised: the ring still names it
    table = ok(lbd, "backend", "list", VIP4)
    assert [line.split()[3] for line in table.splitlines() if failing in line] == ["down"]
    assert f"{failing} of {VIP4}: down is realised in the datapath (0 ring positions" in (
        lbd.log_text())


# --- host maintenance without BGP ------------------------------------------------------------


def test_drain_host_without_bgp_says_what_it_did_and_status_shows_it(lab, lbd):
    drained = lbd.lbctl("drain-host")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout == ("host marked drained (persisted), but BGP is disabled in lbd's "
                              "configuration: no route was withdrawn and routers keep sending "
                              "new flows here; not waiting for new flows to stop\n")
    try:
        assert json.loads(ok(lbd, "status", "-o", "json"))["host_drained"] is True
        assert ("host            drained, but BGP is disabled: no route was withdrawn, routers "
                "still send traffic here (drain-host --undo ends it)\n") in ok(lbd, "status")
    finally:
        undone = ok(lbd, "drain-host", "--undo")
    assert undone == "host back in service (BGP is disabled: nothing to announce)\n"
    assert json.loads(ok(lbd, "status", "-o", "json"))["host_drained"] is False
    assert "host            in service\n" in ok(lbd, "status")
