/* ICMP and ICMPv6 as a load balancer must handle them:
 *  - echo requests to a VIP are answered here, in place;
 *  - errors about a VIP flow (unreachable, fragmentation needed / packet too
 *    big, time exceeded) are matched to the flow by their quoted header, so
 *    the caller can send them to the backend that owns the flow;
 *  - a packet that would be too big once encapsulated is answered with
 *    fragmentation-needed / packet-too-big so the client lowers its MTU.
 */
#ifndef XDPLB_ICMP_H
#define XDPLB_ICMP_H

#include "csum.h"
#include "encap.h"
#include "parse.h"

#define ICMP_ECHO_REQUEST 8
#define ICMP_ECHO_REPLY 0
#define ICMP_DEST_UNREACHABLE 3
#define ICMP_FRAG_NEEDED_CODE 4
#define ICMP_TIME_EXCEEDED_TYPE 11
#define ICMP6_DEST_UNREACHABLE 1
#define ICMP6_PACKET_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3
#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY 129
#define ICMP_REPLY_TTL 64
#define ICMP_HEADER_LEN 8

/* How much of the offending packet a too-big message quotes. Both fit any
 * packet that can be too big: the control plane keeps the MTU >= 1280. */
#define ICMP4_QUOTE_LEN 128 /* covers a 60-byte IPv4 header and its L4 header */
#define ICMP6_QUOTE_LEN 256

static __always_inline int is_echo_request(const struct packet *pkt)
{
	return pkt->ipv6 ? pkt->icmp_type == ICMP6_ECHO_REQUEST
			 : pkt->icmp_type == ICMP_ECHO_REQUEST;
}

static __always_inline int is_icmp_error(const struct packet *pkt)
{
	if (pkt->ipv6)
		return pkt->icmp_type == ICMP6_DEST_UNREACHABLE ||
		       pkt->icmp_type == ICMP6_PACKET_TOO_BIG ||
		       pkt->icmp_type == ICMP6_TIME_EXCEEDED;
	return pkt->icmp_type == ICMP_DEST_UNREACHABLE || pkt->icmp_type == ICMP_TIME_EXCEEDED_TYPE;
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
}

/* Turns the echo request into its reply in place: swapped addresses, a fresh
 * TTL, the type changed, checksums updated incrementally (the ICMPv6
 * pseudo-header sum does not change when its addresses swap). */
static __always_inline int icmp_echo_reply(void *data, void *data_end, const struct packet *pkt)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	__u16 *icmp_word = data + HDR_OFF(pkt->l4_off); /* [0]: type and code, [1]: checksum */
	if ((void *)(icmp_word + 2) > data_end)
		return -1;
	/* A corrupt request is not answered (a host would drop it), rather than sent
	 * back with a checksum that is still wrong. */
	if (!pkt->ipv6) {
		__u32 header_len = (__u32)HDR_OFF(pkt->l4_off) - (__u32)HDR_OFF(pkt->l3_off);
		if (!ipv4_header_valid(data + HDR_OFF(pkt->l3_off), data_end, header_len >> 2))
			return -1;
	}
	swap_macs(eth);

	__u16 old_word = icmp_word[0];
	((__u8 *)icmp_word)[0] = pkt->ipv6 ? ICMP6_ECHO_REPLY : ICMP_ECHO_REPLY;
	csum_replace16(&icmp_word[1], old_word, icmp_word[0]);

	if (pkt->ipv6) {
		struct ipv6hdr *ip6 = data + HDR_OFF(pkt->l3_off);
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		struct in6_addr tmp = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = tmp;
		ip6->hop_limit = ICMP_REPLY_TTL;
		return 0;
	}
	struct iphdr *ip = data + HDR_OFF(pkt->l3_off);
	if ((void *)(ip + 1) > data_end)
		return -1;
	__u32 tmp = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = tmp;
	__u16 old_ttl_word = *(__u16 *)&ip->ttl;
	ip->ttl = ICMP_REPLY_TTL;
	csum_replace16(&ip->check, old_ttl_word, *(__u16 *)&ip->ttl);
	return 0;
}

/* Fills `flow` with the client-to-VIP flow an ICMP error is about. The quoted
 * packet went from the VIP to the client, so its addresses and ports are
 * swapped back. Returns 0 when a TCP or UDP flow was quoted. */
static __always_inline int parse_icmp_error(void *data, void *data_end, const struct packet *pkt,
					    struct packet *flow)
{
	void *quoted = data + HDR_OFF(pkt->l4_off) + ICMP_HEADER_LEN;
	__u16 *ports;

	if (pkt->ipv6) {
		struct ipv6hdr *ip6 = quoted;
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return -1;
		addr16_from_ipv6(&flow->src, &ip6->daddr);
		addr16_from_ipv6(&flow->dst, &ip6->saddr);
		flow->proto = ip6->nexthdr;
		flow->ipv6 = 1;
		ports = (void *)(ip6 + 1);
	} else {
		struct iphdr *ip = quoted;
		if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < IPV4_MIN_IHL)
			return -1;
		addr16_from_ipv4(&flow->src, ip->daddr);
		addr16_from_ipv4(&flow->dst, ip->saddr);
		flow->proto = ip->protocol;
		ports = quoted + ip->ihl * 4;
	}
	if ((void *)(ports + 2) > data_end)
		return -1;
	if (flow->proto != IPPROTO_TCP && flow->proto != IPPROTO_UDP)
		return -1;
	flow->sport = ports[1];
	flow->dport = ports[0];
	return 0;
}

