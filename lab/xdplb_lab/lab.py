"""Network-namespace lab for exercising the load balancer end to end.

Integration tests, benchmarks and the demo need a small, disposable network: a client, a
router, the load balancer and a few direct-server-return backends, each in its own network
namespace and wired together with veth pairs. Everything here stays inside namespaces the
lab created itself: veth pairs are created with one end in each namespace directly, so the
root namespace's interfaces, routes and sysctls are never touched.

Each `Lab` has a unique run id and writes a marker file (creator pid + process start time)
under /run/xdplb-lab/ *before* creating any namespace, so `remove_stale` can tell leftovers
of a crashed run from the namespaces of a run that is still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns as ip_netns

from xdplb_lab.netns import (
    IFNAMSIZ_MAX,
    MARKER_DIR,
    NETNS_DIR,
    NUD_PERMANENT,
    CommandError,
    Host,
    Iface,
    Lab,
    LabError,
    addr_add,
    enable_gro,
    ifindex_of,
    neigh_add,
    pin_dir_of,
    remove_stale,
    route_add,
    set_offloads,
    wait_port,
)

VIP_V4 = "10.200.0.10"
VIP_V6 = "fd00:200::10"
CLIENT_V4, ROUTER_CLIENT_V4 = "10.100.1.2", "10.100.1.1"
CLIENT_V6, ROUTER_CLIENT_V6 = "fd00:100:1::2", "fd00:100:1::1"
LB_V4, ROUTER_LB_V4 = "10.100.2.2", "10.100.2.1"
LB_V6, ROUTER_LB_V6 = "fd00:100:2::2", "fd00:100:2::1"
MAX_BACKENDS = 16


def backend_v4(i: int) -> str:
    """IPv4 address of backend i on its link to the router."""
    return f"10.100.{10 + i}.2"


def backend_v6(i: int) -> str:
    """IPv6 address of backend i on its link to the router."""
    return f"fd00:100:{10 + i}::2"


def router_backend_v4(i: int) -> str:
    """The router's IPv4 address on the link to backend i (the backend's gateway)."""
    return f"10.100.{10 + i}.1"


def router_backend_v6(i: int) -> str:
    """The router's IPv6 address on the link to backend i (the backend's gateway)."""
    return f"fd00:100:{10 + i}::1"


BACKEND_V4 = [backend_v4(i) for i in range(MAX_BACKENDS)]
BACKEND_V6 = [backend_v6(i) for i in range(MAX_BACKENDS)]


# --------------------------------------------------------------------------- the LB topology


@dataclass
class LbLab:
    """Everything a test needs to know about the topology built by `build_lb_lab`.

    Interface naming: client eth0 <-> router eth0, router eth1 <-> lb eth1,
    router ethB{i} <-> backend{i} eth0.
    """

    lab: Lab
    client: Host
    router: Host
    lb: Host
    backends: list[Host]
    client_if: Iface
    router_client_if: Iface
    lb_iface: Iface  # where the XDP program goes; it XDP_TXes back out of here
    router_lb_if: Iface
    backend_ifs: list[Iface]
    router_backend_ifs: list[Iface]
    vip_v4: str = VIP_V4
    vip_v6: str = VIP_V6

    @property
    def lb_nexthop_mac(self) -> str:
        """Destination MAC for frames the lb sends back toward the router."""
        return self.router_lb_if.mac

    @property
    def backend_v4(self) -> list[str]:
        return [backend_v4(i) for i in range(len(self.backends))]

    @property
    def backend_v6(self) -> list[str]:
        return [backend_v6(i) for i in range(len(self.backends))]

    @property
    def backend_macs(self) -> list[str]:
        return [i.mac for i in self.backend_ifs]

    @property
    def router_backend_macs(self) -> list[str]:
        """Per backend: the router's MAC on that link (the lb's L2 next hop is the router)."""
        return [i.mac for i in self.router_backend_ifs]


@dataclass
class _LinkPlan:
    """Addresses of a point-to-point link: [host side, router side] for v4 and v6."""

    v4: tuple[str, str]
    v6: tuple[str, str]

    def cidrs(self, router_side: bool) -> list[str]:
        i = 1 if router_side else 0
        return [f"{self.v4[i]}/24", f"{self.v6[i]}/64"]


_CLIENT_PLAN = _LinkPlan((CLIENT_V4, ROUTER_CLIENT_V4), (CLIENT_V6, ROUTER_CLIENT_V6))
_LB_PLAN = _LinkPlan((LB_V4, ROUTER_LB_V4), (LB_V6, ROUTER_LB_V6))


def _backend_plan(i: int) -> _LinkPlan:
    return _LinkPlan((backend_v4(i), router_backend_v4(i)), (backend_v6(i), router_backend_v6(i)))


def _address_link(host_end: Iface, router_end: Iface, plan: _LinkPlan) -> None:
    """Give both ends their addresses and pin each other's MAC as permanent neighbours."""
    for end, peer, router_side in ((host_end, router_end, False), (router_end, host_end, True)):
        with end.host.ipr() as ipr:
            for cidr in plan.cidrs(router_side):
                addr_add(ipr, end.ifindex, cidr)
                end.addrs.append(cidr)
            for ip in plan.cidrs(not router_side):
                neigh_add(ipr, end.ifindex, ip.split("/")[0], peer.mac)


