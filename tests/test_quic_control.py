"""QUIC VIPs in the control plane: the state's server IDs, and the reconciler
writing them into the datapath's quic_servers table in a safe order.

State: `quic` only on UDP VIPs; server IDs unique across the QUIC VIPs, fitting
their length and the map; a backend without one gets the smallest free one,
the same for the same state whichever order it was built in; a document that
leaves a server ID out keeps it, one that changes it is refused; turning QUIC
off frees them. Reconciler: every QUIC VIP backend's server ID names its
backend entry and VIP, cleared when the backend, its VIP or QUIC goes, moved
when forced; a real short-header packet then goes where its server ID says.
"""

from __future__ import annotations

import ctypes as ct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, NEXTHOP_MAC, require_root
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import XDP_TX, Balancer, MapSizes
from xdplb.reconciler import DatapathSettings, Reconciler
from xdplb.state import (
    AddBackend,
    AddVip,
    BackendSpec,
    DesiredState,
    LimitExceeded,
    Limits,
    QuicConfig,
    ReassignServerId,
    RemoveBackend,
    RemoveVip,
    SetVip,
    StateError,
    VipKey,
    apply_changes,
    default_vip,
    diff,
)

SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=4 * 1009, conn_entries=4096)
LIMITS = Limits.of_map_sizes(SIZES)
Q = VipKey("10.200.0.10", 443, "udp")
Q2 = VipKey("10.200.0.11", 443, "udp")
BACKENDS = ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
CLIENT = "10.100.1.2"


def quic_vip(key: VipKey, addresses: list[str], ids: dict[str, int] | None = None,
             **options) -> object:
    ids = ids or {}
    return default_vip(key, ring_size=1009, quic=QuicConfig(2, 1), backends={
        a: BackendSpec(a, server_id=ids.get(a, 0)) for a in addresses}, **options)


def build(*changes, state: DesiredState | None = None) -> DesiredState:
    return apply_changes(state or DesiredState(), changes, LIMITS)


def server_ids(state: DesiredState, key: VipKey = Q) -> dict[str, int]:
    return {a: b.server_id for a, b in state.vips[key].backends.items()}


# --- the state -------------------------------------------------------------------------


def test_backends_get_the_smallest_free_server_ids_whatever_the_order():
    one = build(AddVip(quic_vip(Q, BACKENDS)))
    assert server_ids(one) == {"10.100.10.2": 1, "10.100.11.2": 2, "10.100.12.2": 3}
    other = build(AddVip(quic_vip(Q, [])), *(AddBackend(Q, BackendSpec(a))
                                             for a in reversed(BACKENDS)))
    assert server_ids(other) == server_ids(one)  # one change: the same order
    given = build(AddVip(quic_vip(Q, BACKENDS[:2], {"10.100.11.2": 1})))
    assert server_ids(given) == {"10.100.10.2": 2, "10.100.11.2": 1}
    freed = build(RemoveBackend(Q, "10.100.10.2"), AddBackend(Q, BackendSpec("10.100.13.2")),
                  state=one)
    assert server_ids(freed)["10.100.13.2"] == 1


def test_the_dict_form_carries_quic_and_server_ids_and_only_for_quic_vips():
    state = build(AddVip(quic_vip(Q, BACKENDS[:1])),
                  AddVip(default_vip(VipKey("10.200.0.12", 80, "tcp"), ring_size=1009, backends={
                      "10.100.10.2": BackendSpec("10.100.10.2")})))
    data = state.to_dict()
    quic = next(v for v in data["vips"] if v["vip"] == str(Q))
    assert quic["quic"] == {"server_id_len": 2, "rotation": 1}
    assert quic["backends"][0]["server_id"] == 1
    plain = next(v for v in data["vips"] if v["vip"] != str(Q))
    assert "quic" not in plain and "server_id" not in plain["backends"][0]
    assert DesiredState.from_dict(data) == state


@pytest.mark.parametrize(("vips", "message"), [
    ([default_vip(VipKey("10.200.0.10", 443, "tcp"), quic=QuicConfig())],
     "QUIC runs over UDP"),
    ([default_vip(Q, quic=QuicConfig(server_id_len=9))], "server_id_len: must be an integer 1..8"),
    ([default_vip(Q, quic=QuicConfig(rotation=7))], "rotation: must be an integer 0..6"),
    ([default_vip(Q, backends={"10.100.10.2": BackendSpec("10.100.10.2", server_id=5)})],
     "only the backends of a QUIC VIP have one"),
    ([quic_vip(Q, BACKENDS[:1], {"10.100.10.2": 4}),
      quic_vip(Q2, BACKENDS[:1], {"10.100.10.2": 4})], "4 is already the server ID of"),
    ([default_vip(Q, quic=QuicConfig(server_id_len=1), backends={
        "10.100.10.2": BackendSpec("10.100.10.2", server_id=256)})],
     "server_id: must be an integer 0..65535|must be an integer 1..255"),
])
def test_bad_quic_settings_are_refused(vips, message):
    with pytest.raises(StateError, match=message):
        build(*(AddVip(v) for v in vips))


