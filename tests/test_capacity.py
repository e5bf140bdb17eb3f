"""Capacity-aware weights: xdplb.capacity and xdplb_lab.load_server.

The control law, the churn budget, hysteresis, fallbacks and slow start run
on a fake clock with pushed reports (report()), and every ring is computed
here independently with maglev.build_ring from the weights apply() hands
over, so shares and positions moved are the rings' own. Two plants:

* open loop: a backend reports 3x target whatever its share (and the others
  report target);
* closed loop: load = demand x ring share / capacity, so cutting a slow
  backend's share lowers its load, as in a real fleet.

The polling tests scrape real HTTP endpoints on loopback (no root, no
namespaces): LoadServer in-process on 127.0.0.1-3 (one per backend, same
port), and `python -m xdplb_lab.load_server` as a process.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from xdplb import capacity as cap_mod
from xdplb import maglev
from xdplb.capacity import CapacityController, MalformedLoad, MemberLoad, parse_load
from xdplb.state import BackendSpec, Capacity, DesiredState, VipKey, VipSpec
from xdplb_lab.load_server import LoadServer, render

KEY = VipKey("10.0.0.10", 80, "tcp")
B = ("10.0.1.1", "10.0.1.2", "10.0.1.3")
RING = maglev.DEFAULT_SIZE
PUSH = Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000)


class Harness:
    """A controller on a fake clock, and the rings its weights build."""

    def __init__(self, capacity: Capacity = PUSH, backends: Mapping[str, int] | None = None,
                 slow_start_s: float = 0.0, ring_size: int = RING):
        self.now = 0.0
        self.lines: list[tuple[str, str]] = []
        self.applied = 0
        self.moves: list[tuple[float, int]] = []
        self.ring_size = ring_size
        self.configured = dict(backends or {a: 100 for a in B})
        self.spec = VipSpec(KEY, ring_size=ring_size, capacity=capacity,
                            slow_start_s=slow_start_s,
                            backends={a: BackendSpec(a, w) for a, w in self.configured.items()})
        self.ctl = CapacityController(
            self._apply, lambda e: self.lines.append((e.message(), e.backend)),
            clock=lambda: self.now)
        self.healthy: dict[tuple[VipKey, str], bool] = {}
        self.ctl.update(DesiredState({KEY: self.spec}), self.healthy)
        self.ring = self.build()

    def weights(self) -> dict[str, int]:
        out = dict(self.configured)
        out.update({a: w for (k, a), w in self.ctl.effective_weights().items() if k == KEY})
        return {a: (w if self.healthy.get((KEY, a), True) else 0) for a, w in out.items()}

    def build(self) -> maglev.Ring:
        return maglev.build_ring(self.weights(), self.ring_size)

    def _apply(self, effective: dict) -> None:
        self.applied += 1
        ring = self.build()
        self.moves.append((self.now, len(maglev.diff_positions(self.ring, ring))))
        self.ring = ring

    def resync(self) -> None:
        """After update(): the weights change without apply() (not adaptation)."""
        self.ring = self.build()

    def set_backends(self, backends: Mapping[str, int], **vip: object) -> None:
        self.configured = dict(backends)
        self.spec = VipSpec(KEY, ring_size=self.ring_size, capacity=vip.get(
            "capacity", self.spec.capacity), slow_start_s=vip.get(
            "slow_start_s", self.spec.slow_start_s),  # type: ignore[arg-type]
            backends={a: BackendSpec(a, w) for a, w in backends.items()})
        self.ctl.update(DesiredState({KEY: self.spec}), self.healthy)
        self.resync()

    def share(self, address: str) -> float:
        return self.ring.shares().get(address, 0) / self.ring_size

    def tick(self, loads: Mapping[str, float] | Callable[[], Mapping[str, float]],
             dt: float = 1.0) -> None:
        self.now += dt
        for address, value in (loads() if callable(loads) else loads).items():
            self.ctl.report(address, value)
        self.ctl.step()

    def status(self, address: str) -> MemberLoad:
        return self.ctl.status((KEY, address))

    def budget(self) -> int:
        return math.floor(self.spec.capacity.churn_budget * self.ring_size)

    def assert_budget_respected(self) -> int:
        """Every [t, t + window) holds at most the budget; returns the largest sum."""
        window = self.spec.capacity.churn_window_s
        worst = 0
        for start, _ in self.moves:
            total = sum(n for t, n in self.moves if start <= t < start + window)
            assert total <= self.budget(), (start, total, self.budget())
            worst = max(worst, total)
        # and the controller's own accounting agrees with the rings built here
        used = sum(n for t, n in self.moves if self.now - window < t <= self.now)
        assert self.ctl.churn(KEY) == (used, self.budget())
        return worst


def adaptation_lines(h: Harness) -> list[str]:
    return [m for m, _ in h.lines if re.search(r"weight \d+ -> \d+", m)]


# --- reading a Prometheus page ---------------------------------------------------------------

PAGE = """# HELP q queue depth
# TYPE q gauge
q{model="a",gpu="0"} 2
q{model="a",gpu="1"} 3.5
q{model="b",gpu="0"} 7
q_total 100
qq 1000
other{model="a"} 9
"""


def test_parse_load_sums_the_samples_matching_every_label():
    assert parse_load(PAGE, "q", {}) == 12.5
    assert parse_load(PAGE, "q", {"model": "a"}) == 5.5
    assert parse_load(PAGE, "q", {"model": "a", "gpu": "1"}) == 3.5
    assert parse_load("r 4\nr{x=\"1\"} 1\n", "r", {"x": ""}) == 4  # absent label matches ""
    assert parse_load("q_total 3\n", "q_total", {}) == 3
    with pytest.raises(MalformedLoad, match=r'no sample of q\{model="c"\}'):
        parse_load(PAGE, "q", {"model": "c"})


@pytest.mark.parametrize(("page", "reason"), [
    ("<html><body>oops</body></html>", "no sample of q"),
    ("", "no sample of q"),
    ('q{model="a" 3\n', "q: "),
    ("q three\n", "q: "),
    ("q NaN\n", "q is nan: not a load"),
    ("q -1\n", "q is -1: not a load"),
    ("q +Inf\n", "q is inf: not a load"),
])
def test_parse_load_refuses_garbage_with_a_reason(page, reason):
    with pytest.raises(MalformedLoad) as info:
        parse_load(page, "q", {})
    assert str(info.value).startswith(reason)


def test_load_server_renders_a_number_as_a_gauge_and_anything_else_verbatim():
    status, body = render("3.25\n", "xdplb_load", 'gpu="0"')
    assert status == 200 and parse_load(body, "xdplb_load", {"gpu": "0"}) == 3.25
    assert render("garbage {", "xdplb_load", "") == (200, "garbage {")
    assert render(None, "xdplb_load", "")[0] == 503


# --- the control law, on the open-loop plant --------------------------------------------------


def test_a_backend_at_three_times_target_loses_its_share_within_the_budget():
    """b0 reports 3x target, b1 and b2 report target, whatever the weights. The law
    cuts b0's factor to min_factor (0.1) and, normalising, raises the others to
    keep the average at 1: b0 ends with about 10 / 300 of the ring (3.3%, from
    33.3%) within 75 intervals. That takes ~20,000 positions: the budget (3,276
    per 10 s) is what paces it, and no 10-s window ever holds more."""
    h = Harness()
    assert h.share(B[0]) == pytest.approx(1 / 3, abs=0.002)
    reached = None
    for i in range(1, 121):
        h.tick({B[0]: 3.0, B[1]: 1.0, B[2]: 1.0})
        if reached is None and h.share(B[0]) <= 0.04:
            reached = i
    assert reached is not None and reached <= 75, reached
    assert h.status(B[0]).factor <= 0.1 * 1.1  # min_factor, within the hysteresis
    assert h.share(B[0]) <= 0.04
    assert min(h.share(B[1]), h.share(B[2])) >= 0.47
    # the shares are those of the ring the controller's weights build
    assert maglev.build_ring(h.weights()).shares() == h.ring.shares()
    worst = h.assert_budget_respected()
    assert worst >= 0.9 * h.budget()  # the budget was binding, yet never exceeded
    line = adaptation_lines(h)[0]
    for needle in ("load 3 vs target 1", "factor 1 ->", "positions moved", "budget",
                   "left in 10 s"):
        assert needle in line, line


def test_partial_steps_when_the_budget_is_nearly_spent():
    """A budget of 1% (655 positions per 10 s) cannot take b0's first step whole:
    the controller takes part of it, then defers, and says so."""
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=0.01))
    for _ in range(30):
        h.tick({B[0]: 3.0, B[1]: 1.0, B[2]: 1.0})
    h.assert_budget_respected()
    text = "\n".join(m for m, _ in h.lines)
    assert "partial step" in text or "one weight unit" in text
    assert "deferred: it does not fit the churn budget" in text
    assert h.share(B[0]) < 1 / 3


# --- closed loop: load follows the ring --------------------------------------------------------


def plant(h: Harness, capacity: dict[str, float], demand: float) -> Callable[[], dict]:
    """Each backend's load: demand x its ring share / its capacity."""
    return lambda: {a: demand * h.share(a) / capacity[a] for a in B}


