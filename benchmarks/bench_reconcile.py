"""Benchmark xdplb.reconciler: one backend change applied to real BPF maps.

Usage: python benchmarks/bench_reconcile.py [--json PATH] [--quick]   (as root)

One VIP with N=1000 equal-weight backends, rings of M=65537 and M=655373 slots, each in
its own Balancer (ring_entries 2*M).  After the initial reconcile, one backend is added,
one removed and one has its weight doubled, each as a separate reconcile starting from
the same N equal weights (an untimed reconcile undoes each change), TRIALS times with a
random backend each.  For each: ring positions written (checked against
maglev.diff_positions of the rings before and after), total map entries written, and
the wall time of reconcile() (median and max over the trials).  The baseline is
maglev.build_ring alone for the same N and M (median of 5); ratio = reconcile / build.
Target: one backend change at N=1000 in at most 50 ms, writing only changed positions.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# Lets the benchmark run from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from timing import median_ms, write_json

from xdplb import maglev
from xdplb.datapath import Balancer, MapSizes
from xdplb.reconciler import Reconciler
from xdplb.state import (
    AddBackend,
    AddVip,
    BackendSpec,
    Change,
    DesiredState,
    Limits,
    RemoveBackend,
    SetBackend,
    VipKey,
    VipSpec,
    apply_changes,
)

N = 1000
SIZES = (65537, 655373)
TRIALS = 5
REPEATS = 5
TARGET_MS = 50.0
VIP = VipKey("10.200.0.10", 80, "tcp")


def identity(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"



class Run:
    """One Balancer and its Reconciler; applies changes and measures each reconcile."""

    def __init__(self, size: int):
        self.size = size
        self.sizes = MapSizes(max_vips=4, max_backends=2048, ring_entries=2 * size,
                              conn_entries=4096)
        self.limits = Limits.of_map_sizes(self.sizes)
        self.bal = Balancer(self.sizes)
        self.rec = Reconciler(self.bal)
        self.state = DesiredState()

    def apply(self, *changes: Change) -> dict[str, object]:
        before = self.state.vips[VIP].ring_weights() if VIP in self.state.vips else {}
        self.state = apply_changes(self.state, changes, self.limits)
        start = time.perf_counter()
        report = self.rec.reconcile(self.state)
        wall_ms = (time.perf_counter() - start) * 1e3
        after = self.state.vips[VIP].ring_weights()
        expected = (self.size if not before else len(maglev.diff_positions(
            maglev.build_ring(before, self.size), maglev.build_ring(after, self.size))))
        positions = report.ring_positions.get(str(VIP), 0)
        if positions != expected:
            sys.exit(f"M={self.size}: wrote {positions} ring positions, "
                     f"maglev.diff_positions says {expected}")
        return {"positions": positions, "expected": expected,
                "writes": report.total_writes, "ms": wall_ms}

    def close(self) -> None:
        self.bal.close()


def row(size: int, change: str, runs: list[dict[str, object]], build_ms: float) -> dict:
    ms = [float(r["ms"]) for r in runs]
    return {
        "size": size, "change": change, "trials": len(runs),
        "positions": [r["positions"] for r in runs],
        "expected_positions": [r["expected"] for r in runs],
        "writes": [r["writes"] for r in runs],
        "median_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2),
        "build_ms": round(build_ms, 2),
        "ratio": round(statistics.median(ms) / build_ms, 2),
    }


def measure(size: int, rng: random.Random) -> list[dict]:
    weights = {identity(i): 100 for i in range(1, N + 1)}
    maglev.build_ring(weights, size)  # warm-up: compile/load the helper once
    build_ms = median_ms(lambda: maglev.build_ring(weights, size))
    run = Run(size)
    try:
        spec = VipSpec(VIP, ring_size=size, backends={a: BackendSpec(a) for a in weights})
        rows = [row(size, "initial", [run.apply(AddVip(spec))], build_ms)]
        rows.append(row(size, "none", [run.apply() for _ in range(TRIALS)], build_ms))
        per_change: dict[str, list] = {"add": [], "remove": [], "reweight_x2": []}
        for trial in range(TRIALS):
            newcomer = identity(N + 1 + trial)
            per_change["add"].append(run.apply(AddBackend(VIP, BackendSpec(newcomer))))
            run.apply(RemoveBackend(VIP, newcomer))
            victim = rng.choice(sorted(weights))
            per_change["remove"].append(run.apply(RemoveBackend(VIP, victim)))
            run.apply(AddBackend(VIP, BackendSpec(victim)))
            victim = rng.choice(sorted(weights))
            per_change["reweight_x2"].append(run.apply(SetBackend(VIP, victim, {"weight": 200})))
            run.apply(SetBackend(VIP, victim, {"weight": 100}))
        rows += [row(size, change, runs, build_ms) for change, runs in per_change.items()]
        return rows
    finally:
        run.close()


def print_report(report: dict) -> None:
    print(f"native helper: {report['native']}   machine: {report['machine']}")
    print(f"\nreconcile of one VIP, N={N} equal-weight backends; one change per reconcile, "
          f"{TRIALS} trials (median / max ms); build = maglev.build_ring alone, median of "
          f"{REPEATS}; ratio = median reconcile / build")
    print(f"{'M':>7} {'change':>12} {'positions':>10} {'diff_pos':>9} {'writes':>7} "
          f"{'median ms':>10} {'max ms':>8} {'build ms':>9} {'ratio':>6}")
    for r in report["rows"]:
        verdict = ""
        if r["change"] in ("add", "remove", "reweight_x2"):
            verdict = "  ok" if r["max_ms"] <= TARGET_MS else "  MISSED"
        print(f"{r['size']:>7} {r['change']:>12} {statistics.median(r['positions']):>10.0f} "
              f"{statistics.median(r['expected_positions']):>9.0f} "
              f"{statistics.median(r['writes']):>7.0f} {r['median_ms']:>10.2f} "
              f"{r['max_ms']:>8.2f} {r['build_ms']:>9.2f} {r['ratio']:>6.2f}{verdict}")
    print(f"\ntarget: one backend change in at most {TARGET_MS:.0f} ms, writing only the "
          "positions that changed (positions == diff_pos, checked on every run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="skip M=655373")
    args = parser.parse_args()
    rng = random.Random(N)
    sizes = SIZES[:1] if args.quick else SIZES
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "native": maglev.native_available(),
        "n": N, "trials": TRIALS, "target_ms": TARGET_MS,
        "rows": [r for size in sizes for r in measure(size, rng)],
    }
    print_report(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
