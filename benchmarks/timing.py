"""Timing and reporting shared by the benchmarks (run as scripts: this directory is on
sys.path)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of `fn` over `repeats` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def write_json(path: Path, report: object) -> None:
    """The benchmark's figures as JSON at `path`, its directory made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
