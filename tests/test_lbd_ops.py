"""Operating lbd: what an operator meets around the API rather than in it.

A bad configuration is refused (exit 2) before anything is touched; the
TCP listener serves mutual TLS, or plaintext on loopback only; the watch
stream tells every change in order; a router change reaches the datapath by
itself; SIGTERM keeps forwarding unless --detach-on-exit; a second lbd on
the same socket is refused.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import json
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.lbd_helpers import ok
from xdplb.datapath import PIN_ROOT, MapSizes
from xdplb_lab.daemon import console_script

pytestmark = pytest.mark.netns

SIZES = MapSizes(max_vips=8, max_backends=16, ring_entries=4 * 65537, conn_entries=65536)
VIP4 = "10.200.0.10:80/tcp"
TLS_ADDRESS = "127.0.0.1:7443"
PLAIN_ADDRESS = "127.0.0.1:7080"
NEW_MAC = "02:00:00:00:77:77"
NEXTHOP_EXTRA = "[nexthop]\nrefresh_s = 1\n"


# --- configuration refusals: exit 2, nothing touched --------------------------------------

NO_IFACE = "xtopsnone0"  # no such interface anywhere: a start that got through fails on it
BASE = f'interfaces = ["{NO_IFACE}"]\n'
LISTEN = '[api]\nlisten = "127.0.0.1:7000"\n'

CONFIG_REFUSALS = [
    ("unknown-top-level-key", BASE + "bogus = 1\n", "unknown key 'bogus'"),
    ("unknown-api-key", BASE + "[api]\nfoo = 1\n", "api: unknown key 'foo'"),
    ("wrong-type", BASE + 'mtu = "1500"\n', "mtu: must be int, got '1500'"),
    ("xdp-mode", BASE + 'xdp_mode = "turbo"\n',
     "xdp_mode: 'turbo' is not one of native, generic"),
    ("no-interfaces", "mtu = 1500\n",
     "interfaces: at least one is needed (--interface IFNAME)"),
    ("max-vips-zero", BASE + "[maps]\nmax_vips = 0\n",
     "maps.max_vips: must be an integer >= 2, got 0"),
    ("max-vips-one", BASE + "[maps]\nmax_vips = 1\n",  # entry 0 is reserved: no VIP fits
     "maps.max_vips: must be an integer >= 2, got 1"),
    ("nexthop-mac", BASE + '[nexthop]\nmac = "02:00:00:00:00"\n',
     "nexthop.mac: '02:00:00:00:00' is not a MAC address"),
    ("listen-without-tls", BASE + LISTEN,
     "api.listen 127.0.0.1:7000: a TCP listener needs TLS (api.tls_cert, api.tls_key), "
     "or --insecure on loopback"),
    ("insecure-off-loopback", BASE + '[api]\nlisten = "10.0.0.1:7000"\ninsecure = true\n',
     "api.listen 10.0.0.1:7000: plaintext is refused on a non-loopback address; use TLS"),
    ("cert-without-key", BASE + LISTEN + 'tls_cert = "{here}/lbd.toml"\n',
     "api.tls_cert and api.tls_key: give both or neither"),
    ("cert-missing", BASE + LISTEN + 'tls_cert = "{here}/missing.pem"\n'
     'tls_key = "{here}/lbd.toml"\n', "api.tls_cert: {here}/missing.pem is not a readable file"),
    ("toml-syntax", BASE + "[api\n", "not valid TOML: "),
    ("health-fwmark-outside-mask", BASE + "[health]\nfwmark = 0x58440001\n",
     "health.fwmark 0x58440001: must be a nonzero 32-bit mark within fwmark_mask 0xffff0000"),
    ("health-mask-not-contiguous", BASE + "[health]\nfwmark_mask = 0xff00ff00\n",
     "health.fwmark_mask 0xff00ff00: must be contiguous high bits (e.g. 0xffff0000)"),
    ("health-mask-too-narrow", BASE + "[health]\nfwmark = 0x58440000\n"
     "fwmark_mask = 0xfffff800\n",
     "health.fwmark_mask 0xfffff800: leaves room for backend indexes up to 2047, but "
     "maps.max_backends is 4096 (indexes up to 4095)"),
    ("health-fwmark-type", BASE + '[health]\nfwmark = "0x58440000"\n',
     "health.fwmark: must be int, got '0x58440000'"),
    ("health-unknown-key", BASE + "[health]\nmark = 1\n", "health: unknown key 'mark'"),
    ("flows-refresh-not-power-of-two", BASE + "[flows]\nsettled_refresh_s = 12\n",
     "flows.settled_refresh_s 12: must be 0 or a power of two 2..1024"),
    ("flows-idle-timeout-too-long", BASE + "[flows]\nidle_timeout_s = 40000\n",
     "flows.idle_timeout_s: 40000 must be 0 (never) or 10..28800 seconds"),
    ("flows-settle-interval", BASE + "[flows]\nsettle_interval_s = 0.5\n",
     "flows.settle_interval_s: 0.5 must be 1..3600 seconds"),
    ("flows-unknown-key", BASE + "[flows]\nidle_timeout = 60\n",
     "flows: unknown key 'idle_timeout'"),
]


def run_lbd(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """lbd with its own --name, --socket and --state-dir under tmp_path; then checks
    that it touched none of them (and removes pins a start that got through left)."""
    name = f"xtops-cfg-{tmp_path.name}"
    pins = PIN_ROOT / name
    argv = [console_script("lbd"), *args, "--name", name,
            "--socket", str(tmp_path / "lbd.sock"), "--state-dir", str(tmp_path / "state")]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert not pins.exists(), f"{pins} was created: {result.stderr}"
    finally:
        if pins.exists():
            shutil.rmtree(pins, ignore_errors=True)
            with contextlib.suppress(OSError):  # the shared root, if nothing else is in it
                PIN_ROOT.rmdir()
    assert not (tmp_path / "lbd.sock").exists()
    assert not (tmp_path / "state").exists()
    return result


@pytest.mark.parametrize(("toml", "message"), [r[1:] for r in CONFIG_REFUSALS],
                         ids=[r[0] for r in CONFIG_REFUSALS])
def test_bad_config_is_refused_before_anything_is_touched(tmp_path, toml, message):
    path = tmp_path / "lbd.toml"
    path.write_text(toml.format(here=tmp_path))
    result = run_lbd(["--config", str(path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"lbd: config {path}: ")
    assert message.format(here=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_config_file_is_refused(tmp_path):
    path = tmp_path / "absent.toml"
    result = run_lbd(["--config", str(path)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"lbd: config {path}: cannot read it: [Errno 2] "
                                     f"No such file or directory: '{path}'")


def test_command_line_without_interface_is_refused(tmp_path):
    result = run_lbd([], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("lbd: command line: interfaces: at least one is needed "
                                     "(--interface IFNAME)")


# --- the lab, the certificates and the daemons --------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str  # a CA that signed nothing lbd knows
    rogue_client_cert: str  # a client certificate the rogue CA signed
    rogue_client_key: str


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=xtops {name}", cwd=d)


def make_leaf(d: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=xtops {name}", cwd=d)
    (d / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(serial), "-days", "2",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_leaf(d, "server", "ca", 1, "basicConstraints = CA:FALSE\n"
              "subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    client_ext = "basicConstraints = CA:FALSE\nextendedKeyUsage = clientAuth\n"
    make_leaf(d, "client", "ca", 2, client_ext)
    make_leaf(d, "rogueclient", "rogue", 3, client_ext)
    return Pki(*(str(d / f) for f in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "rogue.pem",
        "rogueclient.pem", "rogueclient.key")))


class Site:
    """One lab and the lbds run in it, one at a time (they share the interface and pins)."""

    def __init__(self, topo, root: Path):
        self.topo = topo
        self.root = root
        self.daemons: list = []

    def daemon(self, name: str, **kw):
        from xdplb_lab.daemon import LabLbd

        lbd = LabLbd(self.topo, self.root / name, sizes=SIZES, **kw)
        self.daemons.append(lbd)
        return lbd

    def stop_all(self) -> None:
        for lbd in self.daemons:
            lbd.close()

    def start_alone(self, lbd) -> None:
        self.stop_all()
        lbd.start()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_root()
    from xdplb_lab import lab as labmod

    with labmod.Lab(prefix="xtops") as lab:
        topo = labmod.build_lb_lab(lab, n_backends=1)
        here = Site(topo, tmp_path_factory.mktemp("lbd"))
        try:
            yield here
        finally:
            here.stop_all()


@pytest.fixture(scope="module")
def shared(site, pki):
    """The lbd most tests share: mutual TLS on TCP, the next hop followed every second."""
    return site.daemon("shared", config_extra=NEXTHOP_EXTRA, extra_args=[
        "--listen", TLS_ADDRESS, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
        "--client-ca", pki.ca])


@pytest.fixture
def lbd(site, shared):
    """The shared lbd, running with an empty state."""
    if shared.proc is None or shared.proc.poll() is not None:
        site.start_alone(shared)
    return reset(shared)


def reset(lbd):
    """An empty state, whatever an earlier test left."""
    empty = lbd.workdir / "empty.json"
    empty.write_text('{"version": 1, "vips": []}')
    ok(lbd, "apply", "-f", str(empty))
    return lbd



def status(lbd) -> dict:
    return json.loads(ok(lbd, "status", "-o", "json"))


def lbctl_in_lb(site, *args: str) -> subprocess.CompletedProcess[str]:
    """lbctl run inside the lb namespace, where lbd's TCP listener is."""
    return site.topo.lb.run([console_script("lbctl"), *args], check=False)


