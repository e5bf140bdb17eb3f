"""The VM lab applies the namespace lab's plan: the same addresses and a valid state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xdplb.state import DesiredState, Limits, apply_changes, diff
from xdplb_lab import lab
from xdplb_lab import vm as vmlab

VAGRANTFILE = Path(__file__).resolve().parent.parent / "vagrant" / "Vagrantfile"


@pytest.mark.parametrize("backends", [1, 3, 16])
def test_lab_state_is_a_valid_document_over_the_lab_backends(backends: int) -> None:
    state = DesiredState.from_dict(vmlab.lab_state(backends))
    assert apply_changes(DesiredState(), diff(DesiredState(), state), Limits()) == state
    assert [str(k) for k in sorted(state.vips)] == [
        f"{lab.VIP_V4}:80/tcp", f"[{lab.VIP_V6}]:80/tcp"]
    v4, v6 = (state.vips[k] for k in sorted(state.vips))
    assert list(v4.backends) == [lab.backend_v4(i) for i in range(backends)]
    assert list(v6.backends) == [lab.backend_v6(i) for i in range(backends)]


def test_vagrantfile_uses_the_lab_address_plan() -> None:
    text = VAGRANTFILE.read_text()
    client_net = re.search(r'^CLIENT_NET = "([0-9.]+)"', text, re.M)[1]
    lb_net = re.search(r'^LB_NET = "([0-9.]+)"', text, re.M)[1]
    base, offset = re.search(r'def backend_net\(i\) = "([0-9.]+)\.#\{(\d+) \+ i\}"', text).groups()
    assert (f"{client_net}.2", f"{client_net}.1") == (lab.CLIENT_V4, lab.ROUTER_CLIENT_V4)
    assert (f"{lb_net}.2", f"{lb_net}.1") == (lab.LB_V4, lab.ROUTER_LB_V4)
    for i in range(lab.MAX_BACKENDS):
        net = f"{base}.{int(offset) + i}"
        assert (f"{net}.2", f"{net}.1") == (lab.backend_v4(i), lab.router_backend_v4(i))
    for role in ("router --backends", "backend --index", "lb --backends", "client"):
        assert f'provision(node.vm, "{role}' in text
