"""Weighted Maglev consistent hashing, as a pure function of (weights, size).

The lookup table follows the Maglev paper (Eisenbud et al., NSDI 2016, section 3.4):
each backend gets ``offset = h1 mod M`` and ``skip = h2 mod (M - 1) + 1`` from two
independent hashes of its identity, its preference list is ``(offset + j*skip) mod M``,
and backends take turns claiming their next preferred slot that is still empty, until
all M slots (M prime, so every preference list visits every slot) are owned.

Weights: who takes the next turn
--------------------------------
The paper's loop gives every backend one turn per round, i.e. equal shares.  Here the
next turn goes to the live backend with the smallest ``(taken + 1/2) / weight``, ties
to the canonically first identity: a weighted-round-robin schedule whose k-th turn of
backend i sits at virtual time ``(k + 1/2) / w_i`` (Webster/Sainte-Lague apportionment).

* The schedule does not depend on the preference lists (every turn fills exactly one
  slot), so shares are a pure apportionment of M by the weights: every count is within
  1/2 of ``T * w_i`` for one common T, which bounds the total variation distance to the
  weight proportions by N/(2M), 0.76% at N=1000, M=65537 (measured: 0.19% for random
  weights 1..1000).  Equal weights reduce to the paper's round robin: floor(M/N) or
  ceil(M/N) positions each.
* Why not the plain ``taken / weight`` deficit: every backend then gets a turn at time
  0, which favours light backends; measured at N=1000 (938 backends of weight 1, 62 of
  weight 244) its distance reaches 1.32%, over the 1% budget.  Smooth weighted
  round-robin has the same start-up bias and reorders other backends' turns when the
  total weight changes.
* Adding, removing or reweighting one backend leaves the relative order of the other
  backends' turns unchanged, which is what the paper's minimal-disruption argument
  relies on.  Weight 0 means drained: no turns, so the ring equals the ring without it.
* A live backend whose proportional share is under half a slot (M*w/W < 1/2) gets no
  position, as proportionality demands.  With the paper's advice M >= 100*N that only
  happens to weights under 1/200 of the mean.

Disruption (measured at M=65537 by benchmarks/bench_maglev.py, mean / max over 10
random changes, as % of the positions the changed backend did not own):

=====  ==============  =============  =============  =============
N      weights         remove one     add one        weight x2
=====  ==============  =============  =============  =============
10     equal           0.30 / 0.62    0.26 / 0.41    0.30 / 0.67
100    equal           0.56 / 0.58    0.55 / 0.58    0.55 / 0.58
1000   equal           0.55 / 0.59    0.60 / 0.62    0.59 / 0.63
1000   random 1..1000  0.44 / 0.97    0.48 / 0.83    0.45 / 0.87
=====  ==============  =============  =============  =============

Collateral moves are ~5.4x the changed backend's share at N=1000, M=65537 (correlation
0.99 over 120 removals), whatever the weighting: the same factor as the paper's
equal-weight algorithm.  So removing a backend holding twice the mean share (heavy
weight among 1000 random 1..1000) can move slightly over 1% of the rest: up to 1.08%,
in 14 of 120 such trials.  At M=655373 the same removals move at most 0.43%.

Determinism
-----------
offset and skip come from keyed BLAKE2b over the identity's UTF-8 bytes (Python's
``hash()`` is salted per process), and turns follow the sorted identity order, never
the mapping's insertion order, so every host builds a byte-identical table.

Speed
-----
The fill is inherently sequential (each turn depends on the slots taken before it).
Measured on the 2-core dev VM at M=65537, N=1000, equal weights: the pure Python
probing loop alone takes ~33 ms (650k probes); a numpy version that vectorises each
round and commits the longest conflict-free prefix takes ~320 ms (110k small numpy
calls); the 20 ms target is out of reach for both.  So the fill runs in a ~80-line C
helper (``_maglev.c``), compiled when the package is built (the ``xdplb._maglev``
extension of pyproject.toml, so an LB host needs no compiler) and loaded with
ctypes: 6.9 ms for the whole build at N=1000 (hashing and sorting included).  Where
the helper is missing (a checkout run without building it), or with
``XDPLB_MAGLEV_NATIVE=0``, a pure Python/numpy fallback builds the byte-identical
table, more slowly (40-48 ms at N=1000; 0.8-1.8 s at N=1000, M=655373).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SIZE",
    "MAX_WEIGHT",
    "Ring",
    "build_ring",
    "diff_positions",
    "is_prime",
    "native_available",
]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 65537
# 2^24 slots is 64 MiB of int32 table: far beyond any sane BPF map, and keeps every
# intermediate product in the C helper well inside 64 bits.
MAX_SIZE = 1 << 24
# Weights travel as 16-bit values; keeps (2*taken+1)*weight products exact in the C helper.
MAX_WEIGHT = 65535

# Distinct BLAKE2b personalisations make offset and skip independent hashes.
_OFFSET_PERSON = b"xdplb-mglv-off"
_SKIP_PERSON = b"xdplb-mglv-skip"
_FINGERPRINT_TAG = b"xdplb-maglev-ring-v1\0"


@dataclass(frozen=True, eq=False, repr=False)
class Ring:
    """One Maglev lookup table plus what is needed to interpret it.

    ``table`` holds indices into ``order`` (not identities) because that is what the
    data plane stores; ``order`` is canonical so the same backends always get the same
    indices.  The table is made read-only: a Ring is a value that can be shared.
    """

    order: tuple[str, ...]
    weights: tuple[int, ...]
    table: np.ndarray

    @property
    def size(self) -> int:
        """Number of slots M (a prime)."""
        return int(self.table.shape[0])

    def owners(self) -> list[str | None]:
        """Identity owning each position, None when no backend is live.

        Comparisons across rings must use identities, as indices shift whenever a
        backend sorting earlier is added or removed.
        """
        lookup = np.array([*self.order, None], dtype=object)
        return lookup[self.table].tolist()  # -1 picks the trailing None

    def shares(self) -> dict[str, int]:
        """Positions owned per identity (0 for drained ones), for metrics and checks."""
        counts = np.bincount(self.table[self.table >= 0], minlength=len(self.order))
        return {ident: int(c) for ident, c in zip(self.order, counts, strict=True)}

    def fingerprint(self) -> str:
        """Hex SHA-256 of the table as identities, so two hosts can compare rings cheaply.

        Drained identities do not appear in the table, so they do not change the
        fingerprint.  Encoding (for anyone reimplementing it): tag, size as u64 LE,
        live-identity count as u32 LE, each live identity in sorted order as u32 LE
        length + UTF-8, then each slot's index into that live list (-1 for none) as
        i32 LE.
        """
        used = np.flatnonzero(np.bincount(self.table[self.table >= 0],
                                          minlength=len(self.order)))
        remap = np.full(len(self.order) + 1, -1, dtype="<i4")
        remap[used] = np.arange(used.size)
        digest = hashlib.sha256(_FINGERPRINT_TAG)
        digest.update(self.size.to_bytes(8, "little"))
        digest.update(int(used.size).to_bytes(4, "little"))
        for index in used:
            raw = self.order[index].encode()
            digest.update(len(raw).to_bytes(4, "little") + raw)
        digest.update(remap[self.table].tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (self.order == other.order and self.weights == other.weights
                and np.array_equal(self.table, other.table))

    def __hash__(self) -> int:
        return hash((self.order, self.weights, self.table.tobytes()))

    def __repr__(self) -> str:
        return f"Ring(size={self.size}, backends={len(self.order)}, shares={self.shares()})"


def is_prime(n: int) -> bool:
    """Deterministic primality test; Maglev needs a prime M so every skip visits every slot.

    Miller-Rabin with the first 12 prime bases is exact for all n < 3.3e24, which
    covers every table size anyone could configure.
    """
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    return all(_passes_round(n, a, d, r) for a in bases)


def _passes_round(n: int, a: int, d: int, r: int) -> bool:
    """One Miller-Rabin witness test: False proves n composite."""
    x = pow(a, d, n)
    if x in (1, n - 1):
        return True
    for _ in range(r - 1):
        x = pow(x, 2, n)
        if x == n - 1:
            return True
    return False


def build_ring(weights: Mapping[str, int], size: int = DEFAULT_SIZE) -> Ring:
    """Build the weighted Maglev table for ``weights`` (identity -> weight) over ``size`` slots.

    A pure function: the same weights and size give a byte-identical table in any
    process on any host, whatever the mapping's order, so peers need not coordinate.
    Raises ValueError on a size that is not a prime in [3, MAX_SIZE], or on an identity
    that is not a non-empty string, or a weight that is not an int in [0, MAX_WEIGHT].
    """
    size = _check_size(size)
    clean = _check_weights(weights)
    order = tuple(sorted(clean))
    all_weights = tuple(clean[ident] for ident in order)
    table = np.full(size, -1, dtype=np.int32)
    live = [i for i, w in enumerate(all_weights) if w > 0]
    if live:
        params = _live_params([order[i] for i in live], [all_weights[i] for i in live], size)
        _fill(table, *params, np.array(live, dtype=np.int32))
    table.flags.writeable = False
    return Ring(order=order, weights=all_weights, table=table)


def diff_positions(old: Ring, new: Ring) -> np.ndarray:
    """Positions whose owning identity differs between two rings of the same size.

    Compares identities, not indices: adding a backend that sorts early shifts every
    later index without moving any traffic.
    """
    if old.size != new.size:
        raise ValueError(f"rings differ in size ({old.size} vs {new.size}); every slot moves")
    union = sorted(set(old.order) | set(new.order))
    rank = {ident: i for i, ident in enumerate(union)}
    old_ids = _to_union(old, rank)
    new_ids = _to_union(new, rank)
    return np.flatnonzero(old_ids != new_ids)


def _to_union(ring: Ring, rank: dict[str, int]) -> np.ndarray:
    """Re-express a table's entries as indices into a shared identity list (-1 kept)."""
    remap = np.array([*(rank[ident] for ident in ring.order), -1], dtype=np.int64)
    return remap[ring.table]


