"""The flow table (`conns`): one array of 4-way sets shared by every CPU. A
flow's set is computed from its FlowKey alone, the SYN path records, the
established path finds, a full set evicts the flow seen longest ago, every
CPU finds what any CPU recorded, and concurrent writers never make a reader
take a torn entry. Balancer.conns (datapath.FlowTable) reads and writes it
as a FlowKey -> FlowState map."""

from __future__ import annotations

import ctypes as ct
import os
import threading
from collections import defaultdict

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, make_config, nonzero
from xdplb import structs as s
from xdplb.datapath import XDP_TX, BpfMap, DatapathError, MapSizes
from xdplb.flows import FlowEntry, FlowFilter, FlowNames, read_page
from xdplb.state import VipKey
from xdplb_lab.programs import BenchHarness

VIP = "10.200.0.10"
CLIENT = "10.100.1.2"
BACKENDS = ["10.100.10.2", "10.100.11.2", "10.100.12.2"]
RING = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


def frame(sport: int, flags: str = "S", src: str = CLIENT) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=src, dst=VIP) /
                 TCP(sport=sport, dport=80, flags=flags))


@pytest.fixture
def vip(prog):
    for i, addr in enumerate(BACKENDS, start=1):
        prog.backend(i, addr)
    return prog.vip(VIP, 80, s.IPPROTO_TCP, RING)


def key(vip, sport: int, src: str = CLIENT) -> s.FlowKey:
    return s.FlowKey(src=s.Addr16.of(src), sport=s.port_be(sport), dport=s.port_be(80),
                     vip_id=vip.vip_id)


def at(bal, now_s: int) -> None:
    cfg = make_config()
    cfg.now_s = now_s
    bal.write_config(cfg)


def same_set_ports(bal, vip, count: int) -> list[int]:
    by_set: dict[int, list[int]] = defaultdict(list)
    for sport in range(1024, 65536):
        ports = by_set[bal.conns.set_index(key(vip, sport))]
        ports.append(sport)
        if len(ports) == count:
            return ports
    raise AssertionError("no set with enough flows")


