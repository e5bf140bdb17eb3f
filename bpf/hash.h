/* The flow hash. It picks the ring slot and the outer source address, so it
 * must be identical on every LB host (fixed seed, no per-boot randomness) and
 * in daemon/xdplb/structs.py (flow_hash), which tests prove against this code.
 *
 * Built for a short dependency chain, which is what a hash costs in a BPF
 * program: each address is read as two 64-bit lanes (its u32 words read as
 * little-endian straight from network-order memory, word i+1 in the high
 * half), every lane is multiplied by its own odd constant (the multiplies are
 * independent, so they overlap), the products are XORed into a seed, and
 * MurmurHash3's 64-bit finaliser spreads every input bit over the low 32 bits
 * that are returned. An IPv4 address in its mapped form has a zero first lane,
 * so IPv4 skips those two multiplies without changing the result.
 */
#ifndef XDPLB_HASH_H
#define XDPLB_HASH_H

#include "xdplb_structs.h"

#define FLOW_HASH_SEED 0x7864706c7864706cULL /* "xdpl" twice */
#define HASH_K_SRC_LO 0x9e3779b97f4a7c15ULL
#define HASH_K_SRC_HI 0xbf58476d1ce4e5b9ULL
#define HASH_K_DST_LO 0x94d049bb133111ebULL
#define HASH_K_DST_HI 0xd6e8feb86659fd93ULL
#define HASH_K_PORTS 0xa0761d6478bd642fULL
#define FILTER_K_LO 0xe7037ed1a0b428dbULL
#define FILTER_K_HI 0x8ebc6af09c88c6e3ULL
#define FILTER_K_MIX 0x589965cc75374cc3ULL
#define IPV4_MAPPED_LANE_LO 0xffff0000ULL /* w[2] of a mapped IPv4 address, as read */

static __always_inline __u64 fmix64(__u64 h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}

/* Words 0-1 (lo) and 2-3 (hi) of an address as two u64 lanes. */
static __always_inline __u64 lane_lo(const struct addr16 *a)
{
	return ((__u64)a->w[1] << 32) | a->w[0];
}

static __always_inline __u64 lane_hi(const struct addr16 *a)
{
	return ((__u64)a->w[3] << 32) | a->w[2];
}

/* The hi lane of a mapped IPv4 address, from the address word alone. */
static __always_inline __u64 lane_hi4(__u32 addr)
{
	return ((__u64)addr << 32) | IPV4_MAPPED_LANE_LO;
}

static __always_inline __u32 flow_hash(const struct addr16 *src, const struct addr16 *dst,
				       __u16 sport, __u16 dport, __u8 proto, int ipv6)
{
	__u64 h = FLOW_HASH_SEED;
	if (ipv6) {
		h ^= lane_lo(src) * HASH_K_SRC_LO;
		h ^= lane_lo(dst) * HASH_K_DST_LO;
		h ^= lane_hi(src) * HASH_K_SRC_HI;
		h ^= lane_hi(dst) * HASH_K_DST_HI;
	} else {
		h ^= lane_hi4(src->w[3]) * HASH_K_SRC_HI;
		h ^= lane_hi4(dst->w[3]) * HASH_K_DST_HI;
	}
	h ^= (((__u64)proto << 32) | sport | ((__u32)dport << 16)) * HASH_K_PORTS;
	return (__u32)fmix64(h);
}

/* Client affinity: the source address alone. */
static __always_inline __u32 source_hash(const struct addr16 *src, int ipv6)
{
	__u64 h = FLOW_HASH_SEED;
	if (ipv6)
		h ^= lane_lo(src) * HASH_K_SRC_LO ^ lane_hi(src) * HASH_K_SRC_HI;
	else
		h ^= lane_hi4(src->w[3]) * HASH_K_SRC_HI;
	return (__u32)fmix64(h);
}

/* The VIP address filter's slot: multiply-shift over the two lanes, one more
 * multiply to mix; the top 16 bits give the word (10) and the bit (6). It
 * runs on every packet, VIP or not, so it is kept to three multiplies. */
#define FILTER_WORD(h) ((__u32)((h) >> 54) & (ADDR_FILTER_WORDS - 1))
#define FILTER_BIT(h) ((__u32)((h) >> 48) & 63)

static __always_inline __u64 addr_filter_hash(const struct addr16 *a, int ipv6)
{
	__u64 h;
	if (ipv6)
		h = lane_lo(a) * FILTER_K_LO + lane_hi(a) * FILTER_K_HI;
	else
		h = lane_hi4(a->w[3]) * FILTER_K_HI;
	h ^= h >> 32;
	return h * FILTER_K_MIX;
}

/* The VIP index's and the flow table's slot hashes: multiply-add over the
 * key's lanes, folded and multiplied once more; the caller takes the top
 * bits (as many as the table has index bits). The control plane computes
 * them too (daemon/xdplb/structs.py), from the key alone. */
static __always_inline __u64 fold_mix(__u64 h)
{
	h ^= h >> 32;
	return h * FILTER_K_MIX;
}

static __always_inline __u64 vip_index_hash(const struct vip_key *k)
{
	return fold_mix(lane_lo(&k->addr) * HASH_K_SRC_LO + lane_hi(&k->addr) * HASH_K_SRC_HI +
			((((__u64)k->proto) << 16) | k->port) * HASH_K_PORTS);
}

static __always_inline __u64 flow_set_hash(const struct flow_key *k)
{
	return fold_mix(lane_lo(&k->src) * HASH_K_SRC_LO + lane_hi(&k->src) * HASH_K_SRC_HI +
			((((__u64)k->vip_id) << 32) | ((__u32)k->dport << 16) | k->sport) *
				HASH_K_PORTS);
}

/* 1 when now_s is one of the flow's refresh seconds (bpf/balancer.c
 * settled_pick): MurmurHash3's 32-bit finaliser over the flow hash and the
 * second, so whatever the rhythm of a flow's packets (a keepalive every 64 s
 * included), each second it sends in is one with probability 1/period, and
 * flows are staggered. period is a power of two; mirrored in structs.py. */
static __always_inline int refresh_second(__u32 hash, __u32 now_s, __u32 period)
{
	__u32 x = hash ^ (now_s * 0x9e3779b1U);
	x ^= x >> 16;
	x *= 0x85ebca6bU;
	x ^= x >> 13;
	x *= 0xc2b2ae35U;
	x ^= x >> 16;
	return (x & (period - 1)) == 0;
}

/* Lemire's multiply-shift maps a 32-bit hash onto [0, size) without a
 * division, which matters because ring sizes are per-VIP run-time primes. */
static __always_inline __u32 ring_slot(__u32 hash, __u32 size)
{
	return (__u32)(((__u64)hash * size) >> 32);
}

#endif
