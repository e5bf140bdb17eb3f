"""The fleet lab: the BGP lab's two LB hosts sharing one desired state through a
real 3-member etcd cluster (xdplb_lab.etcd), each lbd with a [fleet] table.

`python -m xdplb_lab.fleet up` builds it (prefix "xflt"), starts etcd, BIRD,
both lbds and the backends, makes one change on lb1 only, waits until lb2
realises it, and prints `lbctl fleet status`; `down` removes it. The Makefile
targets `fleet-lab` and `fleet-lab-down` run these.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdplb_lab import bgp
from xdplb_lab.bgp import BgpLab, LbHost, build_bgp_lab, lab_document, start_bgp_lab
from xdplb_lab.daemon import console_script
from xdplb_lab.etcd import EtcdCluster, add_etcd_cluster
from xdplb_lab.lab import Lab, LabError, up_or_down

PREFIX = "xflt"
WORKDIR = Path("/run/xdplb-fleet-lab")
LEASE_TTL_S = 4  # short in the lab: a lost host counts as gone within seconds


@dataclass
class FleetLab:
    topo: BgpLab
    etcd: EtcdCluster
    prefix: str  # the etcd key prefix the lbds share

    @property
    def lbs(self) -> list[LbHost]:
        return self.topo.lbs

    def close(self) -> None:
        self.etcd.close()  # members first: the lab kills the rest
        self.topo.close()


def fleet_section(cluster: EtcdCluster, prefix: str, host: str, extra: str = "") -> str:
    endpoints = ", ".join(json.dumps(url) for url in cluster.endpoints)
    return (f'[fleet]\netcd = [{endpoints}]\nprefix = "{prefix}"\nhost = "{host}"\n'
            f"lease_ttl_s = {LEASE_TTL_S}\n{extra}")  # timeout_s: the default 5 s rides an election


def build_fleet_lab(lab: Lab, workdir: Path, n_backends: int = 3) -> FleetLab:
    """The BGP lab plus etcd members; each lbd's configuration names the cluster."""
    topo = build_bgp_lab(lab, workdir, n_backends)
    cluster = add_etcd_cluster(lab, topo.router, workdir / "etcd")
    prefix = f"/xdplb/{lab.runid}"
    for lb in topo.lbs:
        lb.lbd.config_extra += "\n" + fleet_section(cluster, prefix, lb.role)
    return FleetLab(topo, cluster, prefix)


def start_fleet_lab(fleet: FleetLab) -> float:
    """etcd first (lbd would forward without it, but the lab wants it), then the rest;
    the seconds etcd took to be healthy."""
    took = fleet.etcd.start_all()
    start_bgp_lab(fleet.topo)
    return took


def fleet_status(lb: LbHost) -> dict[str, Any]:
    result = lb.lbctl("fleet", "status", "-o", "json")
    if not result.stdout:
        raise LabError(f"lbctl fleet status on {lb.role}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def wait_converged(fleet: FleetLab, revision: int = 0, timeout: float = 20.0) -> float:
    """Until every lbd realises the newest revision (at least `revision`) with
    matching fingerprints and no drift; the seconds it took."""
    started = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - started < timeout:
        last = fleet_status(fleet.lbs[0])
        newest = int(last["newest_revision"])
        hosts = last["hosts"]
        if (newest >= max(revision, 1) and len(hosts) == len(fleet.lbs)
                and all(int(h["revision"]) == newest and not h["drift"] for h in hosts)):
            return time.monotonic() - started
        time.sleep(0.05)
    raise LabError(f"the fleet did not converge in {timeout:.0f} s: {json.dumps(last)}")


def say(text: str = "") -> None:
    print(text, flush=True)


def up(prefix: str = PREFIX, workdir: Path = WORKDIR) -> FleetLab:
    down(prefix, workdir, quiet=True)
    lab = Lab(prefix=prefix)
    fleet = None
    try:
        fleet = build_fleet_lab(lab, workdir)
        took = start_fleet_lab(fleet)
        say(f"lab {lab.runid}: etcd members m0 m1 m2 (healthy after {took:.1f} s), BIRD, "
            f"lbd on lb1 and lb2 following {fleet.prefix}")
        path = workdir / "lb.json"
        path.write_text(json.dumps(lab_document(fleet.topo), indent=2))
        started = time.monotonic()
        result = fleet.lbs[0].lbctl("apply", "-f", str(path))
        if result.returncode != 0:
            raise LabError(f"lbctl apply on lb1: {result.stderr.strip()}")
        wait_converged(fleet)
        say(f"one `lbctl apply` on lb1; lb1 and lb2 realise it with the same rings "
            f"{time.monotonic() - started:.2f} s later\n")
        status = fleet.lbs[1].lbctl("fleet", "status")
        say(f"$ lbctl --socket {fleet.lbs[1].lbd.socket} fleet status")
        say((status.stdout + status.stderr).rstrip())
        lab.keep()
    except BaseException:
        if fleet is not None:
            fleet.close()
        else:
            lab.close()
        raise
    lbctl = console_script("lbctl")
    say(f"""
The lab stays up. Try:
  {lbctl} --socket {fleet.lbs[0].lbd.socket} backend set '{fleet.topo.vip_v4}:80/tcp' \\
      {fleet.topo.backend_v4[0]} --weight 50
  {lbctl} --socket {fleet.lbs[1].lbd.socket} fleet status
  {lbctl} --socket {fleet.lbs[1].lbd.socket} vip list
Remove it with: make fleet-lab-down""")
    return fleet


def down(prefix: str = PREFIX, workdir: Path = WORKDIR, quiet: bool = False) -> list[str]:
    """Removes what `up` left: processes (etcd too), namespaces, pins, the work directory."""
    removed = bgp.down(prefix, workdir, quiet=True)
    if workdir.exists():
        shutil.rmtree(workdir)
        removed.append(str(workdir))
    if not quiet:
        say("removed: " + (", ".join(removed) if removed else "nothing (no fleet lab was up)"))
    return removed


def main(argv: Sequence[str] | None = None) -> None:
    up_or_down(argv, "xdplb_lab.fleet", "The fleet lab (etcd + two LB hosts)", up, down,
               PREFIX, WORKDIR)


if __name__ == "__main__":
    main()
