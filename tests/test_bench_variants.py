"""benchmarks/linerate_variants.py's patches still apply to bpf/ and the
patched balancer still compiles and passes the verifier, so the README's
variant table stays reproducible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import linerate_variants  # noqa: E402

VARIANTS = sorted(p.stem for p in linerate_variants.VARIANTS.glob("*.patch"))

LOAD = """
import sys
sys.path.insert(0, sys.argv[1])
from xdplb import datapath
assert datapath.__file__.startswith(sys.argv[1]), datapath.__file__
bal = datapath.Balancer(datapath.MapSizes(max_vips=2, max_backends=4, ring_entries=13,
                                          conn_entries=64))
print(bal.prog_fd > 0)
bal.close()
"""


def test_every_variant_is_listed() -> None:
    assert VARIANTS == ["branch-free-compare", "early-read", "no-flow-read", "one-read"]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_applies_compiles_and_loads(name: str, tmp_path: Path) -> None:
    bench = linerate_variants.variant_tree(name, tmp_path)
    daemon = bench.parent.parent / "daemon"
    patched = (daemon / "xdplb" / "bpf" / "balancer.c").read_text()
    assert patched != (REPO / "bpf" / "balancer.c").read_text()
    assert "variant" in patched
    result = subprocess.run([sys.executable, "-c", LOAD, str(daemon)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "True\n"