def test_share_follows_a_slow_backend_and_returns_when_it_recovers():
    """b0 drops to a third of the others' capacity: equal loads need shares 1/7,
    3/7, 3/7 (demand 3.6 x target: everyone above target, so equal loads is the
    best split). Then b0 recovers and its share returns to 1/3 (within the
    hysteresis), each within 60 intervals, within the budget throughout."""
    h = Harness()
    capacity = {B[0]: 1 / 3, B[1]: 1.0, B[2]: 1.0}
    loads = plant(h, capacity, demand=3.6)
    for _ in range(60):
        h.tick(loads)
    assert 0.125 <= h.share(B[0]) <= 0.165, h.share(B[0])
    assert h.status(B[0]).load == pytest.approx(h.status(B[1]).load, rel=0.15)
    capacity[B[0]] = 1.0
    for _ in range(60):
        h.tick(loads)
    assert 0.30 <= h.share(B[0]) <= 0.367, h.share(B[0])
    h.assert_budget_respected()


def test_a_comfortable_vip_is_left_alone():
    """Everyone under target (demand 2.4 x target, b0 a bit slower): nobody needs
    relief, so nothing moves."""
    h = Harness()
    loads = plant(h, {B[0]: 0.8, B[1]: 1.0, B[2]: 1.0}, demand=2.4)
    for _ in range(50):
        h.tick(loads)
    assert h.applied == 0 and h.ctl.effective_weights() == {}


