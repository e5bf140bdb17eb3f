"""The outside probe's findings, straight to lbd's socket: each request that once
got through (or got INTERNAL) is refused with INVALID_ARGUMENT or
RESOURCE_EXHAUSTED and the field path, and changes nothing: not the export,
not state.json, not the maps; the live VIPs keep forwarding. And lbd refusing
to start on a bad state or host file leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.lbd_helpers import lab_with_lbd, ok, running_and_empty
from xdplb.datapath import MapSizes
from xdplb.reconciler import read_view
from xdplb.state import MAX_DOCUMENT_BYTES, MAX_MESSAGE_BYTES
from xdplb.v1 import lb_pb2 as pb
from xdplb.v1 import lb_pb2_grpc as pb_grpc

pytestmark = pytest.mark.netns
SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=4 * 65537, conn_entries=4096)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_with_lbd("xthard", tmp_path_factory.mktemp("lbd"), SIZES) as (topo, lbd):
        yield topo, lbd


@pytest.fixture(scope="module")
def serving(lab):
    """lbd with an IPv4 and an IPv6 VIP over the three backends, forwarding (once: every
    test here asserts that it changed nothing)."""
    topo, lbd = lab
    running_and_empty(lbd)
    v4, v6 = f"{topo.vip_v4}:80/tcp", f"[{topo.vip_v6}]:80/tcp"
    for vip, backends in ((v4, topo.backend_v4), (v6, topo.backend_v6)):
        ok(lbd, "vip", "add", vip, "--check", "none")
        for address in backends:
            ok(lbd, "backend", "add", vip, address)
    return topo, lbd, v4, v6


@pytest.fixture(scope="module")
def stub(lab):
    _, lbd = lab
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(f"unix://{lbd.socket}", options=options) as channel:
        yield pb_grpc.LoadBalancerStub(channel)


def snapshot(stub, lbd) -> tuple[str, bytes, dict]:
    maps = lbd.maps()
    try:
        view = read_view(maps)
    finally:
        maps.close()
    return (stub.GetState(pb.GetStateRequest(), timeout=30).document,
            lbd.state_file.read_bytes(), view)


def refused(stub, lbd, method: str, request, code: grpc.StatusCode, message: str) -> None:
    """The call is refused with `code` and `message`, and nothing changed."""
    before = snapshot(stub, lbd)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details(), info.value.details()
    assert len(info.value.details()) < 1000
    assert snapshot(stub, lbd) == before


def forwards(topo, vip: str) -> None:
    from xdplb_lab.lab import http_get

    assert http_get(topo, vip) in {"backend0", "backend1", "backend2"}


# --- 1, 2: zone ids ----------------------------------------------------------------------


def test_a_zone_id_cannot_make_a_second_key_for_a_live_vip(serving, stub):
    topo, lbd, _, v6 = serving
    zoned = f"[{topo.vip_v6}%eth0]:80/tcp"
    refused(stub, lbd, "AddVip", pb.AddVipRequest(vip=pb.Vip(vip=zoned)), INVALID,
            "has a zone id")
    refused(stub, lbd, "DeleteVip", pb.VipRef(vip=zoned), INVALID, "has a zone id")
    forwards(topo, topo.vip_v6)
    assert json.loads(ok(lbd, "vip", "show", v6, "-o", "json"))["status"]["mode"] == "normal"


@pytest.mark.parametrize("address", ["{b}%x", "{b}%\x00evil"])
def test_a_zone_id_cannot_duplicate_a_backend(serving, stub, address):
    topo, lbd, _, v6 = serving
    backend = address.format(b=topo.backend_v6[0])
    refused(stub, lbd, "AddBackend", pb.AddBackendRequest(
        vip=v6, backend=pb.Backend(address=backend)), INVALID, "has a zone id")


# --- 3: header injection ---------------------------------------------------------------------


@pytest.mark.parametrize(("check", "where"), [
    (pb.HealthCheck(kind="http", host="lab\r\nX-Injected: 1"), "check.host"),
    (pb.HealthCheck(kind="http", path="/h\r\nX-Injected: 1"), "check.path"),
    (pb.HealthCheck(kind="http", path="/h\x00"), "check.path"),
    (pb.HealthCheck(kind="http", body="ok\x00"), "check.body"),
    (pb.HealthCheck(kind="grpc", grpc_service="svc\x00"), "check.grpc_service"),
])
def test_no_control_character_reaches_a_check(serving, stub, check, where):
    _, lbd, v4, _ = serving
    refused(stub, lbd, "SetVip", pb.SetVipRequest(vip=v4, check=check), INVALID, where)


# --- 4: sizes ------------------------------------------------------------------------------


def test_oversized_fields_are_refused_and_the_operator_is_never_locked_out(serving, stub):
    topo, lbd, v4, _ = serving
    refused(stub, lbd, "SetVip", pb.SetVipRequest(vip=v4, check=pb.HealthCheck(
        kind="http", expect_status=[200] * 1_000_000)), INVALID,
        "check.expect_status: 1000000 codes, more than the limit of 16")
    refused(stub, lbd, "SetVip", pb.SetVipRequest(vip=v4, check=pb.HealthCheck(
        kind="http", path="/" + "a" * 3_000_000)), INVALID,
        "check.path: 3000001 characters, more than the limit of 1024")
    refused(stub, lbd, "Apply", pb.ApplyRequest(document=" " * (MAX_DOCUMENT_BYTES + 1)),
            EXHAUSTED, f"more than the limit of {MAX_DOCUMENT_BYTES}")
    for command in (["export"], ["vip", "list"], ["status"]):
        ok(lbd, *command)
    forwards(topo, topo.vip_v4)


# --- 5: documents that are not documents get INVALID_ARGUMENT --------------------------------


@pytest.mark.parametrize(("document", "message"), [
    ("[" * 100_000 + "]" * 100_000, "document: nested too deeply to read"),
    ('{"version": ' + "9" * 5000 + "}", "document: Exceeds the limit (4300 digits)"),
    ('{"version": 1, "vips": [{"vip": "10.0.0.1:80/tcp", "ring_size": ' + "7" * 5000 + "}]}",
     "Exceeds the limit"),
    ('{"version": ' + "[" * 500 + "]" * 500 + "}", "document.version: must be int"),
    ('{"version": 1, "vips": [{"vip": "10.0.0.1:80/tcp", "hash": "' + "x" * 3_000_000 + '"}]}',
     "hash: 'xxxxxxxx"),
])
def test_invalid_documents_are_invalid_arguments(serving, stub, document, message):
    _, lbd, _, _ = serving
    refused(stub, lbd, "Apply", pb.ApplyRequest(document=document), INVALID, message)


# --- 6: NaN --------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    pb.DrainHostRequest(wait_s=math.nan), pb.DrainHostRequest(wait_s=math.inf),
    pb.DrainHostRequest(wait_s=-1), pb.DrainHostRequest(quiet_s=math.nan),
], ids=["wait nan", "wait inf", "wait negative", "quiet nan"])
def test_drain_host_refuses_non_finite_times_and_stays_in_service(serving, stub, request_):
    _, lbd, _, _ = serving
    host_file = lbd.state_dir / "host.json"
    before = host_file.read_bytes() if host_file.exists() else None
    refused(stub, lbd, "DrainHost", request_, INVALID, "must be a number of seconds")
    assert json.loads(ok(lbd, "status", "-o", "json"))["host_drained"] is False
    assert (host_file.read_bytes() if host_file.exists() else None) == before


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_set_vip_and_count_flows_refuse_non_finite_numbers(serving, stub, value):
    _, lbd, v4, _ = serving
    refused(stub, lbd, "SetVip", pb.SetVipRequest(vip=v4, panic_threshold=value), INVALID,
            "panic_threshold")
    refused(stub, lbd, "SetVip", pb.SetVipRequest(vip=v4, slow_start_s=value), INVALID,
            "slow_start_s")
    refused(stub, lbd, "CountFlows", pb.CountFlowsRequest(
        vip=v4, address=serving[0].backend_v4[0], active_within_s=value), INVALID,
        "active_within_s")


# --- 7, 8: refusing to start leaves the system as it was -------------------------------------


def start_refused(lbd, tmp_path: Path, file: str, content: bytes) -> str:
    """lbd (stopped) given a bad `file` in its state dir: exit 1, the message, and
    nothing of its own left: no pins, no lock file, no socket."""
    from xdplb.lbd import LOCK_DIR

    lbd.kill(signal.SIGTERM)
    path = lbd.state_dir / file
    original = path.read_bytes() if path.exists() else None
    # As on a first start: no maps yet, no lock file (a stopped lbd leaves its own).
    subprocess.run(["rm", "-rf", str(lbd.pin_dir)], check=True)
    (LOCK_DIR / f"{lbd.name}.lock").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    try:
        proc = lbd.start(wait=False)
        assert proc.wait(timeout=60) == 1
        log = lbd.log_tail(5)
        assert path.read_bytes() == content  # left untouched
        assert not lbd.pin_dir.exists(), f"{lbd.pin_dir} left behind"
        assert not (LOCK_DIR / f"{lbd.name}.lock").exists()
        assert not lbd.socket.exists()
        assert "Traceback" not in lbd.log_text()
        return log
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
        with contextlib.suppress(Exception):
            lbd.start()


def test_a_state_file_that_is_not_utf8_is_refused_by_name(lab, tmp_path):
    _, lbd = lab
    log = start_refused(lbd, tmp_path, "state.json", b'{"version": 1, "vips": ["\xff"]}')
    assert f"state file {lbd.state_dir / 'state.json'}: not UTF-8 text" in log


def test_a_corrupt_host_file_leaves_no_maps_pinned(lab, tmp_path):
    _, lbd = lab
    log = start_refused(lbd, tmp_path, "host.json", b"{corrupt")
    assert f"host file {lbd.state_dir / 'host.json'}" in log