def native_available() -> bool:
    """Whether the compiled fill is in use, so the daemon can report a slow fallback."""
    return _native_fill() is not None


# --- validation --------------------------------------------------------------------------


def _check_size(size: int) -> int:
    """Reject sizes for which Maglev's guarantees or our integer bounds fail."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"ring size must be an int, got {type(size).__name__}")
    size = int(size)
    if not 3 <= size <= MAX_SIZE:
        raise ValueError(f"ring size must be a prime between 3 and {MAX_SIZE}, got {size}")
    if not is_prime(size):
        lower = next(n for n in range(size - 1, 1, -1) if is_prime(n))
        upper = next(n for n in range(size + 1, 2 * size) if is_prime(n))
        raise ValueError(
            f"ring size must be prime, got {size} (nearest primes: {lower}, {upper})")
    return size


def _check_weights(weights: Mapping[str, int]) -> dict[str, int]:
    """Validate identities and weights; returns a plain dict with plain ints."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of identity to int, got "
                         f"{type(weights).__name__}")
    clean: dict[str, int] = {}
    for ident, weight in weights.items():
        _check_identity(ident)
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
            raise ValueError(f"weight of {ident!r} must be an int, got {type(weight).__name__}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of {ident!r} must be in 0..{MAX_WEIGHT}, got {weight}")
        clean[ident] = int(weight)
    return clean


