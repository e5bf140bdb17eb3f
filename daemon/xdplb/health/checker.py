"""The scheduler: every check of the desired state, verdicts handed over in batches."""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Mapping

from xdplb.events import HealthTransition
from xdplb.health.probes import GrpcChannels, Probe, Result, run_probe
from xdplb.health.syn_prober import SynProber
from xdplb.health.tcp_prober import _TcpProber
from xdplb.health.verdicts import DAMPING_REUSE, Verdict
from xdplb.state import DesiredState, MemberId

log = logging.getLogger("xdplb.health")

JITTER = 0.1  # each wait is shortened by up to 10% (never lengthened)
MAX_CONCURRENT_PROBES = 1024
APPLY_RETRY_S = 1.0  # after `apply` failed, the next attempt waits at least this long

Apply = Callable[[dict[MemberId, bool]], None]
Notify = Callable[[HealthTransition], None]
Observe = Callable[[str, float], None]  # (check kind, latency in seconds), every check
TICK_S = 0.002  # the scheduler's timer granularity: checks due within it start together
MAX_STARTS_PER_TICK = 256  # then the event loop gets a turn
_random = random.random


class HealthChecker:
    """Runs every check of the desired state and reports verdicts in batches.

    One scheduler: a heap of (due time, verdict) and one event-loop timer for
    the earliest. A check's next run is due `interval` after its start, less
    a jitter of up to 10%; TCP checks run through _TcpProber, HTTP(S) and gRPC
    checks as tasks. At most MAX_CONCURRENT_PROBES run at once."""

    def __init__(self, apply: Apply, notify: Notify, batch_interval_s: float = 0.2,
                 observe: Observe | None = None, syn_table: object = None):
        self.apply, self.notify, self.observe = apply, notify, observe
        self.syn_table = syn_table  # the balancer's syn_probes (tcp-syn checks)
        self.batch_interval_s = batch_interval_s
        self.members: dict[MemberId, Probe | None] = {}  # None: kind none, always up
        self.verdicts: dict[Probe, Verdict] = {}
        self._wake = asyncio.Event()
        self.channels = GrpcChannels()
        self.checks_run = 0
        self.batches_applied = 0
        self._due: list[tuple[float, int, Verdict]] = []
        self._order = itertools.count()  # ties in the heap: first pushed, first run
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._running = 0
        self._tasks: dict[Probe, asyncio.Task[None]] = {}  # HTTP(S) and gRPC checks in flight
        self._tcp: _TcpProber | None = None
        self._syn: SynProber | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def update(self, state: DesiredState, known: Mapping[MemberId, bool],
               marks: Mapping[MemberId, int] | None = None) -> None:
        """Follows the desired state: new checks start, unused ones stop. A new check
        of a backend whose health is `known` (a restart: the maps' marks; a changed
        check: the old verdict) starts from it rather than from "unchecked", its first
        run somewhere in its first interval; an unknown one is checked at once.
        `marks` are the socket marks of checks through the VIP, by member."""
        marks = marks or {}
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        members: dict[MemberId, Probe | None] = {}
        wanted: dict[Probe, list[MemberId]] = {}  # each check and whom it serves
        for key, vip in state.vips.items():
            for address, backend in vip.backends.items():
                check = vip.check_for(backend)
                probe = None if check.kind == "none" else Probe.of(
                    check, address, key.port, key.address, marks.get((key, address), 0))
                members[(key, address)] = probe
                if probe is not None:
                    wanted.setdefault(probe, []).append((key, address))
        self.members = members
        now = time.monotonic()
        for probe in wanted.keys() - self.verdicts.keys():
            verdict = Verdict(probe)
            seeded = [known[m] for m in wanted[probe] if m in known]
            first = now
            if seeded:
                verdict.up = all(seeded)
                first += random.uniform(0, probe.interval_ms / 1000)
            self.verdicts[probe] = verdict
            heapq.heappush(self._due, (first, next(self._order), verdict))
        for probe in self.verdicts.keys() - wanted.keys():  # their heap entries are skipped
            self.verdicts.pop(probe).active = False
            task = self._tasks.pop(probe, None)
            if task is not None:
                task.cancel()
            self.channels.discard(probe)
            if self._syn is not None:
                self._syn.release(probe)
        self._arm(now)

    def healthy(self) -> dict[MemberId, bool]:
        return {member: self.serving(member) for member in self.members}

    def serving(self, member: MemberId) -> bool:
        """Whether the current verdict lets this backend serve (no check: it may)."""
        probe = self.members.get(member)
        if probe is None:
            return True
        verdict = self.verdicts.get(probe)
        return bool(verdict and verdict.serving())

    def unchecked(self) -> list[Probe]:
        return [p for p, v in self.verdicts.items() if v.up is None]

    async def first_verdicts(self) -> None:
        """Until every check has a verdict, bounded by the slowest check's timeout."""
        pending = self.unchecked()
        if not pending:
            return
        deadline = time.monotonic() + max(p.timeout_ms for p in pending) / 1000 + 1.0
        while self.unchecked() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def verdict_of(self, member: MemberId) -> Verdict | None:
        probe = self.members.get(member)
        return self.verdicts.get(probe) if probe else None

    @property
    def in_flight(self) -> int:
        return self._running

    # -- the scheduler --

    def _arm(self, now: float) -> None:
        """Sets the timer for the earliest due check or TCP deadline, if sooner than set."""
        if self._loop is None or self._closed:
            return
        runnable = self._due and self._running < MAX_CONCURRENT_PROBES
        at = min(self._due[0][0] if runnable else math.inf,
                 self._tcp.next_deadline() if self._tcp else math.inf,
                 self._syn.next_deadline() if self._syn else math.inf)
        if at == math.inf or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        at = max(at, now + TICK_S) if at > now else now
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._run_due)

    def _run_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = time.monotonic()
        if self._tcp is not None:
            self._tcp.expire(now)
        if self._syn is not None:
            self._syn.expire(now)
        started, due = 0, self._due
        horizon = now + TICK_S  # due within a tick: now (their due times allow for it)
        while due and due[0][0] <= horizon and started < MAX_STARTS_PER_TICK:
            verdict = due[0][2]
            if not verdict.active:
                heapq.heappop(due)  # its check was removed
                continue
            if self._running >= MAX_CONCURRENT_PROBES:
                break  # a finishing check re-arms the timer
            heapq.heappop(due)
            if not self._start(verdict, now):
                heapq.heappush(due, (now + 0.1, next(self._order), verdict))
            started += 1
        if self._syn is not None:
            self._syn.flush()  # the tick's half-open checks leave together
        self._arm(now)  # with more due already, the timer fires a tick later

    def _start(self, verdict: Verdict, now: float) -> bool:
        probe = verdict.probe
        if probe.kind == "tcp-syn" and self.syn_table is not None:
            # Not counted in _running: a half-open check holds no socket, only a slot
            # of the balancer's table, which SynProber bounds itself.
            if self._syn is None:
                assert self._loop is not None
                self._syn = SynProber(self._loop, self.syn_table, self._finish_syn)
            return self._syn.start(verdict, now)
        if probe.kind == "tcp":
            if self._tcp is None:
                assert self._loop is not None
                self._tcp = _TcpProber(self._loop, self._finish)
            self._running += 1
            if not self._tcp.start(verdict, now):
                self._running -= 1
                return False
            return True
        self._running += 1
        task = asyncio.create_task(self._check(verdict, now))
        task.add_done_callback(functools.partial(self._check_done, verdict, now))
        self._tasks[probe] = task
        return True

    async def _check(self, verdict: Verdict, started: float) -> None:
        self._finish(verdict, await run_probe(verdict.probe, self.channels), started)

    def _check_done(self, verdict: Verdict, started: float, task: asyncio.Task[None]) -> None:
        if self._tasks.get(verdict.probe) is task:
            del self._tasks[verdict.probe]
        if task.cancelled():  # its check was removed (or lbd stops)
            self._running -= 1
        elif (exc := task.exception()) is not None:  # run_probe does not raise: a bug
            log.error("%s: the check failed: %r", verdict.probe.describe(), exc)
            self._finish(verdict, Result(False, f"check failed: {exc!r}", 0.0), started)

    def _finish_syn(self, verdict: Verdict, result: Result, started: float) -> None:
        self._running += 1  # _finish counts a check out of _running; this one never was
        self._finish(verdict, result, started)

    def _finish(self, verdict: Verdict, result: Result, started: float) -> None:
        """A check's result: judged, and its next run scheduled."""
        self._running -= 1
        self.checks_run += 1
        if self._closed or not verdict.active:
            return  # removed while it ran
        now = time.monotonic()
        probe = verdict.probe
        try:
            if result.ok == verdict.up and not verdict.suppressed:
                # Most results: what the verdict says already, and nothing held down.
                # observe() would only clear the streak; there is nothing to report.
                verdict.last, verdict.streak = result, 0
            else:
                self._judge(verdict, result, now)
            if self.observe is not None:
                self.observe(probe.kind, result.latency_s)
        except Exception:  # nothing may silence this check for good
            log.exception("%s: judging a result failed", probe.describe())
        # Never later than the interval: the timer's tick is taken off the jitter's range.
        interval = probe.interval_ms / 1000
        due = started + interval * (1 - JITTER * _random()) - TICK_S
        if due < now:
            due = now
        heapq.heappush(self._due, (due, next(self._order), verdict))
        if due < self._timer_at or self._running == MAX_CONCURRENT_PROBES - 1:
            self._arm(now)

    def _judge(self, verdict: Verdict, result: Result, now: float) -> None:
        """One result: verdict, hold-down and release reported; the batcher woken when
        whether the backend may serve changed."""
        was_serving = verdict.serving()
        if verdict.release(now):
            self._tell(verdict, "released from the flapping hold-down (penalty below "
                                f"{DAMPING_REUSE:.0f})")
        first = verdict.up is None
        was_suppressed = verdict.suppressed
        if verdict.observe(result, now):
            if first:
                why = "first check"
            else:
                n = verdict.probe.rise if verdict.up else verdict.probe.fall
                noun = "success" if verdict.up else "failure"
                plural = ("es" if verdict.up else "s") if n > 1 else ""
                why = f"{n} {noun}{plural} in a row"
            note = ""
            if verdict.suppressed and not was_suppressed:
                note = (f"flapping ({verdict.transitions} transitions): held down for "
                        f"{verdict.held_for(now):.1f} s or more")
            elif verdict.suppressed and verdict.up:
                note = "still held down for flapping"
            self._tell(verdict, result.reason, why, note)
        if was_serving != verdict.serving():
            self._wake.set()

    def _tell(self, verdict: Verdict, reason: str, detail: str = "", note: str = "") -> None:
        probe = verdict.probe
        event = HealthTransition(check=probe.describe(), up=bool(verdict.up), reason=reason,
                                 detail=detail, note=note, backend=probe.backend or probe.address)
        try:
            self.notify(event)
        except Exception:  # the verdict stands and is applied all the same
            log.exception("reporting %r failed", event.message())

    async def run_batches(self) -> None:
        """Hands verdict changes to `apply`, at most once per batch interval."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pause = self.batch_interval_s
            try:
                self.apply(self.healthy())
                self.batches_applied += 1
            except Exception:  # the checks go on; the verdicts are handed over again
                log.exception("applying health verdicts failed; retrying")
                self._wake.set()
                pause = max(pause, APPLY_RETRY_S)
            await asyncio.sleep(pause)

    async def close(self) -> None:
        """Stops every check; the last verdicts stay readable."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._due.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            self._running -= len(self._tcp)
            self._tcp.close()
            self._tcp = None
        if self._syn is not None:
            self._syn.close()
            self._syn = None
        await self.channels.close()
