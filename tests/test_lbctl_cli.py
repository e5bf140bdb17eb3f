"""lbctl without a daemon: usage errors, request building, rendering, failures.

Commands run through click's CliRunner with a stand-in client handed in as
the context object, which records the requests it gets; a few tests run the
real client against a socket nobody serves, or against a stub gRPC server.
"""

from __future__ import annotations

import json
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.shell_completion import get_completion_class
from click.testing import CliRunner, Result

from lbctl import output
from lbctl.cli import (
    build_add_backend,
    build_add_vip,
    build_check,
    build_set_backend,
    build_set_vip,
    cli,
    read_document,
)
from lbctl.client import (
    EndpointError,
    LbdError,
    choose_endpoint,
    describe_rpc_error,
    tcp_endpoint,
    unix_endpoint,
)
from xdplb.state import VipKey
from xdplb.v1 import lb_pb2, lb_pb2_grpc

VIP_TEXT = "10.0.0.10:80/tcp"


class RecordingClient:
    """Stands in for LbdClient: records each call, answers from `answers`."""

    def __init__(self, answers: dict[str, Any] | None = None, refusal: str | None = None):
        self.answers = answers or {}
        self.refusal = refusal
        self.calls: list[tuple[str, Any]] = []

    def call(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        if self.refusal:
            raise LbdError(self.refusal)
        answer = self.answers.get(method, lb_pb2.ChangeResponse(changes=[f"did {method}"]))
        return answer.pop(0) if isinstance(answer, list) else answer  # a list: one per call


def run(args: list[str], client: RecordingClient | None = None, **kwargs: Any) -> Result:
    return CliRunner().invoke(cli, args, obj=client, env={"LBCTL_SOCKET": None}, **kwargs)


def check_settings(**overrides: Any) -> lb_pb2.HealthCheck:
    """A check with every field set, as lbd reports one."""
    fields: dict[str, Any] = {
        "kind": "http", "port": 8080, "path": "/healthz", "host": "", "expect_status": [200, 204],
        "body": "", "grpc_service": "", "interval_ms": 2000, "timeout_ms": 1000, "rise": 2,
        "fall": 3, "via": "backend"}
    return lb_pb2.HealthCheck(**{**fields, **overrides})


def sample_vip() -> lb_pb2.Vip:
    up = lb_pb2.Backend(
        address="10.1.0.1", weight=100, drained=False,
        status=lb_pb2.BackendStatus(healthy=True, available=True, index=1, ring_positions=43691,
                                    effective_weight=100, packets=200, bytes=30000,
                                    health="up", last_result="ok", check_latency_ms=0.4,
                                    health_realised=True, realised_since=1.5e9,
                                    active_flows=7))
    down = lb_pb2.Backend(
        address="10.1.0.2", weight=50, drained=False,
        check=check_settings(kind="tcp", port=22, path="/", expect_status=[200]),
        status=lb_pb2.BackendStatus(healthy=False, available=False, index=2,
                                    ring_positions=21846, effective_weight=50,
                                    packets=2**40, bytes=2**50, health="down",
                                    last_result="refused", check_latency_ms=0.25,
                                    check="tcp 10.1.0.2:22", health_realised=True,
                                    realised_since=1.5e9))
    return lb_pb2.Vip(
        vip=VIP_TEXT, hash="5tuple", encap="ipip", ring_size=65537, check=check_settings(),
        panic_threshold=0.0, when_none_healthy="drop", backends=[up, down],
        status=lb_pb2.VipStatus(mode="normal", vip_id=1, healthy_backends=1, serving_backends=1,
                                packets=300, bytes=45000, unsettled_positions=12))


def assert_usage_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == f"lbctl: {message}\n"


# --- usage errors: exit 2, one line, no call -----------------------------------------------


@pytest.mark.parametrize(("vip", "message"), [
    ("10.0.0.10:80", "VIP '10.0.0.10:80': expected ADDRESS[:PORT]/PROTOCOL, e.g. "
                     "10.0.0.10:80/tcp, [2001:db8::10]:443/udp or 10.0.0.10/tcp"),
    ("10.0.0.300:80/tcp", "VIP address: '10.0.0.300' is not an IPv4 or IPv6 address"),
    ("10.0.0.10:0/tcp", "VIP '10.0.0.10:0/tcp': port '0' is not in 1..65535 "
                        "(leave it out for every port)"),
    ("10.0.0.10:65536/tcp", "VIP '10.0.0.10:65536/tcp': port '65536' is not in 1..65535 "
                            "(leave it out for every port)"),
    ("10.0.0.10:80/sctp", "VIP protocol: 'sctp' is not one of tcp, udp"),
    ("10.0.0.10:http/tcp", "VIP '10.0.0.10:http/tcp': port 'http' is not in 1..65535 "
                           "(leave it out for every port)"),
])
def test_a_malformed_vip_is_a_usage_error(vip: str, message: str) -> None:
    client = RecordingClient()
    assert_usage_error(run(["vip", "add", vip], client), message)
    assert client.calls == []


@pytest.mark.parametrize("args", [
    ["vip", "del", "10.0.0.10:0/tcp"], ["vip", "show", "10.0.0.10/icmp"],
    ["vip", "set", "10.0.0.10:65536/tcp", "--hash", "source"],
    ["backend", "add", "10.0.0.10:80", "10.1.0.1"], ["backend", "list", "nonsense"],
    ["stats", "10.0.0.10:80/sctp"],
])
def test_every_command_parses_its_vip_before_calling(args: list[str]) -> None:
    client = RecordingClient()
    result = run(args, client)
    assert result.exit_code == 2
    assert result.stderr.startswith("lbctl: VIP ")
    assert len(result.stderr.splitlines()) == 1
    assert client.calls == []


@pytest.mark.parametrize(("address", "message"), [
    ("10.1.0", "backend address: '10.1.0' is not an IPv4 or IPv6 address"),
    ("10.1.0.1:80", "backend address: '10.1.0.1:80' is not an IPv4 or IPv6 address"),
    ("127.0.0.1", "backend address: 127.0.0.1 is a loopback address"),
])
def test_a_malformed_backend_address_is_a_usage_error(address: str, message: str) -> None:
    client = RecordingClient()
    assert_usage_error(run(["backend", "add", VIP_TEXT, address], client), message)
    assert client.calls == []


@pytest.mark.parametrize("weight", ["-1", "10001"])
def test_a_weight_outside_0_to_10000_is_a_usage_error(weight: str) -> None:
    client = RecordingClient()
    result = run(["backend", "add", VIP_TEXT, "10.1.0.1", "--weight", weight], client)
    assert_usage_error(result, f"Invalid value for '--weight': {weight} is not in the range "
                               "0<=x<=10000.")
    assert client.calls == []


@pytest.mark.parametrize("args", [
    ["vip", "list", "-o", "yaml"], ["vip", "show", VIP_TEXT, "-o", "yaml"],
    ["backend", "list", VIP_TEXT, "-o", "yaml"], ["stats", "-o", "yaml"],
    ["status", "-o", "yaml"],
])
def test_an_unknown_output_format_is_a_usage_error(args: list[str]) -> None:
    assert_usage_error(run(args, RecordingClient()),
                       "Invalid value for '-o' / '--output': 'yaml' is not one of 'table', "
                       "'json'.")


@pytest.mark.parametrize(("args", "message"), [
    (["vip", "add", VIP_TEXT, "--panic-threshold", "1.5"],
     "Invalid value for '--panic-threshold': 1.5 is not in the range 0.0<=x<=1.0."),
    (["vip", "add", VIP_TEXT, "--ring-size", "2"],
     "Invalid value for '--ring-size': 2 is not in the range 3<=x<=16777216."),
    (["vip", "add", VIP_TEXT, "--hash", "round-robin"],
     "Invalid value for '--hash': 'round-robin' is not one of '5tuple', 'source'."),
    (["vip", "add", VIP_TEXT, "--check-status", "200,2x0"],
     "Invalid value for '--check-status': '2x0' is not an HTTP status code 100..599"),
    (["vip", "add", VIP_TEXT, "--rise", "0"],
     "Invalid value for '--rise': 0 is not in the range 1<=x<=100."),
    (["vip", "add", VIP_TEXT, "--check-via", "tunnel"],
     "Invalid value for '--check-via': 'tunnel' is not one of 'backend', 'vip'."),
    (["vip", "set", VIP_TEXT], "vip set: nothing to set (see lbctl vip set --help)"),
    (["backend", "set", VIP_TEXT, "10.1.0.1"],
     "backend set: nothing to set (see lbctl backend set --help)"),
    (["backend", "set", VIP_TEXT, "10.1.0.1", "--vip-check", "--check", "tcp"],
     "--vip-check drops the backend's own check: it cannot be combined with check options"),
    (["vip", "add"], "Missing argument 'VIP'."),
    (["frobnicate"], "No such command 'frobnicate'."),
])
def test_other_usage_errors_are_one_line_too(args: list[str], message: str) -> None:
    client = RecordingClient()
    assert_usage_error(run(args, client), message)
    assert client.calls == []


# --- connection options ------------------------------------------------------------


@pytest.mark.parametrize("address", ["10.0.0.1:50051", "lbd.example.com:50051",
                                     "[2001:db8::1]:50051"])
def test_insecure_is_refused_for_a_non_loopback_address(address: str) -> None:
    client = RecordingClient()
    result = run(["--address", address, "--insecure", "vip", "list"], client)
    assert_usage_error(result, "--insecure is allowed only with a loopback --address "
                               f"(127.0.0.0/8, ::1, localhost), not {address}")
    assert client.calls == []


@pytest.mark.parametrize(("address", "target"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"), ("127.8.9.10:1", "127.8.9.10:1"),
    ("[::1]:50051", "[::1]:50051"), ("localhost:50051", "localhost:50051"),
])
def test_insecure_is_allowed_for_loopback(address: str, target: str) -> None:
    endpoint = choose_endpoint(socket_path="/unused", address=address, insecure=True)
    assert endpoint.target == target
    assert endpoint.credentials is None


@pytest.mark.parametrize(("options", "message"), [
    ({"insecure": True}, "--ca, --cert, --key and --insecure need --address"),
    ({"address": "127.0.0.1:1", "socket_given": True}, "give --socket or --address, not both"),
    ({"address": "127.0.0.1"}, "--address '127.0.0.1': expected HOST:PORT or [IPV6]:PORT, "
                               "e.g. 127.0.0.1:50051"),
    ({"address": "127.0.0.1:0"}, "--address '127.0.0.1:0': port 0 is not in 1..65535"),
    ({"address": "127.0.0.1:1", "cert": "/c.pem"},
     "--cert and --key go together (mutual TLS needs both)"),
])
def test_connection_options_that_do_not_fit(options: dict[str, Any], message: str) -> None:
    with pytest.raises(EndpointError) as refused:
        choose_endpoint(socket_path="/run/xdplb/lbd.sock", **options)
    assert str(refused.value) == message


def test_socket_and_address_together_is_a_usage_error() -> None:
    result = run(["--socket", "/tmp/x.sock", "--address", "127.0.0.1:1", "status"])
    assert_usage_error(result, "give --socket or --address, not both")


def test_the_socket_becomes_an_absolute_unix_target(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert unix_endpoint("lbd.sock").target == f"unix://{tmp_path}/lbd.sock"
    assert choose_endpoint(socket_path="/run/xdplb/lbd.sock").target == (
        "unix:///run/xdplb/lbd.sock")


def test_tls_reads_the_pem_files(tmp_path: Path) -> None:
    # Not validated until the handshake; reading them is what happens here.
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    endpoint = tcp_endpoint("lbd.example.com:50051", ca=str(tmp_path / "ca.pem"),
                            cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    assert endpoint.credentials is not None
    assert endpoint.target == "lbd.example.com:50051"


# --- failures of calls: exit 1, one line -----------------------------------------------


def test_an_unreachable_socket_exits_1_with_one_line(tmp_path: Path) -> None:
    socket = tmp_path / "lbd.sock"
    result = run(["--socket", str(socket), "vip", "list"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"lbctl: cannot reach lbd at unix://{socket}: No such file or directory\n")


def test_the_socket_comes_from_lbctl_socket(tmp_path: Path) -> None:
    socket = tmp_path / "elsewhere.sock"
    result = CliRunner().invoke(cli, ["status"], env={"LBCTL_SOCKET": str(socket)})
    assert result.exit_code == 1
    assert f"cannot reach lbd at unix://{socket}:" in result.stderr


def test_a_refusal_exits_1_with_lbds_message() -> None:
    client = RecordingClient(refusal="VIP 10.0.0.10:80/tcp: already exists")
    result = run(["vip", "add", VIP_TEXT], client)
    assert result.exit_code == 1
    assert result.stderr == "lbctl: VIP 10.0.0.10:80/tcp: already exists\n"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "line"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "VIP 10.0.0.10:80/tcp.ring_size: 65536 is not a prime",
     "VIP 10.0.0.10:80/tcp.ring_size: 65536 is not a prime"),
    (grpc.StatusCode.NOT_FOUND, "", "not_found"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded",
     "lbd at 127.0.0.1:50051 did not answer within 2.5 s (--timeout)"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:50051: Failed to connect to remote host: Connection refused",
     "cannot reach lbd at 127.0.0.1:50051: Failed to connect to remote host: "
     "Connection refused"),
])
def test_rpc_errors_become_one_line(code: grpc.StatusCode, details: str, line: str) -> None:
    endpoint = tcp_endpoint("127.0.0.1:50051", insecure=True)
    assert describe_rpc_error(FakeRpcError(code, details), endpoint, 2.5) == line


class RefusingLoadBalancer(lb_pb2_grpc.LoadBalancerServicer):
    def ListVips(self, request: Any, context: grpc.ServicerContext) -> lb_pb2.ListVipsResponse:
        return lb_pb2.ListVipsResponse(vips=[sample_vip()])

    def AddVip(self, request: Any, context: grpc.ServicerContext) -> lb_pb2.ChangeResponse:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"rings need {request.vip.ring_size} entries in total, more than the "
                      "65537 of map size ring_entries")


