"""Simulate capacity-aware Maglev weights on a heterogeneous GPU inference fleet.

Usage: python benchmarks/sim_capacity.py [--json PATH] [--plot PATH] [--quick]

The fleet: 100 backends with SLOTS (16) parallel slots each (continuous
batching seen as 16 concurrent requests), of three GPU classes serving at
different speeds (30 L4 at 0.5, 40 A100 at 1.0, 30 H100 at 2.0 units of work
per second per slot). Requests arrive as a Poisson process at 75% of the
fleet's capacity, 80% short (chat turns: exponential work, mean 1) and 20%
long (long generations: mean 8); every request is a new flow, hashed onto a
Maglev ring of RING_SIZE (65537) positions built by xdplb.maglev.build_ring
from the weights in force, and queues FCFS at its backend for a free slot.
Queueing delay is the time from arrival to a free slot. At DEGRADE_AT (450 s)
12 of the 30 H100s throttle to a quarter of their speed (a thermal or
noisy-neighbour event nobody configured; the fleet is then at 89% of its
capacity), and recover at RECOVER_AT (690 s).

Policies, all on the very same arrivals (common random numbers):

* static-equal: Maglev with equal weights (what a fleet gets unconfigured);
* static-model: weights set by the operator from the GPU model (50/100/200),
  right until the throttling, which it cannot see;
* adaptive: equal configured weights, with xdplb.capacity.CapacityController
  (the daemon's class itself, on a simulated clock) driving them from pushed
  reports (report(), the ReportLoad RPC): each backend's mean number of
  in-flight requests (queued or served) over the last interval, what an agent
  next to the inference server would report, against a target of 12 (75% of
  16 slots). Every other capacity setting is the default (interval 5 s,
  smoothing 0.3, hysteresis 0.1, factors 0.1..2, churn budget 5% of the ring
  per 10 s, stale after 15 s);
* adaptive-model: the same on top of the model weights;
* adaptive-calm: as adaptive, smoothing 0.1 and hysteresis 0.25: less churn.

Results (seed 20240611, 900 s, ~15 s to run; queueing delay in seconds from
t = 60 s, p99 per phase: converging 60-240 s, steady -450 s, throttled
-690 s, recovered -900 s; churn: ring positions rewritten, budget 3276 per
10 s):

==============  ====  =====  ==========  ======  =========  =========  ==========
policy          p50   p99    converging  steady  throttled  recovered  churn max /
                                                                       steady mean
==============  ====  =====  ==========  ======  =========  =========  ==========
static-equal    0.37  655.8  180.5       342.8   542.2      708.9      0 / 0
static-model    0.00  157.4  3.3         3.5     168.1      136.3      0 / 0
adaptive        0.00  23.7   9.8         4.9     36.2       19.5       3276 / 2941
adaptive-model  0.00  19.5   4.5         4.3     39.2       14.1       3276 / 2990
adaptive-calm   0.00  33.8   11.1        4.6     43.3       37.2       3276 / 1273
==============  ====  =====  ==========  ======  =========  =========  ==========

While throttled, the adaptive policies spread the lost capacity over the
whole fleet (p50 0.9 s, p99 36-43 s) where static-model leaves it on the 12
throttled backends (p50 0, p99 168 s). With the default settings the
controller spends nearly its whole churn budget all the time: in-flight
counts of 16-slot backends with long requests are noisy and bursty, and it
keeps relieving whichever backend has a backlog; adaptive-calm (smoothing
0.1, hysteresis 0.25) halves the steady churn for a higher p99.

Ring churn is measured independently of the controller: the sim builds the
ring it routes with from every set of weights apply() hands over and counts
the positions whose owner changed; the largest sum over any churn window is
checked against the budget. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import math
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from timing import write_json

from xdplb import capacity, maglev
from xdplb.state import BackendSpec, Capacity, DesiredState, VipKey, VipSpec

SEED = 20240611
N = 100
SLOTS = 16
CLASSES = (("L4", 0.5, 30, 50), ("A100", 1.0, 40, 100), ("H100", 2.0, 30, 200))
SHORT_SHARE, SHORT_WORK, LONG_WORK = 0.8, 1.0, 8.0
UTILISATION = 0.75  # offered load / fleet capacity, before the throttling
DURATION_S = 900.0
WARMUP_S = 60.0
STEADY_FROM = 240.0
DEGRADE_AT, RECOVER_AT = 450.0, 690.0
DEGRADED, DEGRADE_FACTOR = 12, 0.25
RING_SIZE = 65537
BIN_S = 15.0
VIP = VipKey("10.0.0.10", 443, "tcp")
CAPACITY = Capacity(source="push", target=12.0)  # every other setting: the defaults
CALM = dataclasses.replace(CAPACITY, smoothing=0.1, hysteresis=0.25)
# policy: (configured weights from the GPU model?, capacity settings or None: static)
POLICIES = {
    "static-equal": (False, None),
    "static-model": (True, None),
    "adaptive": (False, CAPACITY),
    "adaptive-model": (True, CAPACITY),
    "adaptive-calm": (False, CALM),
}


def address(i: int) -> str:
    return f"10.1.{i // 256}.{i % 256}"


def fleet() -> tuple[list[str], np.ndarray, list[str], dict[str, int]]:
    names, speeds, classes, model_weights = [], [], [], {}
    i = 0
    for cls, speed, count, weight in CLASSES:
        for _ in range(count):
            names.append(address(i))
            speeds.append(speed)
            classes.append(cls)
            model_weights[address(i)] = weight
            i += 1
    return names, np.array(speeds), classes, model_weights


def workload(duration: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival times, work and ring slot of every request."""
    _, speeds, _, _ = fleet()
    mean_work = SHORT_SHARE * SHORT_WORK + (1 - SHORT_SHARE) * LONG_WORK
    rate = UTILISATION * SLOTS * speeds.sum() / mean_work
    rng = np.random.default_rng(seed)
    count = int(rate * duration * 1.1) + 100
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    arrivals = arrivals[arrivals < duration]
    n = len(arrivals)
    long = rng.random(n) >= SHORT_SHARE
    work = np.where(long, rng.exponential(LONG_WORK, n), rng.exponential(SHORT_WORK, n))
    slots = rng.integers(0, RING_SIZE, n)
    return arrivals, work, slots


