"""Capacity-aware weights: load feedback and slow start turn configured weights
into effective ones, without letting either rewrite too much of a ring.

effective weight = configured weight x capacity factor x slow-start factor,
rounded half up, at least 1 when the configured weight is above 0 (never 0:
only the operator drains), at most maglev.MAX_WEIGHT. Drained members and
members configured at weight 0 are left alone.

Load feedback
-------------
Per VIP, `capacity.source` says where a backend's load comes from:

* ``prometheus``: lbd scrapes http://ADDR:port/path every interval_ms (each
  wait shortened by up to 10% jitter, never lengthened), each scrape bounded
  by timeout_ms and at most MAX_CONCURRENT_SCRAPES at once. A scrape serving
  several VIPs (same address, port, path and timing) runs once. The value is
  the sum of the samples named exactly `metric` whose labels match every
  matcher of `labels` (an absent label matches ""); the text is parsed with
  prometheus_client.parser.text_string_to_metric_families, after keeping only
  the lines of that metric (so a huge exporter page costs little, and garbage
  elsewhere on it does not matter).
* ``push``: backends (or their agents) call report() (the ReportLoad RPC).

Each sample is smoothed: load <- smoothing x sample + (1 - smoothing) x load.
A member whose last scrape failed ("unreachable: refused", "unreachable:
timeout", "unreachable: status 503", ...) or returned no usable value
("malformed: ..."), or whose last sample is older than stale_after_ms
("stale"), falls back to its configured weight (factor 1.0: never 0), which
status and one notify line say. Its load history is forgotten: the next good
sample starts the average afresh.

The control law: multiplicative integral, normalised
----------------------------------------------------
Every interval, when some member with a fresh sample (healthy, not ramping)
carries more than target x (1 + hysteresis), each such member's ideal factor
is computed, the factor that would put it at its target share at once::

    ideal = clamp(k x applied factor x target / max(load, 1% of target),
                  min_factor, max_factor)

with one k for the whole VIP, such that the ideals average 1 (weighted by
configured weight). A member whose ideal is off its applied factor by more
than `hysteresis` (relative) moves GAIN (0.25) of the way there, in log
space, at most halving or doubling (MAX_STEP)::

    new = applied x (ideal / applied)^GAIN

i.e. f <- f x (k x target / load)^GAIN. It keeps moving, interval after
interval, until within hysteresis / SETTLE (4) of its ideal: hysteresis as a
band, so a member does not stop just inside the threshold, short of its
target. Why this law:

* It is an integral controller in log space: ln f <- ln f - GAIN x (ln load
  - ln target) (+ ln k). A backend's load is, to first order, proportional to
  its traffic share, i.e. to its factor, so each interval removes a fixed
  fraction of the (log) error whatever the backend's speed or weight, and
  the only rest point has every backend at the same load relative to target:
  each carries its target share of the traffic, which is load = target for
  all when the VIP's total load allows it, and equal loads when the VIP as a
  whole is over target, the best a split can do. A proportional law (f =
  target / load, no memory) would settle where loads still differ.
* Multiplicative steps suit weights: a backend at 3x its target needs its
  traffic divided by 3, whatever its weight, and a factor never crosses 0.
* Normalised (k): Maglev shares depend only on the ratios of the weights, so
  the common scale is free; fixing it (average factor 1) costs next to no
  churn (scaling every weight alike rebuilds the same ring, up to rounding),
  keeps members without a sample (at factor 1) level with the others, and
  stops the factors from drifting as a whole into min_factor or max_factor,
  where their differences would be lost (the unnormalised f <- f x (target /
  load)^GAIN walks every factor into a clamp whenever the whole VIP sits above
  or below target, and steps taken by some members but not others, as the
  budget and the hysteresis make them, drift the scale too).
* Anti-windup: each step starts from the *applied* factor, not from an
  internal integrator, so a change held back by the churn budget does not
  accumulate.
* GAIN 0.25 rather than 1 (one-step correction): in-flight requests and queue
  depth include the queue, which integrates an overload and drains only at
  the backend's own pace after its share is cut; a larger gain keeps cutting
  while the backlog drains, then swings back. benchmarks/sim_capacity.py
  (policy adaptive), p99 queueing delay overall / while converging from equal
  weights: GAIN 0.15 25.6 / 10.8 s, 0.25 23.7 / 9.8 s, 0.35 24.6 / 13.5 s,
  0.5 26.8 / 17.9 s, 1.0 68.3 / 28.6 s.
* Hysteresis: ideal factors follow 1 / load, so +-5% noise around target
  moves an ideal by about 5%, under the default 10%: noise does not touch the
  ring. Nor does a member move on less than NOISE_Z (2) standard errors of
  its smoothed load (an exponentially weighted variance of its samples): a
  noisy load needs a larger error. And nothing moves while no member is over
  target by more than the hysteresis: a VIP comfortable everywhere is left
  alone (a backend whose factor was cut keeps it until someone needs relief).
* After a change, the smoothed load of every member is rescaled by the ratio
  of its new and old ring shares (traffic follows positions), so the next
  decision is not made on an average of samples taken at the old weights (a
  lagging average would cut again and again: overshoot). The next samples
  correct the prediction. In the simulation: p99 46.4 s without, 23.7 s with.
* MAX_STEP caps one step at halving or doubling; a member reporting 0 counts
  as 1% of target, and climbs toward max_factor by at most doubling per step.

A ramping member's factor waits until its slow start ends (its load is low
because it ramps, not because it is fast); an unhealthy member's is frozen,
and reset to 1.0 (load forgotten) when it becomes healthy again. Setting a
VIP's source to none resets its factors to 1.0 at once (the operator's
change, not adaptation: not counted against the budget).

Slow start
----------
A member added to an existing VIP while healthy, or becoming healthy again
(or undrained, or reweighted from 0), ramps linearly from SLOW_START_FLOOR
(0.1) to 1 over the VIP's slow_start_s (0: off): s(t) = 0.1 + 0.9 x min(1,
t / slow_start_s). Members present at the first update() (a restart: they
already carry traffic) and members of a VIP added in the same update (all
ramping alike changes no share) do not ramp on addition. The ramp is the
operator's schedule, not adaptation: every step of it is taken when due
(every max(0.1 s, slow_start_s / 10)) and none is charged to the churn
budget. Adding the backend at full weight at once would move the same
positions in one go, unbudgeted; the ramp only spreads them over
slow_start_s. (Charging the steps made a 10 s ramp take about a minute
under the default budget.)

Churn budget
------------
Ring positions rewritten by adaptation (capacity steps and fallbacks) are
capped per VIP: in any churn_window_s-long interval
[t, t + window) at most floor(churn_budget x ring_size) positions (a sliding
window: positions used at time t stop counting at t + window). The positions
a candidate moves are counted exactly: the ring the reconciler would build
from the current weights (health and panic rules applied with
reconciler.plan_vip) against the one from the candidate, with
maglev.build_ring and maglev.diff_positions. Changes triggered by the
operator or by health (adding, removing, draining, reweighting, a backend
going down) are not adaptation and are not counted.

Each step first takes the due slow-start steps, then tries the whole
adaptation. If that does not fit what is left of the budget, the changes are
taken in priority order: fallbacks to the configured weight, then capacity
steps. Within a group the most urgent members (largest load error) go
first: as many of them in full as fit (a binary search over how many);
failing that, part of the most urgent member's step, halving it until it
fits; failing that, one weight unit of one member. What does not fit is
deferred to a later interval (and said once per member). Capacity and
fallback steps never exceed the budget.

Interface (what the controller, the API and lbctl use)
------------------------------------------------------
``CapacityController(apply, notify, clock=time.monotonic)``

* ``update(state, healthy)``: follow the desired state (pollers started and
  stopped, removed members forgotten) and health (missing: healthy). Changes
  effective weights at once (a new member enters at the slow-start floor, a
  removed one vanishes) without calling apply(): read effective_weights()
  right after it, for the same reconcile. Call it inside the event loop when
  a prometheus source is used (it starts poller tasks when a loop runs).
* ``report(address, value, vip=None) -> int``: a pushed sample for every
  push-source VIP having the backend (or just `vip`); the number of members
  it applied to (0: none, e.g. no such backend or not a push VIP); ValueError
  on a negative or non-finite value or a malformed address.
* ``effective_weights() -> dict[MemberId, int]``: members whose effective
  weight differs from the configured one (Runtime.weights).
* ``status(member) -> MemberLoad`` (KeyError for an unknown member): load
  (smoothed, rescaled by share after each change, the last one kept while
  failing; None before the first sample, and for source none), age_s (since
  the last good sample), state, factor and slow_start as applied (a change
  held back by the budget shows as not yet applied).
* ``churn(vip) -> (positions used in the current window, budget)``.
* ``step() -> bool``: one adaptation pass over every VIP whose time has come:
  the load law and fallbacks once per interval_ms; slow-start steps every
  max(0.1 s, slow_start_s / 10) while a member ramps (at most 1 s apart for a
  VIP without a load source); calls apply(effective_weights()) when
  weights changed (and again after an apply() that raised). run() calls it;
  tests call it with a fake clock. A step costs a few ring builds when the
  budget binds: ~20 ms on average in the simulation (100 backends, ring
  65537), run on the event loop.
* ``async run()``: pollers and the periodic adaptation, until close().
* ``async close()``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from xdplb import maglev
from xdplb.health import connect_reason
from xdplb.reconciler import Runtime, plan_vip
from xdplb.state import (
    NO_CAPACITY,
    Capacity,
    DesiredState,
    VipKey,
    VipSpec,
    canonical_address,
    parse_label_matchers,
)

__all__ = [
    "GAIN",
    "MAX_STEP",
    "SLOW_START_FLOOR",
    "CapacityController",
    "MalformedLoad",
    "MemberId",
    "MemberLoad",
    "parse_load",
    "scrape",
]

log = logging.getLogger("xdplb.capacity")

MemberId = tuple[VipKey, str]

GAIN = 0.25
MAX_STEP = 2.0  # one step at most halves or doubles a factor
SLOW_START_FLOOR = 0.1  # where a ramp starts, as a fraction of the weight
SLOW_START_TICK_S = 1.0  # adaptation period of a VIP with slow start but no load source
MAX_CONCURRENT_SCRAPES = 256
SCRAPE_LIMIT = 8 * 1024 * 1024  # bytes of one metrics page
JITTER = 0.1
APPLY_RETRY_S = 1.0
_MAX_HALVINGS = 8
_MAX_TRIES = 5  # ring builds spent finding how many members' steps fit the budget
_MAX_SINGLES = 4  # members tried one unit at a time when no interpolated step fits
_EPS = 1e-9
_RING_CACHE = 4
SETTLE = 4  # a moving member stops within hysteresis / SETTLE of its ideal factor
NOISE_Z = 2.0  # and never moves on less than this many standard errors of its load
_LOAD_FLOOR = 0.01  # a load of 0 counts as 1% of target: far below, yet finite


@dataclass(frozen=True)
class MemberLoad:
    """What status shows per VIP backend."""

    load: float | None  # smoothed load, None when none yet
    age_s: float | None  # seconds since the last sample
    state: str  # none | ok | stale | unreachable: ... | malformed: ... | waiting
    factor: float  # capacity factor applied (1.0 = configured weight)
    slow_start: float  # slow-start factor in (0, 1], 1.0 = fully ramped


class MalformedLoad(ValueError):
    """A metrics page without a usable value of the metric."""


class ScrapeError(OSError):
    """A metrics page could not be fetched; the message is the reason."""


def _round(x: float) -> int:
    return math.floor(x + 0.5)


# --- reading a Prometheus page -----------------------------------------------------------


def _selector(metric: str, matchers: Mapping[str, str]) -> str:
    if not matchers:
        return metric
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"


def parse_load(text: str, metric: str, matchers: Mapping[str, str]) -> float:
    """The sum of the samples of `metric` matching every label matcher, from a
    Prometheus text page; MalformedLoad says why there is none."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(metric) and line[len(metric):len(metric) + 1] in ("{", " ", "\t"):
            lines.append(line)
    what = _selector(metric, matchers)
    if not lines:
        raise MalformedLoad(f"no sample of {metric}")
    try:
        families = list(text_string_to_metric_families("\n".join(lines) + "\n"))
    except Exception as exc:  # the parser raises ValueError, and worse on some garbage
        raise MalformedLoad(f"{metric}: {exc}") from None
    total, found = 0.0, 0
    for family in families:
        for sample in family.samples:
            if sample.name != metric or any(sample.labels.get(k, "") != v
                                            for k, v in matchers.items()):
                continue
            value = float(sample.value)
            if not math.isfinite(value) or value < 0:
                raise MalformedLoad(f"{what} is {value:g}: not a load")
            total += value
            found += 1
    if not found:
        raise MalformedLoad(f"no sample of {what}")
    return total


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ScrapeError) else connect_reason(exc)


