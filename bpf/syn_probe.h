/* Half-open TCP checks (check kind tcp-syn): the replies, caught before the stack.
 *
 * lbd writes a probe into syn_probes[slot] (the backend's address and port and
 * a fresh random cookie), then sends a bare SYN with sequence number = cookie
 * from port SYN_PORT_BASE + slot % SYN_PORTS through a send-only raw socket:
 * the LB host's TCP stack never sees the connection. The backend's answer
 * comes back here. A SYN-ACK or RST whose acknowledgment is cookie + 1, from
 * the probe's address and port, is recorded in the probe (SYN_OPEN or
 * SYN_REFUSED); the SYN-ACK is answered with a RST (XDP_TX) and neither
 * reaches the stack, so it neither answers them nor keeps state. Anything else
 * (another cookie, port or address) passes untouched: a forged or stale reply
 * cannot mark a backend up, since the cookie is 32 random bits per check.
 */
#ifndef XDPLB_SYN_PROBE_H
#define XDPLB_SYN_PROBE_H

#include "parse.h"
#include "csum.h"
#include "encap.h"
#include "icmp.h"

#define TCP_FLAG_RST 0x04
#define SYN_RST_TTL 64
#define TCP_HEADER_LEN 20

/* What the RST needs of the SYN-ACK, kept before the frame is cut. */
struct syn_reply {
	struct addr16 src; /* the backend */
	struct addr16 dst; /* this host */
	__u16 sport;       /* the backend's port, network order */
	__u16 dport;       /* the probe's port, network order */
	__u32 ack;         /* the SYN-ACK's acknowledgment, network order: the RST's seq */
};

static __always_inline int addr_eq(const struct addr16 *a, const struct addr16 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

struct ipv4_pseudo_header {
	__u32 saddr;
	__u32 daddr;
	__u8 zero;
	__u8 proto;
	__u16 len;
};

/* A bare RST: ports swapped, seq = the SYN-ACK's ack, no ACK flag (RFC 9293 3.10.7.3). */
static __always_inline void write_rst_tcp(struct tcphdr *tcp, const struct syn_reply *r)
{
	__builtin_memset(tcp, 0, sizeof(*tcp));
	tcp->source = r->dport;
	tcp->dest = r->sport;
	tcp->seq = r->ack;
	((__u8 *)tcp)[12] = (TCP_HEADER_LEN / 4) << 4;
	((__u8 *)tcp)[TCP_FLAGS_OFFSET] = TCP_FLAG_RST;
}

/* The RST's TCP checksum: the pseudo-header's sum, then the header's. */
static __always_inline int finish_rst_csum(struct tcphdr *tcp, void *pseudo, __u32 pseudo_len)
{
	__s64 seed = bpf_csum_diff(0, 0, pseudo, pseudo_len, 0);
	if (seed < 0)
		return -1;
	__s64 sum = bpf_csum_diff(0, 0, (void *)tcp, TCP_HEADER_LEN, seed);
	if (sum < 0)
		return -1;
	tcp->check = fold_csum((__u64)sum);
	return 0;
}

static __always_inline int write_rst_v4(void *p, void *data_end, const struct syn_reply *r)
{
	struct iphdr *ip = p;
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return -1;
	*(__u8 *)ip = 0x45;
	ip->tos = 0;
	ip->tot_len = BE16(sizeof(*ip) + TCP_HEADER_LEN);
	ip->id = 0;
	ip->frag_off = BE16(0x4000); /* DF */
	ip->ttl = SYN_RST_TTL;
	ip->protocol = IPPROTO_TCP;
	ip->check = 0;
	ip->saddr = r->dst.w[3];
	ip->daddr = r->src.w[3];
	ip->check = ipv4_header_csum(ip);
	write_rst_tcp(tcp, r);
	struct ipv4_pseudo_header ph = {
		.saddr = ip->saddr, .daddr = ip->daddr, .proto = IPPROTO_TCP,
		.len = BE16(TCP_HEADER_LEN),
	};
	return finish_rst_csum(tcp, &ph, sizeof(ph));
}

static __always_inline int write_rst_v6(void *p, void *data_end, const struct syn_reply *r)
{
	struct ipv6hdr *ip6 = p;
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return -1;
	*(__u32 *)ip6 = BE32(6U << 28);
	ip6->payload_len = BE16(TCP_HEADER_LEN);
	ip6->nexthdr = IPPROTO_TCP;
	ip6->hop_limit = SYN_RST_TTL;
	__builtin_memcpy(&ip6->saddr, &r->dst, sizeof(ip6->saddr));
	__builtin_memcpy(&ip6->daddr, &r->src, sizeof(ip6->daddr));
	write_rst_tcp(tcp, r);
	struct ipv6_pseudo_header ph = {
		.saddr = ip6->saddr, .daddr = ip6->daddr,
		.len = BE32(TCP_HEADER_LEN), .nexthdr = BE32(IPPROTO_TCP),
	};
	return finish_rst_csum(tcp, &ph, sizeof(ph));
}

/* Turns the SYN-ACK frame into the RST: cut after the new headers' length, then
 * IP and TCP written afresh where the old IP header began (IPv4 options and IPv6
 * extension headers are not carried over). The frame is addressed back to its
 * sender, or, to_sender 0, left addressed as received for encapsulate() to
 * readdress (the RST of a check through the VIP). */
static __always_inline int write_syn_rst(struct xdp_md *ctx, const struct packet *pkt,
					 const struct syn_reply *r, int to_sender)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l2_header l2;
	if (save_l2(data, data_end, pkt, &l2))
		return -1;
	int ip_len = pkt->ipv6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	int frame_len = data_end - data;
	int keep = pkt->l3_off + ip_len + TCP_HEADER_LEN;
	if (frame_len < keep || (frame_len > keep && bpf_xdp_adjust_tail(ctx, keep - frame_len)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	__u16 eth_proto = pkt->ipv6 ? BE16(ETH_P_IPV6) : BE16(ETH_P_IP);
	void *p = to_sender ? write_l2(data, data_end, &l2, l2.peer_mac, l2.our_mac, eth_proto)
			    : write_l2(data, data_end, &l2, l2.our_mac, l2.peer_mac, eth_proto);
	if (!p)
		return -1;
	if (pkt->ipv6)
		return write_rst_v6(p, data_end, r);
	return write_rst_v4(p, data_end, r);
}

#endif