def tls_args(ca: str, cert: str | None = None, key: str | None = None) -> list[str]:
    args = ["--address", TLS_ADDRESS, "--ca", ca]
    if cert and key:
        args += ["--cert", cert, "--key", key]
    return args


# --- the TCP listener: mutual TLS ---------------------------------------------------------


def test_mutual_tls_serves_clients_with_a_certificate_the_ca_signed(site, lbd, pki):
    result = lbctl_in_lb(site, *tls_args(pki.ca, pki.client_cert, pki.client_key),
                         "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    over_tcp = json.loads(result.stdout)
    over_unix = status(lbd)
    assert over_tcp["pin_dir"] == over_unix["pin_dir"] == str(lbd.pin_dir)
    assert over_tcp["interfaces"] == over_unix["interfaces"]
    assert over_tcp["interfaces"][0]["prog_id"] > 0
    # a change over TCP is the same daemon's change
    result = lbctl_in_lb(site, *tls_args(pki.ca, pki.client_cert, pki.client_key),
                         "vip", "add", VIP4)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"add VIP {VIP4} ")
    assert [v["vip"] for v in json.loads(ok(lbd, "export"))["vips"]] == [VIP4]


@pytest.mark.parametrize("client", ["no-certificate", "rogue-certificate"])
def test_mutual_tls_refuses_a_client_without_a_good_certificate(site, lbd, pki, client):
    if client == "no-certificate":
        args = tls_args(pki.ca)
    else:
        args = tls_args(pki.ca, pki.rogue_client_cert, pki.rogue_client_key)
    result = lbctl_in_lb(site, *args, "status", "-o", "json")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"lbctl: cannot reach lbd at {TLS_ADDRESS}: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    status(lbd)  # still serving on the socket


