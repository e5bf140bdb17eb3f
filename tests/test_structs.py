"""The C structs and their Python mirrors agree: bcc derives ctypes layouts
from bpf/xdplb_structs.h, and every field name, offset and size must match
structs.py, recursively."""

from __future__ import annotations

import ctypes as ct
import re
from pathlib import Path

import pytest

from xdplb import structs as s
from xdplb.datapath.maps import BALANCER_MAPS

MAPS = {spec.name: (spec.key, spec.value) for spec in BALANCER_MAPS}
REPO = Path(__file__).resolve().parent.parent
C_TYPES = {"__u32": ct.c_uint32, "__u64": ct.c_uint64, "struct addr16": s.Addr16,
           "struct vip_addr_meta": s.VipAddrMeta, "struct vip_key": s.VipKey,
           "struct vip_meta": s.VipMeta, "struct vip_index_slot": s.VipIndexSlot,
           "struct backend": s.Backend, "struct flow_set": s.FlowSet,
           "struct lb_config": s.LbConfig, "struct traffic_counters": s.TrafficCounters,
           "struct global_counters": s.GlobalCounters, "struct flood_state": s.FloodState,
           "struct hc_counters": s.HcCounters, "struct vip_ring": s.VipRing,
           "struct settle_state": s.SettleState, "struct flow_census": s.FlowCensus,
           "struct flow_events": s.FlowEvents, "struct quic_server": s.QuicServer,
           "struct quic_counters": s.QuicCounters, "struct syn_probe": s.SynProbe,
           "struct syn_counters": s.SynCounters}


def test_the_map_list_is_what_balancer_c_declares():
    """datapath/maps.py holds the one Python list of the balancer's maps: the same
    maps, in the same order, of the same kinds and layouts as bpf/balancer.c's
    XDPLB_MAP declarations."""
    source = (REPO / "bpf" / "balancer.c").read_text()
    declared = re.findall(r'^XDPLB_MAP\("(\w+)",\s*([^,]+?),\s*([^,]+?),\s*(\w+),', source,
                          re.M)
    assert [name for *_, name in declared] == [spec.name for spec in BALANCER_MAPS]
    for (kind, key, value, name), spec in zip(declared, BALANCER_MAPS, strict=True):
        assert (C_TYPES[key.strip()], C_TYPES[value.strip()]) == (spec.key, spec.value), name
        assert kind == ("percpu_array" if spec.per_cpu else spec.kind), name


def defines(header: str) -> dict[str, int]:
    """The integer #defines of a bpf/ header, evaluated (suffixes dropped, earlier
    names substituted)."""
    values: dict[str, int] = {}
    for name, expr in re.findall(r"^#define (\w+) ([^/\n]+)", (REPO / "bpf" / header)
                                 .read_text(), re.M):
        expr = re.sub(r"(\b0x[0-9a-fA-F]+|\b\d+)(?:ULL|UL|U)\b", r"\1", expr.strip())
        expr = re.sub(r"\b([A-Z_][A-Z0-9_]*)\b", lambda m: str(values.get(m[1], m[1])), expr)
        if re.fullmatch(r"[0-9a-fx()<>+\-\s]+", expr):
            values[name] = eval(expr)  # digits, shifts and parentheses only
    return values


@pytest.mark.parametrize("header", ["xdplb_structs.h", "hash.h"])
def test_constants_of_the_c_headers_are_structs_constants(header):
    constants = defines(header)
    assert constants, header
    for name, value in constants.items():
        assert getattr(s, name) == value, name


def layout(t: type) -> object:
    """(size, [(name, offset, size, nested layout)]) of a ctypes type."""
    if isinstance(t, type) and issubclass(t, ct.Array):
        return ("array", t._length_, layout(t._type_))
    if not (isinstance(t, type) and issubclass(t, ct.Structure)):
        return ct.sizeof(t)
    return (ct.sizeof(t), [
        (name, getattr(t, name).offset, getattr(t, name).size, layout(ftype))
        for name, ftype, *_ in t._fields_
    ])


def strip_pad(node: object) -> object:
    """bcc names anonymous padding fields `__pad_N`; the C header has none."""
    if isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], list):
        return (node[0], [(n, o, z, strip_pad(sub)) for n, o, z, sub in node[1]
                          if not n.startswith("__pad")])
    return node


@pytest.mark.parametrize("name", sorted(MAPS))
def test_map_layouts_agree(balancer_program, name):
    table = balancer_program.bcc_table(name)
    key_type, value_type = MAPS[name]
    leaf = table.Leaf
    if hasattr(table, "total_cpu"):  # bcc's per-CPU leaf is an array of the C struct
        assert leaf._length_ == table.total_cpu
        leaf = leaf._type_
    assert strip_pad(layout(table.Key)) == layout(key_type)
    assert strip_pad(layout(leaf)) == layout(value_type)


def test_map_shapes_are_what_bcc_creates(balancer_program):
    """Balancer.map_shapes, against which pinned maps are checked, lists every
    map of the program with the sizes bcc gave it."""
    shapes = balancer_program.map_shapes()
    assert set(shapes) == set(MAPS) | {"ring", "backend_stats"}
    for name, (key_size, value_size, entries) in shapes.items():
        table = balancer_program.bcc_table(name)
        leaf = table.Leaf._type_ if hasattr(table, "total_cpu") else table.Leaf
        assert (ct.sizeof(table.Key), ct.sizeof(leaf), table.max_entries) == (
            key_size, value_size, entries), name


def test_counter_names_cover_the_struct():
    names = [f for f, _ in s.GlobalCounters._fields_]
    assert names == list(s.OUTCOME_COUNTERS + s.EVENT_COUNTERS)
    assert len(set(names)) == len(names)


def test_addr16_round_trip_and_mapped_form():
    assert bytes(s.Addr16.of("10.1.2.3")) == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert str(s.Addr16.of("10.1.2.3").address()) == "10.1.2.3"
    assert str(s.Addr16.of("2001:db8::7").address()) == "2001:db8::7"


def test_ring_slot_is_multiply_shift():
    assert s.ring_slot(0, 65537) == 0
    assert s.ring_slot(0xFFFFFFFF, 65537) == 65536
    assert s.ring_slot(1 << 31, 13) == 6


def test_the_packing_of_a_syn_probe_is_its_struct():
    probe = s.SynProbe(addr=s.Addr16.of("fd00::7"), cookie=0xDEADBEEF, port=s.port_be(8080),
                       ipv6=1, outcome=s.SYN_OPEN, backend=9)
    assert s.SYN_PROBE_PACKING.pack(*probe.addr.w, 0xDEADBEEF, s.port_be(8080), 1,
                                    s.SYN_OPEN, 9, 0) == bytes(probe)