/* IPv4 pseudo-header-free ICMP checksum over header + quote. */
static __always_inline int finish_icmp4(void *data_end, struct icmphdr *icmp)
{
	if ((void *)icmp + ICMP_HEADER_LEN + ICMP4_QUOTE_LEN > data_end)
		return -1;
	icmp->checksum = 0;
	__s64 sum = bpf_csum_diff(0, 0, (void *)icmp, ICMP_HEADER_LEN + ICMP4_QUOTE_LEN, 0);
	if (sum < 0)
		return -1;
	icmp->checksum = fold_csum((__u64)sum);
	return 0;
}

struct ipv6_pseudo_header {
	struct in6_addr saddr;
	struct in6_addr daddr;
	__u32 len;
	__u32 nexthdr;
};

static __always_inline int finish_icmp6(void *data_end, struct ipv6hdr *ip6, struct icmp6hdr *icmp6)
{
	struct ipv6_pseudo_header ph = {
		.saddr = ip6->saddr,
		.daddr = ip6->daddr,
		.len = BE32(ICMP_HEADER_LEN + ICMP6_QUOTE_LEN),
		.nexthdr = BE32(IPPROTO_ICMPV6),
	};
	if ((void *)icmp6 + ICMP_HEADER_LEN + ICMP6_QUOTE_LEN > data_end)
		return -1;
	icmp6->icmp6_cksum = 0;
	__s64 seed = bpf_csum_diff(0, 0, (void *)&ph, sizeof(ph), 0);
	if (seed < 0)
		return -1;
	__s64 sum = bpf_csum_diff(0, 0, (void *)icmp6, ICMP_HEADER_LEN + ICMP6_QUOTE_LEN, seed);
	if (sum < 0)
		return -1;
	icmp6->icmp6_cksum = fold_csum((__u64)sum);
	return 0;
}

static __always_inline int write_too_big_v4(void *p, void *data_end, const struct packet *pkt,
					    __u16 mtu)
{
	struct iphdr *ip = p;
	struct icmphdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > data_end)
		return -1;
	*(__u8 *)ip = 0x45;
	ip->tos = 0;
	ip->tot_len = BE16(sizeof(*ip) + ICMP_HEADER_LEN + ICMP4_QUOTE_LEN);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = ICMP_REPLY_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = pkt->dst.w[3]; /* the VIP answers: the client expects it */
	ip->daddr = pkt->src.w[3];
	ip->check = ipv4_header_csum(ip);
	icmp->type = ICMP_DEST_UNREACHABLE;
	icmp->code = ICMP_FRAG_NEEDED_CODE;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = BE16(mtu);
	return finish_icmp4(data_end, icmp);
}

static __always_inline int write_too_big_v6(void *p, void *data_end, const struct packet *pkt,
					    __u16 mtu)
{
	struct ipv6hdr *ip6 = p;
	struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
	if ((void *)(icmp6 + 1) > data_end)
		return -1;
	*(__u32 *)ip6 = BE32(6U << 28);
	ip6->payload_len = BE16(ICMP_HEADER_LEN + ICMP6_QUOTE_LEN);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = ICMP_REPLY_TTL;
	__builtin_memcpy(&ip6->saddr, &pkt->dst, sizeof(ip6->saddr));
	__builtin_memcpy(&ip6->daddr, &pkt->src, sizeof(ip6->daddr));
	icmp6->icmp6_type = ICMP6_PACKET_TOO_BIG;
	icmp6->icmp6_code = 0;
	icmp6->icmp6_dataun.un_data32[0] = BE32((__u32)mtu);
	return finish_icmp6(data_end, ip6, icmp6);
}

/* Replaces the frame with an ICMP too-big message back to its sender. The
 * frame is cut to the quote, then the new IP and ICMP headers are prepended;
 * the old Ethernet header's bytes are reused, so the quote follows at once. */
static __always_inline int send_too_big(struct xdp_md *ctx, const struct packet *pkt, __u16 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l2_header l2;
	if (save_l2(data, data_end, pkt, &l2))
		return -1;

	int quote = pkt->ipv6 ? ICMP6_QUOTE_LEN : ICMP4_QUOTE_LEN;
	int frame_len = data_end - data;
	int keep = pkt->l3_off + quote;
	if (frame_len < keep || bpf_xdp_adjust_tail(ctx, keep - frame_len))
		return -1;
	int headers = (pkt->ipv6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) + ICMP_HEADER_LEN;
	if (bpf_xdp_adjust_head(ctx, -headers))
		return -1;

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	__u16 eth_proto = pkt->ipv6 ? BE16(ETH_P_IPV6) : BE16(ETH_P_IP);
	void *p = write_l2(data, data_end, &l2, l2.peer_mac, l2.our_mac, eth_proto);
	if (!p)
		return -1;
	if (pkt->ipv6)
		return write_too_big_v6(p, data_end, pkt, mtu);
	return write_too_big_v4(p, data_end, pkt, mtu);
}

#endif
