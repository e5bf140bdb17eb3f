"""The capacity controller: load feedback and slow start for every VIP, within
the churn budget (docs/health-and-capacity.md explains the law)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping

from xdplb import maglev
from xdplb.capacity.members import (
    APPLY_RETRY_S,
    EPS,
    GAIN,
    JITTER,
    LOAD_FLOOR,
    MAX_CONCURRENT_SCRAPES,
    MAX_HALVINGS,
    MAX_SINGLES,
    MAX_STEP,
    MAX_TRIES,
    NOISE_Z,
    SETTLE,
    SLOW_START_FLOOR,
    Member,
    MemberLoad,
    VipState,
    Want,
    between,
    forget_load,
    normalised,
    one_unit,
    planned,
    source_identity,
)
from xdplb.capacity.scrape import MalformedLoad, ScrapeKey, failure_reason, parse_load, scrape
from xdplb.events import CapacityNotice
from xdplb.state import (
    DesiredState,
    MemberId,
    VipKey,
    canonical_address,
    parse_label_matchers,
)

log = logging.getLogger("xdplb.capacity")

Apply = Callable[[dict[MemberId, int]], None]
Notify = Callable[[CapacityNotice], None]


class CapacityController:
    """Load feedback, slow start and the churn budget, for every VIP."""

    def __init__(self, apply: Apply, notify: Notify,
                 clock: Callable[[], float] = time.monotonic):
        self.apply, self.notify, self.clock = apply, notify, clock
        self.vips: dict[VipKey, VipState] = {}
        self._started = False
        self._pollers: dict[ScrapeKey, asyncio.Task[None]] = {}
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
        vips: dict[VipKey, VipState] = {}
        for key, spec in state.vips.items():
            old = self.vips.get(key)
            if old is None:
                vip = VipState(spec, {}, now, now)
            else:
                vip = old
                if source_identity(old.capacity) != source_identity(spec.capacity):
                    for member in old.members.values():
                        forget_load(member)
                vip.spec = spec
            members: dict[str, Member] = {}
            ramping: list[str] = []
            for address, backend in spec.backends.items():
                up = healthy.get((key, address), True)
                member = vip.members.get(address)
                if member is None:
                    member = Member(backend.weight, backend.drained, up)
                    if up and not first and old is not None:
                        ramping.append(address)
                else:
                    was = member.healthy and member.serving
                    member.weight, member.drained, member.healthy = (
                        backend.weight, backend.drained, up)
                    if member.healthy and member.serving and not was:
                        # back from down (or undrained): starts afresh, and ramps
                        member.factor, member.moving = 1.0, False
                        forget_load(member)
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

    def _start_ramp(self, vip: VipState, address: str, now: float) -> None:
        member = vip.members[address]
        if not member.serving:
            return
        floor = member.effective(ramp=SLOW_START_FLOOR)
        if floor >= member.effective(ramp=1.0):
            return  # the weight is too small to ramp (e.g. 1): nothing to do
        member.ramp, member.ramp_from = SLOW_START_FLOOR, now
        self._tell(vip, address, f"{address} starts its slow start at "
                   f"{SLOW_START_FLOOR:g} of its weight (weight {floor} of "
                   f"{member.effective(ramp=1.0)}, over {vip.spec.slow_start_s:g} s)")

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

    def _sample(self, vip: VipState, member: Member, value: float, now: float) -> None:
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
            if not vip.active or vip.next_due > now + EPS:
                continue
            load_turn = vip.source != "none" and vip.load_due <= now + EPS
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

    def _desired(self, vip: VipState, now: float, load_turn: bool
                 ) -> list[tuple[str, dict[str, Want]]]:
        """What each member should move to, in priority order: slow-start steps, then
        fallbacks to the configured weight, then capacity steps (these two once per
        load interval)."""
        ramps: dict[str, Want] = {}
        for address, m in vip.members.items():
            if m.ramp_from is None or not m.serving:
                continue
            r = vip.ramp_value(m, now)
            if r >= 1 and abs(m.ramp - 1) <= EPS:
                m.ramp, m.ramp_from = 1.0, None  # done
            elif abs(r - m.ramp) > EPS:
                ramps[address] = Want(m.factor, r, f"slow start {r:.3g}", r - m.ramp)
        fallbacks: dict[str, Want] = {}
        targets: dict[str, Want] = {}
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
                if abs(m.factor - 1.0) > EPS:
                    ramp = ramps[address].ramp if address in ramps else m.ramp
                    fallbacks[address] = Want(1.0, ramp, f"fallback: {state}",
                                               abs(math.log(m.factor)))
                continue
            if m.ramp_from is not None:
                continue
            assert m.load is not None
            corrections[address] = math.log(cap.target / max(m.load, cap.target * LOAD_FLOOR))
        if not corrections or max(vip.members[a].load or 0.0 for a in corrections) <= (
                cap.target * (1 + cap.hysteresis)):
            return groups  # nobody over target: nothing to relieve
        for address, ideal in normalised(vip, corrections).items():
            m = vip.members[address]
            error = abs(math.log(ideal / m.factor))
            # hysteresis as a band, and never less than the noise (see the docstring)
            noise = NOISE_Z * math.sqrt(m.variance * cap.smoothing / (2 - cap.smoothing)) / max(
                m.mean, cap.target * LOAD_FLOOR)
            m.moving = error > math.log1p(max(cap.hysteresis / (SETTLE if m.moving else 1),
                                              noise))
            if not m.moving:
                continue
            step = min(MAX_STEP, max(1 / MAX_STEP, (ideal / m.factor) ** GAIN))
            factor = min(cap.max_factor, max(cap.min_factor, m.factor * step))
            targets[address] = Want(factor, m.ramp,
                                     f"load {m.load:.3g} vs target {cap.target:g}, "
                                     f"ideal factor {ideal:.3g}", abs(math.log(ideal / m.factor)))
        return groups

    def _say_state(self, vip: VipState, address: str, m: Member, state: str) -> None:
        if state == "ok":
            if m.said not in ("ok", "waiting", "none"):
                self._tell(vip, address, f"load of {address} is back ({m.load:.3g}, target "
                                         f"{vip.capacity.target:g})")
        elif state != "waiting":
            where = (ScrapeKey.of(vip.capacity, address).url() if vip.source == "prometheus"
                     else "reports")
            age = "" if m.sample_at is None else (
                f", last sample {self.clock() - m.sample_at:.1f} s ago")
            self._tell(vip, address, f"load of {address} from {where}: {state}{age}; its "
                                     "configured weight applies (factor 1.0)")
        m.said = state

    def _step_vip(self, vip: VipState, now: float, load_turn: bool) -> bool:
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
            ring = vip.ring(vip.weights(planned(ramps)))
            changed = self._commit(vip, ramps, base, ring,
                                   len(maglev.diff_positions(base, ring)), now, "",
                                   charged=False)
            base = ring
            groups = [(name, wants) for name, wants in groups if name != "slow start"]
            everything = {a: w for _, wants in groups for a, w in wants.items()}
            if not everything:
                return changed
        current = vip.weights()
        weights = vip.weights(planned(everything))
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

    def _fit(self, vip: VipState, wants: Mapping[str, Want], base: maglev.Ring, now: float,
             name: str) -> tuple[dict[str, Want], maglev.Ring, int, str] | None:
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

        def attempt(chosen: dict[str, Want]) -> tuple[maglev.Ring, int] | None:
            weights = vip.weights(planned(chosen))
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
        best: tuple[dict[str, Want], maglev.Ring, int, str] | None = None
        low, high = 0, len(order) + 1  # the most that fit so far; the fewest that did not
        k = len(order)
        for _ in range(MAX_TRIES):
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
        for _ in range(MAX_HALVINGS):
            chosen = {first: between(members[first], wants[first], alpha)}
            tried = attempt(chosen)
            if tried is None:
                break
            if tried[1] <= left:
                return chosen, *tried, f"partial step {alpha:.3g} of the way"
            # at least halve; less when moves (about proportional to the step) say so
            alpha *= min(0.5, 0.9 * left / tried[1])
        for address in order[:MAX_SINGLES]:
            chosen = {address: one_unit(members[address], wants[address])}
            tried = attempt(chosen)
            if tried is None:
                continue
            if tried[1] <= left:
                return chosen, *tried, "one weight unit"
        return None

    def _commit(self, vip: VipState, chosen: Mapping[str, Want], base: maglev.Ring,
                ring: maglev.Ring, moved: int, now: float, note: str,
                charged: bool = True) -> bool:
        before = {a: (m.factor, m.ramp, m.effective()) for a, m in vip.members.items()}
        for address, want in chosen.items():
            m = vip.members[address]
            m.factor, m.ramp, m.deferred = want.factor, want.ramp, False
            if m.ramp_from is not None and want.ramp >= 1 - EPS:
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
            self._tell(
                vip, address, f"{address} weight {w0} -> {w1} of {m.weight} "
                f"({want.why}; {load}factor {f0:.4g} -> {m.factor:.4g}, "
                f"slow start {r0:.4g} -> {m.ramp:.4g}; ring {moved} positions moved, "
                + (f"budget {left}/{vip.budget} left in {vip.window_s:g} s" if charged else
                   "not charged to the churn budget")
                + (f"; {note}" if note else "") + ")")
        return changed

    def _defer(self, vip: VipState, wants: Mapping[str, Want], name: str, now: float) -> None:
        left = vip.budget - vip.used(now)
        for address, want in wants.items():
            m = vip.members[address]
            if not m.deferred:
                m.deferred = True
                self._tell(vip, address, f"{address} {name} step to weight "
                           f"{m.effective(want.factor, want.ramp)} (now {m.effective()}; "
                           f"{want.why}) deferred: it does not fit the churn budget ({left}/"
                           f"{vip.budget} positions left in {vip.window_s:g} s)")

    def _tell(self, vip: VipState, address: str, text: str) -> None:
        self.notify(CapacityNotice(text, vip=str(vip.spec.key), backend=address))

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

    def _scrape_keys(self) -> Iterable[ScrapeKey]:
        for vip in self.vips.values():
            if vip.source == "prometheus":
                for address, m in vip.members.items():
                    if m.serving:
                        yield ScrapeKey.of(vip.capacity, address)

    async def _poll(self, key: ScrapeKey) -> None:
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
                    page, error = "", failure_reason(exc)
            self.scrapes_run += 1
            try:
                self._deliver(key, page, error)
            except Exception:
                log.exception("%s: taking a scrape failed", key.url())
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def _deliver(self, key: ScrapeKey, page: str, error: str) -> None:
        now = self.clock()
        parsed: dict[tuple[str, str], float | str] = {}
        for vip in self.vips.values():
            if vip.source != "prometheus" or ScrapeKey.of(vip.capacity, key.address) != key:
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