def _check_identity(ident: object) -> None:
    """An identity must hash identically everywhere, hence a non-empty encodable str."""
    if not isinstance(ident, str) or not ident:
        raise ValueError(f"backend identity must be a non-empty string, got {ident!r}")
    try:
        ident.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"backend identity {ident!r} is not valid Unicode") from exc


# --- table construction ------------------------------------------------------------------


def _hash64(ident: str, person: bytes) -> int:
    """Stable 64-bit hash; personalisation gives independent functions from one primitive."""
    digest = hashlib.blake2b(ident.encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little")


def _live_params(
    idents: list[str], weights: list[int], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per live backend: weight, offset (the fill's starting position) and skip."""
    offset = [_hash64(ident, _OFFSET_PERSON) % size for ident in idents]
    skip = [_hash64(ident, _SKIP_PERSON) % (size - 1) + 1 for ident in idents]
    return (np.array(weights, dtype=np.uint32), np.array(offset, dtype=np.uint32),
            np.array(skip, dtype=np.uint32))


def _fill(table: np.ndarray, weight: np.ndarray, offset: np.ndarray, skip: np.ndarray,
          slot_value: np.ndarray) -> None:
    """Fill ``table`` (all -1) in place, natively when possible."""
    native = _native_fill()
    if native is None:
        _fill_python(table, weight, offset, skip, slot_value)
    else:
        _fill_native(native, table, weight, offset, skip, slot_value)


def _fill_native(native: Callable[..., int], table: np.ndarray, weight: np.ndarray,
                 offset: np.ndarray, skip: np.ndarray, slot_value: np.ndarray) -> None:
    """Run the C fill; the scratch buffers are allocated here so C never allocates."""
    n = weight.size
    pos = offset.copy()  # advanced in place by the helper
    taken = np.empty(n, dtype=np.uint64)
    heap = np.empty(n, dtype=np.uint32)
    native(table.size, n, weight, skip, pos, slot_value, taken, heap, table)


def _fill_python(table: np.ndarray, weight: np.ndarray, offset: np.ndarray, skip: np.ndarray,
                 slot_value: np.ndarray) -> None:
    """Reference fill, byte-identical to _maglev.c, used when the helper cannot be built."""
    size = table.size
    owner = [-1] * size  # a list: element access is ~5x cheaper than on an ndarray
    pos = offset.tolist()
    steps = skip.tolist()
    for b in _schedule(weight, size).tolist():
        p = pos[b]
        while owner[p] >= 0:
            p += steps[b]
            if p >= size:
                p -= size
        owner[p] = b
        pos[b] = p
    table[:] = slot_value[np.array(owner)]


def _schedule(weight: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` turns: backend i's k-th turn sits at ((k + 1/2) / w_i, i), ascending.

    Backend i never needs more than floor((size + N/2) * w_i / W + 1/2) turns, so at most
    that many are generated, then stably sorted (generation order is by i, which breaks
    ties exactly as the C heap does).  Float keys order exactly: equal rationals round
    to equal doubles, and distinct ones here differ by at least ~1/(2^17 * size)
    relative, far above double precision.
    """
    w = weight.astype(np.int64)
    counts = (2 * size + w.size) * w // (2 * int(w.sum())) + 1
    owner = np.repeat(np.arange(w.size), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    key = (np.arange(owner.size) - starts + 0.5) / w[owner]
    return owner[np.argsort(key, kind="stable")[:size]]


# --- native helper -----------------------------------------------------------------------

# The compiled helper: built by setuptools as an extension module's file, but a plain
# C library without a Python init function, so it is found (never imported) and loaded
# with ctypes.
NATIVE_MODULE = "xdplb._maglev"


@functools.cache
def _native_fill() -> Callable[..., int] | None:
    """Load the compiled fill once per process; None means use the Python fallback.

    Caching only picks the implementation; both give identical tables.
    """
    if os.environ.get("XDPLB_MAGLEV_NATIVE", "1") == "0":
        return None
    path = native_library_path()
    if path is None:
        log.warning("maglev: the compiled fill %s is not installed (a checkout that was "
                    "not built?); using the slower Python fill", NATIVE_MODULE)
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        log.warning("maglev: cannot load the compiled fill (%s); using the slower Python "
                    "fill", exc)
        return None
    fill = lib.xdplb_maglev_fill
    u32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
    i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    u64 = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
    fill.argtypes = [ctypes.c_uint32, ctypes.c_uint32, u32, u32, u32, i32, u64, u32, i32]
    fill.restype = ctypes.c_uint64
    return fill


def native_library_path() -> str | None:
    """Where the built helper is, or None if this installation has none."""
    spec = importlib.util.find_spec(NATIVE_MODULE)
    return spec.origin if spec is not None and spec.origin else None
