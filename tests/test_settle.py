"""Settled ring slots: established packets skip the flow table on a slot whose
flows all name the slot's backend, and nothing else changes. The reconciler
marks every slot it gives a different backend unsettled in the same store; a
sweep of the table (xdplb_settle) finds the slots entries still hold; only
the others settle, and only in VIPs unchanged since the sweep began. Every
test drives real frames through the balancer with BPF_PROG_TEST_RUN and
compares with the slots and backends computed here from structs.py."""

from __future__ import annotations

import ctypes as ct
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, NEXTHOP_MAC, nonzero, require_root
from tests.packets import encapsulated
from xdplb import structs as s
from xdplb.datapath import PIN_ROOT, XDP_TX, Balancer, BpfMap, MapSizes
from xdplb.reconciler import DatapathSettings, Reconciler, ReconcileReport
from xdplb.state import (
    AddBackend,
    AddVip,
    BackendSpec,
    Change,
    DesiredState,
    Limits,
    SetBackend,
    SetVip,
    VipKey,
    apply_changes,
    default_vip,
)

SIZES = MapSizes(max_vips=8, max_backends=64, ring_entries=4 * 1009, conn_entries=1 << 14)
REFRESH = 8
SETTINGS = DatapathSettings(nexthop_mac=NEXTHOP_MAC, settled_refresh_s=REFRESH)
A = VipKey("10.200.0.10", 80, "tcp")
B = VipKey("fd00:200::10", 443, "udp")  # IPv6, client affinity
C = VipKey("10.200.0.20", 0, "tcp")  # port-less
A_BACKENDS = ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
CLIENT = "10.100.1.2"
NOW = 1000


@pytest.fixture
def lb() -> Iterator[Callable[..., tuple[Balancer, Reconciler]]]:
    require_root()
    opened: list[Balancer] = []

    def make() -> tuple[Balancer, Reconciler]:
        opened.append(Balancer(SIZES))
        return opened[-1], Reconciler(opened[-1])

    yield make
    for bal in opened:
        bal.close()


def build(*changes: Change, state: DesiredState | None = None) -> DesiredState:
    return apply_changes(state or DesiredState(), changes, Limits.of_map_sizes(SIZES))


def vip_a(*backends: str, **options) -> AddVip:
    addresses = backends or tuple(A_BACKENDS)
    return AddVip(default_vip(A, backends={a: BackendSpec(a) for a in addresses},
                              ring_size=1009, **options))


def apply(rec: Reconciler, desired: DesiredState, now: int = NOW,
          settings: DatapathSettings = SETTINGS) -> None:
    rec.reconcile(desired, settings=settings)
    rec.tick(now)


def vip_with_flows(lb, ports: range, now: int = NOW, settle: bool = True
                   ) -> tuple[Balancer, Reconciler, DesiredState, dict[int, str]]:
    """VIP A realised at `now`, a SYN of each port recorded, then (settle) swept."""
    bal, rec = lb()
    desired = build(vip_a())
    apply(rec, desired, now=now)
    opened = open_flows(bal, ports)
    if settle:
        rec.settle(quiet_s=0)
    return bal, rec, desired, opened


def add_fourth_backend(rec: Reconciler, desired: DesiredState) -> ReconcileReport:
    """A ring change: a fourth backend takes about a quarter of the slots."""
    return rec.reconcile(build(AddBackend(A, BackendSpec("10.100.13.2")), state=desired),
                         settings=SETTINGS)


def frame(sport: int, flags: str, dst: str = A.address, dport: int = 80,
          src: str = CLIENT) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=dst) /
                 TCP(sport=sport, dport=dport, flags=flags))


def hash_of(key: VipKey, src: str, sport: int, dport: int, source_only: bool = False) -> int:
    if source_only:
        return s.source_hash(src)
    return s.flow_hash(src, key.address, sport, dport, s.IPPROTO_TCP
                       if key.protocol == "tcp" else s.IPPROTO_UDP)