def _default_via_router(end: Iface, plan: _LinkPlan) -> None:
    with end.host.ipr() as ipr:
        route_add(ipr, "0.0.0.0/0", plan.v4[1], end.ifindex)
        route_add(ipr, "::/0", plan.v6[1], end.ifindex)


def router_sysctls(ifnames: Sequence[str]) -> dict[str, int]:
    """The router's forwarding settings (shared with the VM lab, xdplb_lab.vm).

    rp_filter off: DSR replies arrive from backends with the VIP as source while the VIP
    route points at the lb, and the lb may send encapsulated packets with any outer source.
    """
    return {
        "net.ipv4.ip_forward": 1,
        "net.ipv6.conf.all.forwarding": 1,
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
        **{f"net.ipv4.conf.{name}.rp_filter": 0 for name in ifnames},
    }


def backend_sysctls(ifname: str) -> dict[str, int]:
    """A DSR backend's settings (shared with the VM lab, xdplb_lab.vm)."""
    return {
        # Decapsulated packets arrive with the client as source on an interface that
        # is not the route back to it; strict reverse-path filtering would drop them.
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
        f"net.ipv4.conf.{ifname}.rp_filter": 0,
        # Classic DSR hygiene: never answer ARP for the VIP held on lo.
        "net.ipv4.conf.all.arp_ignore": 1,
        "net.ipv4.conf.all.arp_announce": 2,
    }


def _configure_router(lbl: LbLab) -> None:
    lbl.router.sysctls(router_sysctls([e.name for e in _router_ends(lbl)]))
    with lbl.router.ipr() as ipr:
        route_add(ipr, f"{VIP_V4}/32", LB_V4, lbl.router_lb_if.ifindex)
        route_add(ipr, f"{VIP_V6}/128", LB_V6, lbl.router_lb_if.ifindex)
    enable_gro(lbl.router, lbl.router_lb_if.name)
    # GRO alone did not give the veth NAPI on this kernel: XDP_TX'd frames from
    # the lb vanished until an XDP program ran on the router's end.
    from xdplb_lab.programs import attach_pass

    attach_pass(lbl.router_lb_if.name, netns=lbl.router.name)


def _router_ends(lbl: LbLab) -> list[Iface]:
    return [lbl.router_client_if, lbl.router_lb_if, *lbl.router_backend_ifs]


def _configure_backend(backend: Host, eth: Iface) -> None:
    with backend.ipr() as ipr:
        lo = ifindex_of(ipr, "lo")
        addr_add(ipr, lo, f"{VIP_V4}/32")
        addr_add(ipr, lo, f"{VIP_V6}/128")
    backend.sysctls(backend_sysctls(eth.name))