def _dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise ScrapeError("truncated chunked body")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise ScrapeError("bad chunked body") from None
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2:]
    raise ScrapeError("truncated chunked body")


async def scrape(address: str, port: int, path: str, timeout_s: float) -> str:
    """GET http://ADDRESS:PORT/PATH (HTTP/1.0: no keep-alive, no chunking asked
    for), bounded by timeout_s; the page as text, or ScrapeError/OSError."""
    host = f"[{address}]" if ":" in address else address
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n"
                         "User-Agent: xdplb-lbd\r\nAccept: text/plain;version=0.0.4\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            response, length = b"", None
            while len(response) <= SCRAPE_LIMIT:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                response += chunk
                head, sep, body = response.partition(b"\r\n\r\n")
                if sep and length is None:
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length" and value.strip().isdigit():
                            length = int(value.strip())
                if length is not None and len(body) >= length:
                    break
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if len(response) > SCRAPE_LIMIT:
        raise ScrapeError(f"page over {SCRAPE_LIMIT // (1024 * 1024)} MiB")
    head, sep, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if not sep or len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        raise ScrapeError("not an HTTP response" if response else "empty response")
    if status[1] != "200":
        raise ScrapeError(f"status {status[1]}")
    if any(line.lower().replace(b" ", b"") == b"transfer-encoding:chunked"
           for line in head.split(b"\r\n")):
        body = _dechunk(body)
    if length is not None:
        body = body[:length]
    return body.decode("utf-8", errors="replace")


