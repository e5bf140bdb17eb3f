"""The controller's state per VIP and member, and the steps it wants (the policy)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from xdplb import maglev
from xdplb.reconciler import Runtime, plan_vip
from xdplb.state import (
    NO_CAPACITY,
    Capacity,
    VipSpec,
)

GAIN = 0.25
MAX_STEP = 2.0  # one step at most halves or doubles a factor
SLOW_START_FLOOR = 0.1  # where a ramp starts, as a fraction of the weight
SLOW_START_TICK_S = 1.0  # adaptation period of a VIP with slow start but no load source
MAX_CONCURRENT_SCRAPES = 256
JITTER = 0.1
APPLY_RETRY_S = 1.0
MAX_HALVINGS = 8
MAX_TRIES = 5  # ring builds spent finding how many members' steps fit the budget
MAX_SINGLES = 4  # members tried one unit at a time when no interpolated step fits
EPS = 1e-9
RING_CACHE = 4
SETTLE = 4  # a moving member stops within hysteresis / SETTLE of its ideal factor
NOISE_Z = 2.0  # and never moves on less than this many standard errors of its load
LOAD_FLOOR = 0.01  # a load of 0 counts as 1% of target: far below, yet finite


@dataclass(frozen=True)
class MemberLoad:
    """What status shows per VIP backend."""

    load: float | None  # smoothed load, None when none yet
    age_s: float | None  # seconds since the last sample
    state: str  # none | ok | stale | unreachable: ... | malformed: ... | waiting
    factor: float  # capacity factor applied (1.0 = configured weight)
    slow_start: float  # slow-start factor in (0, 1], 1.0 = fully ramped


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass
class Member:
    weight: int  # configured
    drained: bool
    healthy: bool
    load: float | None = None  # smoothed
    sample_at: float | None = None  # clock() of the last good sample
    error: str = ""  # "unreachable: ..." / "malformed: ...": the last try failed
    factor: float = 1.0  # applied capacity factor
    ramp: float = 1.0  # applied slow-start factor
    ramp_from: float | None = None  # clock() the ramp started; None: not ramping
    said: str = "ok"  # the last state a notify line told about
    deferred: bool = False  # a wanted change is held back (said once)
    moving: bool = False  # past the hysteresis, not yet back within a quarter of it
    mean: float = 0.0  # exponentially weighted mean of the samples (no prediction)
    variance: float = 0.0  # and their variance around it

    @property
    def serving(self) -> bool:
        return self.weight > 0 and not self.drained

    def effective(self, factor: float | None = None, ramp: float | None = None) -> int:
        if not self.serving:
            return 0
        value = self.weight * (self.factor if factor is None else factor) * (
            self.ramp if ramp is None else ramp)
        return min(maglev.MAX_WEIGHT, max(1, round_half_up(value)))


@dataclass
class VipState:
    spec: VipSpec
    members: dict[str, Member]
    next_due: float  # the next step (slow start may step between load intervals)
    load_due: float  # the next step that looks at loads: once per interval
    moves: deque[tuple[float, int]] = field(default_factory=deque)
    rings: dict[tuple[object, ...], maglev.Ring] = field(default_factory=dict)

    @property
    def capacity(self) -> Capacity:
        return self.spec.capacity

    @property
    def source(self) -> str:
        return self.spec.capacity.source

    @property
    def active(self) -> bool:
        return self.source != "none" or self.spec.slow_start_s > 0

    @property
    def window_s(self) -> float:
        w = self.capacity.churn_window_s
        return w if isinstance(w, int | float) and w > 0 else NO_CAPACITY.churn_window_s

    @property
    def budget(self) -> int:
        b = self.capacity.churn_budget
        b = b if isinstance(b, int | float) and 0 < b <= 1 else NO_CAPACITY.churn_budget
        return math.floor(b * self.spec.ring_size + EPS)

    def used(self, now: float) -> int:
        while self.moves and self.moves[0][0] <= now - self.window_s:
            self.moves.popleft()
        return sum(n for _, n in self.moves)

    def period(self) -> float:
        """Until the next step: the load interval (load_due), or slow start's tick."""
        period = (self.capacity.interval_ms / 1000 if self.source != "none"
                  else SLOW_START_TICK_S)
        if self.spec.slow_start_s > 0 and any(m.ramp_from is not None
                                              for m in self.members.values()):
            period = min(period, max(0.1, self.spec.slow_start_s / 10))
        return period

    def ramp_value(self, member: Member, now: float) -> float:
        if member.ramp_from is None or self.spec.slow_start_s <= 0:
            return 1.0
        done = (now - member.ramp_from) / self.spec.slow_start_s
        return min(1.0, SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * max(0.0, done))

    def state(self, member: Member, now: float) -> str:
        if self.source == "none":
            return "none"
        if member.error:
            return member.error
        if member.sample_at is None:
            return "waiting"
        if (now - member.sample_at) * 1000 > self.capacity.stale_after_ms:
            return "stale"
        return "ok"

    def ring(self, weights: Mapping[str, int]) -> maglev.Ring:
        """The ring the reconciler builds from these weights (health and panic rules
        applied as it does); the last few are kept, as each step starts from the
        ring the previous one ended with."""
        key = self.spec.key
        runtime = Runtime(healthy={(key, a): m.healthy for a, m in self.members.items()},
                          weights={(key, a): w for a, w in weights.items()})
        ring_weights = plan_vip(self.spec, runtime).ring_weights
        cache_key = (self.spec.ring_size, tuple(sorted(ring_weights.items())))
        ring = self.rings.get(cache_key)
        if ring is None:
            ring = maglev.build_ring(ring_weights, self.spec.ring_size)
            self.rings[cache_key] = ring
            while len(self.rings) > RING_CACHE:
                del self.rings[next(iter(self.rings))]
        return ring

    def weights(self, candidate: Mapping[str, tuple[float, float]] | None = None
                ) -> dict[str, int]:
        candidate = candidate or {}
        return {a: m.effective(*candidate.get(a, (None, None))) for a, m in self.members.items()}