# --- hysteresis, fallbacks ----------------------------------------------------------------------


def test_noise_of_five_percent_around_target_changes_nothing():
    h = Harness()
    rng = random.Random(7)
    for _ in range(300):
        h.tick({a: 1.0 + rng.uniform(-0.05, 0.05) for a in B})
    assert h.applied == 0
    assert h.ctl.effective_weights() == {}
    assert adaptation_lines(h) == []
    assert {h.status(a).state for a in B} == {"ok"}


def test_noise_on_an_overloaded_vip_does_not_move_balanced_members():
    """All three at 1.5x target +-5% (over target, so the law is on): the loads
    are equal, so no member is off its ideal factor by more than the hysteresis."""
    h = Harness()
    rng = random.Random(11)
    for _ in range(300):
        h.tick({a: 1.5 * (1 + rng.uniform(-0.05, 0.05)) for a in B})
    assert h.applied == 0


def cut_b0(h: Harness, intervals: int = 40) -> None:
    for _ in range(intervals):
        h.tick({B[0]: 3.0, B[1]: 1.0, B[2]: 1.0})
    assert h.status(B[0]).factor < 0.5


def test_stale_samples_fall_back_to_the_configured_weight():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=1.0))
    cut_b0(h)
    last = h.now
    for _ in range(5):  # b0 falls silent; 5 s old is not yet stale
        h.tick({B[1]: 1.0, B[2]: 1.0})
    assert h.status(B[0]).state == "ok" and h.status(B[0]).age_s == pytest.approx(5.0)
    h.tick({B[1]: 1.0, B[2]: 1.0})
    st = h.status(B[0])
    assert st.state == "stale" and st.age_s == pytest.approx(h.now - last)
    assert st.factor == 1.0 and h.weights()[B[0]] == 100
    assert (KEY, B[0]) not in h.ctl.effective_weights()
    said = [m for m, b in h.lines if b == B[0] and "stale" in m]
    assert said and "configured weight applies (factor 1.0)" in said[0]
    assert any("fallback: stale" in m for m in adaptation_lines(h))
    h.tick({a: 1.0 for a in B})  # a fresh sample: the average starts afresh
    assert h.status(B[0]).state == "ok" and h.status(B[0]).load == 1.0
    assert any("load of 10.0.1.1 is back" in m for m, _ in h.lines)


