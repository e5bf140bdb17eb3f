/* bench_memprobe: the MAC swap plus one read of per-flow memory, a second
 * baseline for benchmarks/bench_linerate.py.
 *
 * It reads one 8-byte word of an array as large as the balancer's flow
 * table (PROBE_BITS: log2 of its words), at a slot given by a hash of the
 * frame's IPv4 source address and TCP ports, and makes the frame depend on
 * it. That is the least memory any exact per-flow table must touch for a
 * packet: with many flows the read misses the caches and the TLB, as the
 * balancer's flow lookup does, so the balancer's cost over this program is
 * its own work rather than the memory system's.
 *
 * bench_memlatency, at the end, times reads of the same array one after
 * another (benchmarks/bench_memlatency.py). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>

BPF_ARRAY(probe_words, __u64, 1U << PROBE_BITS);
BPF_PERCPU_ARRAY(probe_stats, __u64, 2); /* 0: frames probed, 1: not IPv4 TCP */
BPF_PERCPU_ARRAY(latency_state, __u64, 1);

int bench_memprobe(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 stat = 1;
	if ((void *)(ip + 1) > data_end || eth->h_proto != __constant_htons(ETH_P_IP) ||
	    ip->protocol != IPPROTO_TCP)
		goto other;
	__u32 *ports = (void *)ip + ip->ihl * 4;
	if ((void *)(ports + 1) > data_end)
		goto other;
	__u64 h = (((__u64)ip->saddr << 32) | *ports) * 0x9E3779B97F4A7C15ULL;
	__u32 slot = h >> (64 - PROBE_BITS);
	__u64 *word = probe_words.lookup(&slot);
	if (!word)
		goto other;
	/* The frame depends on the word (zero: unchanged), as a balancer's
	 * encapsulation depends on the backend it read. */
	__u8 read = *(volatile __u64 *)word;
	stat = 0;
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	eth->h_dest[5] ^= read;
	__u64 *n = probe_stats.lookup(&stat);
	if (n)
		*n += 1;
	return XDP_TX;
other:;
	__u64 *m = probe_stats.lookup(&stat);
	if (m)
		*m += 1;
	return XDP_DROP;
}

/* bench_memlatency: LATENCY_READS reads of probe_words at pseudo-random slots,
 * each slot computed from the word read before it, so the reads cannot
 * overlap and BPF_PROG_TEST_RUN's duration / LATENCY_READS is the latency of
 * one. The generator's state carries over from run to run, so repeated runs
 * do not replay the same slots. */
int bench_memlatency(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *state = latency_state.lookup(&zero);
	if (!state)
		return XDP_ABORTED;
	__u64 x = *state, word = 0;
	for (int i = 0; i < LATENCY_READS; i++) {
		x = x * 6364136223846793005ULL + 1442695040888963407ULL + word;
		__u32 slot = (x >> 33) & ((1U << PROBE_BITS) - 1);
		__u64 *w = probe_words.lookup(&slot);
		if (w)
			word = *(volatile __u64 *)w;
	}
	*state = x;
	return XDP_DROP;
}