def build_lb_lab(lab: Lab, n_backends: int = 3, configure_backends: bool = True) -> LbLab:
    """Build client - router - lb plus `n_backends` DSR backends, fully addressed and routed.

    The client's eth0 has TX checksum offload (and thus TSO) turned off: a veth hands the
    peer CHECKSUM_PARTIAL skbs whose L4 checksum is not filled in, and once the lb rewrites
    such a frame in XDP and XDP_TXes it, that metadata is lost and the backend would see a
    bad checksum. Full checksums and MTU-sized segments from the client avoid that.
    """
    if not 1 <= n_backends <= MAX_BACKENDS:
        raise ValueError(f"n_backends must be 1..{MAX_BACKENDS}")
    client, router, lb = (lab.add_host(r) for r in ("client", "router", "lb"))
    backends = [lab.add_host(f"backend{i}") for i in range(n_backends)]
    client_if, r_client_if = lab.connect(client, router, "eth0", "eth0")
    lb_if, r_lb_if = lab.connect(lb, router, "eth1", "eth1")
    pairs = [lab.connect(b, router, "eth0", f"ethB{i}") for i, b in enumerate(backends)]
    lbl = LbLab(
        lab=lab, client=client, router=router, lb=lb, backends=backends,
        client_if=client_if, router_client_if=r_client_if, lb_iface=lb_if, router_lb_if=r_lb_if,
        backend_ifs=[p[0] for p in pairs], router_backend_ifs=[p[1] for p in pairs],
    )  # fmt: skip
    links = [(client_if, r_client_if, _CLIENT_PLAN), (lb_if, r_lb_if, _LB_PLAN)]
    links += [(b, r, _backend_plan(i)) for i, (b, r) in enumerate(pairs)]
    for host_end, router_end, plan in links:
        _address_link(host_end, router_end, plan)
        _default_via_router(host_end, plan)
    _configure_router(lbl)
    if configure_backends:  # else bare: addressed and routed only (xdplb-backend's job)
        for backend, b_if in zip(backends, lbl.backend_ifs, strict=True):
            _configure_backend(backend, b_if)
    set_offloads(client, "eth0", tx=False)
    return lbl


def start_http_backends(lbl: LbLab, port: int = 80, decap: bool = True) -> list[Any]:
    """Give every backend the decapsulator (accepting its IPv4 and IPv6
    address) and an HTTP server answering `backend{i}`; wait until they serve.

    Returns the Decapsulator handles; the programs stay attached until the
    namespaces go, the servers until the lab closes.
    """
    from xdplb.datapath import Decapsulator

    decaps = []
    for i, host in enumerate(lbl.backends):
        if decap:
            program = Decapsulator()
            program.accept(backend_v4(i))
            program.accept(backend_v6(i))
            program.attach("eth0", netns=host.name)
            decaps.append(program)
        host.popen([sys.executable, "-m", "xdplb_lab.backend_server", "--name", f"backend{i}",
                    "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for host in lbl.backends:
        wait_port(host, port, ip="::1")
    return decaps


def http_get(topo: LbLab, vip: str, port: int = 80, timeout: float = 3.0) -> str:
    """One HTTP request from the client to `vip` on a new TCP connection; the body
    (a lab backend answers with its name)."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with topo.client.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((vip, port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1].strip()


__all__ = [
    "IFNAMSIZ_MAX",
    "MARKER_DIR",
    "NETNS_DIR",
    "NUD_PERMANENT",
    "CommandError",
    "Host",
    "Iface",
    "Lab",
    "LabError",
    "enable_gro",
    "pin_dir_of",
    "remove_stale",
    "set_offloads",
    "wait_port",
]


def stop_backend_server(topo: LbLab, index: int,
                        module: str = "xdplb_lab.backend_server") -> None:
    """Stops a server of one backend (by default its HTTP server; the namespace and
    its link stay). The namespaces share one PID namespace: the server is found among
    the PIDs in this backend's network namespace, not by name alone."""
    for pid in ip_netns.ns_pids().get(topo.backends[index].name, []):
        with contextlib.suppress(OSError):  # gone meanwhile
            if module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)


def up_or_down(argv: Sequence[str] | None, module: str, what: str,
               up: Callable[[str, Path], object], down: Callable[[str, Path], object],
               prefix: str, workdir: Path) -> None:
    """The command line of a lab a make target brings up and down:
    `python -m MODULE up|down [--prefix P] [--workdir DIR]`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description=f"{what}: up or down.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--prefix", default=prefix, help=f"lab prefix (default {prefix})")
    parser.add_argument("--workdir", type=Path, default=workdir,
                        help=f"configs, sockets and logs (default {workdir})")
    args = parser.parse_args(argv)
    (up if args.action == "up" else down)(args.prefix, args.workdir)