def test_a_fallback_is_paced_by_the_budget_too():
    h = Harness()
    cut_b0(h, 80)
    assert h.weights()[B[0]] <= 12
    for _ in range(8):
        h.tick({B[1]: 1.0, B[2]: 1.0})
    assert h.status(B[0]).state == "stale"
    for _ in range(60):
        if h.status(B[0]).factor == 1.0:
            break
        h.tick({B[1]: 1.0, B[2]: 1.0})
    assert h.status(B[0]).factor == 1.0 and h.weights()[B[0]] == 100
    h.assert_budget_respected()


def test_a_backend_reporting_zero_climbs_at_most_doubling_per_step():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=1.0))
    factors = []
    for _ in range(8):
        h.tick({B[0]: 0.0, B[1]: 1.5, B[2]: 1.5})
        factors.append(h.status(B[0]).factor)
    assert all(b <= a * 2 + 1e-9 for a, b in zip([1.0, *factors], factors, strict=False))
    assert factors[-1] > 1.5 and max(factors) <= 2.0  # toward max_factor


def test_weights_are_never_zero():
    h = Harness(backends={B[0]: 3, B[1]: 100, B[2]: 100},
                capacity=Capacity(source="push", target=1.0, interval_ms=1000,
                                  stale_after_ms=5000, churn_budget=1.0))
    for _ in range(60):
        h.tick({B[0]: 50.0, B[1]: 1.0, B[2]: 1.0})
        assert h.weights()[B[0]] >= 1
    assert h.status(B[0]).factor <= 0.1 * 1.05
    assert h.ctl.effective_weights()[(KEY, B[0])] == 1


# --- slow start ---------------------------------------------------------------------------------

RAMP = Capacity(churn_budget=1.0)  # no load source; the budget out of the way


def test_slow_start_ramps_linearly_from_a_tenth_to_full():
    h = Harness(RAMP, slow_start_s=10.0)
    assert h.ctl.effective_weights() == {}  # present from the start: no ramp
    new = "10.0.1.4"
    h.set_backends({**h.configured, new: 100})
    st = h.status(new)
    assert (st.state, st.slow_start, st.factor, st.load) == ("none", 0.1, 1.0, None)
    assert h.ctl.effective_weights() == {(KEY, new): 10}
    seen = {}
    for _ in range(12):
        h.tick({})
        seen[h.now] = (h.status(new).slow_start, h.weights()[new])
    assert seen[5.0][0] == pytest.approx(0.55) and seen[5.0][1] == 55
    assert seen[1.0][0] == pytest.approx(0.19) and seen[1.0][1] == 19
    assert seen[10.0] == (1.0, 100) and seen[12.0] == (1.0, 100)
    assert h.ctl.effective_weights() == {}
    assert any("starts its slow start" in m for m, _ in h.lines)
    assert any("slow start 0.55" in m for m in adaptation_lines(h))
    assert h.ctl.churn(KEY) == (0, h.budget())  # the operator's ramp is not charged


def test_a_backend_back_from_down_ramps_again_and_starts_afresh():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=1.0), slow_start_s=4.0)
    cut_b0(h)
    h.healthy[(KEY, B[0])] = False
    h.ctl.update(DesiredState({KEY: h.spec}), h.healthy)
    h.resync()
    assert h.share(B[0]) == 0
    h.healthy[(KEY, B[0])] = True
    h.ctl.update(DesiredState({KEY: h.spec}), h.healthy)
    h.resync()
    st = h.status(B[0])
    assert (st.slow_start, st.factor, st.state, st.load) == (0.1, 1.0, "waiting", None)
    assert h.weights()[B[0]] == 10
    for _ in range(4):  # its load is low while it ramps: its factor waits
        h.tick({B[0]: 0.2, B[1]: 1.0, B[2]: 1.0})
    assert h.status(B[0]).slow_start == 1.0 and h.weights()[B[0]] == 100


def test_slow_start_weight_is_never_zero():
    h = Harness(RAMP, slow_start_s=10.0)
    h.set_backends({**h.configured, "10.0.1.4": 3})
    assert h.status("10.0.1.4").slow_start == 0.1
    assert h.ctl.effective_weights() == {(KEY, "10.0.1.4"): 1}


