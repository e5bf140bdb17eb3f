/*
 * Weighted Maglev table fill: the hot loop of xdplb.maglev.build_ring.
 *
 * Compiled lazily by maglev.py with gcc and loaded through ctypes, so it has no
 * Python headers and no allocation: the caller passes every buffer.  maglev.py
 * carries a pure Python fallback that must stay byte-identical to this file;
 * tests/test_maglev.py checks that they agree.
 *
 * Turn order: the live backend with the smallest (taken + 1/2) / weight goes next,
 * ties to the lower index (canonical order); maglev.py explains the choice.  Keys
 * are compared as (2*taken + 1) * other_weight so the order is exact: taken <= m
 * <= 2^24 and weight < 2^16 keep the products below 2^42.
 */
#include <stdint.h>

/* Whether backend a takes its turn before backend b. */
static int before(uint32_t a, uint32_t b, const uint64_t *taken, const uint32_t *weight)
{
    uint64_t lhs = (2 * taken[a] + 1) * weight[b];
    uint64_t rhs = (2 * taken[b] + 1) * weight[a];
    return lhs < rhs || (lhs == rhs && a < b);
}

/* Move heap[at] down until both children come after it. */
static void sift_down(uint32_t *heap, uint32_t n, uint32_t at, const uint64_t *taken,
                      const uint32_t *weight)
{
    uint32_t item = heap[at];
    for (;;) {
        uint64_t child = 2 * (uint64_t)at + 1;
        if (child >= n)
            break;
        if (child + 1 < n && before(heap[child + 1], heap[child], taken, weight))
            child++;
        if (!before(heap[child], item, taken, weight))
            break;
        heap[at] = heap[child];
        at = (uint32_t)child;
    }
    heap[at] = item;
}

/*
 * m: table size (prime); n: live backends (weight > 0), in canonical order.
 * weight, skip: per live backend.  pos: per live backend, starts at its offset,
 * advanced in place.  slot_value: what to store in the table for that backend
 * (its index in the full order).  taken, heap: scratch of n entries each.
 * table: m entries, all -1 on entry.  Returns the number of probes made.
 */
uint64_t xdplb_maglev_fill(uint32_t m, uint32_t n, const uint32_t *weight, const uint32_t *skip,
                           uint32_t *pos, const int32_t *slot_value, uint64_t *taken,
                           uint32_t *heap, int32_t *table)
{
    uint64_t probes = 0;
    if (n == 0)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        taken[i] = 0;
        heap[i] = i;
    }
    for (uint32_t i = n / 2; i-- > 0;)
        sift_down(heap, n, i, taken, weight);
    for (uint32_t filled = 0; filled < m; filled++) {
        uint32_t b = heap[0];
        uint64_t p = pos[b];
        while (table[p] >= 0) {
            p += skip[b];
            if (p >= m)
                p -= m;
            probes++;
        }
        table[p] = slot_value[b];
        pos[b] = (uint32_t)p;
        taken[b]++;
        sift_down(heap, n, 0, taken, weight); /* only the root's key grew */
    }
    return probes;
}