# --- the controller's state --------------------------------------------------------------


@dataclass
class _Member:
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
        return min(maglev.MAX_WEIGHT, max(1, _round(value)))


@dataclass
class _Vip:
    spec: VipSpec
    members: dict[str, _Member]
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
        return math.floor(b * self.spec.ring_size + _EPS)

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

    def ramp_value(self, member: _Member, now: float) -> float:
        if member.ramp_from is None or self.spec.slow_start_s <= 0:
            return 1.0
        done = (now - member.ramp_from) / self.spec.slow_start_s
        return min(1.0, SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * max(0.0, done))

    def state(self, member: _Member, now: float) -> str:
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
            while len(self.rings) > _RING_CACHE:
                del self.rings[next(iter(self.rings))]
        return ring

    def weights(self, candidate: Mapping[str, tuple[float, float]] | None = None
                ) -> dict[str, int]:
        candidate = candidate or {}
        return {a: m.effective(*candidate.get(a, (None, None))) for a, m in self.members.items()}


@dataclass(frozen=True)
class _Want:
    """Where one adaptation step would take a member, and why."""

    factor: float
    ramp: float
    why: str
    urgency: float  # larger goes first when the budget cannot take every step


def _plan(wants: Mapping[str, _Want]) -> dict[str, tuple[float, float]]:
    return {a: (w.factor, w.ramp) for a, w in wants.items()}