def test_tls_client_refuses_a_server_its_ca_did_not_sign(site, lbd, pki):
    result = lbctl_in_lb(site, *tls_args(pki.rogue_ca, pki.client_cert, pki.client_key),
                         "status", "-o", "json")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"lbctl: cannot reach lbd at {TLS_ADDRESS}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unix_socket_serves_alongside_tls(lbd):
    listed = status(lbd)
    assert listed["interfaces"][0]["name"] == lbd.topo.lb_iface.name
    assert f"API on unix:{lbd.socket} and {TLS_ADDRESS}" in lbd.log_text()


# --- the watch stream ---------------------------------------------------------------------


class Watcher:
    """lbd's Watch stream read in a thread of the test process."""

    def __init__(self, socket: Path):
        import grpc

        from xdplb.v1 import lb_pb2, lb_pb2_grpc

        self.channel = grpc.insecure_channel(f"unix://{socket}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.call = lb_pb2_grpc.LoadBalancerStub(self.channel).Watch(lb_pb2.WatchRequest())
        self.events: list = []
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for event in self.call:
                with self.changed:
                    self.events.append(event)
                    self.changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.events), timeout), \
                [(e.kind, e.message) for e in self.events]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


def test_watch_streams_changes_and_reconciles_in_order(site, lbd):
    backend = site.topo.backend_v4[0]
    watcher = Watcher(lbd.socket)
    try:
        time.sleep(0.3)  # the server registers the watcher once it has the request
        ok(lbd, "vip", "add", VIP4)
        ok(lbd, "backend", "add", VIP4, backend, "--check", "none")
        watcher.wait_for(lambda events: len(events) >= 6)
        time.sleep(0.5)  # anything unexpected would arrive now
    finally:
        watcher.close()
    assert watcher.error is None, watcher.error
    assert not watcher.thread.is_alive()
    events = watcher.events
    kinds = [e.kind for e in events]
    assert kinds == ["change", "reconcile", "change", "reconcile", "reconcile", "vip"]
    messages = [e.message for e in events]
    assert messages[0] == (f"add VIP {VIP4} (hash 5tuple, encap ipip, ring 65537, "
                           "0 backends)")
    assert messages[1].startswith("change: wrote ")
    assert messages[2] == f"add backend {backend} weight 100 to VIP {VIP4}"
    assert messages[3].startswith("change: wrote ")
    assert f"ring positions {VIP4}: 65537" in messages[3]
    assert messages[4] == f"ring of {VIP4}: 65537 positions written"
    assert events[4].vip == VIP4
    # A VIP without backends is not announced as down; its first one brings it up.
    assert messages[5] == f"{VIP4} is up: 1 of 1 backends healthy"
    assert all(e.time > 0 for e in events)


