/* The flow hash. It picks the ring slot and the outer source address, so it
 * must be identical on every LB host (fixed seed, no per-boot randomness) and
 * in daemon/xdplb/structs.py (flow_hash), which tests prove against this code.
 * MurmurHash3's 32-bit mixing: a handful of multiplies, well spread. Words are
 * read as little-endian u32 straight from network-order memory.
 */
#ifndef XDPLB_HASH_H
#define XDPLB_HASH_H

#include "xdplb_structs.h"

#define FLOW_HASH_SEED 0x7864706cU /* "xdpl" */
#define ADDR_FILTER_SEED 0x61646472U /* "addr" */

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 hash_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51U;
	k = rotl32(k, 15);
	k *= 0x1b873593U;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64U;
}

static __always_inline __u32 hash_final(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

/* IPv4 addresses are mixed as their one meaningful word: the mapped prefix
 * carries no entropy and would cost three mixes per address. */
static __always_inline __u32 hash_addr(__u32 h, const struct addr16 *a, int ipv6)
{
	if (ipv6) {
		h = hash_mix(h, a->w[0]);
		h = hash_mix(h, a->w[1]);
		h = hash_mix(h, a->w[2]);
	}
	return hash_mix(h, a->w[3]);
}

static __always_inline __u32 flow_hash(const struct addr16 *src, const struct addr16 *dst,
				       __u16 sport, __u16 dport, __u8 proto, int ipv6)
{
	__u32 h = hash_addr(FLOW_HASH_SEED, src, ipv6);
	h = hash_addr(h, dst, ipv6);
	h = hash_mix(h, (__u32)sport | ((__u32)dport << 16));
	h = hash_mix(h, proto);
	return hash_final(h);
}

static __always_inline __u32 source_hash(const struct addr16 *src, int ipv6)
{
	return hash_final(hash_addr(FLOW_HASH_SEED, src, ipv6));
}

static __always_inline __u32 addr_filter_hash(const struct addr16 *a, int ipv6)
{
	return hash_final(hash_addr(ADDR_FILTER_SEED, a, ipv6));
}

/* Lemire's multiply-shift maps a 32-bit hash onto [0, size) without a
 * division, which matters because ring sizes are per-VIP run-time primes. */
static __always_inline __u32 ring_slot(__u32 hash, __u32 size)
{
	return (__u32)(((__u64)hash * size) >> 32);
}

#endif
