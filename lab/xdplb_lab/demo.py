"""`make demo`: xdplb forwarding real traffic in a namespace lab, driven the
way an operator drives it: lbd on the LB, lbctl to configure it.

Builds client, router, LB and three backends (each an HTTP server answering
with its name, behind the backend-side decapsulator, VIP on loopback),
starts lbd with TCP health checks, adds an IPv4 and an IPv6 VIP with lbctl,
sends many HTTP requests from the client and shows who answered against the
ring shares; then stops a backend's server, lets the health check take it
out and shows where its traffic went. The lab stays up to explore;
`make demo-down` removes it. Running `make demo` again starts afresh.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xdplb.datapath import MapSizes
from xdplb_lab import lab as labmod
from xdplb_lab.daemon import LabLbd, console_script

PREFIX = "xdemo"
WORKDIR = Path("/run/xdplb-demo")
SIZES = MapSizes(max_vips=16, max_backends=64, ring_entries=4 * 65537, conn_entries=65536)
REQUESTS = 600
CLIENT_THREADS = 16
CHECK = ["--check", "tcp", "--check-interval", "500", "--check-timeout", "300",
         "--rise", "2", "--fall", "2"]


def say(text: str = "") -> None:
    print(text, flush=True)


def lbctl(lbd: LabLbd, *args: str) -> str:
    result = lbd.lbctl(*args)
    if result.returncode != 0:
        raise SystemExit(f"demo: lbctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def show(lbd: LabLbd, *args: str) -> None:
    say(f"$ lbctl {' '.join(args)}")
    for line in lbctl(lbd, *args).splitlines():
        say(f"  {line}")


def configure(lbd: LabLbd, topo: labmod.LbLab) -> dict[str, list[str]]:
    vips = {f"{topo.vip_v4}:80/tcp": topo.backend_v4,
            f"[{topo.vip_v6}]:80/tcp": topo.backend_v6}
    for vip, backends in vips.items():
        show(lbd, "vip", "add", vip, *CHECK)
        for address in backends:
            show(lbd, "backend", "add", vip, address)
    return vips


def traffic(topo: labmod.LbLab, lbd: LabLbd, vip: str, host: str) -> Counter:
    """REQUESTS HTTP requests from the client, each a new TCP connection."""
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        answers = Counter(pool.map(lambda _: labmod.http_get(topo, host), range(REQUESTS)))
    took = time.monotonic() - started
    listing = json.loads(lbctl(lbd, "vip", "show", vip, "-o", "json"))
    ring = listing["ring_size"]
    say(f"\n  {REQUESTS} HTTP connections to {vip} in {took:.1f} s, answered directly by "
        "the backends (DSR):")
    say(f"    {'backend':<26}{'health':<9}{'answers':>8}{'observed':>10}{'ring share':>12}")
    for i, backend in enumerate(listing["backends"]):
        name, status = f"backend{i}", backend["status"]
        n = answers.get(name, 0)
        say(f"    {name + ' ' + backend['address']:<26}{status['health']:<9}{n:>8}"
            f"{n / REQUESTS:>10.1%}{status['ring_positions'] / ring:>12.1%}")
    return answers


def wait_health(lbd: LabLbd, vip: str, address: str, health: str,
                limit_s: float) -> tuple[float, float]:
    """Until the verdict is `health` and the datapath holds it (the reconcile that
    takes a down backend out of the ring has been written): the seconds each took."""
    started = time.monotonic()
    verdict_at = None
    while time.monotonic() - started < limit_s:
        listing = json.loads(lbctl(lbd, "backend", "list", vip, "-o", "json"))
        for backend in listing["backends"]:
            status = backend["status"]
            if backend["address"] != address or status["health"] != health:
                continue
            verdict_at = verdict_at or time.monotonic() - started
            if status["health_realised"]:
                return verdict_at, time.monotonic() - started
        time.sleep(0.05)
    raise SystemExit(f"demo: {address} did not become {health} in the datapath within "
                     f"{limit_s:.0f} s")


def up() -> None:
    down(quiet=True)  # running twice works: the previous lab goes first
    lab = labmod.Lab(prefix=PREFIX)
    topo = labmod.build_lb_lab(lab, n_backends=3)
    say(f"lab {lab.runid}: client, router, lb and 3 backends in network namespaces")
    labmod.start_http_backends(topo)
    lbd = LabLbd(topo, WORKDIR, sizes=SIZES)
    lbd.start()
    say(f"lbd running in {topo.lb.name} on {topo.lb_iface.name}; API {lbd.socket}; "
        f"log {lbd.log_path}\n")
    vips = configure(lbd, topo)
    v4, v6 = list(vips)
    before = traffic(topo, lbd, v4, topo.vip_v4)
    traffic(topo, lbd, v6, topo.vip_v6)
    say()
    show(lbd, "stats")
    failed = topo.backend_v4[1]
    say(f"\nStopping backend1's HTTP server ({failed}); lbd's TCP check (every 500 ms, "
        "fall 2) takes it out:")
    labmod.stop_backend_server(topo, 1)
    verdict, realised = wait_health(lbd, v4, failed, "down", limit_s=10)
    say(f"  backend1 judged down after {verdict:.1f} s, out of the ring after {realised:.1f} s")
    after = traffic(topo, lbd, v4, topo.vip_v4)
    say(f"\n  backend1's share ({before['backend1']} of {REQUESTS} before) went to the others; "
        f"backend0 {before['backend0']} -> {after['backend0']}, "
        f"backend2 {before['backend2']} -> {after['backend2']}")
    say()
    show(lbd, "backend", "list", v4)
    lab.keep()
    lbctl_path = console_script("lbctl")
    say(f"""
The lab stays up, lbd keeps running. Try:
  {lbctl_path} --socket {lbd.socket} status
  {lbctl_path} --socket {lbd.socket} vip show {v4}
  {lbctl_path} --socket {lbd.socket} backend set {v4} {topo.backend_v4[0]} --weight 300
  ip netns exec {topo.client.name} curl -s http://{topo.vip_v4}/
  ip netns exec {topo.client.name} curl -s -g http://[{topo.vip_v6}]/
Remove it with: make demo-down""")


def down(quiet: bool = False) -> None:
    removed = labmod.remove_stale(PREFIX)
    if WORKDIR.exists():
        shutil.rmtree(WORKDIR)
        removed.append(str(WORKDIR))
    if not quiet:
        say("removed: " + (", ".join(removed) if removed else "nothing (no demo lab)"))


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "up"
    if command not in ("up", "down"):
        sys.exit("usage: python -m xdplb_lab.demo [up|down]")
    (up if command == "up" else down)()


if __name__ == "__main__":
    main()