@pytest.fixture
def stub_lbd(tmp_path: Path) -> Any:
    """A gRPC server with lbd's service on a unix socket: not lbd, a stub."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    lb_pb2_grpc.add_LoadBalancerServicer_to_server(RefusingLoadBalancer(), server)
    socket = tmp_path / "lbd.sock"
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    yield socket
    server.stop(grace=None)


def test_the_real_client_reports_a_refusal(stub_lbd: Path) -> None:
    result = run(["--socket", str(stub_lbd), "vip", "add", VIP_TEXT, "--ring-size", "65539"])
    assert result.exit_code == 1
    assert result.stderr == ("lbctl: rings need 65539 entries in total, more than the 65537 of "
                             "map size ring_entries\n")


def test_the_real_client_renders_an_answer(stub_lbd: Path) -> None:
    result = run(["--socket", str(stub_lbd), "vip", "list", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["vips"][0]["backends"][1]["status"]["bytes"] == 2**50


# --- building requests: only what was given is set ---------------------------------------


def set_fields(message: Any) -> list[str]:
    return [field.name for field, _ in message.ListFields()]


def test_vip_add_with_hash_sets_only_vip_and_hash() -> None:
    request = build_add_vip(VipKey.parse("10.0.0.10:80/TCP"), hash="source", encap=None)
    assert request == lb_pb2.AddVipRequest(vip=lb_pb2.Vip(vip=VIP_TEXT, hash="source"))
    assert set_fields(request.vip) == ["vip", "hash"]


def test_vip_add_on_the_command_line_sends_that_request() -> None:
    client = RecordingClient()
    result = run(["vip", "add", "10.0.0.10:80/tcp", "--hash", "source"], client)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "did AddVip\n"
    assert client.calls == [
        ("AddVip", lb_pb2.AddVipRequest(vip=lb_pb2.Vip(vip=VIP_TEXT, hash="source")))]


def test_vip_add_with_every_option() -> None:
    client = RecordingClient()
    result = run(["vip", "add", "[2001:DB8::10]:443/udp", "--hash", "5tuple", "--encap", "gue",
                  "--ring-size", "655373", "--panic-threshold", "0.25",
                  "--when-none-healthy", "all", "--check", "http", "--check-port", "8443",
                  "--check-path", "/healthz", "--check-host", "www", "--check-status", "200,204",
                  "--check-body", "ok", "--check-interval", "500", "--check-timeout", "200",
                  "--rise", "3", "--fall", "4", "--check-via", "vip"], client)
    assert result.exit_code == 0, result.stderr
    check = lb_pb2.HealthCheck(kind="http", port=8443, path="/healthz", host="www",
                               expect_status=[200, 204], body="ok", interval_ms=500,
                               timeout_ms=200, rise=3, fall=4, via="vip")
    assert client.calls[0][1] == lb_pb2.AddVipRequest(vip=lb_pb2.Vip(
        vip="[2001:db8::10]:443/udp", hash="5tuple", encap="gue", ring_size=655373,
        panic_threshold=0.25, when_none_healthy="all", check=check))


def test_check_builder_sets_only_what_is_given() -> None:
    assert build_check(kind=None, port=None) is None
    check = build_check(kind="grpc", grpc_service="lb", port=0, path=None)
    assert check is not None
    # port 0 ("the VIP's port") was given, so it is set: optional fields keep presence
    assert set_fields(check) == ["kind", "port", "grpc_service"]


def test_vip_set_sends_only_the_changes() -> None:
    request = build_set_vip(VipKey.parse(VIP_TEXT), build_check(rise=5), panic_threshold=0.0)
    assert request == lb_pb2.SetVipRequest(vip=VIP_TEXT, panic_threshold=0.0,
                                           check=lb_pb2.HealthCheck(rise=5))
    assert request.HasField("panic_threshold") and not request.HasField("hash")


def test_backend_add_sets_only_what_is_given() -> None:
    client = RecordingClient()
    run(["backend", "add", VIP_TEXT, "2001:DB8::0001"], client)
    run(["backend", "add", VIP_TEXT, "10.1.0.1", "--weight", "0", "--drain"], client)
    assert [request for _, request in client.calls] == [
        lb_pb2.AddBackendRequest(vip=VIP_TEXT, backend=lb_pb2.Backend(address="2001:db8::1")),
        lb_pb2.AddBackendRequest(vip=VIP_TEXT, backend=lb_pb2.Backend(
            address="10.1.0.1", weight=0, drained=True))]
    assert client.calls[1][1].backend.HasField("weight")


def test_backend_set_drain_undrain_and_vip_check() -> None:
    key = VipKey.parse(VIP_TEXT)
    undrain = build_set_backend(key, "10.1.0.1", drained=False, weight=None)
    assert undrain.HasField("drained") and not undrain.HasField("weight")
    client = RecordingClient()
    run(["backend", "set", VIP_TEXT, "10.1.0.1", "--vip-check"], client)
    run(["backend", "set", VIP_TEXT, "10.1.0.1", "--check", "tcp", "--check-port", "22"], client)
    assert [request for _, request in client.calls] == [
        lb_pb2.SetBackendRequest(vip=VIP_TEXT, address="10.1.0.1", clear_check=True),
        lb_pb2.SetBackendRequest(vip=VIP_TEXT, address="10.1.0.1",
                                 check=lb_pb2.HealthCheck(kind="tcp", port=22))]


def test_backend_add_builder_takes_the_check() -> None:
    request = build_add_backend(VipKey.parse(VIP_TEXT), "10.1.0.1",
                                build_check(kind="none"), weight=7)
    assert request.backend == lb_pb2.Backend(address="10.1.0.1", weight=7,
                                             check=lb_pb2.HealthCheck(kind="none"))


def test_deletes_and_reads_send_canonical_names() -> None:
    client = RecordingClient(answers={"GetVip": sample_vip(),
                                      "GetStats": lb_pb2.StatsResponse()})
    for args in (["vip", "del", "10.0.0.10:80/TCP"], ["backend", "del", VIP_TEXT, " 10.1.0.1"],
                 ["vip", "show", VIP_TEXT], ["stats"], ["stats", VIP_TEXT]):
        assert run(args, client).exit_code == 0
    assert client.calls == [
        ("DeleteVip", lb_pb2.VipRef(vip=VIP_TEXT)),
        ("DeleteBackend", lb_pb2.BackendRef(vip=VIP_TEXT, address="10.1.0.1")),
        ("GetVip", lb_pb2.VipRef(vip=VIP_TEXT)),
        ("GetStats", lb_pb2.StatsRequest()),
        ("GetStats", lb_pb2.StatsRequest(vip=VIP_TEXT))]


# --- rendering ----------------------------------------------------------------------


VIP_TABLE = """\
VIP               HASH    ENCAP  RING   MODE    HEALTHY  SERVING  PACKETS  BYTES  CHECK
  -> ADDRESS   WEIGHT  EFF  STATE  AVAIL  RING   SHARE  FLOWS  PACKETS        BYTES             LOAD  LAST           SINCE  CHECK
