"""Python mirror of bpf/xdplb_structs.h, plus the flow hash of bpf/hash.h.

The two sides are declared once each, next to each other; tests/test_structs.py
checks every layout here against the one bcc derives from the C header, and
checks flow_hash against the BPF program's choices.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import struct
from typing import ClassVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

VIP_F_HASH_SRC_ONLY = 1 << 0
VIP_F_GUE = 1 << 1
VIP_F_QUIC = 1 << 2
VIP_QUIC_SID_LEN_SHIFT = 8
VIP_QUIC_ROTATION_SHIFT = 12
QUIC_SID_MAX_LEN = 8
VIP_ADDR_F_PORTLESS_TCP = 1 << 0
VIP_ADDR_F_PORTLESS_UDP = 1 << 1
BACKEND_F_IPV6 = 1 << 0
BACKEND_F_AVAILABLE = 1 << 1
CONFIG_F_READY = 1 << 0

NO_BACKEND = 0  # backend index 0 means "none": an unfilled ring slot drops
# A ring entry's top bit: the slot is unsettled, flows on it read the table.
RING_UNSETTLED = 1 << 31
RING_BACKEND_MASK = RING_UNSETTLED - 1

# Sizes of the outer headers each encapsulation adds (bpf/encap.h).
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8


class Addr16(ct.Structure):
    """struct addr16: IPv4 in its IPv4-mapped IPv6 form, network byte order."""

    _fields_: ClassVar = [("w", ct.c_uint32 * 4)]

    @classmethod
    def of(cls, address: str | IPAddress) -> Addr16:
        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return cls.from_buffer_copy(ip.packed)

    def address(self) -> IPAddress:
        ip = ipaddress.IPv6Address(bytes(self))
        return ip.ipv4_mapped or ip


class VipKey(ct.Structure):
    _fields_: ClassVar = [
        ("addr", Addr16),
        ("port", ct.c_uint16),  # network order
        ("proto", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class VipMeta(ct.Structure):
    _fields_: ClassVar = [
        ("vip_id", ct.c_uint32),
        ("ring_offset", ct.c_uint32),
        ("ring_size", ct.c_uint32),
        ("flags", ct.c_uint32),
    ]


VIP_SLOT_EMPTY = 0
VIP_SLOT_LIVE = 1
VIP_SLOT_TOMBSTONE = 2
VIP_INDEX_PROBES = 4


class VipIndexSlot(ct.Structure):
    """struct vip_index_slot: one slot of the inline-probed VIP index."""

    _fields_: ClassVar = [
        ("seq", ct.c_uint32),  # even: stable; odd: being rewritten
        ("state", ct.c_uint32),  # VIP_SLOT_*
        ("key", VipKey),
        ("meta", VipMeta),
    ]


class VipAddrMeta(ct.Structure):
    _fields_: ClassVar = [("flags", ct.c_uint32)]


class Backend(ct.Structure):
    _fields_: ClassVar = [("addr", Addr16), ("flags", ct.c_uint32), ("vip_id", ct.c_uint32)]


class FlowKey(ct.Structure):
    _fields_: ClassVar = [
        ("src", Addr16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("vip_id", ct.c_uint32),
    ]


class FlowState(ct.Structure):
    """A flow's entry as the control plane sees it (datapath.FlowTable):
    its backend, and when it last sent a packet, in lb_config.now_s."""

    _fields_: ClassVar = [("backend", ct.c_uint32), ("last_seen_s", ct.c_uint32)]


FLOW_WAYS = 4


class FlowSet(ct.Structure):
    """struct flow_set: a value of the shared `conns` array. Way i is empty
    while backend[i] is 0; last_seen is now_s modulo 2^16; seq is odd while
    a writer rewrites the set."""

    _fields_: ClassVar = [
        ("key", FlowKey * FLOW_WAYS),
        ("backend", ct.c_uint32 * FLOW_WAYS),
        ("last_seen", ct.c_uint16 * FLOW_WAYS),
        ("seq", ct.c_uint64),
    ]


class TrafficCounters(ct.Structure):
    _fields_: ClassVar = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


OUTCOME_COUNTERS = (
    "pass_not_vip",
    "pass_unparsed",
    "pass_unconfigured",
    "tx_forwarded",
    "tx_icmp_echo_reply",
    "tx_icmp_error_forwarded",
    "tx_icmp_too_big",
    "drop_fragment",
    "drop_malformed",
    "drop_no_backend",
    "drop_too_big",
    "drop_encap_failed",
)
EVENT_COUNTERS = (
    "conn_hit",
    "conn_miss",
    "conn_rechosen",
    "new_flows",
    "new_flows_unrecorded",
    "conn_busy",
    "conn_settled",
)


class GlobalCounters(ct.Structure):
    """Outcomes first (each packet counts in exactly one), then events."""

    _fields_: ClassVar = [(name, ct.c_uint64) for name in OUTCOME_COUNTERS + EVENT_COUNTERS]


class LbConfig(ct.Structure):
    _fields_: ClassVar = [
        ("nexthop_mac", ct.c_uint8 * 6),
        ("mtu", ct.c_uint16),
        ("gue_port", ct.c_uint16),  # network order
        ("pad", ct.c_uint16),
        ("flags", ct.c_uint32),
        ("encap_src4", ct.c_uint32),  # network order (as read from memory)
        ("encap_src4_hostmask", ct.c_uint32),
        ("encap_src6", Addr16),
        ("encap_src6_hostmask", ct.c_uint32),
        ("max_new_flows_per_cpu", ct.c_uint32),
        ("now_s", ct.c_uint32),
        ("settled_refresh_s", ct.c_uint32),  # a power of two; 0: no fast path
    ]


class VipRing(ct.Structure):
    """struct vip_ring: a VIP's ring and flow-hash inputs, by vip_id."""

    _fields_: ClassVar = [
        ("addr", Addr16),
        ("ring_offset", ct.c_uint32),
        ("ring_size", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("proto", ct.c_uint8),
        ("ipv6", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("changed_s", ct.c_uint32),  # lb_config.now_s when its ring last changed
    ]


class SettleState(ct.Structure):
    """struct settle_state: the table sweep's cursor and totals."""

    _fields_: ClassVar = [
        ("next_set", ct.c_uint32),
        ("end_set", ct.c_uint32),
        ("idle_timeout_s", ct.c_uint32),
        ("now_s", ct.c_uint32),
        ("entries", ct.c_uint64),
        ("blocking", ct.c_uint64),
        ("expired", ct.c_uint64),
        ("busy", ct.c_uint64),
    ]


class FlowCensus(ct.Structure):
    """struct flow_census: the sweep's active window and its count of active entries."""

    _fields_: ClassVar = [
        ("active_window_s", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("active", ct.c_uint64),
    ]


FLOW_EVENT_COUNTERS = ("conn_evicted",)  # struct flow_events, as the counters name it


class FlowEvents(ct.Structure):
    """struct flow_events: per-CPU flow-table events (evicted: conn_evicted)."""

    _fields_: ClassVar = [("evicted", ct.c_uint64)]


def quic_vip_flags(server_id_len: int, rotation: int) -> int:
    """The VIP flags of a QUIC VIP whose server IDs are server_id_len octets long
    in the configuration of codepoint `rotation`."""
    return (VIP_F_QUIC | server_id_len << VIP_QUIC_SID_LEN_SHIFT
            | rotation << VIP_QUIC_ROTATION_SHIFT)


class QuicServer(ct.Structure):
    """struct quic_server: the backend entry of one server ID, under seq."""

    _fields_: ClassVar = [
        ("seq", ct.c_uint32),  # even: stable; odd: being rewritten
        ("vip_id", ct.c_uint32),
        ("backend", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


# struct quic_counters, as the counters name them: quic_routed, then each reason a
# QUIC VIP's packet took the 5-tuple path.
QUIC_COUNTERS = ("routed", "client_cid", "other_version", "other_config", "short_cid",
                 "not_quic", "unknown_server", "server_down", "busy")


class QuicCounters(ct.Structure):
    _fields_: ClassVar = [(name, ct.c_uint64) for name in QUIC_COUNTERS]


SYN_PORT_BASE = 61000  # half-open checks' source ports: SYN_PORT_BASE + slot % SYN_PORTS
SYN_PORTS = 4096
SYN_PENDING = 0
SYN_OPEN = 1
SYN_REFUSED = 2
SYN_COUNTERS = ("open", "refused", "unmatched", "rst_error")


class SynProbe(ct.Structure):
    """struct syn_probe: one half-open check in flight (bpf/syn_probe.h)."""

    _fields_: ClassVar = [
        ("addr", Addr16),
        ("cookie", ct.c_uint32),  # the SYN's sequence number; the reply acks cookie + 1
        ("port", ct.c_uint16),  # network order
        ("ipv6", ct.c_uint8),
        ("outcome", ct.c_uint8),  # SYN_PENDING, SYN_OPEN, SYN_REFUSED
        ("backend", ct.c_uint32),  # through the VIP: the backend entry; 0: not
        ("pad", ct.c_uint32),
    ]


# struct syn_probe as bytes (addr words, cookie, port, ipv6, outcome, backend, pad): what
# a batch of probes is armed from (tests/test_structs.py ties it to SynProbe).
SYN_PROBE_PACKING = struct.Struct("=4IIHBBII")


class SynCounters(ct.Structure):
    _fields_: ClassVar = [(name, ct.c_uint64) for name in SYN_COUNTERS]


class FloodState(ct.Structure):
    _fields_: ClassVar = [("window_start_ns", ct.c_uint64), ("new_flows", ct.c_uint64)]


HC_COUNTERS = ("encapsulated", "drop_unknown", "drop_unparsed", "drop_too_big",
               "drop_encap_failed")


class HcCounters(ct.Structure):
    """struct hc_counters: the health-check encapsulation at tc egress."""

    _fields_: ClassVar = [(name, ct.c_uint64) for name in HC_COUNTERS]


class DecapCounters(ct.Structure):
    _fields_: ClassVar = [("decapsulated", ct.c_uint64), ("passed", ct.c_uint64)]


def port_be(port: int) -> int:
    """A port as the BPF side stores it: network order read as a native u16."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def be_u32(packed: bytes) -> int:
    """Four network-order bytes as the BPF side reads them (a native u32)."""
    return struct.unpack("=I", packed)[0]


# --- the flow hash: a line-for-line port of bpf/hash.h -----------------------

FLOW_HASH_SEED = 0x7864706C7864706C
HASH_K_SRC_LO = 0x9E3779B97F4A7C15
HASH_K_SRC_HI = 0xBF58476D1CE4E5B9
HASH_K_DST_LO = 0x94D049BB133111EB
HASH_K_DST_HI = 0xD6E8FEB86659FD93
HASH_K_PORTS = 0xA0761D6478BD642F
FILTER_K_LO = 0xE7037ED1A0B428DB
FILTER_K_HI = 0x8EBC6AF09C88C6E3
FILTER_K_MIX = 0x589965CC75374CC3
IPV4_MAPPED_LANE_LO = 0xFFFF0000  # w[2] of a mapped IPv4 address as the C reads it
ADDR_FILTER_WORDS = 1024
_M64 = (1 << 64) - 1


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _lanes(ip: IPAddress) -> tuple[int, int]:
    """An address as the BPF side's two u64 lanes (words 0-1 and 2-3 of its
    mapped form, each word read as a little-endian u32)."""
    return struct.unpack("<2Q", bytes(Addr16.of(ip)))


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int:
    """The hash the balancer computes for a client-to-VIP 5-tuple."""
    (s_lo, s_hi), (d_lo, d_hi) = (_lanes(ipaddress.ip_address(a)) for a in (src, dst))
    h = FLOW_HASH_SEED
    for lane, k in ((s_lo, HASH_K_SRC_LO), (d_lo, HASH_K_DST_LO),
                    (s_hi, HASH_K_SRC_HI), (d_hi, HASH_K_DST_HI),
                    (proto << 32 | port_be(sport) | port_be(dport) << 16, HASH_K_PORTS)):
        h ^= (lane * k) & _M64
    return _fmix64(h) & 0xFFFFFFFF


def source_hash(src: str) -> int:
    """The hash of a client-affinity VIP: the source address alone."""
    lo, hi = _lanes(ipaddress.ip_address(src))
    h = FLOW_HASH_SEED ^ ((lo * HASH_K_SRC_LO) & _M64) ^ ((hi * HASH_K_SRC_HI) & _M64)
    return _fmix64(h) & 0xFFFFFFFF


def addr_filter_slot(address: str) -> tuple[int, int]:
    """(word, bit) of an address in the VIP address filter (bpf/hash.h)."""
    lo, hi = _lanes(ipaddress.ip_address(address))
    h = (lo * FILTER_K_LO + hi * FILTER_K_HI) & _M64
    h = ((h ^ (h >> 32)) * FILTER_K_MIX) & _M64
    return (h >> 54) & (ADDR_FILTER_WORDS - 1), (h >> 48) & 63


def refresh_second(hash_value: int, now_s: int, period: int) -> bool:
    """Whether a settled-slot flow reads the flow table this second (bpf/hash.h)."""
    x = hash_value ^ ((now_s * 0x9E3779B1) & 0xFFFFFFFF)
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    x ^= x >> 16
    return x & (period - 1) == 0


def ring_slot(hash_value: int, ring_size: int) -> int:
    """The ring position a hash selects (bpf/hash.h ring_slot)."""
    return (hash_value * ring_size) >> 32


def _fold_mix(h: int) -> int:
    h ^= h >> 32
    return (h * FILTER_K_MIX) & _M64


def vip_index_hash(key: VipKey) -> int:
    """bpf/hash.h vip_index_hash: the VIP index's 64-bit slot hash of a key."""
    lo, hi = struct.unpack("<2Q", bytes(key.addr))
    h = lo * HASH_K_SRC_LO + hi * HASH_K_SRC_HI + ((key.proto << 16) | key.port) * HASH_K_PORTS
    return _fold_mix(h & _M64)


def vip_index_home(key: VipKey, bits: int) -> int:
    """The slot where a key's probe starts in a 2^bits-slot VIP index."""
    return vip_index_hash(key) >> (64 - bits)


def flow_set_hash(key: FlowKey) -> int:
    """bpf/hash.h flow_set_hash: from the FlowKey's fields alone."""
    lo, hi = struct.unpack("<2Q", bytes(key.src))
    ports = (key.vip_id << 32) | (key.dport << 16) | key.sport
    return _fold_mix((lo * HASH_K_SRC_LO + hi * HASH_K_SRC_HI + ports * HASH_K_PORTS) & _M64)


def flow_set_index(key: FlowKey, bits: int) -> int:
    """The flow table set (of 2^bits per CPU) that holds a flow."""
    return flow_set_hash(key) >> (64 - bits)