@dataclass(frozen=True)
class Want:
    """Where one adaptation step would take a member, and why."""

    factor: float
    ramp: float
    why: str
    urgency: float  # larger goes first when the budget cannot take every step


def planned(wants: Mapping[str, Want]) -> dict[str, tuple[float, float]]:
    return {a: (w.factor, w.ramp) for a, w in wants.items()}


def source_identity(capacity: Capacity) -> tuple[object, ...]:
    return (capacity.source, capacity.metric, capacity.labels, capacity.port, capacity.path)


def normalised(vip: VipState, corrections: Mapping[str, float]) -> dict[str, float]:
    """The ideal factors: each member's factor times target / load (e^c), all
    scaled by one constant so that they average 1 (weighted by configured
    weight), clamped to [min_factor, max_factor]. Only relative weights matter
    to Maglev, so the scale is free; anchoring it keeps the factors from
    drifting as a whole into a clamp (as steps applied to some members but not
    others would make them)."""
    cap = vip.capacity
    members = {a: vip.members[a] for a in corrections}
    raw = {a: m.factor * math.exp(corrections[a]) for a, m in members.items()}
    wanted = sum(m.weight * raw[a] for a, m in members.items())
    scale = sum(m.weight for m in members.values()) / wanted if wanted > 0 else 1.0
    return {a: min(cap.max_factor, max(cap.min_factor, f * scale)) for a, f in raw.items()}


def forget_load(member: Member) -> None:
    member.load, member.sample_at = None, None


def between(member: Member, want: Want, alpha: float) -> Want:
    """alpha of the way from the applied (factor, ramp) to want's: the factor
    geometrically, the ramp linearly."""
    return Want(member.factor * (want.factor / member.factor) ** alpha,
                 member.ramp + alpha * (want.ramp - member.ramp), want.why, want.urgency)


def one_unit(member: Member, want: Want) -> Want:
    """One weight unit from the applied weight toward want's."""
    now, goal = member.effective(), member.effective(want.factor, want.ramp)
    if goal == now:
        return want
    unit = now + (1 if goal > now else -1)
    if abs(want.ramp - member.ramp) > EPS:  # a ramp step: move the ramp only
        ramp = min(1.0, unit / (member.weight * member.factor))
        return Want(member.factor, ramp, want.why, want.urgency)
    return Want(unit / (member.weight * member.ramp), member.ramp, want.why, want.urgency)