10.0.0.10:80/tcp  5tuple  ipip   65537  normal  1/2      1        300      45000  http:8080/healthz
  -> 10.1.0.1  100     100  up     yes    43691  66.7%  7      200            30000             -     ok 0.4ms       -      -
  -> 10.1.0.2  50      50   down   no     21846  33.3%  -      1099511627776  1125899906842624  -     refused 0.2ms  -      tcp:22
"""


def test_vip_list_table() -> None:
    client = RecordingClient(answers={"ListVips": lb_pb2.ListVipsResponse(vips=[sample_vip()])})
    result = run(["vip", "list"], client)
    assert result.exit_code == 0
    assert result.stdout == VIP_TABLE


def test_vip_list_table_without_vips_is_the_headers() -> None:
    assert output.render_vip_list(lb_pb2.ListVipsResponse(), "table") == (
        "VIP  HASH  ENCAP  RING  MODE  HEALTHY  SERVING  PACKETS  BYTES  CHECK\n"
        "  -> ADDRESS  WEIGHT  EFF  STATE  AVAIL  RING  SHARE  FLOWS  PACKETS  BYTES  LOAD  LAST  "
        "SINCE  CHECK\n")


@pytest.mark.parametrize(("age", "shown"), [
    (0.4, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (3 * 86400 + 5, "3d")])
def test_since_shows_the_age_of_a_verdict(age: float, shown: str) -> None:
    assert output.since(1_000_000.0, now=1_000_000.0 + age) == shown
    assert output.since(0.0) == "-"


@pytest.mark.parametrize(("state", "load", "age", "shown"), [
    ("", 0.0, 0.0, "-"), ("none", 0.0, 0.0, "-"), ("ok", 12.345, 3.2, "12.3 (3s)"),
    ("stale", 5.0, 40.0, "stale"), ("unreachable: refused", 0.0, 0.0, "unreachable: refused")])
def test_load_cell_shows_load_and_age_or_why_not(state: str, load: float, age: float,
                                                 shown: str) -> None:
    status = lb_pb2.BackendStatus(load_state=state, load=load, load_age_s=age)
    assert output.load_cell(status) == shown


def test_drained_wins_over_health() -> None:
    backend = lb_pb2.Backend(address="10.1.0.3", drained=True,
                             status=lb_pb2.BackendStatus(healthy=True))
    assert output.backend_state(backend) == "drained"


def check_json(**overrides: Any) -> dict[str, Any]:
    fields = {"kind": "http", "port": 8080, "path": "/healthz", "host": "",
              "expect_status": [200, 204], "body": "", "grpc_service": "", "interval_ms": 2000,
              "timeout_ms": 1000, "rise": 2, "fall": 3, "via": "backend"}
    return {**fields, **overrides}


NO_LOAD = {"load": 0.0, "load_age_s": 0.0, "load_state": "", "capacity_factor": 0.0,
           "slow_start_factor": 0.0}
REALISED = {"health_realised": True, "realised_since": 1.5e9}

VIP_JSON = {
    "vip": VIP_TEXT, "hash": "5tuple", "encap": "ipip", "ring_size": 65537,
    "check": check_json(), "panic_threshold": 0.0, "when_none_healthy": "drop",
    "backends": [
        {"address": "10.1.0.1", "weight": 100, "drained": False, "check": None,
         "server_id": None, "status": {"healthy": True, "available": True, "index": 1, "ring_positions": 43691,
                    "effective_weight": 100, "packets": 200, "bytes": 30000, "health": "up",
                    "last_result": "ok", "check_latency_ms": 0.4, "since": 0.0, "check": "",
                    **NO_LOAD, **REALISED, "active_flows": 7}},
        {"address": "10.1.0.2", "weight": 50, "drained": False,
         "check": check_json(kind="tcp", port=22, path="/", expect_status=[200]),
         "server_id": None, "status": {"healthy": False, "available": False, "index": 2, "ring_positions": 21846,
                    "effective_weight": 50, "packets": 2**40, "bytes": 2**50,
                    "health": "down", "last_result": "refused", "check_latency_ms": 0.25,
                    "since": 0.0, "check": "tcp 10.1.0.2:22", **NO_LOAD, **REALISED,
                    "active_flows": None}},
    ],
    "capacity": None, "slow_start_s": None, "quic": None, "health_scope": None,
    "health_quorum": None,
    "status": {"mode": "normal", "vip_id": 1, "healthy_backends": 1, "serving_backends": 1,
               "packets": 300, "bytes": 45000, "ring_fingerprint": "", "announced": False,
               "unsettled_positions": 12},
}


def test_vip_list_json() -> None:
    client = RecordingClient(answers={"ListVips": lb_pb2.ListVipsResponse(vips=[sample_vip()])})
    result = run(["vip", "list", "-o", "json"], client)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"vips": [VIP_JSON]}
    assert result.stdout == json.dumps({"vips": [VIP_JSON]}, indent=2) + "\n"
    assert '"bytes": 1125899906842624' in result.stdout  # a number, not a string


def test_unset_optional_fields_are_null_in_json() -> None:
    vip = lb_pb2.Vip(vip=VIP_TEXT, backends=[lb_pb2.Backend(address="10.1.0.1")])
    data = output.message_to_json(vip)
    assert data["hash"] is None and data["check"] is None and data["status"] is None
    assert data["backends"][0]["weight"] is None
    assert sorted(data) == sorted(VIP_JSON)


def test_vip_show_table_adds_the_details() -> None:
    assert output.render_vip(sample_vip(), "table") == VIP_TABLE + """
