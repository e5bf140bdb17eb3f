"""Latency of one memory read by the size of the array read, inside a BPF program.

What a flow lookup pays once the table outgrows the caches. lab/bpf/bench_memprobe.c's
bench_memlatency makes 256 reads of a BPF array per run, each at a
pseudo-random slot computed from the word read before it, so no two overlap;
BPF_PROG_TEST_RUN's duration / 256 is one read's latency, TLB walk included.
Pinned to one CPU, median of --rounds runs of --runs repeats per size. The
line-rate benchmark's flow table at 1M flows is 128 MiB.

    .venv/bin/python benchmarks/bench_memlatency.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# Lets the benchmark run from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from timing import write_json

from xdplb_lab.programs import MemoryProbe

SIZES_KIB = [128, 1024, 8 * 1024, 32 * 1024, 128 * 1024]


def measure(size_kib: int, rounds: int, runs: int) -> list[float]:
    probe = MemoryProbe(size_kib * 1024)
    try:
        probe.read_latency_ns(runs)  # touches the pages once
        return [probe.read_latency_ns(runs) for _ in range(rounds)]
    finally:
        probe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000, help="runs of 256 reads per round")
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=SIZES_KIB)
    parser.add_argument("--json", type=Path, default=Path("bench-results/memlatency.json"))
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    results = []
    print(f"{'array':>10}{'ns per read':>13}{'min':>8}{'max':>8}")
    for size in args.sizes_kib:
        samples = measure(size, args.rounds, args.runs)
        results.append({"size_kib": size, "median_ns": statistics.median(samples),
                        "samples_ns": samples})
        print(f"{_size(size):>10}{statistics.median(samples):>13.1f}{min(samples):>8.1f}"
              f"{max(samples):>8.1f}")
    write_json(args.json, {"meta": vars(args) | {"json": str(args.json)}, "sizes": results})
    print(f"wrote {args.json}")


def _size(kib: int) -> str:
    return f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"


if __name__ == "__main__":
    main()