# --- following the next hop ---------------------------------------------------------------


def default_gateway(host) -> tuple[str, str]:
    routes = json.loads(host.run(["ip", "-j", "-4", "route", "show", "default"]).stdout)
    return routes[0]["gateway"], routes[0]["dev"]


def config_map_mac(lbd) -> str:
    maps = lbd.maps()
    try:
        config = maps.config.get(ct.c_uint32(0))
    finally:
        maps.close()
    assert config is not None
    return ":".join(f"{b:02x}" for b in config.nexthop_mac)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_next_hop_change_reaches_status_and_the_datapath(site, lbd):
    topo = site.topo
    old_mac = topo.lb_nexthop_mac
    gateway, dev = default_gateway(topo.lb)
    assert status(lbd)["nexthop_mac"] == old_mac
    assert config_map_mac(lbd) == old_mac
    watcher = Watcher(lbd.socket)
    try:
        time.sleep(0.3)
        topo.lb.run(["ip", "neigh", "replace", gateway, "lladdr", NEW_MAC, "dev", dev,
                     "nud", "permanent"])
        wait_until(lambda: status(lbd)["nexthop_mac"] == NEW_MAC, 5.0, "status shows the MAC")
        assert config_map_mac(lbd) == NEW_MAC
        shown = status(lbd)
        assert shown["nexthop_source"] == f"route via {dev} to {gateway}"
        watcher.wait_for(lambda events: len(events) >= 2)
        time.sleep(0.3)
    finally:
        watcher.close()
        topo.lb.run(["ip", "neigh", "replace", gateway, "lladdr", old_mac, "dev", dev,
                     "nud", "permanent"])
    line = (f"next hop changed from {old_mac} ({gateway} on {dev}) to "
            f"{NEW_MAC} ({gateway} on {dev})")
    assert [(e.kind, e.message) for e in watcher.events][1:] == [("nexthop", line)]
    assert watcher.events[0].kind == "reconcile"
    assert watcher.events[0].message.startswith(
        "next hop changed: wrote 1 map entries (1 config) in ")
    log = lbd.log_text()
    assert f"{line} event=nexthop" in log
    assert "next hop changed: wrote 1 map entries (1 config) in " in log
    wait_until(lambda: status(lbd)["nexthop_mac"] == old_mac, 5.0, "the MAC is restored")
    assert config_map_mac(lbd) == old_mac


# --- one lbd per socket -------------------------------------------------------------------


def datapath_of(lbd) -> dict:
    """What forwarding depends on: the attached program, the pins and what the maps hold."""
    from xdplb.datapath import attached_prog_id
    from xdplb.reconciler import read_view

    topo = lbd.topo
    found = {"prog_id": attached_prog_id(topo.lb_iface.name, netns=topo.lb.name),
             "pinned": lbd.pin_dir.is_dir(), "maps": None}
    if found["pinned"]:
        maps = lbd.maps()
        try:
            found["maps"] = read_view(maps)
        finally:
            maps.close()
    return found


@pytest.mark.parametrize("second_args", [[], ["--detach-on-exit"]],
                         ids=["default", "detach-on-exit"])