@dataclass(frozen=True)
class _ScrapeKey:
    address: str
    port: int
    path: str
    interval_ms: int
    timeout_ms: int

    @classmethod
    def of(cls, capacity: Capacity, address: str) -> _ScrapeKey:
        return cls(address, capacity.port, capacity.path, capacity.interval_ms,
                   capacity.timeout_ms)

    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{self.path}"


Apply = Callable[[dict[MemberId, int]], None]
Notify = Callable[[str, str], None]  # (message, backend address)


class CapacityController:
    """Load feedback, slow start and the churn budget, for every VIP."""

    def __init__(self, apply: Apply, notify: Notify,
                 clock: Callable[[], float] = time.monotonic):
        self.apply, self.notify, self.clock = apply, notify, clock
        self.vips: dict[VipKey, _Vip] = {}
        self._started = False
        self._pollers: dict[_ScrapeKey, asyncio.Task[None]] = {}
        self._limit: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._dirty = False  # apply() failed: hand the weights over again
        self.scrapes_run = 0
        self.steps_run = 0

    # -- following the desired state and health --

    def update(self, state: DesiredState, healthy: Mapping[MemberId, bool]) -> None:
        """Follow the desired state (start/stop pollers; forget removed members) and health
        (a member that becomes healthy again, or is newly added, starts its slow start)."""
        now = self.clock()
        first = not self._started
        self._started = True
        vips: dict[VipKey, _Vip] = {}
        for key, spec in state.vips.items():
            old = self.vips.get(key)
            if old is None:
                vip = _Vip(spec, {}, now, now)
            else:
                vip = old
                if _source_identity(old.capacity) != _source_identity(spec.capacity):
                    for member in old.members.values():
                        _forget_load(member)
                vip.spec = spec
            members: dict[str, _Member] = {}
            ramping: list[str] = []
            for address, backend in spec.backends.items():
                up = healthy.get((key, address), True)
                member = vip.members.get(address)
                if member is None:
                    member = _Member(backend.weight, backend.drained, up)
                    if up and not first and old is not None:
                        ramping.append(address)
                else:
                    was = member.healthy and member.serving
                    member.weight, member.drained, member.healthy = (
                        backend.weight, backend.drained, up)
                    if member.healthy and member.serving and not was:
                        # back from down (or undrained): starts afresh, and ramps
                        member.factor, member.moving = 1.0, False
                        _forget_load(member)
                        member.ramp, member.ramp_from = 1.0, None
                        ramping.append(address)
                if spec.capacity.source == "none":
                    member.factor, member.moving = 1.0, False  # the operator turned it off
                members[address] = member
            vip.members = members
            if spec.slow_start_s <= 0:
                for member in members.values():
                    member.ramp, member.ramp_from = 1.0, None
            else:
                for address in ramping:
                    self._start_ramp(vip, address, now)
            vips[key] = vip
        self.vips = vips
        self._sync_pollers()
        if self._wake is not None:
            self._wake.set()

    def _start_ramp(self, vip: _Vip, address: str, now: float) -> None:
        member = vip.members[address]
        if not member.serving:
            return
        floor = member.effective(ramp=SLOW_START_FLOOR)
        if floor >= member.effective(ramp=1.0):
            return  # the weight is too small to ramp (e.g. 1): nothing to do
        member.ramp, member.ramp_from = SLOW_START_FLOOR, now
        self.notify(f"{vip.spec.key}: {address} starts its slow start at "
                    f"{SLOW_START_FLOOR:g} of its weight (weight {floor} of "
                    f"{member.effective(ramp=1.0)}, over {vip.spec.slow_start_s:g} s)", address)

    # -- load samples --

    def report(self, address: str, value: float, vip: VipKey | None = None) -> int:
        """A pushed load sample for every push-source VIP having this backend (or just `vip`);
        returns how many members it applied to; raises ValueError on a negative/NaN value."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"load of {address}: must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"load of {address}: {value:g} is not a load (must be a finite "
                             "number >= 0)")
        address = canonical_address(address, "backend address")
        now = self.clock()
        applied = 0
        for key, v in self.vips.items():
            if (vip is not None and key != vip) or v.source != "push":
                continue
            member = v.members.get(address)
            if member is not None:
                self._sample(v, member, value, now)
                applied += 1
        return applied

    def _sample(self, vip: _Vip, member: _Member, value: float, now: float) -> None:
        fresh = member.load is None or member.error or vip.state(member, now) != "ok"
        alpha = vip.capacity.smoothing
        if fresh:
            member.load, member.mean, member.variance = value, value, 0.0
        else:
            member.load += alpha * (value - member.load)
            # the noise: around the samples' own average, not the predicted load
            diff = value - member.mean
            member.mean += alpha * diff
            member.variance = (1 - alpha) * (member.variance + alpha * diff * diff)
        member.sample_at, member.error = now, ""

    # -- reading --

    def effective_weights(self) -> dict[MemberId, int]:
        """Current effective weights of members whose weight differs from configured
        (never 0 for a configured weight > 0; drained members are not included)."""
        out: dict[MemberId, int] = {}
        for key, vip in self.vips.items():
            for address, member in vip.members.items():
                if member.serving:
                    weight = member.effective()
                    if weight != member.weight:
                        out[(key, address)] = weight
        return out

    def status(self, member: MemberId) -> MemberLoad:
        key, address = member
        vip = self.vips[key]
        m = vip.members[address]
        now = self.clock()
        age = None if m.sample_at is None else max(0.0, now - m.sample_at)
        return MemberLoad(load=m.load if vip.source != "none" else None, age_s=age,
                          state=vip.state(m, now), factor=m.factor, slow_start=m.ramp)

    def churn(self, vip: VipKey) -> tuple[int, int]:
        """(ring positions adaptation rewrote in the current window, the budget)."""
        v = self.vips[vip]
        return v.used(self.clock()), v.budget

    # -- adaptation --

    def step(self) -> bool:
        """One adaptation pass over every VIP whose period has come; calls apply() with
        the effective weights when they changed (or when the last apply() failed)."""
        now = self.clock()
        changed = False
        for vip in self.vips.values():
            if not vip.active or vip.next_due > now + _EPS:
                continue
            load_turn = vip.source != "none" and vip.load_due <= now + _EPS
            try:
                changed |= self._step_vip(vip, now, load_turn)
            finally:
                if load_turn:
                    vip.load_due = now + vip.capacity.interval_ms / 1000
                vip.next_due = now + vip.period()
                if vip.source != "none":
                    vip.next_due = min(vip.next_due, vip.load_due)
        self.steps_run += 1
        if changed or self._dirty:
            self._dirty = True
            self.apply(self.effective_weights())
            self._dirty = False
        return changed

    def _desired(self, vip: _Vip, now: float, load_turn: bool
                 ) -> list[tuple[str, dict[str, _Want]]]:
        """What each member should move to, in priority order: slow-start steps, then
        fallbacks to the configured weight, then capacity steps (these two once per
        load interval)."""
        ramps: dict[str, _Want] = {}
        for address, m in vip.members.items():
            if m.ramp_from is None or not m.serving:
                continue
            r = vip.ramp_value(m, now)
            if r >= 1 and abs(m.ramp - 1) <= _EPS:
                m.ramp, m.ramp_from = 1.0, None  # done
            elif abs(r - m.ramp) > _EPS:
                ramps[address] = _Want(m.factor, r, f"slow start {r:.3g}", r - m.ramp)
        fallbacks: dict[str, _Want] = {}
        targets: dict[str, _Want] = {}
        groups = [("slow start", ramps), ("fallback", fallbacks), ("capacity", targets)]
        cap = vip.capacity
        if vip.source == "none" or not load_turn:
            return groups
        corrections: dict[str, float] = {}
        for address, m in vip.members.items():
            if not m.serving:
                continue
            state = vip.state(m, now)
            if state != m.said:
                self._say_state(vip, address, m, state)
            if not m.healthy:
                continue
            if state != "ok":  # the next good sample restarts the average (_sample)
                if abs(m.factor - 1.0) > _EPS:
                    ramp = ramps[address].ramp if address in ramps else m.ramp
                    fallbacks[address] = _Want(1.0, ramp, f"fallback: {state}",
                                               abs(math.log(m.factor)))
                continue
            if m.ramp_from is not None:
                continue
            assert m.load is not None
            corrections[address] = math.log(cap.target / max(m.load, cap.target * _LOAD_FLOOR))
        if not corrections or max(vip.members[a].load or 0.0 for a in corrections) <= (
                cap.target * (1 + cap.hysteresis)):
            return groups  # nobody over target: nothing to relieve
        for address, ideal in _normalised(vip, corrections).items():
            m = vip.members[address]
            error = abs(math.log(ideal / m.factor))
            # hysteresis as a band, and never less than the noise (see the docstring)
            noise = NOISE_Z * math.sqrt(m.variance * cap.smoothing / (2 - cap.smoothing)) / max(
                m.mean, cap.target * _LOAD_FLOOR)
            m.moving = error > math.log1p(max(cap.hysteresis / (SETTLE if m.moving else 1),
                                              noise))
            if not m.moving:
                continue
            step = min(MAX_STEP, max(1 / MAX_STEP, (ideal / m.factor) ** GAIN))
            factor = min(cap.max_factor, max(cap.min_factor, m.factor * step))
            targets[address] = _Want(factor, m.ramp,
                                     f"load {m.load:.3g} vs target {cap.target:g}, "
                                     f"ideal factor {ideal:.3g}", abs(math.log(ideal / m.factor)))
        return groups

    def _say_state(self, vip: _Vip, address: str, m: _Member, state: str) -> None:
        if state == "ok":
            if m.said not in ("ok", "waiting", "none"):
                self.notify(f"{vip.spec.key}: load of {address} is back ({m.load:.3g}, target "
                            f"{vip.capacity.target:g})", address)
        elif state != "waiting":
            where = (_ScrapeKey.of(vip.capacity, address).url() if vip.source == "prometheus"
                     else "reports")
            age = "" if m.sample_at is None else (
                f", last sample {self.clock() - m.sample_at:.1f} s ago")
            self.notify(f"{vip.spec.key}: load of {address} from {where}: {state}{age}; its "
                        f"configured weight applies (factor 1.0)", address)
        m.said = state

    def _step_vip(self, vip: _Vip, now: float, load_turn: bool) -> bool:
        groups = [(name, wants) for name, wants in self._desired(vip, now, load_turn)
                  if wants]
        everything = {a: w for _, wants in groups for a, w in wants.items()}
        for address, m in vip.members.items():
            if address not in everything:
                m.deferred = False
        if not everything:
            return False
        changed = False
        base = vip.ring(vip.weights())
        ramps = dict(groups).get("slow start")
        if ramps:
            # The operator's schedule, not adaptation: taken whole, never charged to
            # the churn budget (adding the backend at full weight at once would move
            # the same positions, unbudgeted).
            ring = vip.ring(vip.weights(_plan(ramps)))
            changed = self._commit(vip, ramps, base, ring,
                                   len(maglev.diff_positions(base, ring)), now, "",
                                   charged=False)
            base = ring
            groups = [(name, wants) for name, wants in groups if name != "slow start"]
            everything = {a: w for _, wants in groups for a, w in wants.items()}
            if not everything:
                return changed
        current = vip.weights()
        weights = vip.weights(_plan(everything))
        if weights == current:  # only sub-unit changes: take them, no ring moves
            self._commit(vip, everything, base, base, 0, now, "")
            return changed
        ring = vip.ring(weights)
        moved = len(maglev.diff_positions(base, ring))
        if moved <= vip.budget - vip.used(now):
            return self._commit(vip, everything, base, ring, moved, now, "") or changed
        for name, wants in groups:
            found = self._fit(vip, wants, base, now, name)
            if found is None:
                self._defer(vip, wants, name, now)
                continue
            chosen, ring, moved, note = found
            changed |= self._commit(vip, chosen, base, ring, moved, now, note)
            base = ring
        return changed

    def _fit(self, vip: _Vip, wants: Mapping[str, _Want], base: maglev.Ring, now: float,
             name: str) -> tuple[dict[str, _Want], maglev.Ring, int, str] | None:
        """The largest step toward `wants` that fits what is left of the budget: the
        most urgent members in full, as many as fit; else part of the most urgent
        one's step, halving it until it fits; else one weight unit of one member."""
        left = vip.budget - vip.used(now)
        if left <= 0:
            return None
        members = vip.members
        current = vip.weights()
        movers = [a for a, w in wants.items() if members[a].effective(w.factor, w.ramp)
                  != members[a].effective()]
        order = sorted(movers, key=lambda a: (-wants[a].urgency, a))
        free = {a: w for a, w in wants.items() if a not in movers}  # sub-unit: no moves

        def attempt(chosen: dict[str, _Want]) -> tuple[maglev.Ring, int] | None:
            weights = vip.weights(_plan(chosen))
            if weights == current:
                return None
            ring = vip.ring(weights)
            return ring, len(maglev.diff_positions(base, ring))

        # How many of the most urgent fit: positions move about in proportion to
        # the weight changed, so each guess scales the last measured one to what is
        # left, between the most found to fit and the fewest found not to.
        changed = list(itertools.accumulate(
            abs(members[a].effective(wants[a].factor, wants[a].ramp) - members[a].effective())
            for a in order))
        best: tuple[dict[str, _Want], maglev.Ring, int, str] | None = None
        low, high = 0, len(order) + 1  # the most that fit so far; the fewest that did not
        k = len(order)
        for _ in range(_MAX_TRIES):
            chosen = {**free, **{a: wants[a] for a in order[:k]}}
            tried = attempt(chosen)
            moved = tried[1] if tried is not None else 0
            if tried is not None and moved <= left:
                note = "" if k == len(order) else (
                    f"the {k} most urgent of {len(order)} members")
                best, low = (chosen, *tried, note), k
            else:
                high = k
            if high - low <= 1:
                break
            room = changed[k - 1] * 0.95 * left / max(moved, 1)
            guess = bisect.bisect_right(changed, room)
            k = min(high - 1, max(low + 1, guess))
        if best is not None:
            return best
        if not order:
            return None
        first = order[0]
        alpha = 0.5
        for _ in range(_MAX_HALVINGS):
            chosen = {first: _between(members[first], wants[first], alpha)}
            tried = attempt(chosen)
            if tried is None:
                break
            if tried[1] <= left:
                return chosen, *tried, f"partial step {alpha:.3g} of the way"
            # at least halve; less when moves (about proportional to the step) say so
            alpha *= min(0.5, 0.9 * left / tried[1])
        for address in order[:_MAX_SINGLES]:
            chosen = {address: _one_unit(members[address], wants[address])}
            tried = attempt(chosen)
            if tried is None:
                continue
            if tried[1] <= left:
                return chosen, *tried, "one weight unit"
        return None

    def _commit(self, vip: _Vip, chosen: Mapping[str, _Want], base: maglev.Ring,
                ring: maglev.Ring, moved: int, now: float, note: str,
                charged: bool = True) -> bool:
        before = {a: (m.factor, m.ramp, m.effective()) for a, m in vip.members.items()}
        for address, want in chosen.items():
            m = vip.members[address]
            m.factor, m.ramp, m.deferred = want.factor, want.ramp, False
            if m.ramp_from is not None and want.ramp >= 1 - _EPS:
                m.ramp, m.ramp_from = 1.0, None
        if moved:
            if charged:
                vip.moves.append((now, moved))
            old_shares, new_shares = base.shares(), ring.shares()
            for address, m in vip.members.items():
                old, new = old_shares.get(address, 0), new_shares.get(address, 0)
                if m.load is not None and old > 0 and new > 0:
                    m.load *= new / old  # traffic follows positions: see the docstring
        left = vip.budget - vip.used(now)
        cap = vip.capacity
        changed = False
        for address, want in chosen.items():
            m = vip.members[address]
            f0, r0, w0 = before[address]
            w1 = m.effective()
            changed |= w0 != w1
            if w0 == w1:
                continue  # progress within one weight unit changes no ring: nothing to say
            load = ("" if vip.source == "none" or m.load is None
                    else f"load {m.load:.3g} target {cap.target:g}, ")
            self.notify(
                f"{vip.spec.key}: {address} weight {w0} -> {w1} of {m.weight} "
                f"({want.why}; {load}factor {f0:.4g} -> {m.factor:.4g}, "
                f"slow start {r0:.4g} -> {m.ramp:.4g}; ring {moved} positions moved, "
                + (f"budget {left}/{vip.budget} left in {vip.window_s:g} s" if charged else
                   "not charged to the churn budget")
                + (f"; {note}" if note else "") + ")", address)
        return changed

    def _defer(self, vip: _Vip, wants: Mapping[str, _Want], name: str, now: float) -> None:
        left = vip.budget - vip.used(now)
        for address, want in wants.items():
            m = vip.members[address]
            if not m.deferred:
                m.deferred = True
                self.notify(f"{vip.spec.key}: {address} {name} step to weight "
                            f"{m.effective(want.factor, want.ramp)} (now {m.effective()}; "
                            f"{want.why}) deferred: it does not fit the churn budget ({left}/"
                            f"{vip.budget} positions left in {vip.window_s:g} s)", address)

    # -- the loops --

    def _sync_pollers(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous test): run() starts them
        if self._closed:
            return
        if self._limit is None:
            self._limit = asyncio.Semaphore(MAX_CONCURRENT_SCRAPES)
        if self._wake is None:
            self._wake = asyncio.Event()
        wanted = set(self._scrape_keys())
        for key in wanted - set(self._pollers):
            self._pollers[key] = asyncio.create_task(self._poll(key))
        for key in set(self._pollers) - wanted:
            self._pollers.pop(key).cancel()

    def _scrape_keys(self) -> Iterable[_ScrapeKey]:
        for vip in self.vips.values():
            if vip.source == "prometheus":
                for address, m in vip.members.items():
                    if m.serving:
                        yield _ScrapeKey.of(vip.capacity, address)

    async def _poll(self, key: _ScrapeKey) -> None:
        interval = key.interval_ms / 1000
        assert self._limit is not None
        while key in self._pollers and not self._closed:
            due = time.monotonic() + interval * (1 - JITTER * random.random())
            async with self._limit:
                try:
                    page, error = await scrape(key.address, key.port, key.path,
                                               key.timeout_ms / 1000), ""
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    page, error = "", _reason(exc)
            self.scrapes_run += 1
            try:
                self._deliver(key, page, error)
            except Exception:
                log.exception("%s: taking a scrape failed", key.url())
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def _deliver(self, key: _ScrapeKey, page: str, error: str) -> None:
        now = self.clock()
        parsed: dict[tuple[str, str], float | str] = {}
        for vip in self.vips.values():
            if vip.source != "prometheus" or _ScrapeKey.of(vip.capacity, key.address) != key:
                continue
            member = vip.members.get(key.address)
            if member is None:
                continue
            if error:
                member.error = f"unreachable: {error}"
                continue
            which = (vip.capacity.metric, vip.capacity.labels)
            if which not in parsed:
                try:
                    parsed[which] = parse_load(page, which[0], parse_label_matchers(which[1]))
                except MalformedLoad as exc:
                    parsed[which] = f"malformed: {exc}"
            value = parsed[which]
            if isinstance(value, str):
                member.error = value
            else:
                self._sample(vip, member, value, now)

    def _next_due(self) -> float:
        return min((v.next_due for v in self.vips.values() if v.active),
                   default=self.clock() + 1.0)

    async def run(self) -> None:
        """Pollers and the periodic adaptation; calls apply() when weights change."""
        if self._wake is None:
            self._wake = asyncio.Event()
        self._sync_pollers()
        while not self._closed:
            try:
                self.step()
                pause = self._next_due() - self.clock()
            except Exception:
                log.exception("capacity adaptation failed; retrying")
                pause = APPLY_RETRY_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(1.0, max(0.01, pause)))

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._pollers.values())
        self._pollers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._wake is not None:
            self._wake.set()


