/* Line-rate traffic generator and receive counter (benchmarks/bench_linerate.py).
 *
 * xdplb_trafficgen runs under BPF_PROG_TEST_RUN in live-frames mode
 * (BPF_F_TEST_XDP_LIVE_FRAMES) with a veth as ingress device: every frame it
 * returns XDP_TX for is transmitted out of that veth into its peer. The kernel
 * recycles the frames' pages but not their contents (the receiving side may
 * have encapsulated or swapped them), so each run writes the template headers
 * back, then makes the frame flow number (a per-CPU frame counter modulo
 * `flows`) by adding its high bits to the source address and its low bits to
 * the source port, fixing both checksums incrementally.
 *
 * xdplb_rxcount goes on the veth where frames come back: it classifies each
 * frame (IPIP-encapsulated, plain TCP, other), counts it in a per-CPU array
 * and drops it. Attaching it also gives that veth the NAPI instance that
 * XDP_TX'd frames need to be received at all.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#define GEN_HEADER_LEN 64  /* template bytes restored per frame */
#define GEN_PORT_BITS 14   /* flow number bits that go into the source port */

struct gen_config {
	__u32 flows;       /* distinct flows, >= 1 */
	__u32 len;         /* frame length */
	__u8 hdr[GEN_HEADER_LEN];
};

struct rx_counters {
	__u64 encap;       /* IPv4 carrying IPIP (what the balancer sends) */
	__u64 plain;       /* IPv4 TCP (what a MAC-swap program sends) */
	__u64 other;
};

BPF_ARRAY(gen_config, struct gen_config, 1);
BPF_PERCPU_ARRAY(gen_state, __u64, 1);
BPF_PERCPU_ARRAY(rx_stats, struct rx_counters, 1);

/* RFC 1624: checksum after a 16-bit word changes from `old` to `new`. */
static __always_inline __u16 gen_csum_replace(__u16 check, __u16 old, __u16 new)
{
	__u32 sum = (__u16)~check + (__u16)~old + (__u32)new;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

int xdplb_trafficgen(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct gen_config *cfg = gen_config.lookup(&zero);
	__u64 *counter = gen_state.lookup(&zero);
	if (!cfg || !counter || !cfg->flows)
		return XDP_ABORTED;
	int delta = (int)(ctx->data_end - ctx->data) - (int)cfg->len;
	if (delta && bpf_xdp_adjust_head(ctx, delta))
		return XDP_ABORTED;
	if (bpf_xdp_store_bytes(ctx, 0, cfg->hdr, GEN_HEADER_LEN))
		return XDP_ABORTED;

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_ABORTED;

	__u32 flow = *counter % cfg->flows;
	*counter += 1;
	/* The template's source address ends in a 16-bit word with room for
	 * the high bits, and its source port leaves room for the low bits. */
	__u16 *addr_lo = (__u16 *)&ip->saddr + 1;
	__u16 old_addr = *addr_lo, old_port = tcp->source;
	__u16 new_addr = bpf_htons(bpf_ntohs(old_addr) + (flow >> GEN_PORT_BITS));
	__u16 new_port = bpf_htons(bpf_ntohs(old_port) + (flow & ((1 << GEN_PORT_BITS) - 1)));
	*addr_lo = new_addr;
	tcp->source = new_port;
	ip->check = gen_csum_replace(ip->check, old_addr, new_addr);
	__u16 check = gen_csum_replace(tcp->check, old_addr, new_addr);
	tcp->check = gen_csum_replace(check, old_port, new_port);
	return XDP_TX;
}

int xdplb_rxcount(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct rx_counters *c = rx_stats.lookup(&zero);
	if (!c)
		return XDP_DROP;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		c->other++;
	else if (ip->protocol == IPPROTO_IPIP)
		c->encap++;
	else if (ip->protocol == IPPROTO_TCP)
		c->plain++;
	else
		c->other++;
	return XDP_DROP;
}