def slot_of(rec: Reconciler, key: VipKey, h: int) -> int:
    realised = rec.vips[key]
    return realised.offset + s.ring_slot(h, realised.size)


def reads_table(h: int, now: int) -> bool:
    """The flow's refresh second: its established packets read the table."""
    return s.refresh_second(h, now, REFRESH)


def backend_of(out: bytes) -> str:
    packet = Ether(out)
    return packet[IP].dst if IP in packet else packet[IPv6].dst


def send(bal: Balancer, data: bytes) -> str:
    result = bal.test_run(data)
    assert result.verdict == XDP_TX
    return backend_of(result.data)


def open_flows(bal: Balancer, sports: range) -> dict[int, str]:
    """SYNs: each flow recorded with the backend its ring slot gives."""
    return {sport: send(bal, frame(sport, "S")) for sport in sports}


def test_a_new_vip_reads_the_table_until_a_sweep_settles_it(lb):
    bal, rec = lb()
    apply(rec, build(vip_a()))
    assert rec.unsettled_slots(A) == 1009
    opened = open_flows(bal, range(2000, 2300))
    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    assert nonzero(bal.counters()) == {"tx_forwarded": 300, "conn_hit": 300}

    report = rec.settle(quiet_s=0)
    assert (report.sweep.entries, report.sweep.blocking, report.sweep.busy) == (300, 0, 0)
    assert (report.slots_settled, report.slots_unsettled) == (1009, 0)
    assert rec.unsettled_slots(A) == 0
    raw = np.array(bal.read_ring(rec.vips[A].offset, 1009), dtype=np.uint32)
    assert not (raw & s.RING_UNSETTLED).any() and (raw != 0).all()

    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    refreshing = sum(reads_table(hash_of(A, CLIENT, p, 80), NOW) for p in opened)
    assert 0 < refreshing < 300
    assert nonzero(bal.counters()) == {"tx_forwarded": 300, "conn_hit": refreshing,
                                       "conn_settled": 300 - refreshing}


def test_a_settled_packet_is_byte_for_byte_what_the_table_would_send(lb):
    bal, rec = lb()
    apply(rec, build(vip_a()))
    sport = next(p for p in range(3000, 4000)
                 if not reads_table(hash_of(A, CLIENT, p, 80), NOW))
    backend = send(bal, frame(sport, "S"))
    inner = bytes(IP(src=CLIENT, dst=A.address) / TCP(sport=sport, dport=80, flags="A"))
    expected = encapsulated(inner, backend, hash_of(A, CLIENT, sport, 80))
    assert bal.test_run(frame(sport, "A")).data == expected  # through the table
    rec.settle(quiet_s=0)
    bal.reset_counters()
    assert bal.test_run(frame(sport, "A")).data == expected  # through the settled slot
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_settled": 1}


def test_a_ring_change_unsettles_exactly_the_changed_slots_and_moves_no_flow(lb):
    bal, rec, desired, opened = vip_with_flows(lb, range(2000, 2600))
    before = np.array(bal.read_ring(rec.vips[A].offset, 1009), dtype=np.uint32)

    report = add_fourth_backend(rec, desired)
    after = np.array(bal.read_ring(rec.vips[A].offset, 1009), dtype=np.uint32)
    changed = (after & s.RING_BACKEND_MASK) != before
    assert report.ring_positions[str(A)] == int(changed.sum()) > 0
    assert ((after & s.RING_UNSETTLED) != 0).tolist() == changed.tolist()
    assert rec.unsettled_slots(A) == int(changed.sum())

    # Every flow keeps its backend: the changed slots read the table.
    on_changed = {p for p in opened
                  if changed[slot_of(rec, A, hash_of(A, CLIENT, p, 80)) - rec.vips[A].offset]}
    assert 0 < len(on_changed) < len(opened)
    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    skipped = sum(1 for p in opened if p not in on_changed
                  and not reads_table(hash_of(A, CLIENT, p, 80), NOW))
    assert nonzero(bal.counters()) == {"tx_forwarded": 600, "conn_hit": 600 - skipped,
                                       "conn_settled": skipped}

    # The sweep: the changed slots that hold a flow stay unsettled, the rest settle.
    held = {slot_of(rec, A, hash_of(A, CLIENT, p, 80)) for p in on_changed}
    settled = rec.settle(quiet_s=0)
    assert settled.sweep.blocking == len(on_changed)
    assert settled.slots_settled == int(changed.sum()) - len(held)
    assert rec.unsettled_slots(A) == len(held)
    raw = np.array(bal.read_ring(rec.vips[A].offset, 1009), dtype=np.uint32)
    unsettled = {rec.vips[A].offset + int(i) for i in np.flatnonzero(raw & s.RING_UNSETTLED)}
    assert unsettled == held
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend


def test_a_flow_first_seen_mid_stream_is_recorded_in_its_refresh_second(lb):
    bal, rec = lb()
    apply(rec, build(vip_a()))
    rec.settle(quiet_s=0)
    sport = 4242
    h = hash_of(A, CLIENT, sport, 80)
    quiet = next(t for t in range(NOW, NOW + 100) if not reads_table(h, t))
    refresh = next(t for t in range(NOW, NOW + 100) if reads_table(h, t))
    key = s.FlowKey(src=s.Addr16.of(CLIENT), sport=s.port_be(sport), dport=s.port_be(80),
                    vip_id=rec.vip_id(A))
    bal.reset_counters()
    rec.tick(quiet)
    backend = send(bal, frame(sport, "A"))
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_settled": 1}
    assert bal.conns.get(key) is None
    rec.tick(refresh)
    assert send(bal, frame(sport, "A")) == backend
    assert nonzero(bal.counters()) == {"tx_forwarded": 2, "conn_settled": 1, "conn_miss": 1,
                                       "new_flows": 1}
    recorded = bal.conns.get(key)
    assert recorded is not None and recorded.last_seen_s == refresh
    assert recorded.backend == rec.member_index(A, backend)


def changed_ports(rec: Reconciler, before: np.ndarray, ports) -> set[int]:
    """The ports whose flow's slot of A got another backend since `before`."""
    offset = rec.vips[A].offset
    after = rec.ring[offset:offset + 1009] & s.RING_BACKEND_MASK
    return {p for p in ports
            if after[slot_of(rec, A, hash_of(A, CLIENT, p, 80)) - offset]
            != before[slot_of(rec, A, hash_of(A, CLIENT, p, 80)) - offset]}


def backends_of_a(rec: Reconciler) -> np.ndarray:
    offset = rec.vips[A].offset
    return rec.ring[offset:offset + 1009] & s.RING_BACKEND_MASK


def test_only_idle_entries_that_hold_a_changed_slot_are_removed(lb):
    bal, rec, desired, _ = vip_with_flows(
        lb, range(2000, 2300), now=100, settle=False)  # stamped 100
    before = backends_of_a(rec)
    rec.tick(110)
    add_fourth_backend(rec, desired)  # the ring changes at 110
    moved = changed_ports(rec, before, range(2000, 2300))
    rec.tick(170)
    for sport in range(2000, 2100):  # these stay active: stamped 170
        send(bal, frame(sport, "A"))
    rec.tick(190)
    report = rec.settle(idle_timeout_s=30, quiet_s=0)
    idle_held = {p for p in moved if p >= 2100}
    assert 0 < len(idle_held) < len(moved)
    assert (report.sweep.entries, report.sweep.expired, report.sweep.blocking) == (
        300, len(idle_held), len(moved) - len(idle_held))
    kept = {s.port_be(k.sport) for k, _ in bal.conns.items()}
    assert kept == set(range(2000, 2300)) - idle_held  # idle on unchanged slots: kept


