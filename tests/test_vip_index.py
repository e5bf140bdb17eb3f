"""The VIP index (bpf/balancer.c vip_index_find, datapath.VipTable): the
array probed inline in front of the `vips` hash map. Every VIP of the hash map
is found, a deleted VIP is never hit, a full probe chain falls back to the hash
map, and a slot being rewritten is never used half-written."""

from __future__ import annotations

import ctypes as ct
import os
import random
import threading

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.conftest import CLIENT_MAC, LB_MAC
from xdplb import structs as s
from xdplb.datapath import XDP_PASS, XDP_TX, VipTable

CLIENT = "10.100.1.2"
ADDRS = [f"10.200.0.{i}" for i in range(1, 5)]
PORTS = [80, 443, 8080, 53]


def frame(addr: str, port: int, sport: int = 40000, flags: str = "S") -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=CLIENT, dst=addr) /
                 TCP(sport=sport, dport=port, flags=flags))


def key_of(addr: str, port: int) -> s.VipKey:
    return s.VipKey(addr=s.Addr16.of(addr), port=s.port_be(port), proto=s.IPPROTO_TCP)


def backend_addr(index: int) -> str:
    return f"10.1.{index // 250}.{index % 250 + 1}"


def outer_dst(data: bytes) -> str:
    return Ether(data)[IP].dst


def listen(bal, addrs) -> None:
    """Makes the addresses VIP addresses (filter and vip_addrs), with or
    without VIPs on them: a packet to one then reaches the VIP lookup."""
    for addr in addrs:
        bal.vip_addrs.put(s.Addr16.of(addr), s.VipAddrMeta(0))
    bal.write_addr_filter(addrs)


def index_matches_mirror(bal) -> None:
    """The map holds what the writer thinks it wrote, every seq even."""
    vips: VipTable = bal.vips
    table = bal.vip_index.read_array(vips.slots)
    for i in range(vips.slots):
        assert bytes(table[i]) == bytes(vips.slot(i)), f"slot {i}"
        assert table[i].seq % 2 == 0


def structure_holds(bal) -> None:
    """Every VIP of the hash map is LIVE in its chain before any EMPTY slot, or
    overflowed with a chain of LIVE slots; no key is LIVE twice."""
    vips: VipTable = bal.vips
    live = [bytes(vips.slot(i).key) for i in range(vips.slots)
            if vips.slot(i).state == s.VIP_SLOT_LIVE]
    assert len(live) == len(set(live))
    overflowed = {bytes(k) for k in vips.overflowed()}
    for key, meta in bal.vips.items():
        for i in vips.chain(key):
            slot = vips.slot(i)
            assert slot.state != s.VIP_SLOT_EMPTY, "an EMPTY slot before the key"
            if slot.state == s.VIP_SLOT_LIVE and bytes(slot.key) == bytes(key):
                assert bytes(slot.meta) == bytes(meta)
                break
        else:
            assert bytes(key) in overflowed
            assert all(vips.slot(i).state == s.VIP_SLOT_LIVE for i in vips.chain(key))


def test_index_home_slots_agree_with_the_datapath(bal, prog):
    """A VIP placed in its home slot (as computed in Python) is found by the
    datapath without the hash map: with the hash map entry removed behind
    the index's back, the index alone answers."""
    listen(bal, ADDRS)
    prog.backend(1, backend_addr(1))
    for addr in ADDRS:
        for port in PORTS:
            key = key_of(addr, port)
            meta = s.VipMeta(vip_id=1, ring_offset=0, ring_size=1)
            bal.write_ring([0], [1])
            bal.vips.put(key, meta)
            assert bal.vips.slot(bal.vips.chain(key)[0]).state == s.VIP_SLOT_LIVE
            bal.vips.hash.delete(key)  # the index is now the only holder
            out = bal.test_run(frame(addr, port))
            assert out.verdict == XDP_TX, (addr, port)
            bal.vips.hash.put(key, meta)
            bal.vips.delete(key)
            assert bal.test_run(frame(addr, port)).verdict == XDP_PASS


