"""The reconciler against real BPF maps: after every change the incrementally
reconciled maps read exactly like a fresh build of the same state, each ring
is Maglev's, only changed ring positions are written, allocation follows the
IndexPool/RingSpace rules, and a restart over pinned maps writes nothing."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, NEXTHOP_MAC, require_root
from tests.packets import encapsulated
from xdplb import maglev
from xdplb import structs as s
from xdplb.datapath import PIN_ROOT, XDP_TX, Balancer, DatapathError, MapSizes
from xdplb.reconciler import (
    DatapathSettings,
    IndexPool,
    ReconcileError,
    Reconciler,
    RingSpace,
    Runtime,
    VipPlan,
    plan_vip,
    read_view,
)
from xdplb.state import (
    AddBackend,
    AddVip,
    BackendSpec,
    Change,
    DesiredState,
    Limits,
    RemoveBackend,
    RemoveVip,
    SetBackend,
    SetVip,
    VipKey,
    VipSpec,
    apply_changes,
    default_vip,
)

SIZES = MapSizes(max_vips=16, max_backends=128, ring_entries=65537 + 3 * 4099 + 2 * 1009,
                 conn_entries=4096)
LIMITS = Limits.of_map_sizes(SIZES)
SETTINGS = DatapathSettings(nexthop_mac=NEXTHOP_MAC)

A = VipKey("10.200.0.10", 80, "tcp")
B = VipKey("fd00:200::10", 443, "tcp")
C = VipKey("10.200.0.10", 0, "tcp")  # port-less, same address as A
A_BACKENDS = ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
B_BACKENDS = ["fd00:100:10::2", "fd00:100:11::2"]
CLIENT = "10.100.1.2"


def vip(key: VipKey, addresses: list[str], **options) -> VipSpec:
    return default_vip(key, backends={a: BackendSpec(a) for a in addresses}, **options)


def build(*changes: Change, state: DesiredState | None = None) -> DesiredState:
    return apply_changes(state or DesiredState(), changes, LIMITS)


# --- fixtures and the checks every map state must pass ------------------------------


@pytest.fixture
def new_balancer() -> Iterator[Callable[..., Balancer]]:
    """Builds Balancers (own maps each) and closes every one at teardown."""
    require_root()
    opened: list[Balancer] = []

    def make(sizes: MapSizes = SIZES, pin_dir: Path | None = None) -> Balancer:
        opened.append(Balancer(sizes, pin_dir))
        return opened[-1]

    yield make
    for bal in opened:
        bal.close()


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = PIN_ROOT / f"test-reconciler-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):  # the shared root, once empty
            PIN_ROOT.rmdir()


def fresh_view(new_balancer, desired: DesiredState, runtime: Runtime) -> dict:
    """read_view of brand-new maps reconciled once from `desired`."""
    bal = new_balancer()
    try:
        Reconciler(bal).reconcile(desired, runtime)
        return read_view(bal)
    finally:
        bal.close()


def backend_flags(address: str, available: bool) -> int:
    return ((s.BACKEND_F_IPV6 if ":" in address else 0)
            | (s.BACKEND_F_AVAILABLE if available else 0))


def expected_vip_flags(spec: VipSpec) -> int:
    return ((s.VIP_F_HASH_SRC_ONLY if spec.hash == "source" else 0)
            | (s.VIP_F_GUE if spec.encap == "gue" else 0))


def expected_addr_flags(desired: DesiredState) -> dict[str, int]:
    portless = {"tcp": s.VIP_ADDR_F_PORTLESS_TCP, "udp": s.VIP_ADDR_F_PORTLESS_UDP}
    flags: dict[str, int] = {}
    for key in desired.vips:
        flags[key.address] = flags.get(key.address, 0) | (0 if key.port else portless[key.protocol])
    return flags


def expected_filter(desired: DesiredState) -> list[int]:
    words = [0] * s.ADDR_FILTER_WORDS
    for key in desired.vips:
        word, bit = s.addr_filter_slot(key.address)
        words[word] |= 1 << bit
    return words


def assert_realises(view: dict, desired: DesiredState, runtime: Runtime) -> None:
    """The maps (as read_view) hold exactly what `desired` and `runtime` ask for."""
    assert sorted(view["vips"]) == sorted(str(k) for k in desired.vips)
    live_ring_entries = 0
    for key, spec in desired.vips.items():
        plan = plan_vip(spec, runtime)
        got = view["vips"][str(key)]
        assert got["ring"] == maglev.build_ring(plan.ring_weights, spec.ring_size).owners()
        assert got["backends"] == {a: backend_flags(a, plan.available[a]) for a in spec.backends}
        assert got["flags"] == expected_vip_flags(spec)
        if any(plan.ring_weights.values()):
            live_ring_entries += spec.ring_size
    assert view["vip_addrs"] == expected_addr_flags(desired)
    assert view["addr_filter"] == expected_filter(desired)
    assert view["orphan_backends"] == []
    assert view["ring_entries_nonzero"] == live_ring_entries


# --- 1. every step equals a fresh build --------------------------------------------------

DOWN = Runtime(healthy={(A, "10.100.13.2"): False})
STEPS: list[tuple[str, list[Change], Runtime | None]] = [
    ("add VIP A with 3 backends", [AddVip(vip(A, A_BACKENDS, ring_size=1009))], None),
    ("add IPv6 gue source-hash VIP B",
     [AddVip(vip(B, B_BACKENDS, ring_size=4099, encap="gue", hash="source"))], None),
    ("add a backend", [AddBackend(A, BackendSpec("10.100.13.2"))], None),
    ("remove a backend", [RemoveBackend(A, "10.100.11.2")], None),
    ("change a weight", [SetBackend(A, "10.100.12.2", {"weight": 300})], None),
    ("drain", [SetBackend(A, "10.100.10.2", {"drained": True})], None),
    ("undrain", [SetBackend(A, "10.100.10.2", {"drained": False})], None),
    ("mark a backend down", [], DOWN),
    ("bring it back", [], Runtime()),
    ("change ring size", [SetVip(A, {"ring_size": 4099})], None),
    ("change hash mode", [SetVip(A, {"hash": "source"})], None),
    ("remove VIP B", [RemoveVip(B)], None),
    ("add port-less VIP C on A's address",
     [AddVip(vip(C, ["10.100.20.2", "10.100.21.2"], ring_size=1009))], None),
]


def test_every_step_reads_like_a_fresh_build_and_a_second_reconcile_writes_nothing(
        new_balancer):
    bal = new_balancer()
    rec = Reconciler(bal)
    desired, runtime = DesiredState(), Runtime()
    for step, changes, new_runtime in STEPS:
        desired = build(*changes, state=desired)
        runtime = new_runtime or runtime
        assert rec.reconcile(desired, runtime).total_writes > 0, step
        view = read_view(bal)
        assert view == fresh_view(new_balancer, desired, runtime), step
        assert_realises(view, desired, runtime)
        assert rec.reconcile(desired, runtime).total_writes == 0, step


def test_marking_down_clears_only_that_backends_available_flag(new_balancer):
    bal = new_balancer()
    rec = Reconciler(bal)
    desired = build(AddVip(vip(A, [*A_BACKENDS, "10.100.13.2"], ring_size=1009)))
    rec.reconcile(desired)
    report = rec.reconcile(desired, DOWN)
    assert read_view(bal)["vips"][str(A)]["backends"] == {
        "10.100.10.2": s.BACKEND_F_AVAILABLE, "10.100.11.2": s.BACKEND_F_AVAILABLE,
        "10.100.12.2": s.BACKEND_F_AVAILABLE, "10.100.13.2": 0}
    assert report.writes["backends"] == 1


# --- 2. minimal writes ---------------------------------------------------------------


def hundred_backends() -> dict[str, int]:
    return {f"10.1.0.{i}": 100 for i in range(1, 101)}


@pytest.mark.parametrize(("change", "extra_writes"), [
    ("remove", {"backends": 1}),
    ("add", {"backends": 1, "backend_stats": 1}),
    ("reweight", {}),
])
def test_one_backend_change_writes_exactly_the_maglev_diff(new_balancer, change, extra_writes):
    bal = new_balancer()
    rec = Reconciler(bal)
    weights = hundred_backends()
    desired = build(AddVip(vip(A, list(weights), ring_size=65537)))
    rec.reconcile(desired)
    edit = {"remove": RemoveBackend(A, "10.1.0.42"),
            "add": AddBackend(A, BackendSpec("10.1.1.1")),
            "reweight": SetBackend(A, "10.1.0.42", {"weight": 200})}[change]
    desired = build(edit, state=desired)
    report = rec.reconcile(desired)
    old = maglev.build_ring(weights, 65537)
    new = maglev.build_ring(desired.vips[A].ring_weights(), 65537)
    moved = len(maglev.diff_positions(old, new))
    assert 0 < moved < 65537 // 20  # a small fraction of the ring
    assert report.ring_positions == {str(A): moved}
    assert report.writes == Counter({"ring": moved, **extra_writes})
    assert read_view(bal)["vips"][str(A)]["ring"] == new.owners()


# --- 3. allocation ---------------------------------------------------------------------


def test_removed_backend_index_is_not_reused_while_fresh_indexes_remain(new_balancer):
    rec = Reconciler(new_balancer())
    desired = build(AddVip(vip(A, A_BACKENDS, ring_size=1009)))
    rec.reconcile(desired)
    before = {a: rec.member_index(A, a) for a in A_BACKENDS}
    assert sorted(before.values()) == [1, 2, 3]
    desired = build(RemoveBackend(A, "10.100.11.2"), state=desired)
    rec.reconcile(desired)
    desired = build(AddBackend(A, BackendSpec("10.100.13.2")), state=desired)
    rec.reconcile(desired)
    assert rec.member_index(A, "10.100.13.2") == 4
    assert rec.member_index(A, "10.100.10.2") == before["10.100.10.2"]
    assert rec.member_index(A, "10.100.12.2") == before["10.100.12.2"]


def test_allocating_ahead_gives_the_indexes_the_reconcile_then_uses_and_reports(
        new_balancer):
    """Checks through the VIP need a new backend's index before it is realised:
    allocate() hands it out, the reconcile uses it, and reports the counter
    resets allocate() wrote as its own (one reconcile's report, as before)."""
    ahead, plain = Reconciler(new_balancer()), Reconciler(new_balancer())
    desired = build(AddVip(vip(A, A_BACKENDS, ring_size=1009)))
    ahead.allocate(desired)
    indexes = {a: ahead.member_index(A, a) for a in A_BACKENDS}
    ahead.allocate(desired)  # twice: nothing new
    report = ahead.reconcile(desired)
    assert {a: ahead.member_index(A, a) for a in A_BACKENDS} == indexes
    assert report.writes == plain.reconcile(desired).writes
    assert report.writes["backend_stats"] == len(A_BACKENDS)
    assert not ahead.reconcile(desired).total_writes


def test_index_pool_hands_out_fresh_indexes_then_freed_ones_oldest_first():
    pool = IndexPool(6)
    assert [pool.take() for _ in range(3)] == [1, 2, 3]
    pool.give_back(3)
    pool.give_back(1)
    assert [pool.take() for _ in range(4)] == [4, 5, 3, 1]
    with pytest.raises(ReconcileError, match="all 5 indexes are in use"):
        pool.take()


def test_index_pool_rebuilt_from_used_indexes_fills_gaps_after_fresh_ones():
    pool = IndexPool(8, used=[1, 3, 5])
    assert [pool.take() for _ in range(4)] == [6, 7, 2, 4]


def test_ring_space_is_first_fit():
    space = RingSpace(100)
    assert [space.take(10), space.take(20), space.take(30)] == [0, 10, 30]
    space.give_back(10, 20)
    assert space.take(15) == 10  # the first free run that fits, not the best-fitting one
    assert space.free == [(25, 5), (60, 40)]


def test_ring_space_merges_neighbours_on_give_back():
    space = RingSpace(100)
    offsets = [space.take(10), space.take(20), space.take(30)]
    space.give_back(offsets[0], 10)
    space.give_back(offsets[2], 30)
    assert space.free == [(0, 10), (30, 70)]
    space.give_back(offsets[1], 20)
    assert space.free == [(0, 100)]


def test_ring_space_fragmentation_error_names_the_sizes():
    space = RingSpace(100)
    offsets = [space.take(30), space.take(10), space.take(30), space.take(30)]
    space.give_back(offsets[0], 30)
    space.give_back(offsets[2], 30)
    message = ("no 50 contiguous ring entries free (largest free run 30 of 100): "
               "the ring array is fragmented or full")
    with pytest.raises(ReconcileError, match=re.escape(message)):
        space.take(50)


def test_ring_space_refuses_overlapping_used_regions():
    with pytest.raises(ReconcileError, match=re.escape("ring region 5+10 overlaps")):
        RingSpace(100, used=[(0, 10), (5, 10)])


def test_replacing_a_vip_in_a_full_ring_array_reuses_the_removed_region(new_balancer):
    """The new state fits the ring array (DesiredState.validate accepts it); only the
    removed VIP's region is free for the new one."""
    sizes = MapSizes(max_vips=16, max_backends=128, ring_entries=2 * 1009, conn_entries=4096)
    rec = Reconciler(new_balancer(sizes))
    limits = Limits.of_map_sizes(sizes)
    desired = apply_changes(DesiredState(), [AddVip(vip(A, A_BACKENDS, ring_size=1009)),
                                             AddVip(vip(B, B_BACKENDS, ring_size=1009))], limits)
    rec.reconcile(desired)
    replaced = apply_changes(desired, [RemoveVip(B), AddVip(vip(C, ["10.100.20.2"],
                                                               ring_size=1009))], limits)
    rec.reconcile(replaced)
    assert_realises(read_view(rec.bal), replaced, Runtime())


# --- 4. restart ----------------------------------------------------------------------


def two_vips() -> DesiredState:
    return build(AddVip(vip(A, A_BACKENDS, ring_size=1009)),
                 AddVip(vip(B, B_BACKENDS, ring_size=4099, encap="gue")))


def test_restart_on_pinned_maps_writes_nothing_and_recovers_marks(new_balancer, pin_dir):
    desired, down = two_vips(), Runtime(healthy={(A, "10.100.11.2"): False})
    members = [(k, a) for k, spec in desired.vips.items() for a in spec.backends]
    first = new_balancer(pin_dir=pin_dir)
    rec = Reconciler(first)
    rec.reconcile(desired, down, settings=SETTINGS)
    indexes = {m: rec.member_index(*m) for m in members}
    view = read_view(first)
    first.close()

    second = new_balancer(pin_dir=pin_dir)
    restarted = Reconciler(second)
    recovered = restarted.recovered_availability()
    assert recovered == {m: m != (A, "10.100.11.2") for m in members}
    assert {m: restarted.member_index(*m) for m in members} == indexes
    assert restarted.reconcile(desired, Runtime(healthy=recovered),
                               settings=SETTINGS).total_writes == 0
    assert restarted.reconcile(desired, down, settings=SETTINGS).total_writes == 0
    assert read_view(second) == view


def test_restart_keeps_unsettled_bits_and_settles_after_its_own_quiet_period(
        new_balancer, pin_dir):
    desired = two_vips()
    first = new_balancer(pin_dir=pin_dir)
    Reconciler(first).reconcile(desired, settings=SETTINGS)
    raw = first.read_ring(0, SIZES.ring_entries)
    first.close()
    second = new_balancer(pin_dir=pin_dir)
    restarted = Reconciler(second)
    assert second.read_ring(0, SIZES.ring_entries) == raw
    assert restarted.unsettled_slots(A) == 1009
    assert restarted.settle().vips_skipped == 2  # loaded just now: changed for all it knows
    assert restarted.settle(quiet_s=0).slots_unsettled == 0


def test_pinned_maps_of_other_shapes_are_refused_before_anything_loads(new_balancer, pin_dir):
    first = new_balancer(pin_dir=pin_dir)
    Reconciler(first).reconcile(two_vips(), settings=SETTINGS)
    ring = first.read_ring(0, 1009)
    first.close()
    other = MapSizes(max_vips=16, max_backends=128, ring_entries=SIZES.ring_entries,
                     conn_entries=8192)
    with pytest.raises(DatapathError) as refused:
        new_balancer(other, pin_dir)
    assert str(refused.value) == (
        f"pinned map {pin_dir}/conns is (key 4 B, value 128 B, 1024 entries), this build "
        "needs (key 4 B, value 128 B, 2048 entries): they were made by another xdplb "
        "version or other [maps] sizes. Stop the lbd that made them with --detach-on-exit, "
        f"or detach it and remove {pin_dir}")
    assert new_balancer(pin_dir=pin_dir).read_ring(0, 1009) == ring  # left as they were


def test_restart_clears_backend_address_and_filter_entries_nothing_owns(new_balancer):
    desired = two_vips()
    bal = new_balancer()
    Reconciler(bal).reconcile(desired)
    stray = s.Backend(addr=s.Addr16.of("10.9.9.9"), flags=s.BACKEND_F_AVAILABLE, vip_id=9)
    bal.backends.put(ct.c_uint32(100), stray)
    bal.vip_addrs.put(s.Addr16.of("10.9.9.9"), s.VipAddrMeta(s.VIP_ADDR_F_PORTLESS_UDP))
    unused_word = expected_filter(desired).index(0)
    bal.addr_filter.put(ct.c_uint32(unused_word), ct.c_uint64(1 << 63))
    assert read_view(bal)["orphan_backends"] == [100]
    report = Reconciler(bal).reconcile(desired)
    assert report.writes == Counter({"backends": 1, "vip_addrs": 1, "addr_filter": 1})
    assert read_view(bal) == fresh_view(new_balancer, desired, Runtime())


def test_restart_clears_a_ring_region_no_vip_uses(new_balancer):
    desired = two_vips()
    bal = new_balancer()
    Reconciler(bal).reconcile(desired)
    end = SIZES.ring_entries
    bal.write_ring([end - 3, end - 2, end - 1], [1, 2, 3])
    Reconciler(bal).reconcile(desired)
    assert read_view(bal) == fresh_view(new_balancer, desired, Runtime())


# --- 5. panic and zero-healthy ---------------------------------------------------------

FIVE = ["10.100.10.2", "10.100.11.2", "10.100.12.2", "10.100.13.2", "10.100.14.2"]
DRAINED = "10.100.14.2"  # weight 0: never counted as serving, never in the ring


def five_backends(**options) -> VipSpec:
    spec = vip(A, FIVE, ring_size=1009, panic_threshold=0.5, **options)
    return build(AddVip(spec), SetBackend(A, DRAINED, {"drained": True})).vips[A]


def down(*addresses: str) -> Runtime:
    return Runtime(healthy={(A, a): False for a in addresses})


WEIGHTS = {a: (0 if a == DRAINED else 100) for a in FIVE}
ALL_UP = dict.fromkeys(FIVE, True)


def test_plan_normal_keeps_down_backends_out_of_ring_and_unavailable():
    plan = plan_vip(five_backends(), down(FIVE[0], FIVE[1]))  # 2 of 4 up: not < 0.5
    assert plan == VipPlan(ring_weights={**WEIGHTS, FIVE[0]: 0, FIVE[1]: 0},
                           available={**ALL_UP, FIVE[0]: False, FIVE[1]: False},
                           mode="normal", healthy=2, serving=4)


def test_plan_panic_puts_every_weighted_backend_in_ring_and_available():
    plan = plan_vip(five_backends(), down(*FIVE[:3]))  # 1 of 4 up
    assert plan == VipPlan(ring_weights=WEIGHTS, available=ALL_UP, mode="panic",
                           healthy=1, serving=4)


def test_plan_fail_open_when_none_healthy_is_all():
    plan = plan_vip(five_backends(when_none_healthy="all"), down(*FIVE))
    assert plan == VipPlan(ring_weights=WEIGHTS, available=ALL_UP, mode="fail-open",
                           healthy=0, serving=4)


def test_plan_fail_closed_empties_the_ring():
    plan = plan_vip(five_backends(), down(*FIVE))
    assert plan == VipPlan(ring_weights=dict.fromkeys(FIVE, 0),
                           available=dict.fromkeys(FIVE, False), mode="fail-closed",
                           healthy=0, serving=4)


@pytest.mark.parametrize(("when_none_healthy", "runtime", "mode", "ring_weights", "available"), [
    ("drop", down(FIVE[0], FIVE[1]), "normal", {**WEIGHTS, FIVE[0]: 0, FIVE[1]: 0},
     {**ALL_UP, FIVE[0]: False, FIVE[1]: False}),
    ("drop", down(*FIVE[:3]), "panic", WEIGHTS, ALL_UP),
    ("all", down(*FIVE), "fail-open", WEIGHTS, ALL_UP),
    ("drop", down(*FIVE), "fail-closed", dict.fromkeys(FIVE, 0), dict.fromkeys(FIVE, False)),
], ids=["normal", "panic", "fail-open", "fail-closed"])
def test_health_modes_through_the_maps(new_balancer, when_none_healthy, runtime, mode,
                                       ring_weights, available):
    bal = new_balancer()
    rec = Reconciler(bal)
    desired = build(AddVip(five_backends(when_none_healthy=when_none_healthy)))
    rec.reconcile(desired)
    report = rec.reconcile(desired, runtime)
    got = read_view(bal)["vips"][str(A)]
    expected_ring = maglev.build_ring(ring_weights, 1009).owners()
    assert report.modes == {str(A): mode}
    assert got["ring"] == expected_ring
    assert (expected_ring == [None] * 1009) == (mode == "fail-closed")
    assert got["backends"] == {a: backend_flags(a, available[a]) for a in FIVE}
    assert_realises(read_view(bal), desired, runtime)


# --- 6. packets follow the reconciled maps ---------------------------------------------


def test_syn_is_encapsulated_to_the_backend_the_ring_predicts(new_balancer):
    bal = new_balancer()
    desired = build(AddVip(vip(A, A_BACKENDS, ring_size=1009)))
    Reconciler(bal).reconcile(desired, settings=SETTINGS)
    ring = maglev.build_ring(plan_vip(desired.vips[A], Runtime()).ring_weights, 1009)
    owners = ring.owners()
    chosen = set()
    for sport in range(40000, 40032):
        frame = (Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=A.address)
                 / TCP(sport=sport, dport=80, flags="S"))
        h = s.flow_hash(CLIENT, A.address, sport, 80, s.IPPROTO_TCP)
        backend = owners[s.ring_slot(h, ring.size)]
        out = bal.test_run(bytes(frame))
        assert out.verdict == XDP_TX
        assert out.data == encapsulated(bytes(frame)[14:], backend, h)
        chosen.add(backend)
    assert chosen == set(A_BACKENDS)