def test_a_ring_change_restarts_the_idle_clock_of_the_entries_it_strands(lb):
    """Entries on settled slots are refreshed only in refresh seconds, so their
    last_seen may be old when their slot changes: they count idle from the change."""
    _, rec, desired, _ = vip_with_flows(
        lb, range(2000, 2300), now=100, settle=False)  # stamped 100, never again
    before = backends_of_a(rec)
    rec.tick(1000)
    add_fourth_backend(rec, desired)
    moved = changed_ports(rec, before, range(2000, 2300))
    rec.tick(1060)
    assert rec.settle(idle_timeout_s=60, quiet_s=0).sweep.expired == 0
    rec.tick(1061)
    report = rec.settle(idle_timeout_s=60, quiet_s=0)
    assert (report.sweep.expired, report.slots_unsettled) == (len(moved), 0)


def test_a_flow_stamped_after_the_sweeps_second_is_not_idle(lb):
    """The datapath's clock may tick while a sweep runs: an entry seen in the
    next second is fresh, not 65,535 s old."""
    bal, rec, desired, _ = vip_with_flows(
        lb, range(2000, 2100), now=100, settle=False)
    before = backends_of_a(rec)
    rec.tick(101)
    add_fourth_backend(rec, desired)
    moved = changed_ports(rec, before, range(2000, 2100))
    rec.tick(200)
    for sport in moved:
        send(bal, frame(sport, "A"))  # stamped 200
    sweep, _ = bal.sweep_flows(199, 30)
    assert (sweep.expired, sweep.blocking) == (0, len(moved)) and moved
    sweep, _ = bal.sweep_flows(231, 30)
    assert (sweep.expired, sweep.blocking) == (len(moved), 0)


def test_the_sweep_counts_each_backends_active_entries_within_the_window(lb):
    """The census: an entry whose last packet is at most the window old is
    active, per backend as the reconciler names them, and in total; an entry
    stamped in the second after the sweep's clock is active too."""
    bal, rec, _, opened = vip_with_flows(lb, range(2000, 2100), now=1000, settle=False)
    rec.tick(1040)
    recent = range(2000, 2030)
    for sport in recent:
        assert send(bal, frame(sport, "A")) == opened[sport]  # stamped 1040
    rec.tick(1041)
    send(bal, frame(2099, "A"))  # stamped 1041, one second past the sweep's clock
    expected = {a: 0 for a in A_BACKENDS}
    for sport in [*recent, 2099]:
        expected[opened[sport]] += 1
    sweep, _ = bal.sweep_flows(1040, 0, active_window_s=30)
    assert (sweep.entries, sweep.active) == (100, 31)
    by_address = {a: sweep.active_by_backend.get(rec.member_index(A, a), 0)
                  for a in A_BACKENDS}
    assert by_address == expected and sum(expected.values()) == 31
    sweep, _ = bal.sweep_flows(1040, 0, active_window_s=40)  # 1000 is 40 s before: all
    assert sweep.active == 100
    assert sum(sweep.active_by_backend.values()) == 100
    report = rec.settle(quiet_s=0, active_window_s=30)  # the reconciler's clock: 1041
    assert report.active == {(A, a): n for a, n in expected.items()}