def speed_at(base: np.ndarray, degraded: np.ndarray, t: float) -> np.ndarray:
    return degraded if DEGRADE_AT <= t < RECOVER_AT else base


class Router:
    """The ring as the datapath holds it, rebuilt from every set of weights."""

    def __init__(self, names: list[str], weights: dict[str, int]):
        self.names = names
        self.index = {a: i for i, a in enumerate(names)}
        self.ring = maglev.build_ring(weights, RING_SIZE)
        self.owner = self._owner(self.ring)
        self.moves: list[tuple[float, int]] = []

    def _owner(self, ring: maglev.Ring) -> list[int]:
        lookup = np.array([self.index[a] for a in ring.order], dtype=np.int64)
        return lookup[ring.table].tolist()

    def set_weights(self, weights: dict[str, int], now: float) -> None:
        ring = maglev.build_ring(weights, RING_SIZE)
        moved = len(maglev.diff_positions(self.ring, ring))
        if moved:
            self.moves.append((now, moved))
            self.ring, self.owner = ring, self._owner(ring)


def max_window(moves: list[tuple[float, int]], window: float) -> int:
    """The most positions moved in any [t, t + window)."""
    best, total, q = 0, 0, deque()
    for t, n in moves:
        q.append((t, n))
        total += n
        while q[0][0] <= t - window:
            total -= q.popleft()[1]
        best = max(best, total)
    return best


