"""The line-rate benchmark in its quickest form: it must keep working wherever
the tests run, whichever generator the kernel allows (a generator that stops
working fails here, not in a later `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.netns
BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_linerate.py"
FRAMES = 20_000
PROGRAMS = ("floor", "mac_swap", "one_read", "xdplb", "table")


@pytest.mark.parametrize("generator", ["auto", "trafgen"])
def test_the_quickest_line_rate_run_fills_its_table(generator: str, tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "linerate.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--flows", "1000", "--backends", "3", "--rounds", "1",
         "--frames", str(FRAMES), "--max-seconds", "20", "--generator", generator,
         "--json", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    used = data["meta"]["generator"]
    assert used == "trafgen" if generator == "trafgen" else used in ("live-frames", "trafgen")
    if generator == "auto" and used == "trafgen":
        assert "live frames refused here" in result.stderr
    assert result.stdout.startswith("generator: ")
    [case] = data["cases"]
    assert (case["flows"], case["backends"]) == (1000, 3)
    assert case["sent"] == dict.fromkeys(PROGRAMS, FRAMES)
    assert case["lost"] == dict.fromkeys(PROGRAMS, 0)
    assert case["backends_used"] == 3
    assert case["settled_fraction"] + case["conn_hit_fraction"] == pytest.approx(1.0)
    for key in ("ours_mpps", "mac_swap_mpps", "table_mpps", "one_read_mpps"):
        assert case[key] > 0, key