def test_a_restarted_control_plane_counts_idle_time_from_its_start(tmp_path):
    """While no lbd runs the datapath's clock stands still and every packet is
    stamped with it; a restart must not count that time as idle."""
    require_root()
    pins = PIN_ROOT / f"test-settle-{tmp_path.name}"
    try:
        first = Balancer(SIZES, pins)
        rec = Reconciler(first)
        desired = build(vip_a())
        apply(rec, desired, now=1000)
        open_flows(first, range(2000, 2200))
        before = backends_of_a(rec)
        add_fourth_backend(rec, desired)
        moved = changed_ports(rec, before, range(2000, 2200))
        first.close()
        second = Balancer(SIZES, pins)
        try:
            restarted = Reconciler(second)
            restarted.tick(1000 + 7200)  # two hours later: lbd's start ticks first
            restarted.reconcile(build(AddBackend(A, BackendSpec("10.100.13.2")),
                                      state=desired), settings=SETTINGS)
            assert s.VipRing.from_buffer_copy(restarted.vip_rings[restarted.vip_id(A)]
                                              ).changed_s == 8200
            restarted.tick(8200 + 3600)
            assert restarted.settle(idle_timeout_s=3600, quiet_s=0).sweep.expired == 0
            restarted.tick(8200 + 3601)
            assert restarted.settle(idle_timeout_s=3600, quiet_s=0).sweep.expired == len(moved)
        finally:
            second.unpin()
            second.close()
    finally:
        shutil.rmtree(pins, ignore_errors=True)


def test_an_expired_entry_no_longer_holds_its_slot(lb):
    bal, rec, desired, opened = vip_with_flows(
        lb, range(2000, 2600), now=100, settle=False)
    before = backends_of_a(rec)
    add_fourth_backend(rec, desired)
    moved = changed_ports(rec, before, opened)
    assert rec.settle(quiet_s=0).slots_unsettled > 0  # the old flows hold their slots
    rec.tick(200)
    report = rec.settle(idle_timeout_s=60, quiet_s=0)
    assert (report.sweep.expired, report.slots_unsettled) == (len(moved), 0)
    assert len(list(bal.conns.keys())) == len(opened) - len(moved)


def test_a_sweep_vouches_only_for_vips_unchanged_since_it_began(lb):
    bal, rec = lb()
    desired = build(vip_a())
    apply(rec, desired)
    assert rec.settle().vips_skipped == 1  # written less than a second ago
    assert rec.unsettled_slots(A) == 1009
    start = rec.settle_begin(quiet_s=0)
    sweep, blocked = bal.sweep_flows(rec.clock(), 0)
    add_fourth_backend(rec, desired)
    report = rec.settle_finish(start, sweep, blocked)
    assert (report.vips_settled, report.vips_skipped, report.slots_settled) == (0, 1, 0)
    assert rec.unsettled_slots(A) == 1009


def test_a_vip_removed_and_added_again_during_a_sweep_is_not_vouched_for(lb):
    bal, rec = lb()
    desired = build(vip_a())
    apply(rec, desired)
    start = rec.settle_begin(quiet_s=0)
    sweep, blocked = bal.sweep_flows(rec.clock(), 0)
    rec.reconcile(DesiredState(), settings=SETTINGS)
    rec.reconcile(desired, settings=SETTINGS)
    report = rec.settle_finish(start, sweep, blocked)
    assert (report.vips_settled, report.vips_skipped, report.slots_settled) == (0, 1, 0)


def test_a_settled_slot_whose_backend_is_unavailable_reads_the_table(lb):
    bal, rec, _, opened = vip_with_flows(lb, range(2000, 2200))
    down = rec.member_index(A, A_BACKENDS[0])
    entry = bal.backends.get(ct.c_uint32(down))
    entry.flags &= ~s.BACKEND_F_AVAILABLE  # as health marks it, before the ring follows
    bal.backends.put(ct.c_uint32(down), entry)
    bal.reset_counters()
    on_down = [p for p, b in opened.items() if b == A_BACKENDS[0]]
    for sport in on_down:
        send(bal, frame(sport, "A"))
    assert nonzero(bal.counters()) == {"tx_forwarded": len(on_down),
                                       "conn_rechosen": len(on_down)}