id                        1
unsettled ring positions  12
check                     http, port 8080, path /healthz, status 200,204, every 2000 ms, \
timeout 1000 ms, rise 2, fall 3
panic threshold           off
when none healthy         drop
check of 10.1.0.2         tcp, port 22, every 2000 ms, timeout 1000 ms, rise 2, fall 3
"""
    assert json.loads(output.render_vip(sample_vip(), "json")) == VIP_JSON


def test_backend_list() -> None:
    vip = sample_vip()
    assert output.render_backend_list(vip, "table") == """\
ADDRESS   WEIGHT  EFF  STATE  AVAIL  RING   SHARE  FLOWS  PACKETS        BYTES             LOAD  LAST           SINCE  CHECK
10.1.0.1  100     100  up     yes    43691  66.7%  7      200            30000             -     ok 0.4ms       -      -
10.1.0.2  50      50   down   no     21846  33.3%  -      1099511627776  1125899906842624  -     refused 0.2ms  -      tcp:22
"""
    assert json.loads(output.render_backend_list(vip, "json")) == {
        "vip": VIP_TEXT, "backends": VIP_JSON["backends"]}


def sample_stats() -> lb_pb2.StatsResponse:
    def traffic(vip: str, backend: str, packets: int, size: int) -> lb_pb2.TrafficStats:
        return lb_pb2.TrafficStats(vip=vip, backend=backend, packets=packets, bytes=size)
    counters = [lb_pb2.Counter(name="xdp_tx", value=2**33), lb_pb2.Counter(name="no_vip", value=7)]
    return lb_pb2.StatsResponse(traffic=[
        traffic(VIP_TEXT, "", 300, 45000), traffic(VIP_TEXT, "10.1.0.1", 200, 30000),
        traffic(VIP_TEXT, "10.1.0.2", 100, 15000), traffic("10.0.0.11/udp", "", 0, 0),
    ], counters=counters)


def test_stats_table() -> None:
    client = RecordingClient(answers={"GetStats": sample_stats()})
    result = run(["stats"], client)
    assert result.exit_code == 0
    assert result.stdout == """\
