"""Verdicts: HAProxy's rise/fall rule and flap damping (the policy, no I/O)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from xdplb.health.probes import Probe, Result

# Flap damping (after BGP route-flap damping): every transition adds a penalty
# that halves every DAMPING_HALF_LIFE_CHECKS check intervals (15 s at the
# default 2 s interval); above SUPPRESS the backend is held down until the
# penalty decays below REUSE. Time is counted in check intervals so that a
# backend flapping at every check is treated alike whatever its interval:
# the fourth transition in quick succession holds it down, and it stays held
# down while it keeps flapping (the penalty then stays above REUSE).
DAMPING_PENALTY = 1000.0
DAMPING_SUPPRESS = 3000.0
DAMPING_REUSE = 1500.0
DAMPING_HALF_LIFE_CHECKS = 7.5
DAMPING_MAX = 12000.0  # caps the hold-down at three half-lives past REUSE


@dataclass
class Verdict:
    """A check's rise/fall state machine, its damping, and what it last saw.

    Times given as `now` are time.monotonic() seconds; `since` is wall-clock time."""

    probe: Probe
    up: bool | None = None  # None: never checked
    streak: int = 0  # consecutive results that disagree with `up`
    last: Result | None = None
    since: float = field(default_factory=time.time)
    penalty: float = 0.0
    penalty_at: float = 0.0
    suppressed: bool = False
    transitions: int = 0
    active: bool = True  # False once its check is removed: its scheduled runs are dropped

    @property
    def half_life_s(self) -> float:
        return DAMPING_HALF_LIFE_CHECKS * self.probe.interval_ms / 1000

    def observe(self, result: Result, now: float) -> bool:
        """Takes one result; True when the verdict (up/down) changed."""
        self.last = result
        if self.up is None:
            self.up, self.since = result.ok, time.time()
            return True
        if result.ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.probe.rise if result.ok else self.probe.fall):
            return False
        self.up, self.streak, self.since = result.ok, 0, time.time()
        self.transitions += 1
        self.penalty = min(self.decayed(now) + DAMPING_PENALTY, DAMPING_MAX)
        self.penalty_at = now
        if self.penalty >= DAMPING_SUPPRESS:
            self.suppressed = True
        return True

    def decayed(self, now: float) -> float:
        """The penalty as it stands at `now`."""
        return self.penalty * math.pow(0.5, (now - self.penalty_at) / self.half_life_s)

    def release(self, now: float) -> bool:
        """Ends a hold-down once the penalty decayed below REUSE; True when it did."""
        if self.suppressed and self.decayed(now) < DAMPING_REUSE:
            self.suppressed = False
            return True
        return False

    def held_for(self, now: float) -> float:
        """Seconds until the penalty falls below REUSE (0 when it is there already)."""
        penalty = self.decayed(now)
        return 0.0 if penalty < DAMPING_REUSE else self.half_life_s * math.log2(
            penalty / DAMPING_REUSE)

    def serving(self) -> bool:
        """Whether traffic may go to it: up, and not held down for flapping."""
        return bool(self.up) and not self.suppressed

    def reason(self) -> str:
        if self.last is None:
            return "not checked yet"
        return "flapping: held down" if self.suppressed else self.last.reason