def test_churn_every_vip_found_and_no_stale_hit(bal, prog):
    """Random adds, updates and deletes over 16 (address, port) pairs of a
    16-VIP, 64-slot index: after each, every present VIP forwards with its
    current meta, every absent one is passed, and the structure holds."""
    rng = random.Random(7)
    listen(bal, ADDRS)
    pool = [(a, p) for a in ADDRS for p in PORTS]
    # Backend i, alone on ring slot i: the outer destination names the meta used.
    for i in range(1, 33):
        prog.backend(i, backend_addr(i))
    bal.write_ring(range(1, 33), range(1, 33))
    present: dict[tuple[str, int], int] = {}
    for step in range(300):
        vip = rng.choice(pool)
        if vip in present and rng.random() < 0.5:
            assert bal.vips.delete(key_of(*vip))
            del present[vip]
        else:
            index = rng.randrange(1, 33)
            bal.vips.put(key_of(*vip), s.VipMeta(vip_id=rng.randrange(1, 16),
                                                 ring_offset=index, ring_size=1))
            present[vip] = index
        if step % 10 == 0 or step > 280:
            structure_holds(bal)
            index_matches_mirror(bal)
            for addr, port in pool:
                out = bal.test_run(frame(addr, port, sport=1000 + step))
                if (addr, port) in present:
                    assert out.verdict == XDP_TX
                    assert outer_dst(out.data) == backend_addr(present[(addr, port)])
                else:
                    assert out.verdict == XDP_PASS, f"stale hit for {addr}:{port}"
    for vip in list(present):
        bal.vips.delete(key_of(*vip))
    structure_holds(bal)
    # Everything deleted: every tombstone was reclaimed.
    assert all(bal.vips.slot(i).state == s.VIP_SLOT_EMPTY for i in range(bal.vips.slots))


def same_home_keys(bal, count: int) -> list[tuple[str, int]]:
    home = None
    found = []
    for port in range(1, 65536):
        key = key_of(ADDRS[0], port)
        h = s.vip_index_home(key, bal.vips.bits)
        home = h if home is None else home
        if h == home:
            found.append((ADDRS[0], port))
            if len(found) == count:
                return found
    raise AssertionError("no keys sharing a home slot")


def test_full_chain_overflows_to_the_hash_map_and_moves_back(bal, prog):
    listen(bal, ADDRS)
    vips = same_home_keys(bal, s.VIP_INDEX_PROBES + 1)
    for i in range(1, len(vips) + 1):
        prog.backend(i, backend_addr(i))
    bal.write_ring(range(1, len(vips) + 1), range(1, len(vips) + 1))
    for i, vip in enumerate(vips, start=1):
        bal.vips.put(key_of(*vip), s.VipMeta(vip_id=i, ring_offset=i, ring_size=1))
    assert [bytes(k) for k in bal.vips.overflowed()] == [bytes(key_of(*vips[-1]))]
    structure_holds(bal)

    def check(present):
        for i, vip in enumerate(vips, start=1):
            out = bal.test_run(frame(*vip))
            if vip in present:
                assert out.verdict == XDP_TX and outer_dst(out.data) == backend_addr(i), vip
            else:
                assert out.verdict == XDP_PASS, vip
        # A port that is no VIP, whose chain is the full one, is still passed.
        assert bal.test_run(frame(ADDRS[0], 0xFFFF if (ADDRS[0], 0xFFFF) not in vips else 1)
                            ).verdict == XDP_PASS

    check(set(vips))  # the fifth VIP: probes exhausted, found in the hash map
    # The overflowed VIP's meta changes: the hash map has the new one.
    prog.backend(9, backend_addr(9))
    bal.write_ring([9], [9])
    bal.vips.put(key_of(*vips[-1]), s.VipMeta(vip_id=9, ring_offset=9, ring_size=1))
    assert outer_dst(bal.test_run(frame(*vips[-1])).data) == backend_addr(9)
    bal.vips.put(key_of(*vips[-1]), s.VipMeta(vip_id=5, ring_offset=5, ring_size=1))
    # Deleting one frees a slot: the overflowed VIP moves into the index.
    bal.vips.delete(key_of(*vips[1]))
    assert bal.vips.overflowed() == []
    structure_holds(bal)
    index_matches_mirror(bal)
    check(set(vips) - {vips[1]})
    for vip in vips:
        bal.vips.delete(key_of(*vip))
    check(set())