def test_slow_start_holds_its_schedule_under_the_default_churn_budget():
    """The outside probe's case: two backends up, capacity none, the default budget
    (5% of the ring per 10 s), slow start 10 s, a third backend added. Its weight
    stays on the line 100 x (0.1 + 0.9 t / 10), never more than one step (1 s, a
    tenth of the ramp) behind it, ends at 100 at 10 s; nothing is deferred and
    nothing is charged to the budget."""
    def line(t: float) -> float:
        return 100 * (0.1 + 0.9 * min(1.0, max(0.0, t) / 10.0))

    h = Harness(Capacity(), backends={B[0]: 100, B[1]: 100}, slow_start_s=10.0)
    h.set_backends({B[0]: 100, B[1]: 100, B[2]: 100})
    assert h.weights()[B[2]] == 10
    while h.now < 12.0:
        h.tick({}, dt=0.25)
        weight = h.weights()[B[2]]
        assert line(h.now - 1.0) - 1 <= weight <= line(h.now) + 1, (h.now, weight)
    assert h.status(B[2]).slow_start == 1.0 and h.weights()[B[2]] == 100
    assert abs(h.share(B[2]) - 1 / 3) < 0.01
    assert not any("deferred" in m for m, _ in h.lines)
    assert h.ctl.churn(KEY) == (0, h.budget())
    assert any("not charged to the churn budget" in m for m in adaptation_lines(h))


def test_slow_start_of_many_backends_is_not_paced_by_the_budget():
    backends = {f"10.0.2.{i}": 100 for i in range(20)}
    h = Harness(Capacity(), backends=backends, slow_start_s=2.0)
    h.set_backends({**backends, "10.0.3.1": 100, "10.0.3.2": 100})
    for _ in range(4):
        h.tick({}, dt=0.5)
    assert h.now == 2.0
    assert h.status("10.0.3.1").slow_start == 1.0 == h.status("10.0.3.2").slow_start


def test_a_ramp_with_tiny_weights_still_runs():
    h = Harness(Capacity(), backends={B[0]: 5, B[1]: 5}, slow_start_s=10.0)
    h.set_backends({B[0]: 5, B[1]: 5, B[2]: 5})
    assert h.status(B[2]).slow_start == 0.1
    for _ in range(10):
        h.tick({}, dt=1.0)
    assert h.status(B[2]).slow_start == 1.0 and h.weights()[B[2]] == 5


def test_capacity_steps_stay_within_the_budget_while_a_ramp_runs_beside_them():
    cap = Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000)
    h = Harness(cap, backends={a: 100 for a in B}, slow_start_s=4.0)
    h.set_backends({**{a: 100 for a in B}, "10.0.1.9": 100})
    charged = []
    for _ in range(12):
        before = h.ctl.churn(KEY)[0]
        h.tick({B[0]: 3.0, B[1]: 0.5, B[2]: 0.5})
        charged.append(h.ctl.churn(KEY)[0] - before)
        assert h.ctl.churn(KEY)[0] <= h.budget()
    assert h.status("10.0.1.9").slow_start == 1.0
    assert h.weights()[B[0]] < 100  # the overloaded one shed load meanwhile


# --- reports, updates, status ---------------------------------------------------------------------


def test_report_reaches_every_push_vip_of_the_backend():
    other = VipKey("10.0.0.11", 443, "tcp")
    polled = VipKey("10.0.0.12", 443, "tcp")
    ctl = CapacityController(lambda w: None, lambda e: None, clock=lambda: 0.0)
    ctl.update(DesiredState({
        KEY: VipSpec(KEY, capacity=PUSH, backends={a: BackendSpec(a) for a in B}),
        other: VipSpec(other, capacity=PUSH, backends={B[0]: BackendSpec(B[0])}),
        polled: VipSpec(polled, capacity=Capacity(source="prometheus", metric="q", port=9100,
                                                  target=1.0),
                        backends={B[0]: BackendSpec(B[0])}),
    }), {})
    assert ctl.report(B[0], 2.0) == 2
    assert ctl.report(B[0], 2.0, vip=other) == 1
    assert ctl.report(B[0], 2.0, vip=polled) == 0
    assert ctl.report("10.9.9.9", 2.0) == 0
    assert ctl.report(B[1], 0) == 1
    assert ctl.status((other, B[0])).load == 2.0
    assert ctl.status((polled, B[0])).state == "waiting"
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="not a load"):
            ctl.report(B[0], bad)
    with pytest.raises(ValueError):
        ctl.report("not-an-address", 1.0)
    with pytest.raises(ValueError):
        ctl.report(B[0], True)  # type: ignore[arg-type]