def test_ring_entries_packets_read_change_in_stores_none_can_misread(lb, monkeypatch):
    """Every store the reconciler makes into a VIP's live ring either changes
    only the top byte (the unsettled bit) or keeps the bit set before and after:
    a packet reading a half-done 4-byte write never sees a settled slot with a
    mixed backend."""
    bal, rec, desired, _ = vip_with_flows(lb, range(2000, 2300))
    stores: list[tuple[list[int], list[int]]] = []
    write_ring = bal.write_ring

    def recording(slots, backends):
        slots, backends = list(slots), list(backends)
        stores.append((slots, backends))
        return write_ring(slots, backends)

    monkeypatch.setattr(bal, "write_ring", recording)
    held = dict(enumerate(bal.read_ring(0, SIZES.ring_entries)))
    steps = [build(AddBackend(A, BackendSpec("10.100.13.2")), state=desired)]
    steps.append(build(*[SetBackend(A, a, {"drained": True})
                         for a in [*A_BACKENDS, "10.100.13.2"]], state=steps[-1]))
    steps.append(build(SetBackend(A, A_BACKENDS[1], {"drained": False}), state=steps[-1]))
    for step in steps:
        rec.reconcile(step, settings=SETTINGS)
        rec.settle(quiet_s=0)
    assert len(stores) >= 6
    for slots, values in stores:
        for slot, new in zip(slots, values, strict=True):
            old = held[slot]
            top_only = old & 0xFFFFFF == new & 0xFFFFFF
            flagged = old & s.RING_UNSETTLED and new & s.RING_UNSETTLED
            assert top_only or flagged, (slot, hex(old), hex(new))
            held[slot] = new
    assert [held[i] for i in range(SIZES.ring_entries)] == bal.read_ring(0, SIZES.ring_entries)


def test_empty_slots_read_the_table_and_never_settle(lb):
    """All backends drained: the ring is empty, and established flows stay on
    their (still available) backends through the table."""
    bal, rec, desired, opened = vip_with_flows(lb, range(2000, 2100))
    drained = desired
    for address in A_BACKENDS:
        drained = build(SetBackend(A, address, {"drained": True}), state=drained)
    report = rec.reconcile(drained, settings=SETTINGS)
    assert report.ring_positions[str(A)] == 1009
    assert bal.read_ring(rec.vips[A].offset, 1009) == [0] * 1009
    assert rec.unsettled_slots(A) == 0
    assert rec.settle(quiet_s=0).slots_settled == 0
    assert bal.read_ring(rec.vips[A].offset, 1009) == [0] * 1009
    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    assert nonzero(bal.counters()) == {"tx_forwarded": 100, "conn_hit": 100}


def test_a_set_held_by_a_writer_through_the_sweep_settles_nothing(lb):
    bal, rec = lb()
    apply(rec, build(vip_a()))
    held = s.FlowSet()
    held.seq = 7  # odd: a writer holds it
    BpfMap("conns", bal.conns.fd, ct.c_uint32, s.FlowSet).put(ct.c_uint32(5), held)
    report = rec.settle(quiet_s=0)
    assert (report.sweep.busy, report.slots_settled, report.slots_unsettled) == (1, 0, 1009)


def test_a_new_hash_mode_unsettles_every_slot_and_keeps_every_flow(lb):
    bal, rec, desired, opened = vip_with_flows(lb, range(2000, 2300))
    rec.reconcile(build(SetVip(A, {"hash": "source"}), state=desired), settings=SETTINGS)
    assert rec.unsettled_slots(A) == 1009
    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    assert bal.counters()["conn_hit"] == 300 and bal.counters()["conn_settled"] == 0
    # Every flow of the one client now hashes onto one slot; its entries name
    # all three backends, so that slot, and only it, stays unsettled.
    report = rec.settle(quiet_s=0)
    held = slot_of(rec, A, s.source_hash(CLIENT))
    raw = np.array(bal.read_ring(rec.vips[A].offset, 1009), dtype=np.uint32)
    unsettled = {rec.vips[A].offset + int(i) for i in np.flatnonzero(raw & s.RING_UNSETTLED)}
    assert unsettled == {held} and report.slots_unsettled == 1
    assert len(set(opened.values())) == 3