def _source_identity(capacity: Capacity) -> tuple[object, ...]:
    return (capacity.source, capacity.metric, capacity.labels, capacity.port, capacity.path)


def _normalised(vip: _Vip, corrections: Mapping[str, float]) -> dict[str, float]:
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


def _forget_load(member: _Member) -> None:
    member.load, member.sample_at = None, None


def _between(member: _Member, want: _Want, alpha: float) -> _Want:
    """alpha of the way from the applied (factor, ramp) to want's: the factor
    geometrically, the ramp linearly."""
    return _Want(member.factor * (want.factor / member.factor) ** alpha,
                 member.ramp + alpha * (want.ramp - member.ramp), want.why, want.urgency)


def _one_unit(member: _Member, want: _Want) -> _Want:
    """One weight unit from the applied weight toward want's."""
    now, goal = member.effective(), member.effective(want.factor, want.ramp)
    if goal == now:
        return want
    unit = now + (1 if goal > now else -1)
    if abs(want.ramp - member.ramp) > _EPS:  # a ramp step: move the ramp only
        ramp = min(1.0, unit / (member.weight * member.factor))
        return _Want(member.factor, ramp, want.why, want.urgency)
    return _Want(unit / (member.weight * member.ramp), member.ramp, want.why, want.urgency)
