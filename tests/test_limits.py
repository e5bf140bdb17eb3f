"""The largest state lbd accepts can always be read back: its export and its
listings fit the API's message limit, which lbd and lbctl both set.

Two worst shapes at the limits: the most backends the maps allow, each as
small in the state as a backend can be but with the longest status lbd
reports (every backend repeats its VIP's longest check description); and a
state at the byte limit made of backends with the longest check overrides."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from lbctl.client import CHANNEL_OPTIONS
from xdplb import state as st
from xdplb.datapath import MAX_BACKEND_ENTRIES, MapSizes
from xdplb.v1 import lb_pb2 as pb

LONG_PATH = "/" + "p" * (st.MAX_PATH - 1)
LONGEST_CHECK = st.HealthCheck(kind="http", port=65535, path=LONG_PATH, host="h" * st.MAX_HOST,
                               body="b" * st.MAX_BODY, expect_status=(200,) * 16)


def address(i: int) -> str:
    """A long IPv6 text, canonical: no group is zero."""
    return f"fd00:ffff:ffff:ffff:ffff:ffff:{i // 0xE000 + 1:x}:{i % 0xE000 + 0x1000:x}"


def fullest_status(backend: str, check: st.HealthCheck) -> pb.BackendStatus:
    """Every status field at the longest lbd ever reports."""
    described = f"{check.kind} [{backend}]:{check.port}{check.path} through the tunnel to {backend}"
    return pb.BackendStatus(
        healthy=True, available=True, index=MAX_BACKEND_ENTRIES - 1, ring_positions=2**24,
        effective_weight=2**16, packets=2**64 - 1, bytes=2**64 - 1, health="held-down",
        last_result=f"body lacks {'b' * st.MAX_BODY!r}", check_latency_ms=1e9, since=1e10,
        check=described, load=1e12, load_age_s=1e9,
        load_state="malformed: " + "m" * 200, capacity_factor=10.0, slow_start_factor=1.0,
        health_realised=True, realised_since=1e10)


def listing(state: st.DesiredState) -> int:
    """Bytes of ListVips (GetStatus repeats the same VIPs, plus a few fields)."""
    vips = []
    for key in sorted(state.vips):
        vip = state.vips[key]
        message = json_format.ParseDict(st.vip_to_dict(vip), pb.Vip())
        for backend in message.backends:
            backend.status.CopyFrom(fullest_status(backend.address,
                                                   vip.check_for(vip.backends[backend.address])))
        vips.append(message)
    return len(pb.ListVipsResponse(vips=vips).SerializeToString())


def export(state: st.DesiredState) -> int:
    document = json.dumps(state.to_dict(), indent=2)  # as GetState sends it
    return len(pb.StateDocument(document=document).SerializeToString())


def test_the_clients_limit_is_the_servers() -> None:
    assert dict(CHANNEL_OPTIONS) == {"grpc.max_receive_message_length": st.MAX_MESSAGE_BYTES,
                                     "grpc.max_send_message_length": st.MAX_MESSAGE_BYTES}
    assert st.MAX_DOCUMENT_BYTES < st.MAX_MESSAGE_BYTES


def test_the_most_backends_with_the_longest_statuses_fit() -> None:
    limits = st.Limits.of_map_sizes(MapSizes(max_vips=2, max_backends=MAX_BACKEND_ENTRIES,
                                             ring_entries=16777213))
    backends = {address(i): st.BackendSpec(address(i)) for i in range(limits.max_backends)}
    vip = st.VipSpec(st.VipKey("fd00:200::10", 80, "tcp"), check=LONGEST_CHECK,
                     ring_size=16777213, backends=backends)
    state = st.apply_changes(st.DesiredState(), [st.AddVip(vip)], limits)
    with pytest.raises(st.LimitExceeded):  # one more does not fit the maps
        st.apply_changes(state, [st.AddBackend(vip.key, st.BackendSpec("fd00::1"))], limits)
    assert listing(state) <= st.MAX_MESSAGE_BYTES
    assert export(state) <= st.MAX_MESSAGE_BYTES


def test_a_state_at_the_byte_limit_fits() -> None:
    limits = st.Limits.of_map_sizes(MapSizes(max_vips=2, max_backends=MAX_BACKEND_ENTRIES,
                                             ring_entries=16777213))
    per_backend = len(json.dumps(st.backend_to_dict(st.BackendSpec(
        address(0), check=LONGEST_CHECK)), separators=(",", ":"))) + 1
    count = (st.MAX_STATE_BYTES - 4096) // per_backend
    backends = {address(i): st.BackendSpec(address(i), check=LONGEST_CHECK)
                for i in range(count)}
    vip = st.VipSpec(st.VipKey("fd00:200::10", 80, "tcp"), ring_size=16777213,
                     backends=backends)
    state = st.apply_changes(st.DesiredState(), [st.AddVip(vip)], limits)
    more = {address(i): st.BackendSpec(address(i), check=LONGEST_CHECK)
            for i in range(count, count + 20)}
    with pytest.raises(st.LimitExceeded, match="more than the limit of 8388608"):
        st.apply_changes(state, [st.AddBackend(vip.key, b) for b in more.values()], limits)
    assert listing(state) <= st.MAX_MESSAGE_BYTES
    assert export(state) <= st.MAX_MESSAGE_BYTES