def test_server_ids_past_the_map_or_the_length_are_limits():
    with pytest.raises(LimitExceeded, match="exceeds the limit of 31"):
        build(AddVip(quic_vip(Q, BACKENDS[:1], {"10.100.10.2": 32})))
    small = default_vip(Q, ring_size=1009, quic=QuicConfig(server_id_len=1), backends={
        f"10.100.10.{i}": BackendSpec(f"10.100.10.{i}") for i in range(1, 33)})
    with pytest.raises(LimitExceeded, match="no free server ID"):
        build(AddVip(small))


def test_a_document_keeps_server_ids_it_leaves_out_and_refuses_changing_them():
    state = build(AddVip(quic_vip(Q, BACKENDS)))
    document = quic_vip(Q, BACKENDS)  # no server IDs written
    assert diff(state, DesiredState({Q: document})) == []
    changed = quic_vip(Q, BACKENDS, {"10.100.10.2": 9})
    with pytest.raises(StateError, match="server_id: 1 cannot become 9"):
        diff(state, DesiredState({Q: changed}))
    forced = build(ReassignServerId(Q, "10.100.10.2", 9), state=state)
    assert server_ids(forced)["10.100.10.2"] == 9


def test_quic_off_frees_the_server_ids_and_on_again_assigns_them():
    state = build(AddVip(quic_vip(Q, BACKENDS)))
    off = build(SetVip(Q, {"quic": None}), state=state)
    assert set(server_ids(off).values()) == {0}
    on = build(SetVip(Q, {"quic": QuicConfig(3, 2)}), state=off)
    assert sorted(server_ids(on).values()) == [1, 2, 3]


# --- the reconciler --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bal():
    require_root()
    balancer = Balancer(SIZES)
    yield balancer
    balancer.close()


def written(bal: Balancer) -> dict[int, tuple[int, int]]:
    """quic_servers as the kernel holds it (not the writer's mirror), seqs even."""
    found = {}
    for server_id in range(1, SIZES.max_backends):
        entry = bal.quic_servers.array.get(ct.c_uint32(server_id))
        assert entry.seq % 2 == 0
        if entry.backend:
            found[server_id] = (entry.vip_id, entry.backend)
    return found


def expected(rec: Reconciler, state: DesiredState) -> dict[int, tuple[int, int]]:
    return {b.server_id: (rec.vip_id(key), rec.member_index(key, a))
            for key, v in state.vips.items() if v.quic for a, b in v.backends.items()}


def test_the_reconciler_writes_server_ids_and_clears_them_in_order(bal):
    rec = Reconciler(bal)
    state = build(AddVip(quic_vip(Q, BACKENDS)), AddVip(quic_vip(Q2, BACKENDS[:1])))
    rec.reconcile(state, settings=DatapathSettings(nexthop_mac=NEXTHOP_MAC))
    assert written(bal) == expected(rec, state) and len(written(bal)) == 4
    meta = bal.vips.get(s.VipKey(addr=s.Addr16.of(Q.address), port=s.port_be(443),
                                 proto=s.IPPROTO_UDP))
    assert meta.flags == s.quic_vip_flags(2, 1)
    steps = [
        build(RemoveBackend(Q, "10.100.11.2"), state=state),
        build(ReassignServerId(Q, "10.100.10.2", 20), state=state),
        build(RemoveVip(Q2), state=state),
        build(SetVip(Q, {"quic": None}), state=state),
    ]
    for step in steps:
        report = rec.reconcile(step)
        assert written(bal) == expected(rec, step), step
        assert report.writes["quic_servers"] > 0
        rec.reconcile(state)
        assert written(bal) == expected(rec, state)
    assert rec.reconcile(state).writes["quic_servers"] == 0  # nothing to do twice


def test_a_short_header_reaches_the_backend_its_server_id_names(bal):
    rec = Reconciler(bal)
    state = build(AddVip(quic_vip(Q, BACKENDS)))
    rec.reconcile(state, settings=DatapathSettings(nexthop_mac=NEXTHOP_MAC))
    for address, backend in state.vips[Q].backends.items():
        dcid = bytes([1 << 5 | 8]) + backend.server_id.to_bytes(2, "big") + b"nonce6"
        for src, sport in ((CLIENT, 50000), ("10.100.9.9", 1234)):  # before and after moving
            frame = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=Q.address)
                          / UDP(sport=sport, dport=443) / (b"\x41" + dcid + bytes(24)))
            out = bal.test_run(frame)
            h = s.flow_hash(src, Q.address, sport, 443, s.IPPROTO_UDP)
            assert out.verdict == XDP_TX
            assert out.data == encapsulated(frame[14:], address, h)
