"""Benchmark xdplb.maglev: build times, share accuracy and disruption at ring level.

Usage: python benchmarks/bench_maglev.py [--json PATH] [--quick]

Build times are the median of 5 end-to-end build_ring calls (hashing, sorting, fill)
with the compiled helper and, for comparison, with the pure Python fallback.
Disruption counts positions whose owner changed after one backend is added, removed or
has its weight doubled; "collateral" are the changed positions that backend owns
neither before nor after the change: the moves Maglev promises to keep small.  Applying
the changes to BPF maps is the reconciler's business and not measured here.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
from pathlib import Path
from unittest import mock

import numpy as np

# Lets the benchmark run from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from timing import median_ms, write_json

from xdplb import maglev

SIZES = (65537, 655373)
COUNTS = (10, 100, 1000, 10000)
DISRUPTION_COUNTS = (10, 100, 1000)
DISRUPTION_SIZE = 65537
TRIALS = 10


def identity(i: int) -> str:
    """A canonical IPv4 address per index; mixes in IPv6 so sorting sees both forms."""
    if i % 7 == 3:
        return f"2001:db8::{i:x}"
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def random_weights(n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    return {identity(i): rng.randint(1, 1000) for i in range(n)}



def build_times(quick: bool) -> list[dict[str, object]]:
    """Native and fallback build times; the fallback is skipped for the slowest cases
    when --quick is given."""
    rows = []
    for size in SIZES:
        for n in COUNTS:
            weights = random_weights(n, seed=n)
            maglev.build_ring(weights, size)  # warm-up: compile/load the helper once
            native = median_ms(lambda w=weights, s=size: maglev.build_ring(w, s))
            python = None
            if not (quick and size > DISRUPTION_SIZE):
                with mock.patch.object(maglev, "_native_fill", return_value=None):
                    python = median_ms(lambda w=weights, s=size: maglev.build_ring(w, s))
            rows.append({"n": n, "size": size, "native_ms": round(native, 2),
                         "python_ms": None if python is None else round(python, 1)})
    return rows


def share_tvd(n: int, size: int, seed: int) -> float:
    """Total variation distance between ring shares and weight proportions."""
    weights = random_weights(n, seed)
    ring = maglev.build_ring(weights, size)
    shares = np.array([ring.shares()[k] for k in ring.order], dtype=float)
    props = np.array(ring.weights, dtype=float)
    return float(0.5 * np.abs(shares / size - props / props.sum()).sum())


def changed_counts(old: maglev.Ring, new: maglev.Ring, subject: str) -> tuple[int, int, int]:
    """(changed, of which involve `subject`, positions not owned by subject before)."""
    changed = maglev.diff_positions(old, new)
    old_owner = np.array(old.owners(), dtype=object)[changed]
    new_owner = np.array(new.owners(), dtype=object)[changed]
    involved = int(np.count_nonzero((old_owner == subject) | (new_owner == subject)))
    others = old.size - old.shares().get(subject, 0)
    return int(changed.size), involved, others


def scenarios(base: dict[str, int], rng: random.Random) -> dict[str, tuple[dict, dict, str]]:
    """One add, one remove and one doubling, each of a randomly chosen backend."""
    victim = rng.choice(sorted(base))
    removed = {k: v for k, v in base.items() if k != victim}
    newcomer = identity(len(base) + 10_000 + rng.randrange(1000))
    added = {**base, newcomer: rng.choice(sorted(base.values()))}
    doubled = {**base, victim: min(2 * base[victim], maglev.MAX_WEIGHT)}
    return {"remove": (base, removed, victim), "add": (base, added, newcomer),
            "reweight_x2": (base, doubled, victim)}


def disruption(n: int, kind: str) -> list[dict[str, object]]:
    """Aggregate TRIALS random add/remove/reweight changes at size DISRUPTION_SIZE."""
    rng = random.Random(f"{n}-{kind}")
    per_change: dict[str, list[tuple[int, int, int]]] = {}
    for trial in range(TRIALS):
        base = ({identity(i): 100 for i in range(n)} if kind == "equal"
                else random_weights(n, seed=trial))
        for change, (old_w, new_w, subject) in scenarios(base, rng).items():
            old = maglev.build_ring(old_w, DISRUPTION_SIZE)
            new = maglev.build_ring(new_w, DISRUPTION_SIZE)
            per_change.setdefault(change, []).append(changed_counts(old, new, subject))
    return [summarise(n, kind, change, rows) for change, rows in per_change.items()]


def summarise(n: int, kind: str, change: str, rows: list[tuple[int, int, int]]) -> dict:
    collateral = [changed - involved for changed, involved, _ in rows]
    pct_others = [100 * c / others for c, (_, _, others) in zip(collateral, rows, strict=True)]
    return {
        "n": n, "size": DISRUPTION_SIZE, "weights": kind, "change": change, "trials": len(rows),
        "changed_mean": round(statistics.mean(r[0] for r in rows), 1),
        "subject_mean": round(statistics.mean(r[1] for r in rows), 1),
        "collateral_mean": round(statistics.mean(collateral), 1),
        "collateral_max": max(collateral),
        "collateral_pct_of_others_mean": round(statistics.mean(pct_others), 3),
        "collateral_pct_of_others_max": round(max(pct_others), 3),
    }


def print_report(report: dict) -> None:
    print(f"native helper: {report['native']}   machine: {report['machine']}")
    print("\nbuild_ring, median of 5 (random weights 1..1000)")
    print(f"{'N':>6} {'M':>7} {'native ms':>10} {'python ms':>10}")
    for row in report["build"]:
        python = "-" if row["python_ms"] is None else f"{row['python_ms']:.1f}"
        print(f"{row['n']:>6} {row['size']:>7} {row['native_ms']:>10.2f} {python:>10}")
    print("\nshare TVD, random weights 1..1000, M=65537:",
          ", ".join(f"N={k}: {100 * v:.3f}%" for k, v in report["share_tvd"].items()))
    print(f"\ndisruption at M={DISRUPTION_SIZE}, {TRIALS} trials each; collateral = moved "
          "positions not owned by the changed backend before or after")
    print(f"{'N':>5} {'weights':>7} {'change':>12} {'changed':>8} {'subject':>8} "
          f"{'coll.mean':>9} {'coll.max':>8} {'%others mean':>12} {'%others max':>11}")
    for r in report["disruption"]:
        print(f"{r['n']:>5} {r['weights']:>7} {r['change']:>12} {r['changed_mean']:>8} "
              f"{r['subject_mean']:>8} {r['collateral_mean']:>9} {r['collateral_max']:>8} "
              f"{r['collateral_pct_of_others_mean']:>12.3f} "
              f"{r['collateral_pct_of_others_max']:>11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true",
                        help="skip the slow pure-Python timings at M=655373")
    args = parser.parse_args()
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "native": maglev.native_available(),
        "build": build_times(args.quick),
        "share_tvd": {n: share_tvd(n, DISRUPTION_SIZE, seed=n) for n in (10, 100, 1000)},
        "disruption": [row for n in DISRUPTION_COUNTS for kind in ("equal", "random")
                       for row in disruption(n, kind)],
    }
    print_report(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
