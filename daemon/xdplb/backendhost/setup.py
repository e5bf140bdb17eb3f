"""`xdplb-backend setup` and `teardown`.

Setup checks everything it can before it changes anything (interfaces exist,
no other XDP program would be replaced, the tunnel addresses are this host's),
then makes the host a DSR backend, idempotently: the decapsulator (maps pinned)
attached to the interfaces and accepting the tunnel addresses; the VIPs on lo;
the sysctls DSR needs; with clamp_mss, the return routes' advmss lowered so a
client's full-sized segment still fits once encapsulated. What it changed is
recorded (record.py); teardown undoes exactly that.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from xdplb import datapath
from xdplb.backendhost import hostnet
from xdplb.backendhost.plan import BackendPlan
from xdplb.backendhost.record import RouteChange, SetupRecord, load_record, save_record
from xdplb.datapath import BPFFS, DECAP_PROGRAM

# Bytes the encapsulation adds, by the outer address family (GUE: its UDP header too).
OVERHEAD = {4: 20, 6: 40}
GUE_EXTRA = 8
IP_TCP_HEADERS = {4: 40, 6: 60}
# The settings an IPv4 VIP on lo needs on each tunnel interface: (name, wanted, how).
IPV4_CONF = (
    # Decapsulated packets carry the client's address, which may route out another
    # interface: strict reverse-path filtering (1) would drop them; loose (2) keeps
    # the check that some route leads back.
    ("rp_filter", "not 1 (strict)", lambda v: v != 1, 2),
    # Never answer ARP for the VIP held on lo...
    ("arp_ignore", ">= 1", lambda v: v >= 1, 1),
    # ...nor use it as the source of our own ARP requests.
    ("arp_announce", ">= 2", lambda v: v >= 2, 2),
)


class SetupError(RuntimeError):
    """Setup or teardown refused; nothing was changed."""


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)

    def did(self, text: str) -> None:
        self.lines.append(f"done: {text}")

    def kept(self, text: str) -> None:
        self.lines.append(f"already: {text}")


def encapsulation_overhead(plan: BackendPlan) -> int:
    """The most an LB adds to a packet sent to one of the tunnel addresses."""
    families = {ipaddress.ip_address(a).version for a in plan.tunnel_addresses}
    extra = GUE_EXTRA if plan.gue_port else 0
    return max(OVERHEAD[f] + extra for f in families)


def clamped_advmss(plan: BackendPlan, family: int, mtu: int) -> int:
    """The largest MSS whose segments fit in `mtu` once encapsulated."""
    return mtu - IP_TCP_HEADERS[family] - encapsulation_overhead(plan)


# --- setup ------------------------------------------------------------------------------


def setup(plan: BackendPlan) -> list[str]:
    """Makes the host what the plan says; returns what was done and what already was."""
    plan.validate()
    record = load_record(plan.record_path) or SetupRecord(plan.name, str(plan.pin_dir))
    with hostnet.netlink() as ipr:
        links = _preflight(ipr, plan)
        out = Outcome()
        _mount_bpffs(out)
        _load_decapsulator(plan, record, links, out)
        _vips_on_lo(ipr, plan, record, out)
        _sysctls(plan, record, out)
        _clamp_mss(ipr, plan, record, links, out)
    record.tunnel_addresses = list(plan.tunnel_addresses)
    record.vips = [str(v) for v in plan.vips]
    save_record(plan.record_path, record)
    return out.lines


def _preflight(ipr: Any, plan: BackendPlan) -> dict[str, hostnet.Link]:
    problems = []
    links = {}
    for name in plan.interfaces:
        try:
            links[name] = link = hostnet.link(ipr, name)
        except hostnet.HostNetError as exc:
            problems.append(str(exc))
            continue
        if link.xdp_prog_id and attached_name(link.xdp_prog_id) != DECAP_PROGRAM:
            problems.append(
                f"{name} has another XDP program attached (id {link.xdp_prog_id}, "
                f"{attached_name(link.xdp_prog_id)!r}); xdplb-backend will not replace it: "
                f"detach it first (ip link set dev {name} xdp off)")
    own = hostnet.addresses(ipr)
    problems += [f"tunnel address {a} is not an address of this host: LB hosts would send "
                 "to it in vain (add it first, or give this host's address)"
                 for a in plan.tunnel_addresses if a not in own]
    if problems:
        raise SetupError("\n".join(problems))
    return links


def attached_name(prog_id: int) -> str:
    try:
        with datapath.program_by_id(prog_id) as fd:
            return datapath.program_name(fd)
    except datapath.DatapathError:
        return "?"


def _mount_bpffs(out: Outcome) -> None:
    if os.path.ismount(BPFFS):
        return
    result = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SetupError(f"mounting bpffs on {BPFFS}: {result.stderr.strip()}")
    out.did(f"bpffs mounted on {BPFFS}")


def _load_decapsulator(plan: BackendPlan, record: SetupRecord,
                       links: dict[str, hostnet.Link], out: Outcome) -> None:
    decap = datapath.Decapsulator(gue_port=plan.gue_port, pin_dir=plan.pin_dir)
    try:
        before = decap.accepted()
        for address in plan.tunnel_addresses:
            decap.accept(address)
        for address in before - set(plan.tunnel_addresses):
            decap.refuse(address)
        accepted = ", ".join(plan.tunnel_addresses)
        (out.kept if before == set(plan.tunnel_addresses) else out.did)(
            f"decapsulating packets to {accepted}"
            + (f" (IPIP, IP6IP6, 4in6, GUE on UDP {plan.gue_port})" if plan.gue_port else
               " (IPIP, IP6IP6, 4in6; GUE off)"))
        generic = plan.xdp_mode == "generic"
        for name, link in links.items():
            if link.xdp_prog_id and link.xdp_mode != plan.xdp_mode:
                datapath.detach_xdp(name, generic=link.xdp_mode == "generic")
            decap.attach(name, generic=generic)
            record.attached[name] = plan.xdp_mode
            if link.xdp_prog_id and link.xdp_mode == plan.xdp_mode:
                out.kept(f"{name}: decapsulator attached ({plan.xdp_mode} XDP; reloaded, "
                         "same maps)")
            else:
                out.did(f"{name}: decapsulator attached ({plan.xdp_mode} XDP)")
        for name in set(record.attached) - set(links):
            _detach_if_ours(name, record.attached.pop(name), out)
    finally:
        decap.close()


def _detach_if_ours(name: str, mode: str, out: Outcome) -> None:
    with hostnet.netlink() as ipr:
        try:
            link = hostnet.link(ipr, name)
        except hostnet.HostNetError:
            out.kept(f"{name}: gone, nothing to detach")
            return
    if link.xdp_prog_id and attached_name(link.xdp_prog_id) == DECAP_PROGRAM:
        datapath.detach_xdp(name, generic=link.xdp_mode == "generic")
        out.did(f"{name}: decapsulator detached")
    else:
        out.kept(f"{name}: no decapsulator attached")


def _vips_on_lo(ipr: Any, plan: BackendPlan, record: SetupRecord, out: Outcome) -> None:
    lo = hostnet.link_index(ipr, "lo")
    for address in plan.vip_addresses():
        prefix = hostnet.prefix_len(address)
        if hostnet.add_address(ipr, lo, address):
            if address not in record.addresses:  # after a reboot it is there already
                record.addresses.append(address)
            out.did(f"{address}/{prefix} added to lo")
        else:
            out.kept(f"{address}/{prefix} on lo")
    for address in [a for a in record.addresses if a not in plan.vip_addresses()]:
        hostnet.remove_address(ipr, lo, address)
        record.addresses.remove(address)
        out.did(f"{address} removed from lo (no longer a VIP here)")


def _sysctls(plan: BackendPlan, record: SetupRecord, out: Outcome) -> None:
    if not any(v.version == 4 for v in plan.vips):
        return  # IPv6 has no rp_filter, and NDP answers only for the link's own addresses
    for ifname in plan.interfaces:
        for name, wanted, good, value in IPV4_CONF:
            if good(hostnet.effective_ipv4_conf(name, ifname)):
                out.kept(f"{ifname}: {name} {wanted}")
                continue
            keys = [f"net.ipv4.conf.{ifname}.{name}"]
            if name == "rp_filter" and hostnet.read_sysctl("net.ipv4.conf.all.rp_filter") == 1:
                keys.append("net.ipv4.conf.all.rp_filter")  # `all` wins if larger
            for key in keys:
                before = hostnet.read_sysctl(key)
                record.sysctls.setdefault(key, [before, value])
                hostnet.write_sysctl(key, value)
                out.did(f"{key} = {value} (was {before})")


def _clamp_mss(ipr: Any, plan: BackendPlan, record: SetupRecord,
               links: dict[str, hostnet.Link], out: Outcome) -> None:
    if not plan.clamp_mss:
        return
    mtu = min(link.mtu for link in links.values())
    for family in sorted({v.version for v in plan.vips}):
        advmss = clamped_advmss(plan, family, mtu)
        routes = hostnet.default_routes(ipr, family)
        if not routes:
            raise SetupError(f"clamp_mss: no IPv{family} default route to lower the MSS of")
        for route in routes:
            current = hostnet.route_advmss(route)
            oif = hostnet.link(ipr, route.get_attr("RTA_OIF")).name
            gateway = route.get_attr("RTA_GATEWAY") or ""
            if current and current <= advmss:
                out.kept(f"IPv{family} default route via {oif}: advmss {current}")
                continue
            hostnet.set_route_advmss(ipr, route, advmss)
            if not any(r.family == family and r.oif == oif and r.gateway == gateway
                       for r in record.routes):
                record.routes.append(RouteChange(family, oif, gateway, current, advmss))
            out.did(f"IPv{family} default route via {oif}: advmss {advmss} (segments of "
                    f"{advmss + IP_TCP_HEADERS[family]} bytes, {mtu} once encapsulated)")


# --- teardown ---------------------------------------------------------------------------


def teardown(plan: BackendPlan) -> list[str]:
    """Undoes what the record says setup did; the rest of the host is left alone."""
    record = load_record(plan.record_path)
    out = Outcome()
    if record is None:
        out.kept(f"nothing to undo: no record at {plan.record_path}")
        return out.lines
    for name, mode in sorted(record.attached.items()):
        _detach_if_ours(name, mode, out)
    with hostnet.netlink() as ipr:
        lo = hostnet.link_index(ipr, "lo")
        for address in record.addresses:
            if hostnet.remove_address(ipr, lo, address):
                out.did(f"{address} removed from lo")
        for key, (before, value) in sorted(record.sysctls.items()):
            if hostnet.read_sysctl(key) == value:
                hostnet.write_sysctl(key, before)
                out.did(f"{key} = {before} (restored)")
            else:
                out.kept(f"{key} changed since setup: left at {hostnet.read_sysctl(key)}")
        for change in record.routes:
            _restore_route(ipr, change, out)
    datapath.remove_decap_pins(plan.pin_dir)
    out.did(f"pinned maps removed ({plan.pin_dir})")
    plan.record_path.unlink()
    return out.lines


def _restore_route(ipr: Any, change: RouteChange, out: Outcome) -> None:
    for route in hostnet.default_routes(ipr, change.family):
        oif = hostnet.link(ipr, route.get_attr("RTA_OIF")).name
        if oif == change.oif and (route.get_attr("RTA_GATEWAY") or "") == change.gateway:
            if hostnet.route_advmss(route) == change.advmss:
                hostnet.set_route_advmss(ipr, route, change.advmss_before)
                out.did(f"IPv{change.family} default route via {oif}: advmss "
                        f"{change.advmss_before or 'unset'} (restored)")
            return
    out.kept(f"IPv{change.family} default route via {change.oif}: gone, nothing to restore")
