"""`make demo`: xdplb forwarding real traffic in a namespace lab.

Builds client, router, LB and three backends (each running an HTTP server
that answers with its name, behind the backend-side decapsulator), loads the
balancer on the LB with IPv4 and IPv6 VIPs on Maglev rings, sends real HTTP
requests from the client and shows where they went; then fails a backend and
shows that only its share moved. The lab stays up to explore;
`make demo-down` removes it.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import shutil
import socket
import sys
import time
from collections import Counter

from xdplb import lab as labmod
from xdplb import maglev
from xdplb import structs as s
from xdplb.datapath import PIN_ROOT, Balancer, MapSizes

PREFIX = "xdemo"
PIN_DIR = PIN_ROOT / "demo"
SIZES = MapSizes(max_vips=16, max_backends=64, ring_entries=2 * 65537, conn_entries=65536)
RING_SIZE = 65537
REQUESTS = 300


def say(text: str = "") -> None:
    print(text, flush=True)


def configure(bal: Balancer, topo: labmod.LbLab) -> None:
    cfg = s.LbConfig(mtu=1500, flags=s.CONFIG_F_READY, gue_port=s.port_be(6080),
                     now_s=int(time.monotonic()))
    cfg.nexthop_mac[:] = bytes.fromhex(topo.lb_nexthop_mac.replace(":", ""))
    cfg.encap_src4 = s.be_u32(bytes([172, 16, 0, 0]))
    cfg.encap_src4_hostmask = s.be_u32(bytes([0, 0, 255, 255]))
    cfg.encap_src6 = s.Addr16.of("fd00:ec::")
    cfg.encap_src6_hostmask = s.be_u32(bytes([0, 0, 255, 255]))
    bal.write_config(cfg)


class DemoVip:
    """One VIP on a Maglev ring, written straight into the maps."""

    def __init__(self, bal: Balancer, vip_id: int, addr: str, backends: dict[str, int]):
        self.bal, self.vip_id, self.addr, self.backends = bal, vip_id, addr, backends
        self.offset = (vip_id - 1) * RING_SIZE
        self.ring = maglev.build_ring(dict.fromkeys(backends, 1), RING_SIZE)
        bal.write_ring(range(self.offset, self.offset + RING_SIZE),
                       [backends[self.ring.order[i]] for i in self.ring.table])
        for address, index in backends.items():
            flags = s.BACKEND_F_AVAILABLE | (s.BACKEND_F_IPV6 if ":" in address else 0)
            bal.backends.put(ct.c_uint32(index), s.Backend(addr=s.Addr16.of(address),
                                                           flags=flags))
        bal.vip_addrs.put(s.Addr16.of(addr), s.VipAddrMeta(0))
        bal.vips.put(s.VipKey(addr=s.Addr16.of(addr), port=s.port_be(80), proto=s.IPPROTO_TCP),
                     s.VipMeta(vip_id=vip_id, ring_offset=self.offset, ring_size=RING_SIZE))

    def fail(self, address: str) -> tuple[int, int]:
        """Takes a backend out: rebuilds the ring, writes only changed slots,
        marks it unavailable. Returns (slots it owned, other slots moved)."""
        weights = {a: (0 if a == address else 1) for a in self.backends}
        new = maglev.build_ring(weights, RING_SIZE)
        moved = maglev.diff_positions(self.ring, new)
        owners = self.ring.owners()
        its_own = sum(1 for p in moved if owners[p] == address)
        self.bal.write_ring((self.offset + int(p) for p in moved),
                            [self.backends[new.order[new.table[p]]] for p in moved])
        self.bal.backends.put(ct.c_uint32(self.backends[address]),
                              s.Backend(addr=s.Addr16.of(address), flags=0))
        self.ring = new
        return its_own, len(moved) - its_own

    def expected_share(self, address: str) -> float:
        return self.ring.shares().get(address, 0) / RING_SIZE


def http_get(topo: labmod.LbLab, vip: str) -> str:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with topo.client.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        sock.connect((vip, 80))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1].strip()


def traffic(topo: labmod.LbLab, vip: DemoVip, names: dict[str, str]) -> None:
    started = time.monotonic()
    answers = Counter(http_get(topo, vip.addr) for _ in range(REQUESTS))
    took = time.monotonic() - started
    say(f"  {REQUESTS} HTTP requests to {vip.addr}:80 in {took:.1f}s, answered directly "
        "by the backends:")
    say(f"    {'backend':<10}{'address':<18}{'answers':>8}{'observed':>10}{'ring share':>12}")
    for address, name in names.items():
        if address in vip.backends:
            n = answers.get(name, 0)
            say(f"    {name:<10}{address:<18}{n:>8}{n / REQUESTS:>10.1%}"
                f"{vip.expected_share(address):>12.1%}")


def counters_line(bal: Balancer) -> str:
    return ", ".join(f"{k}={v}" for k, v in bal.counters().items() if v)


def up() -> None:
    down(quiet=True)  # running twice works: the previous lab goes first
    lab = labmod.Lab(prefix=PREFIX)
    topo = labmod.build_lb_lab(lab, n_backends=3)
    say(f"lab {lab.runid}: client, router, lb and 3 backends in network namespaces")
    decaps = labmod.start_http_backends(topo)
    bal = Balancer(SIZES, pin_dir=PIN_DIR)
    configure(bal, topo)
    v4 = DemoVip(bal, 1, topo.vip_v4, {a: i + 1 for i, a in enumerate(topo.backend_v4)})
    v6 = DemoVip(bal, 2, topo.vip_v6, {a: i + 11 for i, a in enumerate(topo.backend_v6)})
    bal.write_addr_filter([topo.vip_v4, topo.vip_v6])
    bal.attach(topo.lb_iface.name, netns=topo.lb.name)
    say(f"xdplb attached (native XDP) to {topo.lb.name}:{topo.lb_iface.name}; "
        f"VIPs {topo.vip_v4}:80 and [{topo.vip_v6}]:80, Maglev rings of {RING_SIZE}\n")
    names = {a: f"backend{i % 3}" for i, a in enumerate(topo.backend_v4 + topo.backend_v6)}
    for vip in (v4, v6):
        traffic(topo, vip, names)
    say(f"\n  LB counters: {counters_line(bal)}\n")
    its_own, others = v4.fail(topo.backend_v4[1])
    say(f"backend1 ({topo.backend_v4[1]}) fails: its {its_own} ring slots move to the others, "
        f"and {others} other slots of {RING_SIZE} ({others / RING_SIZE:.2%}) change hands")
    traffic(topo, v4, names)
    say(f"\n  LB counters: {counters_line(bal)}")
    lab.keep()
    for decap in decaps:
        decap.close()
    bal.close()
    say(f"""
The lab stays up. Try:
  ip netns exec {topo.client.name} curl -s http://{topo.vip_v4}/
  ip netns exec {topo.client.name} curl -s -g http://[{topo.vip_v6}]/
  ip netns exec {topo.client.name} ping -c 2 {topo.vip_v4}
  ip netns exec {topo.lb.name} ip -d link show {topo.lb_iface.name}
Remove it with: make demo-down""")


def down(quiet: bool = False) -> None:
    removed = labmod.remove_stale(PREFIX)
    if PIN_DIR.exists():
        shutil.rmtree(PIN_DIR)
        removed.append(str(PIN_DIR))
    with contextlib.suppress(OSError):  # the shared root, when nothing else is pinned
        PIN_ROOT.rmdir()
    if not quiet:
        say("removed: " + (", ".join(removed) if removed else "nothing (no demo lab)"))


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    if command not in ("up", "down"):
        sys.exit("usage: python -m xdplb.demo [up|down]")
    (up if command == "up" else down)()


if __name__ == "__main__":
    main()