VIP               PACKETS  BYTES
10.0.0.10:80/tcp  300      45000
  -> 10.1.0.1     200      30000
  -> 10.1.0.2     100      15000
10.0.0.11/udp     0        0

COUNTER  VALUE
xdp_tx   8589934592
no_vip   7
"""


def test_stats_json() -> None:
    assert json.loads(output.render_stats(sample_stats(), "json")) == {
        "traffic": [
            {"vip": VIP_TEXT, "backend": "", "packets": 300, "bytes": 45000},
            {"vip": VIP_TEXT, "backend": "10.1.0.1", "packets": 200, "bytes": 30000},
            {"vip": VIP_TEXT, "backend": "10.1.0.2", "packets": 100, "bytes": 15000},
            {"vip": "10.0.0.11/udp", "backend": "", "packets": 0, "bytes": 0}],
        "counters": [{"name": "xdp_tx", "value": 2**33}, {"name": "no_vip", "value": 7}]}


def sample_status() -> lb_pb2.StatusResponse:
    return lb_pb2.StatusResponse(
        version="0.1.0", uptime_s=93784.5,
        interfaces=[lb_pb2.Interface(name="eth0", prog_id=42, mode="native"),
                    lb_pb2.Interface(name="eth1")],
        nexthop_mac="02:00:00:00:00:99", nexthop_source="route via eth0 to 10.0.0.1",
        state_file="/var/lib/xdplb/state.json", pin_dir="/sys/fs/bpf/xdplb", vips=1,
        backends=2, max_vips=511, max_backends=4095, ring_entries_used=65537,
        ring_entries=4194368,
        last_reconcile=lb_pb2.ReconcileSummary(map_writes=12, duration_ms=0.83,
                                               ring_positions={VIP_TEXT: 65537}),
        vip_status=[lb_pb2.Vip(vip=VIP_TEXT, status=lb_pb2.VipStatus(
            mode="panic", vip_id=1, healthy_backends=1, serving_backends=2, packets=5,
            bytes=600))],
        flow_table=lb_pb2.FlowTableStatus(capacity=1 << 20, entries=1 << 16, active=5000,
                                          active_window_s=60, swept_at=time.time() - 3.5,
                                          evicted=12))


def test_status_table() -> None:
    client = RecordingClient(answers={"GetStatus": sample_status()})
    result = run(["status"], client)
    assert result.exit_code == 0
    assert result.stdout == """\