def test_the_sweep_finds_slots_as_the_datapath_does_for_ipv6_source_hash_and_portless(lb):
    bal, rec = lb()
    b_spec = default_vip(B, backends={a: BackendSpec(a) for a in ["fd00:100::2", "fd00:101::2"]},
                         ring_size=1009, hash="source")
    c_spec = default_vip(C, backends={a: BackendSpec(a) for a in ["10.100.20.2", "10.100.21.2"]},
                         ring_size=1009)
    desired = build(AddVip(b_spec), AddVip(c_spec))
    apply(rec, desired)
    clients6 = [f"fd00:1::{i:x}" for i in range(1, 120)]
    for i, src in enumerate(clients6):
        data = bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=src, dst=B.address) /
                     UDP(sport=5000 + i, dport=443))
        assert bal.test_run(data).verdict == XDP_TX
    ports = range(1, 200)
    for dport in ports:
        send(bal, frame(40000, "S", dst=C.address, dport=dport))
    rec.settle(quiet_s=0)
    # A third backend in each moves some slots; the recorded flows must hold exactly
    # the moved slots their hashes land on.
    changed = build(AddBackend(B, BackendSpec("fd00:102::2")),
                    AddBackend(C, BackendSpec("10.100.22.2")), state=desired)
    before = np.array(bal.read_ring(0, SIZES.ring_entries), dtype=np.uint32) & s.RING_BACKEND_MASK
    rec.reconcile(changed, settings=SETTINGS)
    after = np.array(bal.read_ring(0, SIZES.ring_entries), dtype=np.uint32) & s.RING_BACKEND_MASK
    moved = set(np.flatnonzero(after != before).tolist())
    on_b = {slot_of(rec, B, s.source_hash(src)) for src in clients6}
    on_c = {slot_of(rec, C, hash_of(C, CLIENT, 40000, p)) for p in ports}
    report = rec.settle(quiet_s=0)
    assert report.sweep.entries == len(clients6) + len(ports)
    raw = np.array(bal.read_ring(0, SIZES.ring_entries), dtype=np.uint32)
    assert set(np.flatnonzero(raw & s.RING_UNSETTLED).tolist()) == (on_b | on_c) & moved
    assert len((on_b | on_c) & moved) > 0


def test_refresh_seconds_are_one_in_the_period_whatever_a_flows_rhythm():
    flows = [s.flow_hash(CLIENT, A.address, p, 80, s.IPPROTO_TCP) for p in range(2000, 3000)]
    for step in (1, 8, 64, 7200):  # every second, and keepalive-like periods
        hits = sum(s.refresh_second(h, NOW + i * step, REFRESH)
                   for h in flows for i in range(64))
        assert abs(hits / (len(flows) * 64) - 1 / REFRESH) < 0.01, step


def test_refresh_zero_reads_the_table_on_every_packet(lb):
    bal, rec = lb()
    apply(rec, build(vip_a()), settings=DatapathSettings(nexthop_mac=NEXTHOP_MAC,
                                                         settled_refresh_s=0))
    opened = open_flows(bal, range(2000, 2100))
    assert rec.settle(quiet_s=0).slots_unsettled == 0
    bal.reset_counters()
    for sport, backend in opened.items():
        assert send(bal, frame(sport, "A")) == backend
    assert nonzero(bal.counters()) == {"tx_forwarded": 100, "conn_hit": 100}


@pytest.mark.parametrize("refresh", [1, 3, 12, 2048, -2])
def test_a_refresh_period_must_be_zero_or_a_power_of_two(refresh):
    with pytest.raises(ValueError, match=r"settled_refresh_s .*power of two 2\.\.1024"):
        DatapathSettings(nexthop_mac=NEXTHOP_MAC, settled_refresh_s=refresh)