def test_update_forgets_removed_members_and_never_weights_drained_ones():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=1.0))
    cut_b0(h)
    spec = VipSpec(KEY, capacity=h.spec.capacity, backends={
        B[0]: BackendSpec(B[0], drained=True), B[1]: BackendSpec(B[1])})
    h.ctl.update(DesiredState({KEY: spec}), {})
    assert all(a != B[0] for _, a in h.ctl.effective_weights())
    with pytest.raises(KeyError):
        h.ctl.status((KEY, B[2]))
    h.ctl.update(DesiredState({}), {})
    assert h.ctl.effective_weights() == {}
    with pytest.raises(KeyError):
        h.ctl.status((KEY, B[1]))


def test_a_changed_load_source_forgets_the_loads():
    h = Harness()
    h.tick({a: 1.0 for a in B})
    assert h.status(B[0]).load == 1.0
    h.set_backends(h.configured, capacity=Capacity(source="prometheus", metric="q",
                                                   port=9100, target=1.0))
    assert h.status(B[0]) == MemberLoad(None, None, "waiting", 1.0, 1.0)


def test_status_of_a_vip_without_a_source():
    h = Harness(Capacity())
    assert h.status(B[0]) == MemberLoad(None, None, "none", 1.0, 1.0)


# --- polling real endpoints -----------------------------------------------------------------

POLL = dict(source="prometheus", metric="xdplb_load", target=1.0, interval_ms=100,
            timeout_ms=50, stale_after_ms=1000, churn_budget=1.0)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def loopback_servers(tmp_path: Path, values: list[str]) -> tuple[list[LoadServer], list[Path]]:
    """One LoadServer per backend, on 127.0.0.1, .2, .3 and the same port."""
    files = [tmp_path / f"load{i}" for i in range(len(values))]
    for f, v in zip(files, values, strict=True):
        f.write_text(v)
    first = LoadServer("127.0.0.1", 0, files[0])
    port = first.server_address[1]
    servers = [first] + [LoadServer(f"127.0.0.{i + 1}", port, files[i])
                         for i in range(1, len(values))]
    for s in servers:
        s.start()
    return servers, files


def test_polling_a_dead_or_garbage_endpoint_falls_back(tmp_path):
    servers, files = loopback_servers(tmp_path, ["3", "1", "1"])
    port = servers[0].server_address[1]
    addrs = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    # loopback backends: not valid in a desired state, fine for the controller
    spec = VipSpec(KEY, capacity=Capacity(port=port, **POLL),
                   backends={a: BackendSpec(a) for a in addrs})
    lines: list[str] = []
    applied: list[dict] = []

    async def scenario() -> None:
        ctl = CapacityController(applied.append, lambda e: lines.append(e.message()))
        ctl.update(DesiredState({KEY: spec}), {})
        task = asyncio.create_task(ctl.run())
        try:
            await until(lambda: ctl.status((KEY, addrs[0])).factor < 0.9)
            st = ctl.status((KEY, addrs[0]))
            assert st.state == "ok" and st.load is not None and st.age_s < 1.0
            assert applied and (KEY, addrs[0]) in applied[-1]
            servers[0].shutdown()
            servers[0].server_close()
            # the notify line comes with the next adaptation step after the scrape
            await until(lambda: any(
                "http://127.0.0.1:" in m and "unreachable: refused" in m
                and "configured weight applies (factor 1.0)" in m for m in lines))
            st = ctl.status((KEY, addrs[0]))
            assert (st.state, st.factor) == ("unreachable: refused", 1.0)
            assert (KEY, addrs[0]) not in ctl.effective_weights()
            files[1].write_text("<html>not metrics</html>")
            await until(lambda: ctl.status((KEY, addrs[1])).state.startswith("malformed: ")
                        and ctl.status((KEY, addrs[1])).factor == 1.0)  # the next step
            assert ctl.status((KEY, addrs[1])).state == "malformed: no sample of xdplb_load"
            files[2].unlink()
            await until(lambda: ctl.status((KEY, addrs[2])).state == "unreachable: status 503")
            assert ctl.scrapes_run > 0
        finally:
            await ctl.close()
            await asyncio.wait_for(task, 5)

    try:
        asyncio.run(scenario())
    finally:
        for s in servers[1:]:
            s.shutdown()
            s.server_close()