def two_cpus() -> tuple[int, int]:
    """Two CPUs this process may run on (the same one twice on a 1-CPU host,
    where the tests still check the table's semantics, not concurrency)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


def on_cpu(cpu: int, fn):
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, affinity)


def test_size_is_entries_in_sets_of_four(bal):
    assert bal.conns.sets == bal.sizes.conn_entries // s.FLOW_WAYS
    assert MapSizes(conn_entries=1 << 20).conn_set_bits == 18
    assert s.FlowSet.__dict__["seq"].offset == 120 and s.ct.sizeof(s.FlowSet) == 128
    with pytest.raises(DatapathError, match="power of two"):
        MapSizes(conn_entries=3 * 1024)
    with pytest.raises(DatapathError, match=">= 16"):
        MapSizes(conn_entries=8)


def test_syn_records_in_the_set_the_control_plane_computes(bal, prog, vip):
    for sport in range(2000, 2200):
        assert bal.test_run(frame(sport)).verdict == XDP_TX
        flow_set = bal.conns.read_set(bal.conns.set_index(key(vip, sport)))
        assert bytes(key(vip, sport)) in [bytes(k) for k in flow_set.key], sport
        assert flow_set.seq % 2 == 0 and flow_set.seq > 0  # written, unlocked
    assert len(list(bal.conns.keys())) == 200
    # Elsewhere in the C code: vip_id in the hash; a v6 key's lanes are both used.
    k6 = s.FlowKey(src=s.Addr16.of("fd00::1"), sport=1, dport=2, vip_id=3)
    assert s.flow_set_index(k6, 10) != s.flow_set_index(
        s.FlowKey(src=s.Addr16.of("fd00::1"), sport=1, dport=2, vip_id=4), 10)


def test_full_set_evicts_the_flow_seen_longest_ago(bal, prog, vip):
    ports = same_set_ports(bal, vip, s.FLOW_WAYS + 1)
    for now, sport in enumerate(ports[:4], start=100):  # last seen 100, 101, 102, 103
        at(bal, now)
        bal.test_run(frame(sport))
    at(bal, 104)
    bal.test_run(frame(ports[0], flags="A"))  # the first flow is seen again: 104
    at(bal, 105)
    bal.reset_counters()
    bal.test_run(frame(ports[4]))  # a fifth flow in the full set
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "new_flows": 1, "conn_evicted": 1}
    held = {k.sport: st.last_seen_s for k, st in bal.conns.items()}
    assert held == {s.port_be(ports[0]): 104, s.port_be(ports[2]): 102,
                    s.port_be(ports[3]): 103, s.port_be(ports[4]): 105}
    bal.reset_counters()
    bal.test_run(frame(ports[1], flags="A"))  # the evicted flow misses and takes the ring
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_miss": 1, "new_flows": 1,
                                       "conn_evicted": 1}
    assert bal.conns.get(key(vip, ports[1])).last_seen_s == 105
    assert bal.conns.get(key(vip, ports[2])) is None  # now the oldest (102): evicted


def test_ages_wrap_modulo_two_to_the_sixteen(bal, prog, vip):
    """last_seen holds now_s mod 2^16: eviction and the adapter both take
    ages modulo 2^16, so the clock passing a multiple of 65536 changes
    nothing."""
    ports = same_set_ports(bal, vip, s.FLOW_WAYS + 1)
    for now, sport in zip((65533, 65534, 65535, 65536), ports[:4], strict=True):
        at(bal, now)
        bal.test_run(frame(sport))
    at(bal, 65537)
    assert bal.conns.get(key(vip, ports[3])).last_seen_s == 65536
    assert bal.conns.get(key(vip, ports[0])).last_seen_s == 65533
    bal.test_run(frame(ports[4]))
    assert bal.conns.get(key(vip, ports[0])) is None  # 65533, stored as 65533: the oldest
    assert bal.conns.get(key(vip, ports[3])).last_seen_s == 65536  # stored as 0: kept


def test_a_repeated_syn_reuses_the_flows_entry(bal, prog, vip):
    ports = same_set_ports(bal, vip, 2)
    for _ in range(5):
        bal.test_run(frame(ports[0]))
    bal.test_run(frame(ports[1]))
    flow_set = bal.conns.read_set(bal.conns.set_index(key(vip, ports[0])))
    recorded = [flow_set.key[w].sport for w in range(s.FLOW_WAYS) if flow_set.backend[w]]
    assert sorted(recorded) == sorted(s.port_be(p) for p in ports)


def test_last_seen_is_written_only_when_the_second_changes(bal, prog, vip):
    at(bal, 500)
    bal.test_run(frame(3000))
    index = bal.conns.set_index(key(vip, 3000))
    seq = bal.conns.read_set(index).seq
    bal.test_run(frame(3000, flags="A"))
    assert bal.conns.get(key(vip, 3000)).last_seen_s == 500
    at(bal, 501)
    bal.test_run(frame(3000, flags="A"))
    assert bal.conns.get(key(vip, 3000)).last_seen_s == 501
    assert bal.counters()["conn_hit"] == 2
    assert bal.conns.read_set(index).seq == seq  # hits never lock the set


def test_every_cpu_finds_what_any_cpu_recorded(bal, prog, vip):
    """A veth runs XDP on the sender's CPU, so a flow's packets hop between
    CPUs. A flow recorded on one CPU is a hit on another; and when a SYN
    re-chooses a reused 4-tuple after a ring change, its next packets find
    the new choice whatever CPU they run on (a per-CPU table would send
    them to the old ring's backend)."""
    first, second = two_cpus()
    out = on_cpu(first, lambda: bal.test_run(frame(4000)))
    backend = Ether(out.data)[IP].dst
    bal.reset_counters()
    out = on_cpu(second, lambda: bal.test_run(frame(4000, flags="A")))
    assert Ether(out.data)[IP].dst == backend
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_hit": 1}
    other = next(i for i in (1, 2, 3) if BACKENDS[i - 1] != backend)
    prog.set_ring(vip, [other] * 13)
    out = on_cpu(second, lambda: bal.test_run(frame(4000)))  # the same 4-tuple, a new SYN
    assert Ether(out.data)[IP].dst == BACKENDS[other - 1]
    out = on_cpu(first, lambda: bal.test_run(frame(4000, flags="A")))
    assert Ether(out.data)[IP].dst == BACKENDS[other - 1]
    assert [bytes(k) for k, _ in bal.conns.items()] == [bytes(key(vip, 4000))]


def test_concurrent_writers_never_give_a_reader_a_torn_or_foreign_entry(bal, prog, vip):
    """One CPU records SYNs of three flows as fast as it can into the set
    where a fourth, established flow F lives, while another CPU runs F's
    packets. F is recorded on backend 3, which the ring never picks: a packet
    of F that read a torn entry, missed, or took the ring would land on
    backend 1 or 2 (and re-record F there). Every one must reach backend 3."""
    first, second = two_cpus()
    ports = same_set_ports(bal, vip, s.FLOW_WAYS)
    established, writers = ports[0], ports[1:]
    prog.set_ring(vip, [1, 2] * 6 + [1])
    bal.conns.put(key(vip, established), s.FlowState(backend=3, last_seen_s=0))
    ack = frame(established, flags="A") + bytes(16)  # the harness restores 64 bytes
    syns = [frame(p) + bytes(16) for p in writers]
    stop = threading.Event()
    written = [0]

    def writer():
        os.sched_setaffinity(0, {second})  # this thread only
        harness = BenchHarness()
        try:
            while not stop.is_set():
                for syn in syns:
                    harness.prepare(syn, bal.prog_fd)
                    harness.run(syn, 5_000)
                    written[0] += 5_000
        finally:
            harness.close()

    thread = threading.Thread(target=writer)
    harness = BenchHarness()
    runs = 0
    try:
        harness.prepare(ack, bal.prog_fd)
        thread.start()
        while written[0] == 0:
            pass
        for _ in range(40):
            assert on_cpu(first, lambda: harness.run(ack, 20_000)).verdict == XDP_TX
            runs += 20_000
    finally:
        stop.set()
        thread.join()
        harness.close()
    per_backend = {i: bal.backend_stats.read(i)["packets"] for i in (1, 2, 3)}
    counters = bal.counters()
    assert per_backend[3] == runs
    assert per_backend[1] + per_backend[2] == written[0] == counters["new_flows"]
    assert counters["conn_hit"] == runs and counters["conn_miss"] == 0
    assert bal.conns.get(key(vip, established)).backend == 3
    assert sorted(k.sport for k, _ in bal.conns.items()) == sorted(s.port_be(p) for p in ports)


def hold_set(bal, index: int, held: bool) -> None:
    """Makes set `index` look taken by a writer on another CPU (seq odd), or
    released, without changing its ways."""
    raw = BpfMap("conns", bal.conns.fd, ct.c_uint32, s.FlowSet)
    flow_set = bal.conns.read_set(index)
    flow_set.seq = (flow_set.seq | 1) if held else (flow_set.seq + 1) & ~1
    raw.put(ct.c_uint32(index), flow_set)


def test_a_set_held_by_another_writer_is_neither_read_nor_written(bal, prog, vip):
    """While another CPU holds a set, a packet of a flow recorded there takes
    the ring (the entry cannot be trusted), a new flow of that set is
    forwarded but not recorded, and each such packet counts once in
    conn_busy. Released, the recorded flow is a hit again."""
    ports = same_set_ports(bal, vip, 2)
    recorded, new = ports
    index = bal.conns.set_index(key(vip, recorded))
    ring_choice = vip.backend_for(CLIENT, recorded)
    other = next(i for i in (1, 2, 3) if i != ring_choice)
    bal.conns.put(key(vip, recorded), s.FlowState(backend=other, last_seen_s=0))
    hold_set(bal, index, True)
    try:
        out = bal.test_run(frame(recorded, flags="A"))
        assert Ether(out.data)[IP].dst == BACKENDS[ring_choice - 1]
        assert nonzero(bal.counters()) == {"tx_forwarded": 1, "new_flows": 1, "conn_busy": 1}
        bal.reset_counters()
        out = bal.test_run(frame(new))
        assert Ether(out.data)[IP].dst == BACKENDS[vip.backend_for(CLIENT, new) - 1]
        assert nonzero(bal.counters()) == {"tx_forwarded": 1, "new_flows": 1, "conn_busy": 1}
        flow_set = bal.conns.read_set(index)
        assert [flow_set.backend[w] for w in range(s.FLOW_WAYS)].count(0) == s.FLOW_WAYS - 1
    finally:
        hold_set(bal, index, False)
    bal.reset_counters()
    out = bal.test_run(frame(recorded, flags="A"))
    assert Ether(out.data)[IP].dst == BACKENDS[other - 1]
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_hit": 1}


def test_adapter_round_trips(bal, prog, vip):
    at(bal, 9)
    k = key(vip, 5000)
    assert bal.conns.get(k) is None
    bal.conns.put(k, s.FlowState(backend=2, last_seen_s=7))
    assert (bal.conns.get(k).backend, bal.conns.get(k).last_seen_s) == (2, 7)
    [(got_key, got)] = list(bal.conns.items())
    assert bytes(got_key) == bytes(k) and (got.backend, got.last_seen_s) == (2, 7)
    [[state]] = list(bal.conns.values_batch())
    assert state.backend == 2
    seq = bal.conns.read_set(bal.conns.set_index(k)).seq
    assert seq % 2 == 0 and seq >= 2  # a write leaves the set unlocked, seq moved on
    # The datapath uses an entry the control plane wrote.
    out = bal.test_run(frame(5000, flags="A"))
    assert Ether(out.data)[IP].dst == BACKENDS[1]
    assert bal.counters()["conn_hit"] == 1
    bal.conns.put(k, s.FlowState(backend=3, last_seen_s=8))  # overwrites its own entry
    assert len(list(bal.conns.keys())) == 1 and bal.conns.get(k).backend == 3
    assert bal.conns.delete(k)
    assert not bal.conns.delete(k)
    assert bal.conns.get(k) is None and list(bal.conns.keys()) == []
    with pytest.raises(DatapathError, match="backend 0"):
        bal.conns.put(k, s.FlowState(backend=0))


def test_adapter_put_evicts_the_oldest_like_the_datapath(bal, prog, vip):
    at(bal, 60)
    ports = same_set_ports(bal, vip, s.FLOW_WAYS + 1)
    for now, sport in zip((30, 10, 40, 20, 50), ports, strict=True):
        bal.conns.put(key(vip, sport), s.FlowState(backend=1, last_seen_s=now))
    assert sorted(k.sport for k, _ in bal.conns.items()) == sorted(
        s.port_be(p) for p in ports if p != ports[1])


def test_values_batch_counts_entries_per_backend(bal, prog, vip):
    """controller.count_flows scans values_batch: one state per flow."""
    sports = range(6000, 6300)
    for sport in sports:
        bal.test_run(frame(sport))
    counted = defaultdict(int)
    for chunk in bal.conns.values_batch(chunk=64):
        for st in chunk:
            counted[st.backend] += 1
    expected = defaultdict(int)
    for sport in sports:
        expected[vip.backend_for(CLIENT, sport)] += 1
    # A 4-way set may have evicted a few of 300 flows in 1024 sets: none here.
    assert dict(counted) == dict(expected)


def test_flow_pages_cover_the_table_once_and_filter_exactly(bal, prog, vip):
    """flows.read_page (`lbctl flows`): pages from set to set show every entry
    once, with its client, port, VIP, backend and idle seconds, and a filter
    keeps exactly the entries of its VIP and backends."""
    at(bal, 1000)
    expected = {}
    for i in range(300):
        client, sport = f"10.7.{i // 200}.{i % 200 + 1}", 10000 + i
        backend = 1 + i % 3
        bal.conns.put(key(vip, sport, src=client), s.FlowState(backend=backend,
                                                               last_seen_s=1000 - i))
        expected[(client, sport)] = (BACKENDS[backend - 1], i)
    v6 = s.FlowKey(src=s.Addr16.of("fd00::7"), sport=s.port_be(443), dport=s.port_be(8443),
                   vip_id=99)  # a VIP removed since: no name
    bal.conns.put(v6, s.FlowState(backend=2, last_seen_s=1000))
    held = {(str(k.src.address()), s.port_be(k.sport)) for k, _ in bal.conns.items()}
    names = FlowNames(vips={vip.vip_id: VipKey(VIP, 80, "tcp")},
                      backends=dict(enumerate(BACKENDS, start=1)), now_s=1000)

    seen, start, pages = [], 0, 0
    while start < bal.conns.sets:
        page = read_page(bal.conns, names, FlowFilter(), limit=7, from_set=start)
        assert page.from_set == start and page.next_set > start
        assert 7 <= len(page.flows) <= 7 + s.FLOW_WAYS - 1 or page.next_set == bal.conns.sets
        seen += page.flows
        start, pages = page.next_set, pages + 1
    assert pages >= len(held) // (7 + 3)
    by_client = {(f.client, f.client_port): f for f in seen}
    assert len(seen) == len(by_client) == len(held) == 301  # each once
    for (client, sport), (backend, idle) in expected.items():
        assert by_client[(client, sport)] == FlowEntry(
            client=client, client_port=sport, vip=VipKey(VIP, 80, "tcp"), port=80,
            backend=backend, idle_s=idle)
    assert by_client[("fd00::7", 443)] == FlowEntry("fd00::7", 443, None, 8443, BACKENDS[1], 0)

    whole = read_page(bal.conns, names, FlowFilter(vip_ids=frozenset({vip.vip_id}),
                                                   backends=frozenset({2})), 10_000, 0)
    assert (whole.next_set, whole.limit_reached) == (bal.conns.sets, False)
    assert whole.entries_read == 301
    assert sorted((f.client, f.client_port) for f in whole.flows) == sorted(
        c for c, (b, _) in expected.items() if b == BACKENDS[1])