version         0.1.0
uptime          1d 2h 3m 4s
interface       eth0 native prog 42
interface       eth1 (nothing attached)
nexthop         02:00:00:00:00:99 (route via eth0 to 10.0.0.1)
state file      /var/lib/xdplb/state.json
pin dir         /sys/fs/bpf/xdplb
vips            1 of 511
backends        2 of 4095
ring entries    65537 of 4194368 (1.6%)
host            in service
flow table      65536 of 1048576 entries (6.2%), 5000 active within 60s, swept 3s ago; 12 evicted
last reconcile  12 map writes in 0.8 ms

VIP               MODE   HEALTHY  SERVING  PACKETS  BYTES  ANNOUNCED  RING
10.0.0.10:80/tcp  panic  1        2        5        600    no         -
"""


def test_status_json() -> None:
    data = json.loads(output.render_status(sample_status(), "json"))
    assert data["interfaces"] == [{"name": "eth0", "prog_id": 42, "mode": "native"},
                                  {"name": "eth1", "prog_id": 0, "mode": ""}]
    assert data["last_reconcile"] == {"map_writes": 12, "ring_positions": {VIP_TEXT: 65537},
                                      "duration_ms": 0.83}
    assert data["ring_entries"] == 4194368 and data["uptime_s"] == 93784.5
    assert data["vip_status"][0]["status"]["mode"] == "panic"
    assert data["vip_status"][0]["check"] is None
    assert list(data) == [field.name for field in lb_pb2.StatusResponse.DESCRIPTOR.fields]


# --- apply and export ------------------------------------------------------------------


DOCUMENT = {"version": 1, "vips": [{"vip": VIP_TEXT, "hash": "source", "backends": [
    {"address": "10.1.0.1", "weight": 100}, {"address": "10.1.0.2", "drained": True}]}]}


def test_apply_sends_a_toml_file_as_json(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text('version = 1\n\n[[vips]]\nvip = "10.0.0.10:80/tcp"\nhash = "source"\n\n'
                    '[[vips.backends]]\naddress = "10.1.0.1"\nweight = 100\n\n'
                    '[[vips.backends]]\naddress = "10.1.0.2"\ndrained = true\n')
    client = RecordingClient(answers={"Apply": lb_pb2.ChangeResponse(
        changes=["add VIP 10.0.0.10:80/tcp", "add backend 10.1.0.1"])})
    result = run(["apply", "-f", str(path)], client)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "add VIP 10.0.0.10:80/tcp\nadd backend 10.1.0.1\n"
    method, request = client.calls[0]
    assert method == "Apply" and not request.dry_run
    assert json.loads(request.document) == DOCUMENT


def test_apply_dry_run_from_stdin() -> None:
    client = RecordingClient(answers={"Apply": lb_pb2.ChangeResponse()})
    result = run(["apply", "-f", "-", "--dry-run"], client, input=json.dumps(DOCUMENT))
    assert result.exit_code == 0
    assert result.stdout == ""  # an empty diff: nothing to change
    assert result.stderr == "no change\n(dry run: nothing was changed)\n"
    request = client.calls[0][1]
    assert request.dry_run and json.loads(request.document) == DOCUMENT


def test_apply_with_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('version = 1\n[[vips]\nvip = "10.0.0.10:80/tcp"\n')
    client = RecordingClient()
    result = run(["apply", "-f", str(path)], client)
    assert_usage_error(result, f"{path}: not valid TOML: Expected ']]' at the end of an array "
                               "declaration (at line 2, column 7)")
    assert client.calls == []


def test_apply_with_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "vips": [}')
    result = run(["apply", "-f", str(path)], RecordingClient())
    assert_usage_error(result, f"{path}: not valid JSON: Expecting value: line 1 column 25 "
                               "(char 24)")


def test_apply_with_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    assert_usage_error(run(["apply", "-f", str(path)], RecordingClient()),
                       f"cannot read {path}: No such file or directory")


def test_read_document_takes_json_for_any_other_name(tmp_path: Path) -> None:
    path = tmp_path / "lb.conf"
    path.write_text(json.dumps(DOCUMENT))
    assert json.loads(read_document(str(path))) == DOCUMENT


def test_export_prints_the_document_apply_takes() -> None:
    document = json.dumps(DOCUMENT, separators=(",", ":"))
    client = RecordingClient(answers={"GetState": lb_pb2.StateDocument(document=document)})
    result = run(["export"], client)
    assert result.exit_code == 0
    assert result.stdout == json.dumps(DOCUMENT, indent=2) + "\n"
    assert client.calls == [("GetState", lb_pb2.GetStateRequest())]


# --- completion ----------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_clicks_script(shell: str) -> None:
    result = run(["completion", shell])
    assert result.exit_code == 0
    completer = get_completion_class(shell)
    assert completer is not None
    assert result.stdout == completer(cli, {}, "lbctl", "_LBCTL_COMPLETE").source()
    assert "_LBCTL_COMPLETE" in result.stdout


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    assert_usage_error(run(["completion", "tcsh"]),
                       "Invalid value for 'SHELL': 'tcsh' is not one of 'bash', 'zsh', 'fish'.")


def test_a_check_through_the_vip_shows_in_the_table_and_the_description() -> None:
    via_vip = check_settings(kind="tcp", port=0, via="vip")
    assert output.short_check(via_vip) == "tcp@vip"
    assert output.short_check(check_settings()) == "http:8080/healthz"
    assert output.describe_check(via_vip).endswith(", through the VIP")
    assert "through the VIP" not in output.describe_check(check_settings())


def test_backend_add_with_a_check_through_the_vip() -> None:
    client = RecordingClient()
    result = run(["backend", "add", VIP_TEXT, "10.1.0.7", "--check-via", "vip"], client)
    assert result.exit_code == 0, result.stderr
    request = client.calls[0][1]
    assert request.backend.check == lb_pb2.HealthCheck(via="vip")


# --- health verdicts and what the datapath holds ------------------------------------------


@pytest.mark.parametrize(("health", "realised", "shown"), [
    ("down", False, "down (leaving ring)"),
    ("down", True, "down"),
    ("held-down", False, "held-down (leaving ring)"),
    ("up", False, "up (joining ring)"),
    ("up", True, "up"),
    ("unchecked", True, "unchecked"),
])
def test_a_verdict_the_maps_do_not_hold_yet_says_so(health: str, realised: bool,
                                                    shown: str) -> None:
    backend = lb_pb2.Backend(address="10.1.0.3", status=lb_pb2.BackendStatus(
        health=health, health_realised=realised))
    assert output.backend_state(backend) == shown


# --- the host's state in `lbctl status` ------------------------------------------------------


@pytest.mark.parametrize(("bgp", "shown"), [
    (True, "drained: every VIP withdrawn from BGP (drain-host --undo ends it)"),
    (False, "drained, but BGP is disabled: no route was withdrawn, routers still send "
            "traffic here (drain-host --undo ends it)"),
])
def test_status_shows_a_drained_host(bgp: bool, shown: str) -> None:
    status = sample_status()
    status.host_drained = True
    status.bgp.enabled = bgp
    assert f"\nhost            {shown}\n" in output.render_status(status, "table")
    assert json.loads(output.render_status(status, "json"))["host_drained"] is True


# --- exit codes: 0 success, 1 refused / unreachable / wait ran out, 2 usage -------------------


class WaitingClient(RecordingClient):
    """A drain that never ends, and hosts whose rings differ."""

    def call(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        if method == "CountFlows":
            return lb_pb2.FlowCount(flows=3, active=2)
        if method == "GetStatus":
            ring = "ab" * 8 if len(self.calls) == 1 else "cd" * 8
            return lb_pb2.StatusResponse(vip_status=[lb_pb2.Vip(
                vip=VIP_TEXT, status=lb_pb2.VipStatus(ring_fingerprint=ring))])
        return lb_pb2.ChangeResponse(changes=[f"did {method}"])

    def for_endpoint(self, host: str) -> WaitingClient:
        return self

    def close(self) -> None:
        pass


EXIT_CODES = [
    # (arguments, client, exit code): every kind of outcome the README names
    (["vip", "add", VIP_TEXT], RecordingClient(), 0),
    (["--version"], RecordingClient(), 0),
    (["vip", "add", "10.0.0.10:80"], RecordingClient(), 2),  # malformed VIP
    (["vip", "add", "fd00::1:80/tcp"], RecordingClient(), 2),  # ambiguous IPv6 VIP
    (["vip", "add", "[fd77::1%eth0]:80/tcp"], RecordingClient(), 2),  # zone id
    (["backend", "add", VIP_TEXT, "10.1.0.300"], RecordingClient(), 2),  # address
    (["backend", "add", VIP_TEXT, "10.1.0.1", "--weight", "10001"], RecordingClient(), 2),
    (["vip", "add", VIP_TEXT, "--ring-size", "65536"], RecordingClient(), 2),  # not prime
    (["vip", "add", VIP_TEXT, "--ring-size", "2"], RecordingClient(), 2),  # out of range
    (["vip", "add", VIP_TEXT, "--check-interval", "99"], RecordingClient(), 2),
    (["vip", "add", VIP_TEXT, "--panic-threshold", "1.5"], RecordingClient(), 2),
    (["vip", "add", VIP_TEXT, "--hash", "crc"], RecordingClient(), 2),  # not a choice
    (["vip", "set", VIP_TEXT], RecordingClient(), 2),  # nothing to set
    (["vip", "lst"], RecordingClient(), 2),  # no such command
    (["vip", "list", "--colour"], RecordingClient(), 2),  # no such option
    (["vip", "add", VIP_TEXT], RecordingClient(refusal="VIP 10.0.0.10:80/tcp: already "
                                                      "exists"), 1),
    (["backend", "drain", VIP_TEXT, "10.1.0.1", "--wait", "--timeout", "1"],
     WaitingClient(), 1),  # the wait ran out
    (["compare", "a.sock", "b.sock"], WaitingClient(), 1),  # the rings differ
]


@pytest.mark.parametrize(("args", "client", "code"), EXIT_CODES,
                         ids=[" ".join(c[0]) for c in EXIT_CODES])
def test_exit_codes(args: list[str], client: RecordingClient, code: int) -> None:
    result = run(args, client)
    assert result.exit_code == code, result.output
    if code == 2:
        assert client.calls == []  # a usage error is found before any call
        assert result.stderr.startswith("lbctl: ") and result.stderr.count("\n") == 1


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    result = run(["--version"])
    assert result.stdout == f"lbctl {version('xdplb')}\n"


# --- flows ------------------------------------------------------------------------------


def flow(client: str, port: int, backend: str, idle: int, vip: str = VIP_TEXT) -> lb_pb2.Flow:
    return lb_pb2.Flow(client=client, client_port=port, vip=vip, port=80, backend=backend,
                       idle_s=idle)


def test_flows_follows_pages_to_the_end_of_the_table() -> None:
    pages = [
        lb_pb2.ListFlowsResponse(flows=[flow("10.2.0.1", 40000, "10.1.0.1", 3),
                                        flow("fd00::7", 443, "10.1.0.2", 0, vip="")],
                                 from_set=0, next_set=262144, total_sets=524288, ways=4,
                                 entries_read=900),
        lb_pb2.ListFlowsResponse(flows=[flow("10.2.0.2", 40001, "10.1.0.1", 61)],
                                 from_set=262144, next_set=524288, total_sets=524288, ways=4,
                                 entries_read=100)]
    client = RecordingClient(answers={"ListFlows": pages})
    result = run(["flows", VIP_TEXT, "--backend", "10.1.0.1", "--limit", "5"], client)
    assert result.exit_code == 0, result.output
    assert [(r.vip, r.backend, r.limit, r.from_set) for _, r in client.calls] == [
        (VIP_TEXT, "10.1.0.1", 5, 0), (VIP_TEXT, "10.1.0.1", 3, 262144)]
    assert result.stdout == """\
