"""A multi-host lab for BGP scale-out: one router, two LB hosts, DSR backends.

    client eth0 ---- eth0 router eth1 ---- eth1 lb1   (10.100.2.0/24, fd00:100:2::/64)
                            eth2 ---- eth1 lb2        (10.100.3.0/24, fd00:100:3::/64)
                            ethB{i} ---- eth0 backend{i}

Each LB host runs its own BIRD (its own config, control socket and log) and
its own lbd with [bgp] enabled: lbd writes the VIPs that have a healthy
backend into vips4.conf / vips6.conf in its include_dir and asks its BIRD to
reload; BIRD includes those files in two static protocols and exports them
over eBGP (AS 65001) to the router. The router runs BIRD too (AS 65000), one
BGP session per LB host and address family, and a kernel protocol per family
with `merge paths on`, so a VIP learned from both LB hosts becomes one ECMP
route in the router's kernel; the router hashes flows on the 5-tuple
(fib_multipath_hash_policy = 1 for IPv4 and IPv6).

There are no static VIP routes: the router forwards a VIP only while some LB
host announces it. Each lbd XDP_TXes encapsulated packets back to the router
on its own link (its next hop is the router's MAC there, resolved from its
default route), the router forwards them to the backend, which decapsulates
in BPF and answers the client directly.

`python -m xdplb_lab.bgp up` builds the lab (prefix "xbgp"), configures one
IPv4 and one IPv6 VIP on both lbds, shows the sessions, the ECMP routes and
the ring fingerprints, and leaves it running; `python -m xdplb_lab.bgp down`
removes it (namespaces, processes, pinned maps, work directory). The Makefile
targets `bgp-lab` and `bgp-lab-down` run these.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import netns

from xdplb.bgp import BirdAnnouncer, host_prefix
from xdplb.datapath import PIN_ROOT, Decapsulator, MapSizes
from xdplb_lab import lab as labmod
from xdplb_lab.bird import (
    BGP_ESTABLISH_TIMEOUT_S,
    BIRDC,
    LB_AS,
    ROUTER_AS,
    Bird,
    lb_bird_config,
    lb_v4,
    lb_v6,
    router_bird_config,
    router_lb_v4,
    router_lb_v6,
)
from xdplb_lab.daemon import LabLbd, console_script
from xdplb_lab.lab import (
    CLIENT_V4,
    CLIENT_V6,
    ROUTER_CLIENT_V4,
    ROUTER_CLIENT_V6,
    VIP_V4,
    VIP_V6,
    Host,
    Iface,
    Lab,
    LabError,
    _address_link,
    _backend_plan,
    _configure_backend,
    _default_via_router,
    _LinkPlan,
    enable_gro,
    router_sysctls,
    set_offloads,
    wait_port,
)
from xdplb_lab.netns import _runid_of, family_of
from xdplb_lab.programs import attach_pass

PREFIX = "xbgp"  # the make target's lab; tests use their own prefix
WORKDIR = Path("/run/xdplb-bgp-lab")
N_LB_HOSTS = 2
SIZES = MapSizes(max_vips=8, max_backends=16, ring_entries=4 * 65537, conn_entries=65536)


def _lb_plan(i: int) -> _LinkPlan:
    return _LinkPlan((lb_v4(i), router_lb_v4(i)), (lb_v6(i), router_lb_v6(i)))


_CLIENT_PLAN = _LinkPlan((CLIENT_V4, ROUTER_CLIENT_V4), (CLIENT_V6, ROUTER_CLIENT_V6))


# --------------------------------------------------------------------------- lbd per LB host


@dataclass
class _LbView:
    """What LabLbd reads of a topology: the lab, the LB host and its XDP interface."""

    lab: Lab
    lb: Host
    lb_iface: Iface


class HostLbd(LabLbd):
    """The real lbd on one LB host of the multi-host lab: its own name (so its own pin dir,
    `{runid}-lbN`), state dir, socket, log, and a [bgp] section for its BIRD."""

    def __init__(self, lab: Lab, host: Host, iface: Iface, workdir: Path, bird_socket: Path,
                 include_dir: Path, sizes: MapSizes = SIZES, config_extra: str = "",
                 birdc: str = BIRDC):
        bgp = (f'[bgp]\nenabled = true\nbird_socket = "{bird_socket}"\n'
               f'include_dir = "{include_dir}"\nbirdc = "{birdc}"\n')
        super().__init__(_LbView(lab, host, iface), workdir, sizes=sizes,  # type: ignore[arg-type]
                         config_extra=config_extra + "\n" + bgp)
        self.name = f"{lab.runid}-{host.role}"


# --------------------------------------------------------------------------- the topology


@dataclass
class LbHost:
    """One LB host: namespace, link to the router, its BIRD and its lbd."""

    index: int
    host: Host
    iface: Iface  # eth1: XDP runs here and XDP_TXes back to the router
    router_iface: Iface
    bird: Bird
    lbd: HostLbd
    include_dir: Path

    @property
    def role(self) -> str:
        return self.host.role

    @property
    def v4(self) -> str:
        return lb_v4(self.index)

    @property
    def v6(self) -> str:
        return lb_v6(self.index)

    @property
    def sessions(self) -> tuple[str, str]:
        """The router's BGP protocol names for this host's sessions."""
        return f"lb{self.index + 1}v4", f"lb{self.index + 1}v6"

    def lbctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.lbd.lbctl(*args, timeout=timeout)


@dataclass
class BgpLab:
    """Everything about the multi-host lab; attribute names shared with LbLab where they
    mean the same (client, router, backends, client_if, ...), so tests.flows works on it."""

    lab: Lab
    workdir: Path
    client: Host
    router: Host
    lbs: list[LbHost]
    backends: list[Host]
    client_if: Iface
    router_client_if: Iface
    backend_ifs: list[Iface]
    router_backend_ifs: list[Iface]
    router_bird: Bird
    vip_v4: str = VIP_V4
    vip_v6: str = VIP_V6
    decap: Decapsulator | None = None

    @property
    def backend_v4(self) -> list[str]:
        return [labmod.backend_v4(i) for i in range(len(self.backends))]

    @property
    def backend_v6(self) -> list[str]:
        return [labmod.backend_v6(i) for i in range(len(self.backends))]

    # -- the router's view --

    def vip_paths(self, prefix: str, ipr: Any = None) -> set[str]:
        """The LB hosts (roles) the router's kernel route for `prefix` points to now
        (`ipr`: an open IPRoute in the router's namespace, for fast polling)."""
        return _paths(self, prefix, ipr)

    def wait_paths(self, prefix: str, roles: set[str], timeout: float = 20.0) -> float:
        """Until the router's kernel route for `prefix` goes to exactly `roles` (empty: no
        route); the seconds it took. TimeoutError with what the route is otherwise."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.vip_paths(prefix) == roles:
                return time.monotonic() - started
            time.sleep(0.02)
        raise TimeoutError(f"route {prefix} on the router goes to {self.vip_paths(prefix)}, "
                           f"not {roles}, after {timeout:.0f} s")

    def wait_established(self, timeout: float = BGP_ESTABLISH_TIMEOUT_S) -> float:
        names = [n for lb in self.lbs for n in lb.sessions]
        return self.router_bird.wait_established(names, timeout)

    # -- LB host failure and recovery --

    def fail_lb(self, lb: LbHost) -> float:
        """The LB host dies: its link goes down (nothing more leaves it), then its lbd and
        BIRD are killed. Returns when the link went down (wall clock, time.time())."""
        with lb.host.ipr() as ipr:
            failed_at = time.time()
            ipr.link("set", index=lb.iface.ifindex, state="down")
        lb.lbd.kill(signal.SIGKILL)
        lb.bird.stop(signal.SIGKILL)
        return failed_at

    def restore_lb(self, lb: LbHost) -> None:
        """Brings a failed LB host back: link up, its routes and neighbours again (a link
        going down flushes them), BIRD, then lbd on its saved state and pinned maps."""
        with lb.host.ipr() as ipr:
            ipr.link("set", index=lb.iface.ifindex, state="up")
            for ip in (router_lb_v4(lb.index), router_lb_v6(lb.index)):
                ipr.neigh("replace", dst=ip, lladdr=lb.router_iface.mac,
                          ifindex=lb.iface.ifindex, state=labmod.NUD_PERMANENT,
                          family=family_of(ip))
            for dst, via in (("0.0.0.0/0", router_lb_v4(lb.index)),
                             ("::/0", router_lb_v6(lb.index))):
                ipr.route("replace", dst=dst, gateway=via, oif=lb.iface.ifindex,
                          family=family_of(via))
        if not lb.bird.running:
            lb.bird.start()
        if lb.lbd.proc is None or lb.lbd.proc.poll() is not None:
            lb.lbd.start()

    def close(self) -> None:
        """Stops the lbds, removes the lab (processes, namespaces, the run's pin dir), every
        per-LB-host pin dir and lbd's instance lock files."""
        for lb in self.lbs:
            with contextlib.suppress(Exception):
                lb.lbd.close()
        self.lab.close()
        _remove_instances(lb.lbd.name for lb in self.lbs)


def _paths(topo: BgpLab, prefix: str, ipr: Any = None) -> set[str]:
    if ipr is None:
        with topo.router.ipr() as own:
            return _paths(topo, prefix, own)
    by_ifindex = {lb.router_iface.ifindex: lb.role for lb in topo.lbs}
    dst, plen = prefix.split("/")
    # A dump, filtered: `get_routes(dst=...)` asks for a lookup, which picks one path.
    routes = [r for r in ipr.get_routes(family=family_of(dst), table=254)
              if r.get_attr("RTA_DST") == dst and r["dst_len"] == int(plen)]
    roles: set[str] = set()
    for route in routes:
        multipath = route.get_attr("RTA_MULTIPATH")
        oifs = ([hop["oif"] for hop in multipath] if multipath
                else [route.get_attr("RTA_OIF")])
        roles |= {by_ifindex.get(oif, f"ifindex {oif}") for oif in oifs}
    return roles


def build_bgp_lab(lab: Lab, workdir: Path, n_backends: int = 3, sizes: MapSizes = SIZES,
                  lb_as: Sequence[int] = (LB_AS, LB_AS), config_extra: str = "",
                  birdc: str = BIRDC) -> BgpLab:
    """Namespaces, links, addresses, routes and BIRD configs; nothing started yet.
    `birdc`: the client the lbds run (a test may put a wrapper there to inject faults)."""
    if not 1 <= n_backends <= labmod.MAX_BACKENDS:
        raise ValueError(f"n_backends must be 1..{labmod.MAX_BACKENDS}")
    workdir.mkdir(parents=True, exist_ok=True)
    client, router = lab.add_host("client"), lab.add_host("router")
    lb_hosts = [lab.add_host(f"lb{i + 1}") for i in range(N_LB_HOSTS)]
    for host in lb_hosts:
        # A failed LB host's link goes down and comes back: keep its IPv6 address.
        host.sysctl("net.ipv6.conf.all.keep_addr_on_down", 1)
    backends = [lab.add_host(f"backend{i}") for i in range(n_backends)]
    client_if, r_client_if = lab.connect(client, router, "eth0", "eth0")
    lb_links = [lab.connect(h, router, "eth1", f"eth{i + 1}") for i, h in enumerate(lb_hosts)]
    pairs = [lab.connect(b, router, "eth0", f"ethB{i}") for i, b in enumerate(backends)]
    links = [(client_if, r_client_if, _CLIENT_PLAN)]
    links += [(a, b, _lb_plan(i)) for i, (a, b) in enumerate(lb_links)]
    links += [(b, r, _backend_plan(i)) for i, (b, r) in enumerate(pairs)]
    for host_end, router_end, plan in links:
        _address_link(host_end, router_end, plan)
        _default_via_router(host_end, plan)
    router_ends = [r_client_if, *(b for _, b in lb_links), *(r for _, r in pairs)]
    router.sysctls({
        **router_sysctls([e.name for e in router_ends]),
        # ECMP on the 5-tuple: flows of one client spread over the LB hosts.
        "net.ipv4.fib_multipath_hash_policy": 1,
        "net.ipv6.fib_multipath_hash_policy": 1,
    })
    for _, r_lb_if in lb_links:
        enable_gro(router, r_lb_if.name)  # start_bgp_lab also attaches the pass program
    for backend, (b_if, _) in zip(backends, pairs, strict=True):
        _configure_backend(backend, b_if)
    set_offloads(client, "eth0", tx=False)  # see build_lb_lab: full checksums from the client

    lbs = []
    for i, (host, (lb_if, r_lb_if)) in enumerate(zip(lb_hosts, lb_links, strict=True)):
        hostdir = workdir / host.role
        include_dir = hostdir / "bird-include"
        bird = Bird(host, hostdir / "bird", lb_bird_config(i, include_dir, lb_as[i]))
        lbd = HostLbd(lab, host, lb_if, hostdir / "lbd", bird.socket, include_dir, sizes,
                      config_extra, birdc)
        lbs.append(LbHost(i, host, lb_if, r_lb_if, bird, lbd, include_dir))
    router_bird = Bird(router, workdir / "router" / "bird",
                       router_bird_config(len(lbs), list(lb_as)))
    return BgpLab(lab=lab, workdir=workdir, client=client, router=router, lbs=lbs,
                  backends=backends, client_if=client_if, router_client_if=r_client_if,
                  backend_ifs=[p[0] for p in pairs], router_backend_ifs=[p[1] for p in pairs],
                  router_bird=router_bird)


def start_backends(topo: BgpLab, port: int = 80) -> Decapsulator:
    """Like lab.start_http_backends, with one decapsulator (one compile) shared by every
    backend: it accepts every backend's addresses, each backend only receives its own."""
    decap = Decapsulator()
    for address in (*topo.backend_v4, *topo.backend_v6):
        decap.accept(address)
    for i, host in enumerate(topo.backends):
        decap.attach("eth0", netns=host.name)
        host.popen([sys.executable, "-m", "xdplb_lab.backend_server", "--name", f"backend{i}",
                    "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for host in topo.backends:
        wait_port(host, port, ip="::1")
    return decap


def start_bgp_lab(topo: BgpLab) -> None:
    """Every BIRD, both lbds, the router's pass programs and the backends, then waits for
    lbd to answer and every BGP session to be established. The lbds compile their
    programs while this process compiles the lab's own."""
    for lb in topo.lbs:
        # BIRD's config includes lbd's files: they must exist (empty) before BIRD parses it.
        BirdAnnouncer(lb.include_dir, lb.bird.socket).prepare()
        lb.bird.start()
    topo.router_bird.start()
    for lb in topo.lbs:
        lb.lbd.start(wait=False)
    for lb in topo.lbs:
        # XDP_TX'd frames from an LB host are received only if the router's end has NAPI.
        attach_pass(lb.router_iface.name, netns=topo.router.name)
    topo.decap = start_backends(topo)
    for lb in topo.lbs:
        lb.lbd.wait_ready()
    topo.wait_established()


def _remove_instances(names: Iterable[str]) -> list[str]:
    """An lbd instance's pin dir and its instance lock file (lbd is gone)."""
    from xdplb.lbd import LOCK_DIR

    removed = []
    for name in names:
        pins, lock = PIN_ROOT / name, LOCK_DIR / f"{name}.lock"
        if pins.exists():
            shutil.rmtree(pins, ignore_errors=True)
            removed.append(str(pins))
        if lock.exists():
            lock.unlink(missing_ok=True)
            removed.append(str(lock))
    with contextlib.suppress(OSError):  # the shared root, once no instance is left
        PIN_ROOT.rmdir()
    return removed


def _remove_stale_instances(prefix: str) -> list[str]:
    """The LB hosts' lbd instances ({runid}-lbN: pin dirs, lock files) of runs under
    `prefix` that have neither a namespace nor a marker left (remove_stale went first)."""
    from xdplb.lbd import LOCK_DIR

    live = {_runid_of(n) for n in netns.listnetns()}
    found = [p.name for p in PIN_ROOT.iterdir()] if PIN_ROOT.is_dir() else []
    found += [p.name.removesuffix(".lock") for p in LOCK_DIR.glob(f"{prefix}*-lb*.lock")]
    stale = {name for name in found
             if name.startswith(prefix) and re.fullmatch(r"[a-z0-9]+-lb\d+", name)
             and _runid_of(name) not in live
             and not (labmod.MARKER_DIR / _runid_of(name)).exists()}
    return _remove_instances(sorted(stale))


# --------------------------------------------------------------------------- make bgp-lab


def say(text: str = "") -> None:
    print(text, flush=True)


def lab_document(topo: BgpLab, check_interval_ms: int = 500) -> dict[str, Any]:
    """The desired state both lbds get: the same document, so the same rings."""
    check = {"kind": "tcp", "interval_ms": check_interval_ms,
             "timeout_ms": min(300, check_interval_ms), "rise": 2, "fall": 2}
    return {"version": 1, "vips": [
        {"vip": f"{topo.vip_v4}:80/tcp", "check": check,
         "backends": [{"address": a} for a in topo.backend_v4]},
        {"vip": f"[{topo.vip_v6}]:80/tcp", "check": check,
         "backends": [{"address": a} for a in topo.backend_v6]},
    ]}


def apply_everywhere(topo: BgpLab, document: dict[str, Any]) -> None:
    path = topo.workdir / "lb.json"
    path.write_text(json.dumps(document, indent=2))
    for lb in topo.lbs:
        result = lb.lbctl("apply", "-f", str(path))
        if result.returncode != 0:
            raise LabError(f"lbctl apply on {lb.role}: {result.stderr.strip()}")


def up(prefix: str = PREFIX, workdir: Path = WORKDIR) -> BgpLab:
    """Builds and starts the lab, configures both lbds, shows what runs; leaves it up."""
    down(prefix, workdir, quiet=True)  # running twice works: the previous lab goes first
    lab = Lab(prefix=prefix)
    topo = None
    try:
        topo = build_bgp_lab(lab, workdir)
        say(f"lab {lab.runid}: client, router, lb1, lb2 and {len(topo.backends)} backends "
            "in network namespaces")
        start_bgp_lab(topo)
        say(f"BIRD on the router (AS {ROUTER_AS}) and on lb1 and lb2 (AS {LB_AS}): "
            "BGP sessions established")
        apply_everywhere(topo, lab_document(topo))
        for vip in (topo.vip_v4, topo.vip_v6):
            took = topo.wait_paths(host_prefix(vip), {"lb1", "lb2"})
            say(f"router: {host_prefix(vip)} is one ECMP route over lb1 and lb2 "
                f"({took:.1f} s after the VIPs were configured)")
        say()
        say(topo.router_bird.birdc("show", "protocols").stdout.rstrip())
        for family in ("-4", "-6"):
            say(topo.router.run(["ip", family, "route", "show", "proto", "bird"]).stdout.rstrip())
        sockets = [str(lb.lbd.socket) for lb in topo.lbs]
        compare = topo.lbs[0].lbctl("compare", *sockets)
        say(f"\n$ lbctl compare {' '.join(sockets)}")
        say((compare.stdout + compare.stderr).rstrip())
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: labmod.http_get(topo, topo.vip_v4), range(60)))
        say(f"\n60 HTTP requests to {topo.vip_v4} (new connections, spread over lb1 and "
            "lb2 by the router): "
            + ", ".join(f"{b} {answers.count(b)}" for b in sorted(set(answers))))
        lab.keep()
    except BaseException:
        if topo is not None:
            topo.close()
        else:
            lab.close()
        raise
    lbctl = console_script("lbctl")
    lines = [f"  {lbctl} --socket {lb.lbd.socket} status" for lb in topo.lbs]
    say(f"""
The lab stays up. Try:
{chr(10).join(lines)}
  {lbctl} compare {' '.join(sockets)}
  {lbctl} --socket {topo.lbs[0].lbd.socket} drain-host --wait 30 --quiet 2
  {BIRDC} -s {topo.router_bird.socket} show route all
  ip netns exec {topo.router.name} ip route show proto bird
  ip netns exec {topo.client.name} curl -s http://{topo.vip_v4}/
Remove it with: make bgp-lab-down""")
    return topo


def down(prefix: str = PREFIX, workdir: Path = WORKDIR, quiet: bool = False) -> list[str]:
    """Removes what `up` left: processes, namespaces, pinned maps, the work directory."""
    removed = labmod.remove_stale(prefix)
    removed += _remove_stale_instances(prefix)
    if workdir.exists():
        shutil.rmtree(workdir)
        removed.append(str(workdir))
    if not quiet:
        say("removed: " + (", ".join(removed) if removed else "nothing (no BGP lab was up)"))
    return removed


def main(argv: Sequence[str] | None = None) -> None:
    labmod.up_or_down(argv, "xdplb_lab.bgp", "The multi-host BGP lab", up, down, PREFIX,
                      WORKDIR)


if __name__ == "__main__":
    main()
