"""Tests for xdplb.state: VIP keys, apply_changes, the dict form and diff."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdplb import state

LIMITS = state.Limits()

V4 = state.VipKey("10.0.0.10", 80, "tcp")
V6 = state.VipKey("2001:db8::10", 443, "udp")
ALL_PORTS = state.VipKey("10.0.0.20", 0, "tcp")
NEW = state.VipKey("10.0.0.30", 80, "tcp")
UNKNOWN = state.VipKey("10.9.9.9", 80, "tcp")

HTTP = state.HealthCheck(kind="http", path="/healthz", host="example.org",
                         expect_status=(200, 204), interval_ms=1000, timeout_ms=500,
                         rise=3, fall=2)


def build(*changes: state.Change, limits: state.Limits = LIMITS) -> state.DesiredState:
    return state.apply_changes(state.DesiredState(), changes, limits)


def base_state() -> state.DesiredState:
    """Three VIPs (IPv4, IPv6, port-less), four backends, rings 65537 + 251 + 13."""
    return build(
        state.AddVip(state.default_vip(V4)),
        state.AddBackend(V4, state.BackendSpec("10.1.0.1")),
        state.AddBackend(V4, state.BackendSpec("10.1.0.2", weight=50)),
        state.AddVip(state.default_vip(V6, ring_size=251)),
        state.AddBackend(V6, state.BackendSpec("2001:db8:1::1")),
        state.AddVip(state.default_vip(ALL_PORTS, ring_size=13)),
        state.AddBackend(ALL_PORTS, state.BackendSpec(
            "10.1.0.3", check=state.HealthCheck(kind="tcp", port=8080))),
    )


BASE_RING_TOTAL = 65537 + 251 + 13
BASE_MEMBERS = 4


@pytest.fixture
def base() -> state.DesiredState:
    return base_state()


def apply(desired: state.DesiredState, *changes: state.Change) -> state.DesiredState:
    return state.apply_changes(desired, changes, LIMITS)


def with_vip(desired: state.DesiredState, vip: state.VipSpec) -> state.DesiredState:
    return state.DesiredState({**desired.vips, vip.key: vip})


def assert_refused(desired: state.DesiredState, changes: list[state.Change], message: str,
                   limits: state.Limits = LIMITS) -> None:
    """apply_changes raises a StateError containing `message` and leaves `desired` as it was."""
    before = desired.to_dict()
    with pytest.raises(state.StateError) as info:
        state.apply_changes(desired, changes, limits)
    assert message in str(info.value)
    assert desired.to_dict() == before


# --- VipKey.parse -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "address", "port", "protocol"), [
    ("10.0.0.10:80/tcp", "10.0.0.10", 80, "tcp"),
    ("[2001:db8::10]:443/udp", "2001:db8::10", 443, "udp"),
    ("10.0.0.10/tcp", "10.0.0.10", 0, "tcp"),
    ("2001:db8::10/tcp", "2001:db8::10", 0, "tcp"),
    ("[2001:db8::10]/tcp", "2001:db8::10", 0, "tcp"),
    ("10.0.0.10:65535/TCP", "10.0.0.10", 65535, "tcp"),
    ("[2001:db8::10]:1/Udp", "2001:db8::10", 1, "udp"),
    ("[2001:DB8:0::10]:80/tcp", "2001:db8::10", 80, "tcp"),
    (" 10.0.0.10:80/tcp ", "10.0.0.10", 80, "tcp"),
])
def test_parse_vip_key(text, address, port, protocol):
    assert state.VipKey.parse(text) == state.VipKey(address, port, protocol)


def test_vip_key_canonicalises_its_address():
    assert state.VipKey("2001:DB8:0::10", 80, "tcp").address == "2001:db8::10"


@pytest.mark.parametrize(("text", "canonical"), [
    ("10.0.0.10:80/tcp", "10.0.0.10:80/tcp"),
    ("[2001:db8::10]:443/udp", "[2001:db8::10]:443/udp"),
    ("10.0.0.10/tcp", "10.0.0.10/tcp"),
    ("2001:db8::10/tcp", "2001:db8::10/tcp"),
    ("[2001:db8::10]/tcp", "2001:db8::10/tcp"),
    ("10.0.0.10:80/UDP", "10.0.0.10:80/udp"),
    ("[2001:DB8:0::10]:443/udp", "[2001:db8::10]:443/udp"),
    ("[fd00::1:80]/tcp", "[fd00::1:80]/tcp"),  # unbracketed it would read as port 80
    ("[fd00::80]/tcp", "fd00::80/tcp"),  # fd00: is no address: not ambiguous
])
def test_vip_key_str_is_canonical_and_parses_back(text, canonical):
    key = state.VipKey.parse(text)
    assert str(key) == canonical
    assert state.VipKey.parse(str(key)) == key


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.10:80", "VIP '10.0.0.10:80': expected ADDRESS[:PORT]/PROTOCOL"),
    ("10.0.0.10:80/", "VIP protocol: '' is not one of tcp, udp"),
    ("10.0.0.10:80/sctp", "VIP protocol: 'sctp' is not one of tcp, udp"),
    ("10.0.0.10:0/tcp", "VIP '10.0.0.10:0/tcp': port '0' is not in 1..65535"),
    ("10.0.0.10:65536/tcp", "VIP '10.0.0.10:65536/tcp': port '65536' is not in 1..65535"),
    ("10.0.0.10:http/tcp", "VIP '10.0.0.10:http/tcp': port 'http' is not in 1..65535"),
    ("10.0.0.10:-1/tcp", "port '-1' is not in 1..65535"),
    ("10.0.0.10:/tcp", "port '' is not in 1..65535"),
    ("10.0.0.10:\N{SUPERSCRIPT TWO}/tcp", "port '\N{SUPERSCRIPT TWO}' is not in 1..65535"),
    ("2001:db8:0:0:0:0:0:10:443/tcp", "put an IPv6 address in brackets: [ADDR]:PORT/PROTO"),
    ("example.com:80/tcp", "VIP address: 'example.com' is not an IPv4 or IPv6 address"),
    ("10.0.0.300:80/tcp", "VIP address: '10.0.0.300' is not an IPv4 or IPv6 address"),
    ("224.0.0.1:80/tcp", "VIP address: 224.0.0.1 is a multicast address"),
    ("[ff02::1]:80/tcp", "VIP address: ff02::1 is a multicast address"),
    ("127.0.0.1:80/tcp", "VIP address: 127.0.0.1 is a loopback address"),
    ("[::1]:80/tcp", "VIP address: ::1 is a loopback address"),
    ("0.0.0.0:80/tcp", "VIP address: 0.0.0.0 is a unspecified address"),
    ("[::]:80/tcp", "VIP address: :: is a unspecified address"),
    ("255.255.255.255:80/tcp", "VIP address: 255.255.255.255 is the broadcast address"),
    ("[::ffff:10.0.0.1]:80/tcp", "is IPv4-mapped: write the IPv4 address 10.0.0.1"),
    ("", "expected ADDRESS[:PORT]/PROTOCOL"),
    ("fd00::1:80/tcp", "VIP 'fd00::1:80/tcp' is ambiguous: write [fd00::1]:80/tcp for port 80, "
                       "or [fd00::1:80]/tcp for every port of that address"),
    ("2001:db8::1:443/udp", "write [2001:db8::1]:443/udp for port 443, or "
                            "[2001:db8::1:443]/udp for every port"),
    ("[fd77:100::1%eth0]:80/tcp", "VIP address: 'fd77:100::1%eth0' has a zone id (%...): "
                                  "VIPs and backends are global addresses; leave the zone out"),
    ("fd77:100::1%eth0/tcp", "has a zone id"),
])
def test_parse_vip_key_refuses(text, message):
    with pytest.raises(state.StateError) as info:
        state.VipKey.parse(text)
    assert message in str(info.value)


def test_parse_vip_key_refuses_a_non_string():
    with pytest.raises(state.StateError, match="expected ADDRESS"):
        state.VipKey.parse(80)  # type: ignore[arg-type]


@pytest.mark.parametrize(("address", "port", "protocol", "message"), [
    ("10.0.0.10", 65536, "tcp", "VIP port: must be an integer 1..65535 (0: every port)"),
    ("10.0.0.10", True, "tcp", "VIP port: must be an integer 1..65535 (0: every port), got True"),
    ("10.0.0.10", 80, "TCP", "VIP protocol: 'TCP' is not one of tcp, udp"),
    ("10.0.0.10:80", 80, "tcp", "VIP address: '10.0.0.10:80' is not an IPv4 or IPv6 address"),
])
def test_vip_key_constructor_refuses(address, port, protocol, message):
    with pytest.raises(state.StateError) as info:
        state.VipKey(address, port, protocol)
    assert message in str(info.value)


# --- apply_changes: what each change does ---------------------------------------------


def test_add_vip(base):
    vip = state.default_vip(NEW, hash="source", backends={
        "10.2.0.1": state.BackendSpec("10.2.0.1", weight=7)})
    assert apply(base, state.AddVip(vip)) == with_vip(base, vip)
    assert base == base_state()


def test_default_vip_of_a_port_less_key_has_no_check():
    assert state.default_vip(ALL_PORTS).check == state.NO_CHECK
    assert state.default_vip(V4).check == state.HealthCheck()


def test_remove_vip(base):
    expected = state.DesiredState({k: v for k, v in base.vips.items() if k != V6})
    assert apply(base, state.RemoveVip(V6)) == expected
    assert base == base_state()


def test_set_vip_changes_exactly_the_given_fields(base):
    settings_ = {"hash": "source", "encap": "gue", "ring_size": 251, "check": HTTP,
                 "panic_threshold": 0.5, "when_none_healthy": "all"}
    after = apply(base, state.SetVip(V4, settings_))
    assert after == with_vip(base, dataclasses.replace(base.vips[V4], **settings_))


def test_add_backend_canonicalises_its_address(base):
    after = apply(base, state.AddBackend(V6, state.BackendSpec("2001:DB8:1:0::2", weight=3)))
    backends = {**base.vips[V6].backends,
                "2001:db8:1::2": state.BackendSpec("2001:db8:1::2", weight=3)}
    assert after == with_vip(base, dataclasses.replace(base.vips[V6], backends=backends))


def test_remove_backend_accepts_any_spelling_of_the_address(base):
    after = apply(base, state.RemoveBackend(V6, "2001:DB8:1:0::1"))
    assert after == with_vip(base, dataclasses.replace(base.vips[V6], backends={}))


def test_set_backend_changes_exactly_the_given_fields(base):
    check = state.HealthCheck(kind="http", path="/ready")
    after = apply(base, state.SetBackend(V4, "10.1.0.2",
                                         {"weight": 0, "drained": True, "check": check}))
    backends = {**base.vips[V4].backends,
                "10.1.0.2": state.BackendSpec("10.1.0.2", 0, True, check)}
    assert after == with_vip(base, dataclasses.replace(base.vips[V4], backends=backends))


def test_set_backend_check_none_reverts_to_the_vips_check(base):
    after = apply(base, state.SetBackend(ALL_PORTS, "10.1.0.3", {"check": None}),
                  state.SetVip(ALL_PORTS, {"check": state.HealthCheck(kind="tcp", port=22)}))
    vip = after.vips[ALL_PORTS]
    assert vip.backends["10.1.0.3"].check is None
    assert vip.check_for(vip.backends["10.1.0.3"]) == state.HealthCheck(kind="tcp", port=22)


def test_no_changes_give_an_equal_state(base):
    assert apply(base) == base


@pytest.mark.parametrize("weight", [0, state.MAX_WEIGHT])
def test_weight_bounds_are_accepted(base, weight):
    after = apply(base, state.SetBackend(V4, "10.1.0.1", {"weight": weight}))
    assert after.vips[V4].backends["10.1.0.1"].weight == weight


def test_ring_with_one_slot_more_than_backends_is_accepted(base):
    after = apply(base, state.AddBackend(ALL_PORTS, state.BackendSpec("10.1.0.4")),
                  state.SetVip(ALL_PORTS, {"ring_size": 3}))
    assert after.vips[ALL_PORTS].ring_size == 3


def test_ipv4_vip_may_have_ipv6_backends(base):
    after = apply(base, state.AddBackend(V4, state.BackendSpec("2001:db8:1::9")))
    assert "2001:db8:1::9" in after.vips[V4].backends


def test_changes_apply_in_order_and_validate_only_at_the_end(base):
    after = apply(base, state.RemoveVip(V4), state.AddVip(state.default_vip(V4, ring_size=7)),
                  state.SetVip(V4, {"ring_size": 13}))
    assert after == with_vip(base, state.default_vip(V4, ring_size=13))


# --- apply_changes: refusals, all or nothing --------------------------------------------


GOOD = [
    state.AddBackend(V4, state.BackendSpec("10.1.0.9")),
    state.SetVip(V6, {"hash": "source"}),
    state.SetBackend(V4, "10.1.0.1", {"weight": 5}),
]


def test_the_good_changes_alone_are_accepted(base):
    after = apply(base, *GOOD)
    assert after.vips[V4].backends["10.1.0.9"] == state.BackendSpec("10.1.0.9")
    assert after.vips[V6].hash == "source"
    assert after.vips[V4].backends["10.1.0.1"].weight == 5


def _backend(address: str, **fields) -> state.BackendSpec:
    return state.BackendSpec(address, **fields)


V4_WHERE = "VIP 10.0.0.10:80/tcp"
V6_WHERE = "VIP [2001:db8::10]:443/udp"
ALL_PORTS_WHERE = "VIP 10.0.0.20/tcp"

REFUSALS = [
    pytest.param([state.AddVip(state.default_vip(V4))],
                 f"{V4_WHERE}: already exists", id="duplicate VIP"),
    pytest.param([state.RemoveVip(UNKNOWN)],
                 "VIP 10.9.9.9:80/tcp: no such VIP", id="remove unknown VIP"),
    pytest.param([state.SetVip(UNKNOWN, {"hash": "source"})],
                 "VIP 10.9.9.9:80/tcp: no such VIP", id="set unknown VIP"),
    pytest.param([state.AddBackend(UNKNOWN, _backend("10.1.0.1"))],
                 "VIP 10.9.9.9:80/tcp: no such VIP", id="backend of unknown VIP"),
    pytest.param([state.AddBackend(V4, _backend("10.1.0.1"))],
                 f"{V4_WHERE}: backend 10.1.0.1 already exists", id="duplicate backend"),
    pytest.param([state.AddBackend(V6, _backend("2001:DB8:1:0::1"))],
                 f"{V6_WHERE}: backend 2001:db8:1::1 already exists",
                 id="duplicate backend, other spelling"),
    pytest.param([state.RemoveBackend(V4, "10.1.0.99")],
                 f"{V4_WHERE}: no backend 10.1.0.99", id="remove unknown backend"),
    pytest.param([state.SetBackend(V4, "10.1.0.99", {"weight": 1})],
                 f"{V4_WHERE}: no backend 10.1.0.99", id="set unknown backend"),
    pytest.param([state.RemoveBackend(V4, "not-an-ip")],
                 "backend address: 'not-an-ip' is not an IPv4 or IPv6 address",
                 id="backend address garbage"),
    pytest.param([state.AddBackend(V4, _backend("10.1.0.7", weight=-1))],
                 f"{V4_WHERE} backend 10.1.0.7.weight: must be an integer 0..10000, got -1",
                 id="weight -1"),
    pytest.param([state.AddBackend(V4, _backend("10.1.0.7", weight=state.MAX_WEIGHT + 1))],
                 f"{V4_WHERE} backend 10.1.0.7.weight: must be an integer 0..10000, got 10001",
                 id="weight MAX_WEIGHT+1"),
    pytest.param([state.SetBackend(V4, "10.1.0.2", {"weight": True})],
                 f"{V4_WHERE} backend 10.1.0.2.weight: must be an integer 0..10000, got True",
                 id="weight bool"),
    pytest.param([state.SetBackend(V4, "10.1.0.2", {"drained": 1})],
                 f"{V4_WHERE} backend 10.1.0.2.drained: must be true or false, got 1",
                 id="drained not bool"),
    pytest.param([state.SetVip(V4, {"ring_size": 65536})],
                 f"{V4_WHERE}.ring_size: 65536 is not a prime in 3..16777216",
                 id="ring size not prime"),
    pytest.param([state.SetVip(V4, {"ring_size": 2})],
                 f"{V4_WHERE}.ring_size: 2 is not a prime in 3..16777216",
                 id="ring size below 3"),
    pytest.param([state.SetVip(V4, {"ring_size": 16777259})],
                 f"{V4_WHERE}.ring_size: 16777259 is not a prime in 3..16777216",
                 id="ring size prime above MAX_SIZE"),
    pytest.param([state.AddBackend(V6, _backend("2001:db8:1::2")),
                  state.AddBackend(V6, _backend("2001:db8:1::3")),
                  state.SetVip(V6, {"ring_size": 3})],
                 f"{V6_WHERE}.backends: 3 backends do not fit a ring of 3: use a larger ring_size",
                 id="ring too small for backends"),
    pytest.param([state.AddBackend(V6, _backend("10.1.0.5"))],
                 f"{V6_WHERE} backend 10.1.0.5: an IPv6 VIP needs IPv6 backends",
                 id="IPv6 VIP with IPv4 backend"),
    pytest.param([state.SetVip(V4, {"hash": "random"})],
                 f"{V4_WHERE}.hash: 'random' is not one of 5tuple, source", id="bad hash"),
    pytest.param([state.SetVip(V4, {"encap": "vxlan"})],
                 f"{V4_WHERE}.encap: 'vxlan' is not one of ipip, gue", id="bad encap"),
    pytest.param([state.SetVip(V4, {"when_none_healthy": "panic"})],
                 f"{V4_WHERE}.when_none_healthy: 'panic' is not one of drop, all",
                 id="bad when_none_healthy"),
    pytest.param([state.SetVip(V4, {"panic_threshold": -0.1})],
                 f"{V4_WHERE}.panic_threshold: must be a fraction 0..1 (0: off), got -0.1",
                 id="panic_threshold below 0"),
    pytest.param([state.SetVip(V4, {"panic_threshold": 1.5})],
                 f"{V4_WHERE}.panic_threshold: must be a fraction 0..1 (0: off), got 1.5",
                 id="panic_threshold above 1"),
    pytest.param([state.SetVip(V4, {"panic_threshold": True})],
                 f"{V4_WHERE}.panic_threshold: must be a fraction 0..1 (0: off), got True",
                 id="panic_threshold bool"),
    pytest.param([state.SetVip(V4, {"backends": {}})],
                 f"{V4_WHERE}: 'backends' cannot be set (settable: hash, encap, ring_size, "
                 "check, panic_threshold, when_none_healthy, capacity, slow_start_s, quic, "
                 "health_scope, health_quorum)",
                 id="SetVip backends"),
    pytest.param([state.SetVip(V4, {"key": V6})],
                 f"{V4_WHERE}: 'key' cannot be set", id="SetVip key"),
    pytest.param([state.SetBackend(V4, "10.1.0.1", {"address": "10.1.0.8"})],
                 "backend 10.1.0.1: 'address' cannot be set (settable: weight, drained, check)",
                 id="SetBackend address"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(interval_ms=1000,
                                                               timeout_ms=1500)})],
                 f"{V4_WHERE}.check.timeout_ms: 1500 exceeds interval_ms 1000",
                 id="VIP check timeout > interval"),
    pytest.param([state.SetBackend(V4, "10.1.0.1", {"check": state.HealthCheck(rise=0)})],
                 f"{V4_WHERE} backend 10.1.0.1.check.rise: must be an integer 1..100, got 0",
                 id="backend check rise 0"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(kind="http", path="health")})],
                 f"{V4_WHERE}.check.path: must start with '/', got 'health'",
                 id="check path without /"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(kind="ping")})],
                 f"{V4_WHERE}.check.kind: 'ping' is not one of none, tcp, tcp-syn, http, https, "
                 "grpc, h3",
                 id="check kind"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(expect_status=(200, 600))})],
                 f"{V4_WHERE}.check.expect_status: must be an integer 100..599, got 600",
                 id="check status code"),
    pytest.param([state.AddBackend(ALL_PORTS, _backend(
                      "10.1.0.8", check=state.HealthCheck(kind="tcp")))],
                 f"{ALL_PORTS_WHERE} backend 10.1.0.8.check.port: "
                 "a port-less VIP's checks need a port", id="port-less VIP, backend check"),
    pytest.param([state.SetBackend(ALL_PORTS, "10.1.0.3", {"check": None}),
                  state.SetVip(ALL_PORTS, {"check": state.HealthCheck(kind="http")})],
                 f"{ALL_PORTS_WHERE}.check.port: "
                 "a port-less VIP's check needs a port", id="port-less VIP, VIP check"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(via="tunnel")})],
                 f"{V4_WHERE}.check.via: 'tunnel' is not one of backend, vip", id="check via"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(kind="grpc", via="vip")})],
                 f"{V4_WHERE}.check.via: a grpc check cannot go through the VIP (the gRPC "
                 "client cannot mark its connections); use via \"backend\", or a tcp or "
                 "http check", id="grpc check via the VIP"),
    pytest.param([state.SetBackend(V4, "10.1.0.1", {"check": state.HealthCheck(
                      kind="grpc", via="vip")})],
                 f"{V4_WHERE} backend 10.1.0.1.check.via: a grpc check cannot go through "
                 "the VIP", id="backend grpc check via the VIP"),
    pytest.param([state.SetVip(V6, {"check": state.HealthCheck(port=53, via="vip")})],
                 f"{V6_WHERE}.check.via: checks through the VIP speak TCP; "
                 "[2001:db8::10]:443/udp is a udp VIP", id="UDP VIP check via the VIP"),
    pytest.param([state.SetVip(V4, {"check": state.HealthCheck(port=8080, via="vip")})],
                 f"{V4_WHERE}.check.port: a check through the VIP goes to the VIP's port 80 "
                 "(set 0 or 80, or use via \"backend\")", id="check via the VIP, other port"),
    pytest.param([state.SetBackend(ALL_PORTS, "10.1.0.3", {"check": state.HealthCheck(
                      via="vip")})],
                 f"{ALL_PORTS_WHERE} backend 10.1.0.3.check.port: "
                 "a port-less VIP's checks need a port", id="port-less VIP, via the VIP"),
    pytest.param([state.AddVip(state.default_vip(state.VipKey("10.0.0.20", 443, "tcp"))),
                  state.SetVip(ALL_PORTS, {"check": state.HealthCheck(port=443, via="vip")})],
                 "VIP 10.0.0.20/tcp.check.port: a check through the VIP to port 443 would "
                 "reach VIP 10.0.0.20:443/tcp, not this one",
                 id="port-less VIP, via the VIP to another VIP's port"),
]


def test_checks_through_the_vip_are_accepted_and_round_trip(base):
    vip_check = state.HealthCheck(kind="http", path="/healthz", via="vip")
    new = state.apply_changes(base, [
        state.SetVip(V4, {"check": vip_check}),
        state.SetVip(ALL_PORTS, {"check": state.HealthCheck(port=8080, via="vip")}),
        state.SetBackend(V4, "10.1.0.1", {"check": state.HealthCheck(port=80, via="vip")}),
    ], state.Limits())
    assert new.vips[V4].check.via == "vip"
    assert state.DesiredState.from_dict(new.to_dict()) == new
    assert state.vip_to_dict(new.vips[V4])["check"]["via"] == "vip"
    # the default is the backend's own address, and an older document without it reads so
    data = state.vip_to_dict(base.vips[V4])
    assert data["check"]["via"] == "backend"
    del data["check"]["via"]
    assert state.vip_from_dict(data, "vip").check.via == "backend"


@pytest.mark.parametrize(("changes", "message"), REFUSALS)
def test_refused_change_names_what_and_why_and_leaves_the_state(base, changes, message):
    assert_refused(base, [*GOOD, *changes], message)


LIMIT_REFUSALS = [
    pytest.param(state.Limits(max_vips=3), [state.AddVip(state.default_vip(NEW))],
                 "4 VIPs exceed the limit of 3 (map size max_vips)", id="max_vips"),
    pytest.param(state.Limits(max_backends=BASE_MEMBERS + 1),
                 [state.AddBackend(V6, _backend("2001:db8:1::2"))],
                 "6 backends (counted per VIP) exceed the limit of 5 (map size max_backends)",
                 id="max_backends summed over VIPs"),
    pytest.param(state.Limits(ring_entries=BASE_RING_TOTAL + 100),
                 [state.SetVip(ALL_PORTS, {"ring_size": 251})],
                 f"rings need {65537 + 251 + 251} entries in total, more than the "
                 f"{BASE_RING_TOTAL + 100} of map size ring_entries", id="ring_entries"),
]


@pytest.mark.parametrize(("limits", "changes", "message"), LIMIT_REFUSALS)
def test_change_over_a_limit_is_refused_and_leaves_the_state(base, limits, changes, message):
    assert_refused(base, [*GOOD, *changes], message, limits)


def test_limits_are_inclusive(base):
    limits = state.Limits(max_vips=3, max_backends=BASE_MEMBERS + 1,
                          ring_entries=BASE_RING_TOTAL)
    assert state.apply_changes(base, GOOD, limits) == apply(base, *GOOD)


def test_limits_of_map_sizes_reserve_index_zero():
    sizes = dataclasses.make_dataclass("Sizes", ["max_vips", "max_backends", "ring_entries"])
    assert state.Limits.of_map_sizes(sizes(16, 64, 1616)) == state.Limits(15, 63, 1616)


def test_add_vip_refuses_one_backend_under_two_spellings():
    """Bug: AddVip neither canonicalises nor de-duplicates the backends it brings."""
    vip = state.default_vip(V6, backends={
        "2001:DB8:1::1": state.BackendSpec("2001:DB8:1::1"),
        "2001:db8:1::1": state.BackendSpec("2001:db8:1::1"),
    })
    empty = state.DesiredState()
    with pytest.raises(state.StateError) as info:
        apply(empty, state.AddVip(vip))
    assert "2001:db8:1::1" in str(info.value).lower()
    assert empty == state.DesiredState()


# --- BackendSpec.ring_weight ------------------------------------------------------------


def test_ring_weight_is_the_weight_when_not_drained():
    assert state.BackendSpec("10.1.0.1", weight=70).ring_weight == 70


def test_ring_weight_is_zero_when_drained():
    assert state.BackendSpec("10.1.0.1", weight=70, drained=True).ring_weight == 0


def test_vip_ring_weights_follow_drain(base):
    after = apply(base, state.SetBackend(V4, "10.1.0.1", {"drained": True}))
    assert after.vips[V4].ring_weights() == {"10.1.0.1": 0, "10.1.0.2": 50}


# --- the dict form ----------------------------------------------------------------------


def rich_state() -> state.DesiredState:
    return build(
        state.AddVip(state.default_vip(V4, hash="source", encap="gue", ring_size=251, check=HTTP,
                                       panic_threshold=0.25, when_none_healthy="all")),
        state.AddBackend(V4, _backend("10.1.0.1", weight=250)),
        state.AddBackend(V4, _backend("10.1.0.2", drained=True)),
        state.AddBackend(V4, _backend("10.1.0.10", weight=0, check=dataclasses.replace(
            HTTP, port=8080, path="/ready"))),
        state.AddVip(state.default_vip(V6, check=state.HealthCheck(
            kind="grpc", grpc_service="lb.Health"))),
        state.AddBackend(V6, _backend("2001:db8:1::1")),
        state.AddBackend(V6, _backend("2001:db8:1::2", weight=state.MAX_WEIGHT)),
        state.AddVip(state.default_vip(ALL_PORTS, ring_size=13)),
        state.AddBackend(ALL_PORTS, _backend("10.1.0.4", check=state.HealthCheck(port=22))),
        state.AddBackend(ALL_PORTS, _backend("10.1.0.5")),
    )


def test_rich_state_round_trips_through_the_dict_form():
    rich = rich_state()
    data = json.loads(json.dumps(rich.to_dict()))
    assert state.DesiredState.from_dict(data) == rich
    assert state.DesiredState.from_dict(data).to_dict() == data


def test_to_dict_sorts_vips_and_backends_by_address():
    data = rich_state().to_dict()
    assert data["version"] == state.FORMAT_VERSION
    assert [v["vip"] for v in data["vips"]] == [
        "10.0.0.10:80/tcp", "10.0.0.20/tcp", "[2001:db8::10]:443/udp"]
    assert [b["address"] for b in data["vips"][0]["backends"]] == [
        "10.1.0.1", "10.1.0.2", "10.1.0.10"]


def test_to_dict_of_a_backend():
    assert state.backend_to_dict(_backend("10.1.0.1", weight=3, drained=True)) == {
        "address": "10.1.0.1", "weight": 3, "drained": True}


def test_from_dict_fills_defaults():
    loaded = state.DesiredState.from_dict({"vips": [
        {"vip": "10.0.0.10:80/tcp", "backends": [{"address": "10.1.0.1"}]}]})
    expected = build(state.AddVip(state.default_vip(V4)),
                     state.AddBackend(V4, _backend("10.1.0.1")))
    assert loaded == expected


def test_from_dict_of_an_empty_table_is_the_empty_state():
    assert state.DesiredState.from_dict({}) == state.DesiredState()


def test_port_less_vip_without_a_check_gets_kind_none():
    loaded = state.DesiredState.from_dict({"vips": [
        {"vip": "10.0.0.20/tcp", "backends": [{"address": "10.1.0.1"}]}]})
    assert loaded.vips[ALL_PORTS].check == state.NO_CHECK
    assert loaded.vips[ALL_PORTS].check.kind == "none"


def test_vip_check_table_inherits_the_defaults():
    loaded = state.DesiredState.from_dict({"vips": [
        {"vip": "10.0.0.10:80/tcp", "check": {"kind": "http", "path": "/healthz"}}]})
    assert loaded.vips[V4].check == state.HealthCheck(kind="http", path="/healthz")


def test_backend_partial_check_inherits_the_vips_check():
    loaded = state.DesiredState.from_dict({"vips": [{
        "vip": "10.0.0.10:80/tcp",
        "check": {"kind": "http", "path": "/healthz", "port": 8080, "rise": 5},
        "backends": [{"address": "10.1.0.1", "check": {"port": 9090}}],
    }]})
    assert loaded.vips[V4].backends["10.1.0.1"].check == state.HealthCheck(
        kind="http", path="/healthz", port=9090, rise=5)


def test_backend_partial_check_of_a_port_less_vip_inherits_kind_none():
    loaded = state.DesiredState.from_dict({"vips": [{
        "vip": "10.0.0.20/tcp", "backends": [{"address": "10.1.0.1", "check": {"port": 22}}]}]})
    assert loaded.vips[ALL_PORTS].backends["10.1.0.1"].check == state.HealthCheck(
        kind="none", port=22)


def _vip(**fields) -> dict:
    return {"vip": "10.0.0.10:80/tcp", **fields}


VIP0 = "state.vips[0] (10.0.0.10:80/tcp)"

FROM_DICT_REFUSALS = [
    pytest.param([], "state: must be a table/object, got list", id="not a table"),
    pytest.param({"vips": [], "vipz": []}, "state: unknown key 'vipz'", id="unknown top key"),
    pytest.param({"vips": [_vip(weight=1)]}, "state.vips[0]: unknown key 'weight'",
                 id="unknown VIP key"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "port": 80}])]},
                 f"{VIP0}.backends[0]: unknown key 'port'", id="unknown backend key"),
    pytest.param({"vips": [_vip(check={"kind": "tcp", "retries": 3})]},
                 f"{VIP0}.check: unknown key 'retries'", id="unknown check key"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "weight": "5"}])]},
                 f"{VIP0}.backends[0].weight: must be int, got '5'", id="string weight"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "weight": True}])]},
                 f"{VIP0}.backends[0].weight: must be int, got True", id="bool weight"),
    pytest.param({"vips": [_vip(check={"port": True})]},
                 f"{VIP0}.check.port: must be int, got True", id="bool check port"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "check": {"port": False}}])]},
                 f"{VIP0}.backends[0].check.port: must be int, got False",
                 id="bool backend check port"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "drained": "yes"}])]},
                 f"{VIP0}.backends[0].drained: must be bool, got 'yes'", id="string drained"),
    pytest.param({"vips": [_vip(ring_size=251.0)]},
                 "state.vips[0].ring_size: must be int, got 251.0", id="float ring size"),
    pytest.param({"vips": [_vip(panic_threshold=True)]},
                 "state.vips[0].panic_threshold: must be int/float, got True", id="bool panic"),
    pytest.param({"vips": {"vip": "10.0.0.10:80/tcp"}},
                 "state.vips: must be list, got {", id="vips not a list"),
    pytest.param({"vips": [{"hash": "source"}]},
                 "state.vips[0].vip: missing", id="VIP without vip"),
    pytest.param({"vips": [_vip(), {"vip": "10.0.0.11:80/tcp"}, {"vip": "10.0.0.10:0080/TCP"}]},
                 "state.vips[2]: VIP 10.0.0.10:80/tcp is listed twice", id="VIP twice"),
    pytest.param({"vips": [{"vip": "[2001:DB8::10]:443/udp"}, {"vip": "[2001:db8::10]:443/udp"}]},
                 "state.vips[1]: VIP [2001:db8::10]:443/udp is listed twice",
                 id="IPv6 VIP twice, other spelling"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1"}, {"address": "10.1.0.1"}])]},
                 f"{VIP0}.backends[1]: backend 10.1.0.1 is listed twice", id="backend twice"),
    pytest.param({"vips": [{"vip": "[2001:db8::10]:443/udp", "backends": [
                     {"address": "2001:db8:1::1"}, {"address": "2001:DB8:1:0::1"}]}]},
                 "state.vips[0] ([2001:db8::10]:443/udp).backends[1]: "
                 "backend 2001:db8:1::1 is listed twice", id="backend twice, other spelling"),
    pytest.param({"version": 2, "vips": []},
                 "state.version: format 2 is not supported (this lbd reads 1)",
                 id="unsupported version"),
    pytest.param({"version": "1"}, "state.version: must be int, got '1'", id="string version"),
    pytest.param({"vips": [{"vip": "10.0.0.10:80/sctp"}]},
                 "state.vips[0].vip: VIP protocol: 'sctp' is not one of tcp, udp",
                 id="bad vip text"),
    pytest.param({"vips": [_vip(backends=[{"address": "10.1.0.1", "weight": -1}])]},
                 f"{VIP0}.backends[0].weight: must be an integer 0..10000, got -1",
                 id="weight out of range"),
    pytest.param({"vips": [_vip(check={"timeout_ms": 3000})]},
                 f"{VIP0}.check.timeout_ms: 3000 exceeds interval_ms 2000",
                 id="check timeout > interval"),
    pytest.param({"vips": [{"vip": "10.0.0.20/tcp", "check": {"kind": "tcp"},
                            "backends": [{"address": "10.1.0.1"}]}]},
                 "state.vips[0] (10.0.0.20/tcp).check.port: "
                 "a port-less VIP's check needs a port", id="port-less VIP check without port"),
    pytest.param({"vips": [{"vip": "[2001:db8::10]:443/udp",
                            "backends": [{"address": "10.1.0.1"}]}]},
                 "an IPv6 VIP needs IPv6 backends", id="IPv6 VIP with IPv4 backend"),
]


@pytest.mark.parametrize(("data", "message"), FROM_DICT_REFUSALS)
def test_from_dict_refuses_with_the_path(data, message):
    with pytest.raises(state.StateError) as info:
        state.DesiredState.from_dict(data)
    assert message in str(info.value)


def test_port_less_ipv6_vip_round_trips_through_the_dict_form():
    key = state.VipKey("2001:db8::20", 0, "udp")
    desired = build(state.AddVip(state.default_vip(key)),
                    state.AddBackend(key, _backend("2001:db8:1::1")))
    assert state.DesiredState.from_dict(desired.to_dict()) == desired


def test_ipv4_vip_with_ipv4_and_ipv6_backends_round_trips_through_the_dict_form(base):
    mixed = apply(base, state.AddBackend(V4, _backend("2001:db8:1::9")))
    assert state.DesiredState.from_dict(mixed.to_dict()) == mixed


# --- diff -------------------------------------------------------------------------------


def test_diff_lists_removals_then_additions_then_settings(base):
    new_vip = state.default_vip(NEW)
    new = apply(base, state.RemoveVip(ALL_PORTS), state.AddVip(new_vip),
                state.SetVip(V6, {"encap": "gue"}),
                state.RemoveBackend(V4, "10.1.0.2"),
                state.AddBackend(V4, _backend("10.1.0.9", weight=9)),
                state.SetBackend(V4, "10.1.0.1", {"drained": True}))
    assert state.diff(base, new) == [
        state.RemoveVip(ALL_PORTS),
        state.AddVip(new_vip),
        state.RemoveBackend(V4, "10.1.0.2"),
        state.AddBackend(V4, _backend("10.1.0.9", weight=9)),
        state.SetBackend(V4, "10.1.0.1", {"drained": True}),
        state.SetVip(V6, {"encap": "gue"}),
    ]


def test_diff_handles_an_ipv4_vip_with_ipv4_and_ipv6_backends(base):
    mixed = apply(base, state.AddBackend(V4, _backend("2001:db8:1::9")))
    assert apply(base, *state.diff(base, mixed)) == mixed


VIP_ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1", "2001:db8::2")
V4_BACKENDS = tuple(f"10.1.0.{i}" for i in range(1, 9))
V6_BACKENDS = tuple(f"2001:db8:1::{i}" for i in range(1, 9))
PORT_CHECKS = (state.HealthCheck(), state.HealthCheck(kind="http", path="/h"))
BACKEND_CHECKS = (None, state.HealthCheck(kind="tcp", port=8080))

vip_keys = st.builds(state.VipKey, st.sampled_from(VIP_ADDRESSES), st.sampled_from((0, 80)),
                     st.sampled_from(state.PROTOCOLS))


@st.composite
def backend_specs(draw, address: str) -> state.BackendSpec:
    return state.BackendSpec(address, weight=draw(st.sampled_from((0, 1, 100, state.MAX_WEIGHT))),
                             drained=draw(st.booleans()),
                             check=draw(st.sampled_from(BACKEND_CHECKS)))


@st.composite
def vip_changes(draw, key: state.VipKey) -> list[state.Change]:
    options = {
        "hash": draw(st.sampled_from(state.HASH_MODES)),
        "encap": draw(st.sampled_from(state.ENCAPSULATIONS)),
        "ring_size": draw(st.sampled_from((7, 13, 251))),
        "panic_threshold": draw(st.sampled_from((0.0, 0.5, 1.0))),
        "when_none_healthy": draw(st.sampled_from(state.WHEN_NONE_HEALTHY)),
    }
    if key.port:
        options["check"] = draw(st.sampled_from(PORT_CHECKS))
    pool = V6_BACKENDS if key.ipv6 else V4_BACKENDS + V6_BACKENDS[:2]  # 4in6 is allowed
    addresses = draw(st.lists(st.sampled_from(pool), max_size=6, unique=True))
    return [state.AddVip(state.default_vip(key, **options)),
            *(state.AddBackend(key, draw(backend_specs(a))) for a in addresses)]


@st.composite
def desired_states(draw) -> state.DesiredState:
    keys = draw(st.lists(vip_keys, max_size=4, unique=True))
    changes = [change for key in keys for change in draw(vip_changes(key))]
    return state.apply_changes(state.DesiredState(), changes, LIMITS)


@settings(max_examples=300)
@given(desired_states(), desired_states())
def test_applying_the_diff_turns_old_into_new(old, new):
    before = old.to_dict()
    assert state.apply_changes(old, state.diff(old, new), LIMITS) == new
    assert old.to_dict() == before


@given(desired_states())
def test_diff_of_a_state_with_itself_is_empty(desired):
    assert state.diff(desired, desired) == []


@given(desired_states())
def test_diff_from_empty_rebuilds_the_state(desired):
    assert apply(state.DesiredState(), *state.diff(state.DesiredState(), desired)) == desired


# --- one datapath address, one key ----------------------------------------------------------


@pytest.mark.parametrize("text", ["fd77::c%x", "fd77::b%\x00evil", "fe80::1%eth0", "10.0.0.1%0"])
def test_a_zone_id_is_refused_in_a_backend_address(text):
    with pytest.raises(state.StateError, match="has a zone id"):
        state.canonical_address(text, "backend address")


# --- a timeout nobody set follows the interval ---------------------------------------------


@pytest.mark.parametrize(("given", "timeout"), [
    ({"interval_ms": 500}, 500),  # the default 1000 would exceed it: clamped
    ({"interval_ms": 5000}, 1000),  # the default fits: kept
    ({"interval_ms": 500, "timeout_ms": 200}, 200),
])
def test_an_unset_timeout_is_clamped_to_the_interval(given, timeout):
    assert state.check_from_dict(given, "check").timeout_ms == timeout


def test_an_explicit_timeout_over_the_interval_is_still_refused():
    with pytest.raises(state.StateError, match=r"check\.timeout_ms: 1000 exceeds interval_ms 500"):
        state.check_from_dict({"interval_ms": 500, "timeout_ms": 1000}, "check")


def test_a_shorter_interval_clamps_the_timeout_the_vip_had():
    base = state.check_from_dict({"interval_ms": 2000, "timeout_ms": 1500}, "check")
    assert state.check_from_dict({"interval_ms": 1000}, "check", base).timeout_ms == 1000


# --- every string a character set and a length, every list a count, every number a range ---


def _refused(doc_vip: dict, message: str) -> None:
    with pytest.raises(state.StateError) as info:
        state.DesiredState.from_dict({"vips": [_vip(**doc_vip)]})
    assert message in str(info.value), str(info.value)
    assert len(str(info.value)) < 500  # bounded, whatever was sent


LIMIT_REFUSALS = [
    ({"check": {"kind": "http", "host": "lab\r\nX-Injected: 1"}},
     f"{VIP0}.check.host: 'lab\\r\\nX-Injected: 1' holds a control character"),
    ({"check": {"kind": "http", "path": "/a\r\nX: 1"}}, f"{VIP0}.check.path: "),
    ({"check": {"kind": "http", "path": "/a b"}}, "an HTTP path holds only letters"),
    ({"check": {"kind": "http", "path": "/\x00"}}, "holds a control character"),
    ({"check": {"kind": "http", "body": "ok\x00"}}, f"{VIP0}.check.body: "),
    ({"check": {"kind": "grpc", "grpc_service": "svc\x00"}}, f"{VIP0}.check.grpc_service: "),
    ({"check": {"kind": "grpc", "grpc_service": "a b"}}, "is not a gRPC service name"),
    ({"check": {"kind": "http", "host": "a b"}}, "is not a host name or address"),
    ({"check": {"kind": "http", "path": "/" + "a" * 1024}},
     "1025 characters, more than the limit of 1024"),
    ({"check": {"kind": "http", "host": "h" * 256}}, "256 characters, more than the limit"),
    ({"check": {"kind": "http", "body": "b" * 257}}, "257 characters, more than the limit"),
    ({"check": {"kind": "http", "expect_status": [200] * 17}},
     f"{VIP0}.check.expect_status: 17 codes, more than the limit of 16"),
    ({"check": {"kind": "http", "expect_status": [200] * 1_000_000}}, "1000000 codes"),
    ({"capacity": {"source": "none", "metric": "q\nx"}}, f"{VIP0}.capacity.metric: "),
    ({"capacity": {"source": "none", "labels": 'a="\x00"'}}, f"{VIP0}.capacity.labels: "),
    ({"capacity": {"source": "push", "target": float("nan")}}, f"{VIP0}.capacity.target: "),
    ({"capacity": {"source": "none", "target": float("inf")}}, f"{VIP0}.capacity.target: "),
    ({"capacity": {"source": "none", "smoothing": float("nan")}},
     f"{VIP0}.capacity.smoothing: "),
    ({"panic_threshold": float("nan")}, f"{VIP0}.panic_threshold: "),
    ({"slow_start_s": float("inf")}, f"{VIP0}.slow_start_s: "),
    ({"ring_size": 10**5000}, f"{VIP0}.ring_size: <int too large to show> is not a prime"),
]


@pytest.mark.parametrize(("doc_vip", "message"), LIMIT_REFUSALS,
                         ids=[m[:40] for _, m in LIMIT_REFUSALS])
def test_limits_are_refused_with_the_field_path(doc_vip, message):
    _refused(doc_vip, message)


def test_a_long_vip_or_address_is_refused_before_parsing():
    with pytest.raises(state.StateError, match="65 characters, no VIP is that long"):
        state.VipKey.parse("1" * 61 + "/tcp")
    with pytest.raises(state.StateError, match="no address is that long"):
        state.canonical_address("1" * 3_000_000)


def test_messages_quote_huge_or_deep_values_briefly():
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(state.StateError) as info:
        state.DesiredState.from_dict({"version": deep})
    assert len(str(info.value)) < 200
    with pytest.raises(state.StateError) as info:
        state.DesiredState.from_dict({"vips": [_vip(hash="x" * 3_000_000)]})
    assert len(str(info.value)) < 300


def test_the_state_may_not_grow_past_what_the_api_can_return():
    limits = state.Limits(max_vips=16, max_backends=1 << 20, ring_entries=16 * 655373)
    heavy = state.HealthCheck(kind="http", path="/" + "p" * 1023, host="h" * 255,
                              body="b" * 256)
    backends = {f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}": state.BackendSpec(
        f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", check=heavy) for i in range(1, 6001)}
    vip = state.default_vip(state.VipKey("10.200.0.1", 80, "tcp"), backends=backends,
                            ring_size=655373)
    with pytest.raises(state.LimitExceeded, match="more than the limit of 8388608"):
        state.apply_changes(state.DesiredState(), [state.AddVip(vip)], limits)
    smaller = dataclasses.replace(vip, backends=dict(list(backends.items())[:3000]))
    assert state.apply_changes(state.DesiredState(), [state.AddVip(smaller)], limits)
