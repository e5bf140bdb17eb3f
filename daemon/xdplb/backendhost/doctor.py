"""`xdplb-backend doctor`: every condition a DSR backend needs, each with the fix.

Why a backend does not answer through the VIP is nearly always one of these:
no decapsulator on the interface the tunnel packets arrive on (or it does not
accept the address they are sent to), the VIP missing from lo, reverse-path
filtering dropping the decapsulated packets, the host answering ARP for the
VIP, nothing listening on the VIP's port, replies routed into a tunnel, or a
client's full-sized segment no longer fitting once encapsulated. A check
passes (ok), fails (fail: the doctor exits 1) or warns (warn: worth a look,
not a failure by itself, e.g. no tunnel traffic during the sample).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xdplb import datapath
from xdplb.backendhost import hostnet
from xdplb.backendhost.plan import BackendPlan, VipTarget
from xdplb.backendhost.setup import (
    IP_TCP_HEADERS,
    IPV4_CONF,
    attached_name,
    clamped_advmss,
    encapsulation_overhead,
)
from xdplb.datapath import DECAP_PROGRAM

# Where clients are when none is named: documentation addresses, only looked up in
# the routing table (no packet is sent to them).
SAMPLE_CLIENTS = {4: "198.51.100.1", 6: "2001:db8::1"}
MARKS = {"ok": "✓", "fail": "✗", "warn": "!"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | fail | warn
    detail: str
    fix: str = ""

    def render(self) -> str:
        line = f"{MARKS[self.status]} {self.name}: {self.detail}"
        return line + (f"\n    fix: {self.fix}" if self.fix and self.status != "ok" else "")


def setup_command(plan: BackendPlan) -> str:
    parts = ["xdplb-backend setup"]
    parts += [f"--interface {i}" for i in plan.interfaces]
    parts += [f"--tunnel-address {a}" for a in plan.tunnel_addresses]
    parts += [f"--vip {v}" for v in plan.vips]
    return " ".join(parts)


def diagnose(plan: BackendPlan, clients: dict[int, str] | None = None,
             sample_s: float = 1.0) -> list[Check]:
    """Every check, in the order a packet meets them."""
    clients = {**SAMPLE_CLIENTS, **(clients or {})}
    checks: list[Check] = []
    with hostnet.netlink() as ipr:
        checks += _decapsulator(ipr, plan)
        checks += _vips_on_lo(ipr, plan)
        checks += _ipv4_conf(plan)
        checks += _listeners(plan)
        checks += _return_path(ipr, plan, clients)
    checks += _traffic(plan, sample_s)
    return checks


def _decapsulator(ipr: Any, plan: BackendPlan) -> Iterator[Check]:
    setup = setup_command(plan)
    for name in plan.interfaces:
        try:
            link = hostnet.link(ipr, name)
        except hostnet.HostNetError as exc:
            yield Check(f"{name}", "fail", str(exc), "name an interface of this host")
            continue
        attached = attached_name(link.xdp_prog_id) if link.xdp_prog_id else ""
        if attached == DECAP_PROGRAM:
            yield Check(f"{name}: decapsulator", "ok",
                        f"attached ({link.xdp_mode} XDP, prog {link.xdp_prog_id})")
        elif attached:
            yield Check(f"{name}: decapsulator", "fail",
                        f"another XDP program is attached ({attached!r}, prog "
                        f"{link.xdp_prog_id}): tunnel packets are not decapsulated",
                        f"ip link set dev {name} xdp off; then {setup}")
        else:
            yield Check(f"{name}: decapsulator", "fail",
                        "no XDP program attached: tunnel packets reach the stack still "
                        "encapsulated and are dropped", setup)
    if not datapath.PinnedDecap.exists(plan.pin_dir):
        yield Check("decapsulator maps", "fail", f"none pinned in {plan.pin_dir}", setup)
        return
    own = hostnet.addresses(ipr)
    maps = datapath.PinnedDecap(plan.pin_dir)
    try:
        accepted, gue = maps.accepted(), maps.gue_port()
    finally:
        maps.close()
    for address in plan.tunnel_addresses:
        if address not in own:
            yield Check(f"tunnel address {address}", "fail",
                        "not an address of this host: packets the LB hosts send to it "
                        "never arrive", f"ip addr add {address}/... dev IFACE, or "
                        "decapsulate this host's own address")
        elif address not in accepted:
            yield Check(f"tunnel address {address}", "fail",
                        "the decapsulator does not accept it: its packets pass up "
                        "encapsulated", setup)
        else:
            yield Check(f"tunnel address {address}", "ok",
                        "this host's, and decapsulated" + (f" (GUE on UDP {gue} too)"
                                                           if gue else ""))


def _vips_on_lo(ipr: Any, plan: BackendPlan) -> Iterator[Check]:
    on_lo = hostnet.addresses(ipr, hostnet.link_index(ipr, "lo"))
    for address in plan.vip_addresses():
        prefix = hostnet.prefix_len(address)
        if address in on_lo:
            yield Check(f"VIP {address}", "ok", f"on lo (/{prefix})")
        else:
            yield Check(f"VIP {address}", "fail",
                        "not on lo: the stack drops decapsulated packets to it as not "
                        "its own", f"ip addr add {address}/{prefix} dev lo (or setup)")


def _ipv4_conf(plan: BackendPlan) -> Iterator[Check]:
    if not any(v.version == 4 for v in plan.vips):
        return
    for ifname in plan.interfaces:
        for name, wanted, good, value in IPV4_CONF:
            try:
                found = hostnet.effective_ipv4_conf(name, ifname)
            except OSError:
                continue  # no such interface: told above
            why = {"rp_filter": "strict reverse-path filtering drops decapsulated packets "
                                "whose client is routed out another interface",
                   "arp_ignore": "the host answers ARP for the VIPs on lo, stealing them "
                                 "from the LB",
                   "arp_announce": "ARP requests may carry a VIP as their source"}[name]
            if good(found):
                yield Check(f"{ifname}: {name}", "ok", f"{found} ({wanted})")
            else:
                yield Check(f"{ifname}: {name}", "fail", f"{found}: {why}",
                            f"sysctl -w net.ipv4.conf.{ifname}.{name}={value}"
                            + (" net.ipv4.conf.all.rp_filter=2" if name == "rp_filter"
                               else "") + " (or setup)")


def _listeners(plan: BackendPlan) -> Iterator[Check]:
    sockets = {p: hostnet.bound_sockets(p) for p in ("tcp", "udp")}
    for vip in plan.vips:
        if not vip.protocol or not vip.port:
            continue  # a bare address, or every port: nothing in particular to look for
        found = hostnet.serves(sockets[vip.protocol], vip.address, vip.port)
        what = "listening" if vip.protocol == "tcp" else "bound"
        if found:
            yield Check(f"VIP {vip}", "ok", f"a socket is {what} on {found.address} "
                                            f"port {found.port}")
        else:
            yield Check(f"VIP {vip}", "fail", f"no {vip.protocol.upper()} socket {what} on "
                                              f"{vip.address} or a wildcard, port {vip.port}",
                        "start the service, bound to the VIP or to 0.0.0.0 / [::]")


def _return_path(ipr: Any, plan: BackendPlan, clients: dict[int, str]) -> Iterator[Check]:
    mtu = min((hostnet.link(ipr, n).mtu for n in plan.interfaces
               if ipr.link_lookup(ifname=n)), default=0)
    own = hostnet.addresses(ipr)
    for address in plan.vip_addresses():
        family = ipaddress.ip_address(address).version
        client = clients[family]
        # From the VIP when it is local (policy routing may pick on the source); else
        # the kernel refuses the lookup, and the missing VIP is told above.
        route = hostnet.route_get(ipr, client, src=address if address in own else None)
        name = f"replies from {address}"
        if route is None:
            yield Check(name, "fail", f"no route to clients (looked up {client})",
                        "add a default route (or routes to the clients)")
            continue
        if route.oif == "lo" or route.kind in hostnet.TUNNEL_KINDS:
            yield Check(name, "fail", f"routed via {route.oif} ({route.kind or 'loopback'}) "
                                      f"to {client}: replies must go straight to clients",
                        "route the clients via the host's uplink, not through a tunnel")
            continue
        yield Check(name, "ok", f"to {client} via {route.oif}"
                                + (f" (gateway {route.gateway})" if route.gateway else ""))
        if mtu:
            yield _mtu_headroom(plan, family, route, mtu)


def _mtu_headroom(plan: BackendPlan, family: int, route: hostnet.RouteChoice,
                  mtu: int) -> Check:
    mss = route.advmss or route.mtu - IP_TCP_HEADERS[family]
    overhead = encapsulation_overhead(plan)
    size = mss + IP_TCP_HEADERS[family] + overhead
    name = f"IPv{family} MTU headroom"
    detail = (f"MSS {mss} on the return route: a client's full segment is {size} bytes "
              f"encapsulated (+{overhead}), the tunnel interfaces take {mtu}")
    if size <= mtu:
        return Check(name, "ok", detail)
    return Check(name, "fail", detail + ": too big, it is dropped or fragmented on the way",
                 f"xdplb-backend setup ... --clamp-mss (advmss "
                 f"{clamped_advmss(plan, family, mtu)}), or an MTU of at least {size} "
                 "from the LB hosts to here")


def _traffic(plan: BackendPlan, sample_s: float) -> Iterator[Check]:
    if not datapath.PinnedDecap.exists(plan.pin_dir):
        return
    maps = datapath.PinnedDecap(plan.pin_dir)
    try:
        before = maps.counters()
        time.sleep(sample_s)
        after = maps.counters()
    finally:
        maps.close()
    moved = after["decapsulated"] - before["decapsulated"]
    total = f"{after['decapsulated']} decapsulated, {after['passed']} passed since setup"
    if moved:
        yield Check("tunnel traffic", "ok", f"{moved} packets decapsulated in "
                                            f"{sample_s:g} s ({total})")
    else:
        yield Check("tunnel traffic", "warn",
                    f"none decapsulated in {sample_s:g} s ({total})",
                    "expected while no LB sends here; otherwise check that the LB hosts "
                    "route the tunnel addresses to this host")


def plan_from_record(record: Any, plan: BackendPlan) -> BackendPlan:
    """What to check when only a name is given: what setup was last asked for."""
    from dataclasses import replace

    return replace(plan, interfaces=tuple(record.attached), tunnel_addresses=tuple(
        record.tunnel_addresses), vips=tuple(VipTarget.parse(v) for v in record.vips))