def test_second_lbd_on_the_same_socket_is_refused_and_touches_nothing(site, lbd, second_args):
    topo = site.topo
    ok(lbd, "vip", "add", VIP4)
    ok(lbd, "backend", "add", VIP4, topo.backend_v4[0], "--check", "none")
    before = datapath_of(lbd)
    assert before["prog_id"] > 0
    assert sorted(before["maps"]["vips"]) == [VIP4]
    second = site.daemon(f"second{len(site.daemons)}", extra_args=second_args)
    second.socket = lbd.socket  # its own state dir, the same socket (and instance name)
    intact = False
    try:
        proc = second.start(wait=False)
        assert proc.wait(timeout=120) == 1, second.log_tail()
        assert f"lbd: api.socket {lbd.socket}: another lbd is serving on it" in second.log_text()
        # the first one still answers, and its datapath was left alone
        assert status(lbd)["vips"] == 1
        assert [v["vip"] for v in json.loads(ok(lbd, "export"))["vips"]] == [VIP4]
        after = datapath_of(lbd)
        assert after["pinned"], second.log_text()
        assert after["maps"]["vips"] == before["maps"]["vips"], second.log_text()
        assert after == before, second.log_text()
        intact = True
    finally:
        second.close()
        if not intact:
            lbd.close()  # the next test starts it afresh from its state file and pins


# --- daemons of their own (each stops the shared one) -------------------------------------


@pytest.fixture
def plain(site):
    """An lbd of its own with a plaintext listener on loopback (the shared one stopped)."""
    found = [d for d in site.daemons if d.workdir.name == "plain"]
    daemon = found[0] if found else site.daemon(
        "plain", extra_args=["--listen", PLAIN_ADDRESS, "--insecure"])
    if daemon.proc is None or daemon.proc.poll() is not None:
        site.start_alone(daemon)
    return reset(daemon)


def test_insecure_listener_on_loopback_serves_plaintext(site, plain):
    result = lbctl_in_lb(site, "--address", PLAIN_ADDRESS, "--insecure",
                         "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pin_dir"] == str(plain.pin_dir)
    assert f"API on unix:{plain.socket} and {PLAIN_ADDRESS}" in plain.log_text()
    assert status(plain)["interfaces"][0]["prog_id"] > 0  # and the socket alongside


def test_sigterm_by_default_keeps_the_program_and_the_pins(site, plain):
    from xdplb.datapath import attached_prog_id

    topo = site.topo
    ok(plain, "vip", "add", VIP4)
    prog_id = status(plain)["interfaces"][0]["prog_id"]
    assert prog_id > 0
    assert plain.kill(signal.SIGTERM) == 0
    assert attached_prog_id(topo.lb_iface.name, netns=topo.lb.name) == prog_id
    pins = {p.name for p in plain.pin_dir.iterdir()}
    assert {"config", "vips", "vip_addrs", "ring", "backends", "conns"} <= pins
    assert not plain.socket.exists()
    assert "lbd stopped: the datapath keeps forwarding" in plain.log_text()


def test_sigterm_with_detach_on_exit_detaches_and_unpins(site):
    from xdplb.datapath import attached_prog_id, tc_egress_programs

    topo = site.topo
    lbd = site.daemon("detach", extra_args=["--detach-on-exit"])
    site.start_alone(lbd)
    ifname, netns = topo.lb_iface.name, topo.lb.name
    try:
        ok(lbd, "vip", "add", VIP4)
        assert tc_egress_programs(ifname, netns=netns) == []  # only once a check needs it
        ok(lbd, "backend", "add", VIP4, topo.backend_v4[0], "--check", "tcp",
           "--check-via", "vip", "--check-timeout", "100")
        assert tc_egress_programs(ifname, netns=netns) == ["xdplb_hc_encap"]
        assert status(lbd)["interfaces"][0]["prog_id"] > 0
        assert lbd.pin_dir.is_dir()
        assert lbd.socket.is_socket()
        assert lbd.kill(signal.SIGTERM) == 0
        assert attached_prog_id(topo.lb_iface.name, netns=topo.lb.name) == 0
        assert tc_egress_programs(ifname, netns=netns) == []
        assert "clsact" not in topo.lb.run(["tc", "qdisc", "show", "dev", ifname]).stdout
        assert not lbd.pin_dir.exists()
        assert not lbd.socket.exists()
        assert "lbd stopped: XDP detached and maps unpinned" in lbd.log_text()
    finally:
        lbd.close()
