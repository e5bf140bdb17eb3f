"""The line-rate benchmark on variants of the balancer: what the flow lookup costs.

Each variant is a patch to bpf/ in benchmarks/variants/ (no-flow-read: the
ring answers established packets and the flow table is not read; one-read:
one 8-byte read of the flow's set in place of the lookup, nothing depending
on it; branch-free-compare: the key compares as mask arithmetic; early-read:
the flow's set read right after parsing, before the VIP lookup). For the
shipped program and each variant this copies the xdplb package to a
temporary directory with bpf/ patched, runs that copy's bench_linerate.py
in a child process (as root: it builds its own namespaces) and
prints the ratios side by side. Nothing in the checkout is changed.

    .venv/bin/python benchmarks/linerate_variants.py            # 1M flows, 3 backends
    .venv/bin/python benchmarks/linerate_variants.py --flows 1000 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import write_json

REPO = Path(__file__).resolve().parent.parent
VARIANTS = Path(__file__).resolve().parent / "variants"
SHIPPED = "shipped"


def variant_tree(name: str, root: Path) -> Path:
    """A copy of the benchmarks and the xdplb package under root, with bpf/ as
    the variant has it (the benchmarks import xdplb from ../daemon). Returns
    the copy of bench_linerate.py."""
    shutil.copytree(REPO / "benchmarks", root / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__", "variants"))
    package = root / "daemon" / "xdplb"
    shutil.copytree(REPO / "daemon" / "xdplb", package, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "bpf"))
    shutil.copytree(REPO / "bpf", package / "bpf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if name != SHIPPED:
        patch = VARIANTS / f"{name}.patch"
        subprocess.run(["git", "apply", "-p1", str(patch)], cwd=package / "bpf", check=True)
    return root / "benchmarks" / "bench_linerate.py"


def run_variant(name: str, bench_args: list[str], root: Path) -> list[dict]:
    bench = variant_tree(name, root / name)
    out = root / f"{name}.json"
    subprocess.run([sys.executable, str(bench), *bench_args, "--json", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["cases"]


def print_table(results: dict[str, list[dict]]) -> None:
    print(f"{'variant':<22}{'flows':>9}{'backends':>10}{'xdplb':>8}{'swap':>8}{'ratio':>8}"
          f"{'1 read':>8}{'conn hits':>11}")
    print(f"{'':<22}{'':>9}{'':>10}{'Mpps':>8}{'Mpps':>8}{'':>8}{'Mpps':>8}")
    for name, cases in results.items():
        for c in cases:
            print(f"{name:<22}{c['flows']:>9}{c['backends']:>10}{c['ours_mpps']:>8.2f}"
                  f"{c['mac_swap_mpps']:>8.2f}{c['ratio']:>8.3f}{c['one_read_mpps']:>8.2f}"
                  f"{c['conn_hit_fraction']:>11.1%}")


def main() -> None:
    known = sorted(p.stem for p in VARIANTS.glob("*.patch"))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=known, default=known)
    parser.add_argument("--flows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--backends", type=int, nargs="+", default=[3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-results/linerate-variants.json"))
    args = parser.parse_args()
    bench_args = ["--flows", *map(str, args.flows), "--backends", *map(str, args.backends),
                  "--rounds", str(args.rounds)]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="xdplb-variants-") as tmp:
        for name in [SHIPPED, *args.variants]:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_variant(name, bench_args, Path(tmp))
    print_table(results)
    write_json(args.json, {"meta": {"bench_args": bench_args}, "variants": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