CLIENT          VIP               PORT  BACKEND   IDLE
10.2.0.1:40000  10.0.0.10:80/tcp  80    10.1.0.1  3s
[fd00::7]:443   (removed VIP)     80    10.1.0.2  0s
10.2.0.2:40001  10.0.0.10:80/tcp  80    10.1.0.1  61s
3 flows; read sets 0..524287 of 524288 (100.0%), 1000 entries (to the end)
"""


def test_flows_stops_at_the_limit_and_says_where_to_go_on() -> None:
    page = lb_pb2.ListFlowsResponse(flows=[flow("10.2.0.1", 40000, "10.1.0.1", 3)],
                                    from_set=10, next_set=5000, total_sets=524288, ways=4,
                                    entries_read=17, limit_reached=True)
    client = RecordingClient(answers={"ListFlows": [page]})
    result = run(["flows", "--limit", "1", "--from-set", "10"], client)
    assert result.exit_code == 0, result.output
    assert len(client.calls) == 1
    assert result.stdout.splitlines()[-1] == (
        "1 flows; read sets 10..4999 of 524288 (1.0%), 17 entries; go on with --from-set 5000")
    data = json.loads(output.render_flows([page], "json"))
    assert data == {"flows": [{"client": "10.2.0.1", "client_port": 40000, "vip": VIP_TEXT,
                               "port": 80, "backend": "10.1.0.1", "idle_s": 3}],
                    "from_set": 10, "next_set": 5000, "total_sets": 524288,
                    "entries_read": 17, "complete": False}


@pytest.mark.parametrize("args", [["flows", "--limit", "0"], ["flows", "--limit", "10001"],
                                  ["flows", "--backend", "not-an-address"],
                                  ["flows", "--from-set", "-1"]])
def test_flows_refuses_bad_options_before_asking_lbd(args: list[str]) -> None:
    client = RecordingClient()
    result = run(args, client)
    assert result.exit_code == 2 and client.calls == []
