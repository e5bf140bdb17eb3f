"""Tests for xdplb.maglev: table invariants, weighting, disruption, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xdplb import maglev
from xdplb.maglev import Ring, build_ring, diff_positions, is_prime

M = 65537
SMALL_PRIMES = (3, 5, 13, 251, 1009)
FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

identities = st.one_of(st.ip_addresses().map(str), st.text(min_size=1, max_size=12))


def addr(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def equal(n: int, weight: int = 100) -> dict[str, int]:
    return {addr(i): weight for i in range(n)}


def random_weights(n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    return {addr(i): rng.randint(1, 1000) for i in range(n)}


def tvd(ring: Ring) -> float:
    shares = np.array([ring.shares()[k] for k in ring.order], dtype=float)
    props = np.array(ring.weights, dtype=float)
    return float(0.5 * np.abs(shares / ring.size - props / props.sum()).sum())


@contextmanager
def python_fill() -> Iterator[None]:
    """Force the pure Python fallback, as on a host without gcc."""
    with mock.patch.object(maglev, "_native_fill", return_value=None):
        yield


def test_the_compiled_fill_is_installed() -> None:
    """setup.sh builds the package, and so the C fill: the comparisons below need it."""
    assert maglev.native_library_path() is not None
    assert maglev.native_available()


# --- reference: a literal transcription of the paper's loop with weighted turns ----------


def _h64(ident: str, person: bytes) -> int:
    raw = hashlib.blake2b(ident.encode(), digest_size=8, person=person).digest()
    return int.from_bytes(raw, "little")


def reference_owners(weights: dict[str, int], size: int) -> list[str | None]:
    """Maglev section 3.4 pseudo-code; the backend with least (taken + 1/2)/weight moves."""
    order = sorted(weights)
    live = [b for b in order if weights[b] > 0]
    offset = {b: _h64(b, b"xdplb-mglv-off") % size for b in live}
    skip = {b: _h64(b, b"xdplb-mglv-skip") % (size - 1) + 1 for b in live}
    nxt = dict.fromkeys(live, 0)
    taken = dict.fromkeys(live, 0)
    table: list[str | None] = [None] * size
    for _ in range(size if live else 0):
        b = min(live, key=lambda c: (Fraction(2 * taken[c] + 1, 2 * weights[c]), order.index(c)))
        while True:
            slot = (offset[b] + nxt[b] * skip[b]) % size
            nxt[b] += 1
            if table[slot] is None:
                break
        table[slot] = b
        taken[b] += 1
    return table


# --- invariants ---------------------------------------------------------------------------


@FAST
@given(st.dictionaries(identities, st.integers(0, 1000), max_size=30),
       st.sampled_from((*SMALL_PRIMES, M)))
def test_every_position_holds_a_live_backend(weights: dict[str, int], size: int) -> None:
    ring = build_ring(weights, size)
    assert ring.table.dtype == np.int32
    assert ring.table.shape == (size,)
    if any(w > 0 for w in weights.values()):
        assert int(ring.table.min()) >= 0
        live = np.array(ring.weights)[ring.table]
        assert int(np.count_nonzero(live == 0)) == 0
        assert sum(ring.shares().values()) == size
    else:
        assert np.count_nonzero(ring.table == -1) == size
        assert ring.owners() == [None] * size


@pytest.mark.parametrize("weights", [{}, {"10.0.0.1": 0}, {"10.0.0.1": 0, "10.0.0.2": 0}])
def test_no_live_backend_gives_minus_one_everywhere(weights: dict[str, int]) -> None:
    ring = build_ring(weights, 13)
    assert ring.table.tolist() == [-1] * 13
    assert ring.shares() == dict.fromkeys(weights, 0)


@FAST
@given(st.dictionaries(identities, st.integers(0, 50), max_size=12),
       st.sampled_from(SMALL_PRIMES))
@example({"a": 1, "b": 1, "c": 1}, 13)  # plain paper algorithm: equal weights
@example({"a": 2, "b": 4, "c": 6}, 251)  # many exact key ties
@example({str(i): 1 for i in range(7)}, 5)  # more backends than slots
def test_matches_reference_transcription(weights: dict[str, int], size: int) -> None:
    assert build_ring(weights, size).owners() == reference_owners(weights, size)


def test_known_answer_pins_the_algorithm_across_versions() -> None:
    """Hosts on different releases must agree, so the output itself is part of the API."""
    weights = {"10.0.0.1": 1, "10.0.0.2": 2, "2001:db8::1": 3}
    small = build_ring(weights, 13)
    assert small.table.tolist() == [1, 2, 2, 1, 2, 2, 0, 2, 2, 1, 0, 1, 2]
    assert small.shares() == {"10.0.0.1": 2, "10.0.0.2": 4, "2001:db8::1": 7}
    big = build_ring(weights)
    assert big.fingerprint() == "b1f1365576f4134eed39cfc78cd0672db6716a1f54450e97e09277aa39c2faa6"
    assert big.shares() == {"10.0.0.1": 10923, "10.0.0.2": 21846, "2001:db8::1": 32768}


# --- weighting ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 999, 1000, 4099])
def test_equal_weights_get_floor_or_ceil(n: int) -> None:
    counts = list(build_ring(equal(n, weight=7)).shares().values())
    assert set(counts) <= {M // n, -(-M // n)}
    assert counts.count(-(-M // n)) == (M % n if M % n else n)


def test_more_backends_than_slots_gives_one_slot_each_to_the_first() -> None:
    ring = build_ring(equal(10), 7)
    assert list(ring.shares().values()) == [1] * 7 + [0] * 3


def assert_webster(ring: Ring) -> None:
    """Exact apportionment check: some T has every count within 1/2 of T * weight."""
    pairs = [(c, w) for c, w in zip(ring.shares().values(), ring.weights, strict=True) if w]
    lowest_upper = min(Fraction(2 * c + 1, 2 * w) for c, w in pairs)
    highest_lower = max(Fraction(2 * c - 1, 2 * w) for c, w in pairs)
    assert highest_lower <= lowest_upper


@FAST
@given(st.integers(1, 1000).flatmap(
    lambda n: st.lists(st.integers(1, 1000), min_size=n, max_size=n)))
@example([1] * 938 + [244] * 62)  # where the plain taken/weight deficit reaches 1.32%
@example([1] * 999 + [1000])
@example([1000] * 1000)
def test_shares_follow_weights(weights: list[int]) -> None:
    ring = build_ring({addr(i): w for i, w in enumerate(weights)}, M)
    assert_webster(ring)
    assert tvd(ring) <= len(weights) / (2 * M)  # the bound the schedule guarantees
    assert tvd(ring) < 0.01


def test_zero_weight_is_drained_and_changes_nothing_else() -> None:
    base = random_weights(50, seed=3)
    drained = {**base, "10.9.9.9": 0, "0.0.0.0": 0}  # one sorts first: indices shift
    with_zero, without = build_ring(drained), build_ring(base)
    assert with_zero.shares()["10.9.9.9"] == 0
    assert with_zero.shares()["0.0.0.0"] == 0
    assert with_zero.owners() == without.owners()
    assert diff_positions(with_zero, without).size == 0
    assert with_zero.fingerprint() == without.fingerprint()
    assert len(with_zero.order) == 52
    assert np.count_nonzero(with_zero.table != without.table) == M  # all indices shifted


# --- disruption ---------------------------------------------------------------------------


def collateral(old: Ring, new: Ring, subject: str) -> tuple[int, int]:
    """(moved positions owned by the subject neither before nor after, positions it didn't own).

    Moves to or from the subject are the ones the change asks for; the rest is the
    collateral Maglev promises to keep small.
    """
    moved = diff_positions(old, new)
    old_owner = np.array(old.owners(), dtype=object)[moved]
    new_owner = np.array(new.owners(), dtype=object)[moved]
    involved = (old_owner == subject) | (new_owner == subject)
    owned = max(old.shares().get(subject, 0), new.shares().get(subject, 0))
    return int(np.count_nonzero(~involved)), M - owned


def slots_of(ring: Ring, ident: str) -> np.ndarray:
    return np.flatnonzero(np.array(ring.owners(), dtype=object) == ident)


DISRUPTION_CASES = {
    "equal-10": equal(10),
    "equal-100": equal(100),
    "equal-1000": equal(1000),
    # Collateral scales with the changed backend's share (see the module docstring), so
    # the weighted case changes a backend of typical weight.
    "random-1000": random_weights(1000, seed=11),
}


def typical(weights: dict[str, int]) -> str:
    ranked = sorted(weights, key=lambda k: (weights[k], k))
    return ranked[len(ranked) // 2]


@pytest.mark.parametrize("case", sorted(DISRUPTION_CASES))
def test_removing_one_backend_moves_its_positions_and_under_1pct_of_others(case: str) -> None:
    base = DISRUPTION_CASES[case]
    victim = typical(base)
    old = build_ring(base)
    new = build_ring({k: w for k, w in base.items() if k != victim})
    moved, others = collateral(old, new, victim)
    victim_slots = slots_of(old, victim)
    assert victim_slots.size == old.shares()[victim] > 0
    assert np.isin(victim_slots, diff_positions(old, new)).all()
    assert moved <= 0.01 * others, f"{moved} of {others} other positions moved"


@pytest.mark.parametrize("case", sorted(DISRUPTION_CASES))
def test_adding_one_backend_moves_under_1pct_of_others(case: str) -> None:
    base = DISRUPTION_CASES[case]
    newcomer = "0.0.0.1"  # sorts first, so every index shifts; identities must not
    old = build_ring(base)
    new = build_ring({**base, newcomer: base[typical(base)]})
    moved, others = collateral(old, new, newcomer)
    newcomer_slots = slots_of(new, newcomer)
    assert newcomer_slots.size == new.shares()[newcomer] > 0
    assert np.isin(newcomer_slots, diff_positions(old, new)).all()
    assert moved <= 0.01 * others, f"{moved} of {others} other positions moved"


@pytest.mark.parametrize("case", sorted(DISRUPTION_CASES))
def test_doubling_one_weight_moves_under_1pct_of_others(case: str) -> None:
    base = DISRUPTION_CASES[case]
    subject = typical(base)
    old = build_ring(base)
    new = build_ring({**base, subject: 2 * base[subject]})
    moved, others = collateral(old, new, subject)
    kept = np.intersect1d(slots_of(old, subject), slots_of(new, subject)).size
    assert kept == old.shares()[subject]  # growing never takes a slot away from it
    assert moved <= 0.01 * others, f"{moved} of {others} other positions moved"


def test_diff_positions_compares_identities_not_indices() -> None:
    old = build_ring(equal(20))
    new = build_ring({**equal(20), "0.0.0.1": 100})
    moved = diff_positions(old, new)
    newcomer_slots = np.flatnonzero(new.table == new.order.index("0.0.0.1"))
    assert np.isin(newcomer_slots, moved).all()
    assert moved.size - newcomer_slots.size <= 0.01 * M
    assert np.count_nonzero(old.table != new.table) > 0.9 * M  # raw indices shifted


def test_diff_positions_rejects_different_sizes() -> None:
    with pytest.raises(ValueError, match="size"):
        diff_positions(build_ring(equal(3), 13), build_ring(equal(3), 17))


# --- determinism and the two implementations ----------------------------------------------

_CHILD = """
import json, random, sys
from xdplb import maglev
items = json.loads(sys.argv[1])
random.Random(int(sys.argv[2])).shuffle(items)
ring = maglev.build_ring(dict(items))
print(json.dumps([ring.fingerprint(), ring.table.tobytes().hex(), maglev.native_available()]))
"""


def run_child(items: list, seed: int, **env: str) -> list:
    full_env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(items), str(seed)],
                         env=full_env, check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def test_two_processes_build_identical_rings_from_shuffled_input() -> None:
    items = [[ident, w] for ident, w in random_weights(40, seed=5).items()]
    items.append(["2001:db8::7", 300])
    native = run_child(items, seed=1, PYTHONHASHSEED="1", XDPLB_MAGLEV_NATIVE="1")
    fallback = run_child(items, seed=2, PYTHONHASHSEED="2", XDPLB_MAGLEV_NATIVE="0")
    assert fallback[2] is False
    assert native[:2] == fallback[:2]
    here = build_ring(dict(reversed([tuple(i) for i in items])))
    assert [here.fingerprint(), here.table.tobytes().hex()] == native[:2]


@FAST
@given(st.dictionaries(identities, st.integers(0, 1000), max_size=40),
       st.sampled_from((*SMALL_PRIMES, M)))
@example({"a": 2, "b": 4, "c": 6}, 251)
@example({str(i): 3 for i in range(9)}, 5)
def test_native_and_python_fill_are_byte_identical(weights: dict[str, int], size: int) -> None:
    native = build_ring(weights, size)
    with python_fill():
        fallback = build_ring(weights, size)
    assert native.table.tobytes() == fallback.table.tobytes()


@pytest.mark.parametrize("n", [300, 1000])
def test_native_and_python_fill_agree_at_scale(n: int) -> None:
    weights = random_weights(n, seed=n)
    native = build_ring(weights)
    with python_fill():
        fallback = build_ring(weights)
    assert native.table.tobytes() == fallback.table.tobytes()


def test_build_is_pure() -> None:
    weights = random_weights(30, seed=9)
    snapshot = dict(weights)
    first, second = build_ring(weights), build_ring(weights)
    assert weights == snapshot
    assert first == second
    assert hash(first) == hash(second)
    assert not first.table.flags.writeable


def test_fingerprint_tracks_content() -> None:
    base = random_weights(10, seed=1)
    victim = sorted(base)[0]
    reweighted = {**base, victim: base[victim] + 1}
    assert build_ring(base).fingerprint() != build_ring(reweighted).fingerprint()
    assert build_ring(base, 13).fingerprint() != build_ring(base, 17).fingerprint()
    assert build_ring({}, 13).fingerprint() != build_ring({}, 17).fingerprint()


# --- validation ---------------------------------------------------------------------------


def test_is_prime_matches_a_sieve() -> None:
    limit = 20000
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    assert [n for n in range(limit) if is_prime(n)] == np.flatnonzero(sieve).tolist()


@pytest.mark.parametrize("n", [65537, 655373, 16777213, 2**61 - 1])
def test_is_prime_on_table_sizes(n: int) -> None:
    assert is_prime(n)


@pytest.mark.parametrize("n", [561, 41041, 3215031751, 65536, 655371, 2**32 + 1, -7])
def test_is_prime_rejects_composites(n: int) -> None:
    assert not is_prime(n)


@pytest.mark.parametrize(("size", "message"), [
    (65536, r"prime, got 65536 \(nearest primes: 65521, 65537\)"),
    (1, "between 3 and"),
    (2, "between 3 and"),
    (4, "prime"),
    (maglev.MAX_SIZE + 43, "between 3 and"),
    (65537.0, "must be an int"),
    (True, "must be an int"),
])
def test_rejects_bad_sizes(size: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_ring({"10.0.0.1": 1}, size)  # type: ignore[arg-type]


@pytest.mark.parametrize(("weights", "message"), [
    ({"10.0.0.1": -1}, "must be in 0..65535"),
    ({"10.0.0.1": 65536}, "must be in 0..65535"),
    ({"10.0.0.1": 1.5}, "must be an int, got float"),
    ({"10.0.0.1": "3"}, "must be an int, got str"),
    ({"10.0.0.1": True}, "must be an int, got bool"),
    ({"": 1}, "non-empty string"),
    ({7: 1}, "non-empty string"),
    ({"\ud800": 1}, "not valid Unicode"),
    ([("10.0.0.1", 1)], "must be a mapping"),
])
def test_rejects_bad_weights(weights: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_ring(weights)  # type: ignore[arg-type]


def test_accepts_numpy_integer_weights() -> None:
    assert build_ring({"10.0.0.1": np.int64(3)}, 13).shares() == {"10.0.0.1": 13}
