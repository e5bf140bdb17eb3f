"""Shared fixtures: one compile of each BPF program per session, maps reset
between tests, and a small programmer that fills maps the way the control
plane does, so datapath tests can predict every choice exactly."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from xdplb import structs as s

LB_MAC = "02:00:00:00:00:02"
CLIENT_MAC = "02:00:00:00:00:01"
NEXTHOP_MAC = "02:00:00:00:00:99"
ENCAP_SRC4 = "172.16.0.0"
ENCAP_SRC6 = "fd00:ec::"
GUE_PORT = 6080
MTU = 1500
# Name prefixes of the labs tests make: "xt..." (lab tests), "xlt" and "s" + hex
# (test_lab.py's own runs). Never a demo's, a benchmark's or a make target's.
TEST_LAB_PREFIXES = ("xt", "xlt", "s")


def pytest_configure(config: pytest.Config) -> None:
    """Before any test (and any xdist worker) starts, remove what a run that was
    killed outright left behind: teardown cannot run in a killed process, so the
    next run reaps its labs (only runs whose creator process is gone)."""
    if hasattr(config, "workerinput") or os.geteuid() != 0:
        return
    from xdplb_lab.lab import remove_stale

    for prefix in TEST_LAB_PREFIXES:
        removed = remove_stale(prefix)
        if removed:
            print(f"removed namespaces a killed test run left: {' '.join(removed)}")


def require_root() -> None:
    """Root tests never skip in CI (CI runs as root): a skip there would hide them."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: BPF and netns tests cannot be skipped")
        pytest.skip("needs root (BPF programs, network namespaces)")


@pytest.fixture(scope="session")
def balancer_program():
    require_root()
    from xdplb.datapath import Balancer, MapSizes

    bal = Balancer(MapSizes(max_vips=16, max_backends=64, ring_entries=16 * 101,
                            conn_entries=4096))
    yield bal
    bal.close()


def _mac_bytes(mac: str) -> list[int]:
    return [int(x, 16) for x in mac.split(":")]


def make_config(*, hostmask4: str = "0.0.255.255", hostmask6: str = "0.0.255.255",
                mtu: int = MTU, max_new_flows: int = 0) -> s.LbConfig:
    cfg = s.LbConfig(mtu=mtu, flags=s.CONFIG_F_READY, gue_port=s.port_be(GUE_PORT),
                     max_new_flows_per_cpu=max_new_flows)
    cfg.nexthop_mac[:] = _mac_bytes(NEXTHOP_MAC)
    cfg.encap_src4 = s.be_u32(ipaddress.IPv4Address(ENCAP_SRC4).packed)
    cfg.encap_src4_hostmask = s.be_u32(ipaddress.IPv4Address(hostmask4).packed)
    cfg.encap_src6 = s.Addr16.of(ENCAP_SRC6)
    cfg.encap_src6_hostmask = s.be_u32(ipaddress.IPv4Address(hostmask6).packed)
    return cfg


@dataclass
class Vip:
    addr: str
    port: int
    proto: int
    vip_id: int
    ring_offset: int
    ring: list[int]  # backend index per slot
    flags: int = 0

    def backend_for(self, src: str, sport: int, dport: int | None = None) -> int:
        """The backend index the ring gives this client flow."""
        if self.flags & s.VIP_F_HASH_SRC_ONLY:
            h = s.source_hash(src)
        else:
            port = self.port if dport is None else dport
            h = s.flow_hash(src, self.addr, sport, port, self.proto)
        return self.ring[s.ring_slot(h, len(self.ring))]


class Programmer:
    """Writes VIPs, backends and rings straight into the maps, for tests."""

    def __init__(self, bal):
        self.bal = bal
        self.backend_addrs: dict[int, str] = {}
        self._next_ring = 0
        self._next_vip = 1

    def backend(self, index: int, addr: str, available: bool = True) -> None:
        flags = (s.BACKEND_F_AVAILABLE if available else 0) | (
            s.BACKEND_F_IPV6 if ipaddress.ip_address(addr).version == 6 else 0)
        self.bal.backends.put(ct.c_uint32(index), s.Backend(addr=s.Addr16.of(addr), flags=flags))
        self.backend_addrs[index] = addr

    def vip(self, addr: str, port: int, proto: int, ring: Sequence[int], flags: int = 0,
            addr_flags: int = 0) -> Vip:
        vip = Vip(addr, port, proto, self._next_vip, self._next_ring, list(ring), flags)
        self._next_vip += 1
        self._next_ring += len(ring)
        self.bal.write_ring(range(vip.ring_offset, vip.ring_offset + len(ring)), ring)
        old = self.bal.vip_addrs.get(s.Addr16.of(addr))
        merged = (old.flags if old else 0) | addr_flags
        self.bal.vip_addrs.put(s.Addr16.of(addr), s.VipAddrMeta(merged))
        self.bal.write_addr_filter(str(k.address()) for k, _ in self.bal.vip_addrs.items())
        key = s.VipKey(addr=s.Addr16.of(addr), port=s.port_be(port), proto=proto)
        self.bal.vips.put(key, s.VipMeta(vip_id=vip.vip_id, ring_offset=vip.ring_offset,
                                         ring_size=len(ring), flags=flags))
        return vip

    def set_ring(self, vip: Vip, ring: Sequence[int]) -> None:
        vip.ring = list(ring)
        self.bal.write_ring(range(vip.ring_offset, vip.ring_offset + len(ring)), ring)


def reset_maps(bal) -> None:
    for m in (bal.vip_addrs, bal.vips):
        for key in list(m.keys()):
            m.delete(key)
    bal.conns.clear()
    for server_id in bal.quic_servers.in_use():
        bal.quic_servers.clear(server_id)
    for index in range(bal.sizes.max_backends):
        bal.backends.put(ct.c_uint32(index), s.Backend())
    bal.write_addr_filter([])
    bal.write_ring(range(bal.sizes.ring_entries), [0] * bal.sizes.ring_entries)
    for index in range(bal.sizes.max_vips):
        bal.vip_rings.put(ct.c_uint32(index), s.VipRing())
    bal.reset_counters()
    bal.syn_probes.clear_counters()
    slots = list(range(bal.sizes.max_backends))
    bal.syn_probes.arm(slots, [s.Addr16()] * len(slots), [0] * len(slots),
                       [False] * len(slots), [0] * len(slots))
    for index in range(bal.sizes.max_vips):
        bal.vip_stats.clear(index)
    for index in range(bal.sizes.max_backends):
        bal.backend_stats.clear(index)
    bal.write_config(make_config())


@pytest.fixture
def bal(balancer_program) -> Iterator:
    reset_maps(balancer_program)
    yield balancer_program
    reset_maps(balancer_program)


@pytest.fixture
def prog(bal) -> Programmer:
    return Programmer(bal)


def nonzero(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if v}