def simulate(policy: str, duration: float, seed: int) -> dict[str, object]:
    names, speeds, classes, model_weights = fleet()
    degraded_speeds = speeds.copy()
    h100 = [i for i, c in enumerate(classes) if c == "H100"][:DEGRADED]
    degraded_speeds[h100] *= DEGRADE_FACTOR
    arrivals, work, slots = workload(duration, seed)
    by_model, settings = POLICIES[policy]
    configured = model_weights if by_model else {a: 100 for a in names}
    router = Router(names, configured)
    interval = CAPACITY.interval_ms / 1000
    clock = [0.0]
    ctl = None
    factors: list[tuple[float, dict[str, float]]] = []
    if settings is not None:
        spec = VipSpec(VIP, ring_size=RING_SIZE, capacity=settings, backends={
            a: BackendSpec(a, configured[a]) for a in names})

        def apply(effective: dict[tuple[VipKey, str], int]) -> None:
            weights = dict(configured)
            weights.update({a: w for (_, a), w in effective.items()})
            router.set_weights(weights, clock[0])

        ctl = capacity.CapacityController(apply, lambda event: None,
                                          clock=lambda: clock[0])
        ctl.update(DesiredState({VIP: spec}), {})
    free = [[0.0] * SLOTS for _ in names]  # each backend's slot-free times (heaps)
    busy_bins = np.zeros((len(names), math.ceil(duration / interval) + 2))
    whole = np.zeros_like(busy_bins)  # difference array of fully covered intervals
    covered = np.zeros(len(names))
    delays = np.empty(len(arrivals))
    served_by = np.empty(len(arrivals), dtype=np.int64)
    next_report = interval
    t_control = 0.0
    for i in range(len(arrivals)):
        t = arrivals[i]
        while ctl is not None and t >= next_report:
            clock[0] = next_report
            started = time.perf_counter()
            bin_index = round(next_report / interval) - 1
            covered += whole[:, bin_index]
            inflight = (busy_bins[:, bin_index] + covered) / interval
            for b, name in enumerate(names):
                ctl.report(name, float(inflight[b]))
            ctl.step()
            t_control += time.perf_counter() - started
            if int(next_report) % 30 == 0:
                factors.append((next_report, {n: ctl.status((VIP, n)).factor for n in names}))
            next_report += interval
        b = router.owner[slots[i]]
        slot_free = heapq.heappop(free[b])
        start = max(t, slot_free)
        speed = speed_at(speeds, degraded_speeds, start)[b]
        finish = start + work[i] / speed
        heapq.heappush(free[b], finish)
        delays[i] = start - t
        served_by[i] = b
        if ctl is not None:  # in-flight (queued or served) time per interval
            first = int(t // interval)
            last = min(int(finish // interval), busy_bins.shape[1] - 1)
            if first == last:
                busy_bins[b, first] += finish - t
            else:
                busy_bins[b, first] += (first + 1) * interval - t
                busy_bins[b, last] += finish - last * interval
                whole[b, first + 1] += interval  # bins first+1 .. last-1 fully covered
                whole[b, last] -= interval
    return summarise(policy, arrivals, delays, served_by, classes, router, factors,
                     t_control, duration)


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarise(policy: str, arrivals: np.ndarray, delays: np.ndarray, served_by: np.ndarray,
              classes: list[str], router: Router, factors: list, t_control: float,
              duration: float) -> dict[str, object]:
    measured = arrivals >= WARMUP_S
    phases = {"converging": (WARMUP_S, STEADY_FROM), "steady": (STEADY_FROM, DEGRADE_AT),
              "throttled": (DEGRADE_AT, RECOVER_AT), "recovered": (RECOVER_AT, duration)}
    out: dict[str, object] = {
        "policy": policy,
        "requests": int(measured.sum()),
        "p50_s": pct(delays[measured], 50), "p99_s": pct(delays[measured], 99),
        "mean_s": float(delays[measured].mean()),
        "phases": {name: {"p50_s": pct(delays[(arrivals >= a) & (arrivals < b)], 50),
                          "p99_s": pct(delays[(arrivals >= a) & (arrivals < b)], 99)}
                   for name, (a, b) in phases.items()},
    }
    edges = np.arange(0.0, duration + BIN_S, BIN_S)
    series = []
    for a, b in itertools.pairwise(edges):
        sel = (arrivals >= a) & (arrivals < b)
        series.append({"t": float(a), "p50_s": pct(delays[sel], 50),
                       "p99_s": pct(delays[sel], 99)})
    out["series"] = series
    cls = np.array(classes)
    shares = router.ring.shares()
    out["final_share_by_class"] = {
        c: round(sum(shares[address(i)] for i in np.flatnonzero(cls == c)) / RING_SIZE, 4)
        for c in dict.fromkeys(classes)}
    window = CAPACITY.churn_window_s
    budget = math.floor(CAPACITY.churn_budget * RING_SIZE)
    windows = np.zeros(math.ceil(duration / window))
    for t, n in router.moves:
        windows[int(t // window)] += n
    out["churn"] = {
        "budget_per_window": budget, "window_s": window,
        "max_in_any_window": max_window(router.moves, window),
        "total_positions": int(sum(n for _, n in router.moves)),
        "mean_per_window_steady": round(float(windows[
            int(STEADY_FROM // window):int(DEGRADE_AT // window)].mean()), 1),
        "ring_changes": len(router.moves),
        "per_window": windows.astype(int).tolist(),
    }
    out["control_s"] = round(t_control, 2)
    if factors:
        out["factors_by_class"] = [
            {"t": t, **{c: round(float(np.mean([f[address(i)] for i in np.flatnonzero(cls == c)])),
                             3) for c in dict.fromkeys(classes)}} for t, f in factors]
    return out


def plot(results: list[dict], path: Path, duration: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"static-equal": "tab:red", "static-model": "tab:orange", "adaptive": "tab:blue",
              "adaptive-model": "tab:green", "adaptive-calm": "tab:purple"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for r in results:
        t = [s["t"] + BIN_S / 2 for s in r["series"]]
        axes[0, 0].plot(t, [max(s["p99_s"], 1e-3) for s in r["series"]],
                        label=r["policy"], color=colors[r["policy"]])
        axes[0, 1].plot(t, [max(s["p50_s"], 1e-3) for s in r["series"]],
                        label=r["policy"], color=colors[r["policy"]])
    for ax, what in ((axes[0, 0], "p99"), (axes[0, 1], "p50")):
        ax.set_yscale("log")
        ax.set_xlabel("time (s)")
        ax.set_ylabel(f"{what} queueing delay (s), per {BIN_S:g} s")
        ax.axvspan(DEGRADE_AT, RECOVER_AT, color="grey", alpha=0.15,
                   label=f"{DEGRADED} H100 throttled")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    names = [r["policy"] for r in results]
    x = np.arange(len(names))
    ax = axes[1, 0]
    p50 = [max(r["p50_s"], 1e-3) for r in results]
    p99 = [max(r["p99_s"], 1e-3) for r in results]
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    for xi, (a, b) in enumerate(zip(p50, p99, strict=True)):
        ax.text(xi - 0.2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=8)
        ax.text(xi + 0.2, b, f"{b:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"queueing delay (s), t >= {WARMUP_S:g} s")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 1]
    adaptive = [r for r in results if r["policy"].startswith("adaptive")]
    churn = adaptive[0]["churn"]
    for r in adaptive:
        per_window = r["churn"]["per_window"]
        starts = np.arange(len(per_window) + 1) * churn["window_s"]
        ax.stairs(per_window, starts, color=colors[r["policy"]],
                  label=f"{r['policy']} (max {r['churn']['max_in_any_window']} in any "
                        f"{churn['window_s']:g} s)")
    ax.axhline(churn["budget_per_window"], color="black", linestyle="--",
               label=f"budget {churn['budget_per_window']} "
                     f"({CAPACITY.churn_budget:.0%} of {RING_SIZE}) per {churn['window_s']:g} s")
    ax.axvspan(DEGRADE_AT, RECOVER_AT, color="grey", alpha=0.15)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"ring positions rewritten per {churn['window_s']:g} s")
    ax.set_ylim(0, churn["budget_per_window"] * 1.35)
    ax.set_xlim(0, duration)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{N} GPU backends (L4/A100/H100 at 0.5/1/2x), {SLOTS} slots each, "
                 f"{UTILISATION:.0%} load, Maglev ring {RING_SIZE}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--plot", type=Path,
                        default=Path(__file__).resolve().parent / "capacity.png")
    parser.add_argument("--quick", action="store_true", help="a shorter run, no plot")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    duration = 300.0 if args.quick else DURATION_S
    started = time.perf_counter()
    results = [simulate(p, duration, args.seed) for p in POLICIES]
    phases = list(results[0]["phases"])
    print(f"queueing delay (s) from t={WARMUP_S:g} s; p99 per phase: converging "
          f"{WARMUP_S:g}-{STEADY_FROM:g}, steady -{DEGRADE_AT:g}, throttled -{RECOVER_AT:g} "
          f"({DEGRADED} H100 at {DEGRADE_FACTOR:g}x), recovered -{duration:g}")
    print(f"{'policy':<16}{'p50':>7}{'p99':>8}" + "".join(f"{p:>12}" for p in phases)
          + f"{'churn max/window':>18}{'steady mean':>13}{'total moved':>13}")
    for r in results:
        churn = r["churn"]
        print(f"{r['policy']:<16}{r['p50_s']:>7.2f}{r['p99_s']:>8.1f}"
              + "".join(f"{r['phases'][p]['p99_s']:>12.1f}" for p in phases)
              + f"{churn['max_in_any_window']:>11}/{churn['budget_per_window']:<6}"
              f"{churn['mean_per_window_steady']:>13.0f}{churn['total_positions']:>13}")
    for r in results:
        print(f"{r['policy']}: final ring share by class {r['final_share_by_class']}")
    ok = all(r["churn"]["max_in_any_window"] <= r["churn"]["budget_per_window"]
             for r in results)
    elapsed = time.perf_counter() - started
    control = sum(r["control_s"] for r in results)
    print(f"churn budget respected in every window: {ok}; ran in {elapsed:.1f} s "
          f"(controller steps {control:.1f} s)")
    report = {
        "config": {"backends": N, "slots": SLOTS, "classes": [
            {"name": c, "speed": s, "count": n, "model_weight": w} for c, s, n, w in CLASSES],
            "short_share": SHORT_SHARE, "short_work": SHORT_WORK, "long_work": LONG_WORK,
            "utilisation": UTILISATION, "duration_s": duration, "warmup_s": WARMUP_S,
            "degrade": {"at_s": DEGRADE_AT, "until_s": RECOVER_AT, "backends": DEGRADED,
                        "speed_factor": DEGRADE_FACTOR},
            "ring_size": RING_SIZE, "seed": args.seed, "gain": capacity.GAIN,
            "capacity": dataclasses.asdict(CAPACITY),
            "policies": {p: {"model_weights": m, "capacity": c and dataclasses.asdict(c)}
                         for p, (m, c) in POLICIES.items()}},
        "results": results,
        "budget_respected": ok,
        "elapsed_s": round(elapsed, 1),
    }
    if args.json:
        write_json(args.json, report)
    if not args.quick:
        plot(results, args.plot, duration)
        print(f"plot written to {args.plot}")
    if not ok:
        raise SystemExit("churn budget exceeded")


if __name__ == "__main__":
    main()