def test_slot_left_mid_update_falls_back_and_is_repaired(bal, prog):
    """A writer killed between the protocol's updates leaves an odd seq: the
    datapath ignores the slot's content (here garbage) and asks the hash map;
    the next VipTable on these maps (a restarted daemon) repairs the slot."""
    listen(bal, ADDRS)
    for i in (1, 2):
        prog.backend(i, backend_addr(i))
    bal.write_ring([1, 2], [1, 2])
    key = key_of(ADDRS[0], 80)
    bal.vips.put(key, s.VipMeta(vip_id=1, ring_offset=1, ring_size=1))
    home = bal.vips.chain(key)[0]
    torn = bal.vips.slot(home)
    torn.seq += 1
    torn.meta = s.VipMeta(vip_id=2, ring_offset=2, ring_size=1)  # not what the hash map says
    bal.vip_index.put(ct.c_uint32(home), torn)
    assert outer_dst(bal.test_run(frame(ADDRS[0], 80)).data) == backend_addr(1)
    # A stale (even) entry elsewhere, and a VIP the index lacks, are repaired too.
    other = key_of(ADDRS[1], 443)
    bal.vips.hash.put(other, s.VipMeta(vip_id=2, ring_offset=2, ring_size=1))
    repaired = VipTable(bal.vips.hash, bal.vip_index, bal.vips.bits)
    bal.vips = repaired  # the fixture's cleanup goes through the new writer
    try:
        index_matches_mirror(bal)
        structure_holds(bal)
        assert repaired.slot(home).meta.ring_offset == 1
        assert outer_dst(bal.test_run(frame(ADDRS[1], 443)).data) == backend_addr(2)
    finally:
        for k in (key, other):
            repaired.delete(k)


def test_concurrent_rewrites_never_show_a_torn_meta(bal, prog):
    """A writer thread on another CPU flips one VIP between two metas (A, B)
    as fast as it can, while the balancer runs a SYN of one flow over and
    over (the bench harness restores the frame before every run). Metas are
    chosen so that any mix of A's and B's fields picks backend 3 (or
    mismatches the per-VIP counters): every packet must go to A's backend 1
    with vip_id 1 or to B's backend 2 with vip_id 2."""
    affinity = os.sched_getaffinity(0)
    here = {min(affinity)}
    others = set(range(os.cpu_count() or 1)) - here
    if not others:
        pytest.skip("needs two CPUs for a concurrent writer")
    from xdplb_lab.programs import BenchHarness

    listen(bal, [ADDRS[0]])
    for i in (1, 2, 3):
        prog.backend(i, backend_addr(i))
    # A flow whose slot in a 3-slot ring is not 0.
    sport = next(p for p in range(1000, 2000)
                 if s.ring_slot(s.flow_hash(CLIENT, ADDRS[0], p, 80, 6), 3) != 0)
    j = s.ring_slot(s.flow_hash(CLIENT, ADDRS[0], sport, 80, 6), 3)
    ring = [1, 3, 3] + [0] * 7 + [3, 3, 3]
    ring[10 + j] = 2
    bal.write_ring(range(13), ring)
    meta_a = s.VipMeta(vip_id=1, ring_offset=0, ring_size=1)
    meta_b = s.VipMeta(vip_id=2, ring_offset=10, ring_size=3)
    key = key_of(ADDRS[0], 80)
    bal.vips.put(key, meta_a)
    syn = frame(ADDRS[0], 80, sport=sport) + bytes(16)  # the harness restores 64 bytes

    stop = threading.Event()
    rewrites = [0]

    def writer():
        os.sched_setaffinity(0, others)  # this thread only
        while not stop.is_set():
            bal.vips.put(key, meta_b if rewrites[0] % 2 == 0 else meta_a)
            rewrites[0] += 1

    harness = BenchHarness()
    thread = threading.Thread(target=writer)
    os.sched_setaffinity(0, here)  # this thread runs the packets, the writer the others
    try:
        harness.prepare(syn, bal.prog_fd)
        thread.start()
        runs = 0
        for _ in range(40):
            result = harness.run(syn, 20_000)
            assert result.verdict == XDP_TX
            runs += 20_000
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        harness.close()
        os.sched_setaffinity(0, affinity)
    per_backend = {i: bal.backend_stats.read(i)["packets"] for i in (1, 2, 3)}
    per_vip = {i: bal.vip_stats.read(i)["packets"] for i in (1, 2)}
    assert per_backend[3] == 0, "a packet used a torn meta"
    assert per_backend[1] + per_backend[2] == runs == bal.counters()["tx_forwarded"]
    assert per_vip == {1: per_backend[1], 2: per_backend[2]}
    assert rewrites[0] > 100 and per_backend[1] > 0 and per_backend[2] > 0
    index_matches_mirror(bal)
