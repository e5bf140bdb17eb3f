"""What the tests that drive the real lbd share: running lbctl, applying a document,
and an lbd that starts each test empty."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EMPTY_STATE: dict[str, Any] = {"version": 1, "vips": []}


def ok(lbd: Any, *args: str) -> str:
    """lbctl's output, asserting it succeeded."""
    result = lbd.lbctl(*args)
    assert result.returncode == 0, f"lbctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def apply_doc(lbd: Any, doc: dict[str, Any]) -> None:
    """`lbctl apply -f` of a document written to lbd's work dir."""
    path = lbd.workdir / "apply.json"
    path.write_text(json.dumps(doc))
    ok(lbd, "apply", "-f", str(path))


def empty_for_each_test(lbd: Any) -> Iterator[Any]:
    """A fixture body: lbd running and empty for the test, and left empty after it."""
    running_and_empty(lbd)
    yield lbd
    if lbd.proc is not None and lbd.proc.poll() is None:
        apply_doc(lbd, EMPTY_STATE)


def running_and_empty(lbd: Any) -> Any:
    """lbd started if it is not running, with no VIP."""
    if lbd.proc is None or lbd.proc.poll() is not None:
        lbd.start()
    apply_doc(lbd, EMPTY_STATE)
    return lbd


@contextlib.contextmanager
def lab_with_lbd(prefix: str, workdir: Path, sizes: Any, n_backends: int = 3,
                 http: bool = True, config_extra: str = "",
                 bare_backends: bool = False) -> Iterator[tuple[Any, Any]]:
    """A namespace lab (client, router, LB, backends with HTTP servers) and a running
    lbd on its LB, both torn down on the way out, even after a failure: (topo, lbd).
    Bare backends are addressed and routed, and serve HTTP, but have no VIP on lo,
    no DSR sysctls and no decapsulator."""
    from tests.conftest import require_root

    require_root()
    from xdplb_lab import lab as labmod
    from xdplb_lab.daemon import LabLbd

    with labmod.Lab(prefix=prefix) as lab:
        topo = labmod.build_lb_lab(lab, n_backends=n_backends,
                                   configure_backends=not bare_backends)
        if http:
            labmod.start_http_backends(topo, decap=not bare_backends)
        lbd = LabLbd(topo, workdir, sizes=sizes, config_extra=config_extra)
        lbd.start()
        try:
            yield topo, lbd
        finally:
            lbd.close()
