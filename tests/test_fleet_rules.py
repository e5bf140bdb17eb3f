"""The fleet's pure parts: health agreement, drift, the stored forms, the [fleet]
table and the VIP's health scope (no etcd needed; test_fleet.py runs a real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdplb import state
from xdplb.config import ConfigError, load_config
from xdplb.fleet.etcd import prefix_end
from xdplb.fleet.layout import (
    HostReport,
    Keys,
    agreed_verdicts,
    decode_state,
    decode_verdicts,
    drift_of,
    encode_state,
    encode_verdicts,
    quorum_of,
)
from xdplb.fleet.settings import FleetConfig

KEY = state.VipKey.parse("10.0.0.10:80/tcp")
A, B = (KEY, "10.1.0.1"), (KEY, "10.1.0.2")


def reports(**hosts: dict) -> dict[str, dict[str, bool]]:
    return {name: decode_verdicts(encode_verdicts(v)) for name, v in hosts.items()}


def test_a_backend_is_down_only_when_a_majority_of_the_hosts_reporting_it_see_it_down():
    seen = reports(lb1={A: False, B: True}, lb2={A: True, B: True}, lb3={A: False})
    assert agreed_verdicts({A: 0, B: 0}, seen) == {A: False, B: True}
    two = reports(lb1={A: False}, lb2={A: True})
    assert agreed_verdicts({A: 0}, two) == {A: True}  # 1 of 2 is no majority
    assert agreed_verdicts({A: 0}, reports(lb1={A: False}, lb2={A: False})) == {A: False}


def test_a_configured_quorum_counts_hosts_and_a_backend_nobody_reports_is_left_out():
    seen = reports(lb1={A: False}, lb2={A: True}, lb3={A: True})
    assert agreed_verdicts({A: 1}, seen) == {A: False}
    assert agreed_verdicts({A: 2}, seen) == {A: True}
    assert agreed_verdicts({B: 0}, seen) == {}
    assert [quorum_of(0, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert quorum_of(4, 2) == 4  # more than report it: it never goes down


def test_verdicts_that_cannot_be_read_count_as_no_report():
    assert decode_verdicts(b"not json") == {}
    assert decode_verdicts(b"[1, 2]") == {}
    assert decode_verdicts(b'{"10.0.0.10:80/tcp|10.1.0.1": "down", "x": true}') == {"x": True}
    assert encode_verdicts({B: True, A: False}) == (
        b'{"10.0.0.10:80/tcp|10.1.0.1":false,"10.0.0.10:80/tcp|10.1.0.2":true}')


def report(host: str, revision: int, fingerprint: str = "f1", **extra) -> HostReport:
    return HostReport(host=host, version="1", revision=revision,
                      fingerprints={"10.0.0.10:80/tcp": fingerprint}, **extra)


def test_drift_names_a_host_behind_one_with_another_ring_one_refusing_and_one_gone():
    hosts = {"lb1": report("lb1", 9), "lb2": report("lb2", 9), "lb3": report("lb3", 9, "f2"),
             "lb4": report("lb4", 7), "lb5": report("lb5", 9, refused_revision=10,
                                                    refused_reason="limits"),
             "lb6": report("lb6", 9)}
    drift = drift_of(hosts, {"lb1", "lb2", "lb3", "lb4", "lb5"}, 9)
    assert drift == {
        "lb1": [], "lb2": [],
        "lb3": ["ring differs at revision 9: 10.0.0.10:80/tcp"],
        "lb4": ["behind: realises revision 7 of 9"],
        "lb5": ["refused revision 10: limits"],
        "lb6": ["lease expired"],
    }


def test_a_host_report_round_trips_and_an_unreadable_one_says_so():
    original = report("lb1", 3, addresses=("10.0.0.1",), down=("x|y",), drained=True,
                      reported_at=5.0)
    assert HostReport.from_json("lb1", original.to_json()) == original
    assert original.same_content(HostReport.from_json("lb1", original.to_json()))
    broken = HostReport.from_json("lb9", b"{")
    assert (broken.host, broken.revision, broken.refused_reason) == ("lb9", 0,
                                                                    "unreadable report")


def test_the_stored_state_round_trips_and_a_bad_one_is_named():
    desired = state.DesiredState({KEY: state.default_vip(KEY)})
    value = encode_state(desired, 12.5, "lb1", "w1")
    stored = decode_state(b"/p/state", value, 42)
    assert (stored.state, stored.revision, stored.changed_at, stored.changed_by,
            stored.write) == (desired, 42, 12.5, "lb1", "w1")
    with pytest.raises(state.StateError, match=r"etcd key /p/state \(revision 7\): not JSON"):
        decode_state(b"/p/state", b"{", 7)
    with pytest.raises(state.StateError, match="not a desired state written by lbd"):
        decode_state(b"/p/state", b'{"vips": []}', 7)
    with pytest.raises(state.StateError, match="vips"):
        decode_state(b"/p/state", json.dumps({"state": {"vips": [{"vip": "x"}]}}).encode(), 7)


def test_keys_live_under_the_prefix_and_a_prefix_range_ends_right_after_it():
    keys = Keys("/xdplb/prod")
    assert (keys.state, keys.host("lb1"), keys.live_host("lb1"), keys.health_of("lb1")) == (
        b"/xdplb/prod/state", b"/xdplb/prod/hosts/lb1", b"/xdplb/prod/live/lb1",
        b"/xdplb/prod/health/lb1")
    assert Keys.name_under(keys.hosts, keys.host("lb-2")) == "lb-2"
    assert prefix_end(b"/xdplb/") == b"/xdplb0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


def config_problems(tmp_path: Path, table: str) -> list[str]:
    path = tmp_path / "lbd.toml"
    path.write_text(f'interfaces = ["eth0"]\n[fleet]\n{table}')
    try:
        load_config(path, {})
    except ConfigError as exc:
        return [p.split(": ", 1)[1] for p in exc.problems]
    return []


@pytest.mark.parametrize(("table", "problem"), [
    ('etcd = ["10.0.0.1:2379"]', "fleet.etcd: '10.0.0.1:2379' is not http(s)://HOST:PORT"),
    ('etcd = ["http://a:1", "https://b:2"]', "fleet.etcd: mixes http and https endpoints"),
    ('etcd = ["http://a:1"]\nprefix = "xdplb/"', "fleet.prefix: 'xdplb/' must be an absolute"),
    ('etcd = ["http://a:1"]\nhost = "a b"', "fleet.host: 'a b' is not a host name"),
    ('etcd = ["http://a:1"]\nlease_ttl_s = 1', "fleet.lease_ttl_s: 1 must be 2..300"),
    ('etcd = ["https://a:1"]\ncert = "/etc/hostname"', "fleet.cert and fleet.key go together"),
    ('etcd = ["http://a:1"]\nca = "/etc/hostname"', "fleet.ca/cert/key: the endpoints are http"),
    ('etcd = ["https://a:1"]\nca = "/nonexistent"', "fleet.ca: /nonexistent is not a readable"),
    ('etcd = ["http://a:1"]\nendpoints = 1', "fleet: unknown key 'endpoints'"),
])
def test_a_bad_fleet_table_is_refused_with_the_key_and_why(tmp_path, table, problem):
    problems = config_problems(tmp_path, table)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_the_fleet_is_off_by_default_and_a_good_table_is_taken(tmp_path):
    assert not load_config(None, {"interfaces": ("eth0",)}).fleet.enabled
    assert config_problems(tmp_path, 'etcd = ["http://10.0.0.1:2379", "http://[fd00::1]:2379"]'
                                      '\nprefix = "/xdplb/prod"\nhost = "lb1"') == []
    assert FleetConfig(etcd=("http://a:1",), host="lb7").host_name == "lb7"


def test_health_scope_and_quorum_are_validated_and_kept_in_the_dict_form():
    vip = state.vip_from_dict({"vip": "10.0.0.10:80/tcp", "health_scope": "fleet",
                               "health_quorum": 2}, "vip")
    assert (vip.health_scope, vip.health_quorum) == ("fleet", 2)
    assert state.vip_to_dict(vip)["health_scope"] == "fleet"
    assert "health_scope" not in state.vip_to_dict(state.default_vip(KEY))
    with pytest.raises(state.StateError, match=r"health_scope.*not one of host, fleet"):
        state.vip_from_dict({"vip": "10.0.0.10:80/tcp", "health_scope": "all"}, "vip")
    with pytest.raises(state.StateError, match=r"health_quorum: must be 0 .* got 65"):
        state.vip_from_dict({"vip": "10.0.0.10:80/tcp", "health_quorum": 65}, "vip")
