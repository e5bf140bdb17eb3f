"""The C structs and their Python mirrors agree: bcc derives ctypes layouts
from bpf/xdplb_structs.h, and every field name, offset and size must match
structs.py, recursively."""

from __future__ import annotations

import ctypes as ct

import pytest

from xdplb import structs as s

MAPS = {
    "addr_filter": (ct.c_uint32, ct.c_uint64),
    "vip_addrs": (s.Addr16, s.VipAddrMeta),
    "vips": (s.VipKey, s.VipMeta),
    "backends": (ct.c_uint32, s.Backend),
    "vip_index": (ct.c_uint32, s.VipIndexSlot),
    "conns": (ct.c_uint32, s.FlowSet),
    "config": (ct.c_uint32, s.LbConfig),
    "vip_stats": (ct.c_uint32, s.TrafficCounters),
    "global_stats": (ct.c_uint32, s.GlobalCounters),
    "flood": (ct.c_uint32, s.FloodState),
    "hc_stats": (ct.c_uint32, s.HcCounters),
    "vip_rings": (ct.c_uint32, s.VipRing),
    "settle": (ct.c_uint32, s.SettleState),
    "settle_blocked": (ct.c_uint32, ct.c_uint64),
}


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
