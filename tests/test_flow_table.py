"""The flow table (`conns`): a per-CPU array of 4-way sets. A flow's set is
computed from its FlowKey alone, the SYN path records, the established path
finds, a full set evicts the entry seen longest ago, and each CPU has its
own table. Balancer.conns (datapath.FlowTable) reads and writes it as a
FlowKey -> FlowState map."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC, make_config, nonzero
from xdplb import structs as s
from xdplb.datapath import XDP_TX, DatapathError, MapSizes

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


def this_cpu() -> int:
    [cpu] = os.sched_getaffinity(0)  # the bal fixture pins the test to one CPU
    return cpu


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


def test_size_is_entries_per_cpu_in_sets_of_four(bal):
    assert bal.conns.sets == bal.sizes.conn_entries // s.FLOW_WAYS
    assert MapSizes(conn_entries=1 << 20).conn_set_bits == 18
    with pytest.raises(DatapathError, match="power of two"):
        MapSizes(conn_entries=3 * 1024)
    with pytest.raises(DatapathError, match=">= 16"):
        MapSizes(conn_entries=8)


def test_syn_records_in_the_set_the_control_plane_computes(bal, prog, vip):
    cpu = this_cpu()
    for sport in range(2000, 2200):
        assert bal.test_run(frame(sport)).verdict == XDP_TX
        per_cpu = bal.conns.read_set(bal.conns.set_index(key(vip, sport)))
        ways = [bytes(e.key) for e in per_cpu[cpu].way]
        assert bytes(key(vip, sport)) in ways, sport
    assert len(list(bal.conns.keys())) == 200
    # Elsewhere in the C code: src/dst order of the FlowKey fields, vip_id in
    # the hash; a v6 key's lanes are both used.
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
    bal.test_run(frame(ports[4]))  # a fifth flow in the full set
    held = {k.sport: st.last_seen_s for k, st in bal.conns.items()}
    assert held == {s.port_be(ports[0]): 104, s.port_be(ports[2]): 102,
                    s.port_be(ports[3]): 103, s.port_be(ports[4]): 105}
    bal.global_stats.clear(0)
    bal.test_run(frame(ports[1], flags="A"))  # the evicted flow misses and takes the ring
    assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_miss": 1, "new_flows": 1}
    assert bal.conns.get(key(vip, ports[1])).last_seen_s == 105
    assert bal.conns.get(key(vip, ports[2])) is None  # now the oldest (102): evicted


def test_a_repeated_syn_reuses_the_flows_entry(bal, prog, vip):
    ports = same_set_ports(bal, vip, 2)
    for _ in range(5):
        bal.test_run(frame(ports[0]))
    bal.test_run(frame(ports[1]))
    per_cpu = bal.conns.read_set(bal.conns.set_index(key(vip, ports[0])))
    recorded = [e.key.sport for e in per_cpu[this_cpu()].way if e.state.backend]
    assert sorted(recorded) == sorted(s.port_be(p) for p in ports)


def test_last_seen_is_written_only_when_the_second_changes(bal, prog, vip):
    at(bal, 500)
    bal.test_run(frame(3000))
    bal.test_run(frame(3000, flags="A"))
    assert bal.conns.get(key(vip, 3000)).last_seen_s == 500
    at(bal, 501)
    bal.test_run(frame(3000, flags="A"))
    assert bal.conns.get(key(vip, 3000)).last_seen_s == 501
    assert bal.counters()["conn_hit"] == 2


def test_each_cpu_has_its_own_table(bal, prog, vip):
    """A flow recorded on one CPU is unknown to the others: there it misses
    and takes the ring, which gives the same backend while the ring is
    unchanged (and the new ring's backend after a change), and is recorded
    on that CPU too. The adapter reports the flow once, as the CPU that saw
    it last has it."""
    first = this_cpu()
    others = set(range(os.cpu_count() or 1)) - {first}
    if not others:
        pytest.skip("needs two CPUs")
    second = min(others)
    at(bal, 10)
    out = bal.test_run(frame(4000))
    backend = Ether(out.data)[IP].dst
    k = key(vip, 4000)
    assert bal.conns.get(k, cpu=first) is not None
    assert bal.conns.get(k, cpu=second) is None
    os.sched_setaffinity(0, {second})
    try:
        at(bal, 11)
        bal.global_stats.clear(0)
        out = bal.test_run(frame(4000, flags="A"))
        assert Ether(out.data)[IP].dst == backend  # the ring, unchanged: same backend
        assert nonzero(bal.counters()) == {"tx_forwarded": 1, "conn_miss": 1, "new_flows": 1}
        prog.set_ring(vip, [next(i for i in (1, 2, 3) if BACKENDS[i - 1] != backend)] * 13)
        out = bal.test_run(frame(4001))  # recorded on the second CPU only
        moved = Ether(out.data)[IP].dst
    finally:
        os.sched_setaffinity(0, {first})
    assert bal.conns.get(k, cpu=first).last_seen_s == 10
    assert bal.conns.get(k, cpu=second).last_seen_s == 11
    assert bal.conns.get(k).last_seen_s == 11  # merged: the CPU that saw it last
    assert [bytes(x) for x in bal.conns.keys()].count(bytes(k)) == 1
    assert sum(len(c) for c in bal.conns.values_batch()) == 2
    # Back on the first CPU, the flow recorded on the second one is new here.
    out = bal.test_run(frame(4001, flags="A"))
    assert Ether(out.data)[IP].dst == moved  # the current ring's choice


def test_adapter_round_trips(bal, prog, vip):
    k = key(vip, 5000)
    assert bal.conns.get(k) is None
    bal.conns.put(k, s.FlowState(backend=2, last_seen_s=7))
    assert (bal.conns.get(k).backend, bal.conns.get(k).last_seen_s) == (2, 7)
    for cpu in range(bal.conns.ncpus):  # written on every CPU
        assert bal.conns.get(k, cpu=cpu).backend == 2
    [(got_key, got)] = list(bal.conns.items())
    assert bytes(got_key) == bytes(k) and (got.backend, got.last_seen_s) == (2, 7)
    [[state]] = list(bal.conns.values_batch())
    assert state.backend == 2
    # The datapath uses an entry the control plane wrote.
    out = bal.test_run(frame(5000, flags="A"))
    assert Ether(out.data)[IP].dst == BACKENDS[1]
    assert bal.counters()["conn_hit"] == 1
    bal.conns.put(k, s.FlowState(backend=3, last_seen_s=8))  # overwrites its own entry
    assert len(list(bal.conns.keys())) == 1 and bal.conns.get(k).backend == 3
    assert bal.conns.delete(k)
    assert not bal.conns.delete(k)
    assert bal.conns.get(k) is None and list(bal.conns.keys()) == []
    # One CPU only.
    bal.conns.put(k, s.FlowState(backend=1, last_seen_s=9), cpu=0)
    assert bal.conns.get(k, cpu=0).backend == 1
    if bal.conns.ncpus > 1:
        assert bal.conns.get(k, cpu=1) is None
    with pytest.raises(DatapathError, match="backend 0"):
        bal.conns.put(k, s.FlowState(backend=0))


def test_adapter_put_evicts_the_oldest_like_the_datapath(bal, prog, vip):
    ports = same_set_ports(bal, vip, s.FLOW_WAYS + 1)
    for now, sport in zip((30, 10, 40, 20, 50), ports):
        bal.conns.put(key(vip, sport), s.FlowState(backend=1, last_seen_s=now))
    assert sorted(k.sport for k in bal.conns.keys()) == sorted(
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