def test_polling_a_load_server_process(tmp_path):
    load = tmp_path / "load"
    load.write_text("2.5\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdplb_lab.load_server", "--host", "127.0.0.1", "--port", "0",
         "--file", str(load), "--labels", 'model="llama"'],
        stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"load server listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        port = int(match[1])
        spec = VipSpec(KEY, capacity=Capacity(port=port, labels='model="llama"', **POLL),
                       backends={"127.0.0.1": BackendSpec("127.0.0.1")})
        member = (KEY, "127.0.0.1")

        async def scenario() -> None:
            ctl = CapacityController(lambda w: None, lambda e: None)
            ctl.update(DesiredState({KEY: spec}), {})
            task = asyncio.create_task(ctl.run())
            try:
                await until(lambda: ctl.status(member).state == "ok")
                assert ctl.status(member).load == 2.5  # the first sample as is
                load.write_text("4.5\n")
                await until(lambda: ctl.status(member).load > 4.4)  # smoothed toward it
                proc.terminate()
                proc.wait(5)
                await until(lambda: ctl.status(member).state == "unreachable: refused")
            finally:
                await ctl.close()
                await asyncio.wait_for(task, 5)

        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()


def test_scrape_reasons(tmp_path):
    servers, _ = loopback_servers(tmp_path, ["1"])
    port = servers[0].server_address[1]

    async def scenario() -> None:
        assert "xdplb_load 1.0" in await cap_mod.scrape("127.0.0.1", port, "/metrics", 1.0)
        with pytest.raises(cap_mod.ScrapeError, match="status 404"):
            await cap_mod.scrape("127.0.0.1", port, "/nope", 1.0)
        servers[0].shutdown()
        servers[0].server_close()
        with pytest.raises(ConnectionRefusedError):
            await cap_mod.scrape("127.0.0.1", port, "/metrics", 1.0)

    asyncio.run(scenario())


def test_an_undrained_backend_ramps_and_a_removed_source_restores_the_weights():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=1000, stale_after_ms=5000,
                         churn_budget=1.0), slow_start_s=10.0)
    cut_b0(h)
    h.ctl.update(DesiredState({KEY: VipSpec(KEY, capacity=h.spec.capacity, slow_start_s=10.0,
                                            backends={**h.spec.backends, B[2]: BackendSpec(
                                                B[2], drained=True)})}), {})
    h.ctl.update(DesiredState({KEY: h.spec}), {})  # undrained
    assert h.status(B[2]).slow_start == 0.1 and h.status(B[2]).factor == 1.0
    h.set_backends(h.configured, capacity=Capacity(churn_budget=1.0))  # source none
    assert h.status(B[0]).factor == 1.0 and h.status(B[0]).state == "none"
    assert h.ctl.effective_weights() == {(KEY, B[2]): 10}


def test_the_law_runs_once_per_interval_while_a_ramp_ticks_faster():
    h = Harness(Capacity(source="push", target=1.0, interval_ms=5000, stale_after_ms=15000,
                         churn_budget=1.0), slow_start_s=4.0)
    h.set_backends({**h.configured, "10.0.1.4": 100})
    changes = []
    for _ in range(40):  # 20 s in 0.5 s ticks
        before = h.status(B[0]).factor
        h.tick({B[0]: 3.0, B[1]: 1.0, B[2]: 1.0, "10.0.1.4": 1.0}, dt=0.5)
        if h.status(B[0]).factor != before:
            changes.append(h.now)
    assert len(changes) >= 3
    assert all((b - a) % 5 == 0 for a, b in itertools.pairwise(changes)), changes
    assert h.status("10.0.1.4").slow_start == 1.0  # ramped in 0.4 s ticks
    assert any("slow start 0.325" in m for m in adaptation_lines(h))  # 0.1 + 0.9 x 1/4
