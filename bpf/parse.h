/* Packet parsing: Ethernet, one VLAN tag, IPv4 (any IHL), IPv6, TCP, UDP,
 * ICMP and ICMPv6. Every read is bounds-checked against data_end right where
 * it happens, and nothing here writes to the packet.
 */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "xdplb_structs.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "xdplb's BPF programs assume a little-endian host"
#endif

/* Constant-foldable byte swaps, usable in case labels and initialisers. */
#define BE16(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define BE32(x) ((__u32)__builtin_bswap32((__u32)(x)))

#define IPV4_MAPPED_PREFIX BE32(0x0000ffff)
#define IPV4_DF BE16(0x4000)
#define IPV4_FRAG_MASK BE16(0x3fff) /* MF flag and fragment offset */
#define IPV4_MIN_IHL 5
#define IPV6_NEXTHDR_FRAGMENT 44
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define TCP_FLAGS_OFFSET 13 /* byte offset of the flags in a TCP header */

/* Header offsets are at most 18 + 60 bytes. Masking a stored offset before
 * adding it to a packet pointer tells the verifier so; without it a 16-bit
 * offset reloaded from the stack is too wide for it to accept the bounds
 * check that follows. */
#define HDR_OFF(x) ((x) & 0xff)

struct vlan_hdr {
	__u16 tci;
	__u16 encap_proto;
};

/* What the balancer needs to know about one packet. Offsets are from the
 * start of the frame; addresses and ports are in network order. */
struct packet {
	struct addr16 src;
	struct addr16 dst;
	__u16 sport;
	__u16 dport;
	__u16 l3_off;
	__u16 l4_off;
	__u16 l3_len;   /* the IP header's own total length: trailing padding excluded */
	__u16 vlan_tci; /* network order, valid when vlan is set */
	__u8 proto;
	__u8 ipv6;
	__u8 vlan;
	__u8 tcp_flags;
	__u8 tos;       /* IPv4 TOS or IPv6 traffic class, copied to the outer header */
	__u8 df;        /* IPv4 don't-fragment; IPv6 never fragments in flight */
	__u8 fragment;
	__u8 icmp_type;
};

enum parse_result {
	PARSE_OK,
	PARSE_NOT_IP,   /* not IP, or the IP header itself is unusable: the kernel decides */
	PARSE_BAD_L4,   /* the IP header is fine but what follows is truncated or lies */
};

static __always_inline void addr16_from_ipv4(struct addr16 *a, __u32 addr)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = IPV4_MAPPED_PREFIX;
	a->w[3] = addr;
}

static __always_inline void addr16_from_ipv6(struct addr16 *a, const struct in6_addr *addr)
{
	a->w[0] = addr->in6_u.u6_addr32[0];
	a->w[1] = addr->in6_u.u6_addr32[1];
	a->w[2] = addr->in6_u.u6_addr32[2];
	a->w[3] = addr->in6_u.u6_addr32[3];
}

/* Returns the L3 EtherType; sets l3_off and the VLAN fields. 0 = truncated. */
static __always_inline __u16 parse_eth(void *data, void *data_end, struct packet *pkt)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return 0;
	__u16 proto = eth->h_proto;
	__u16 off = sizeof(*eth);
	if (proto == BE16(ETH_P_8021Q) || proto == BE16(ETH_P_8021AD)) {
		struct vlan_hdr *vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return 0;
		pkt->vlan = 1;
		pkt->vlan_tci = vh->tci;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}
	pkt->l3_off = off;
	return proto;
}

/* Reads ports (and TCP flags) at l4_off. The L4 header must lie wholly inside
 * the IP packet, which itself lies inside the frame (checked by the caller). */
static __always_inline int parse_l4(void *data, void *data_end, struct packet *pkt)
{
	void *l3_end = data + pkt->l3_off + pkt->l3_len;
	void *l4 = data + HDR_OFF(pkt->l4_off);

	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || (void *)(tcp + 1) > l3_end)
			return PARSE_BAD_L4;
		__u32 doff = tcp->doff * 4;
		if (doff < sizeof(*tcp) || l4 + doff > l3_end)
			return PARSE_BAD_L4;
		pkt->sport = tcp->source;
		pkt->dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
	} else if (pkt->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end || (void *)(udp + 1) > l3_end)
			return PARSE_BAD_L4;
		__u16 ulen = BE16(udp->len);
		if (ulen < sizeof(*udp) || l4 + ulen > l3_end)
			return PARSE_BAD_L4;
		pkt->sport = udp->source;
		pkt->dport = udp->dest;
	} else if (pkt->proto == IPPROTO_ICMP || pkt->proto == IPPROTO_ICMPV6) {
		/* type, code, checksum and the 4 bytes after them */
		__u8 *icmp = l4;
		if ((void *)(icmp + 8) > data_end || (void *)(icmp + 8) > l3_end)
			return PARSE_BAD_L4;
		pkt->icmp_type = icmp[0];
	}
	return PARSE_OK;
}

static __always_inline int parse_ipv4(void *data, void *data_end, struct packet *pkt)
{
	struct iphdr *ip = data + HDR_OFF(pkt->l3_off);
	if ((void *)(ip + 1) > data_end)
		return PARSE_NOT_IP;
	__u32 ihl = ip->ihl * 4;
	__u32 tot_len = BE16(ip->tot_len);
	if (ip->version != 4 || ip->ihl < IPV4_MIN_IHL || tot_len < ihl ||
	    (void *)ip + tot_len > data_end)
		return PARSE_NOT_IP;
	addr16_from_ipv4(&pkt->src, ip->saddr);
	addr16_from_ipv4(&pkt->dst, ip->daddr);
	pkt->proto = ip->protocol;
	pkt->tos = ip->tos;
	pkt->l3_len = tot_len;
	pkt->l4_off = pkt->l3_off + ihl;
	pkt->df = (ip->frag_off & IPV4_DF) != 0;
	pkt->fragment = (ip->frag_off & IPV4_FRAG_MASK) != 0;
	if (pkt->fragment)
		return PARSE_OK; /* no L4 header to read in a non-first fragment */
	return parse_l4(data, data_end, pkt);
}

/* Extension headers other than Fragment are not walked: their packets carry
 * the extension's number as proto, match no VIP and go to the kernel. */
static __always_inline int parse_ipv6(void *data, void *data_end, struct packet *pkt)
{
	struct ipv6hdr *ip6 = data + HDR_OFF(pkt->l3_off);
	if ((void *)(ip6 + 1) > data_end)
		return PARSE_NOT_IP;
	__u32 tot_len = sizeof(*ip6) + BE16(ip6->payload_len);
	if (ip6->version != 6 || (void *)ip6 + tot_len > data_end)
		return PARSE_NOT_IP;
	addr16_from_ipv6(&pkt->src, &ip6->saddr);
	addr16_from_ipv6(&pkt->dst, &ip6->daddr);
	pkt->ipv6 = 1;
	pkt->proto = ip6->nexthdr;
	pkt->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	pkt->l3_len = tot_len;
	pkt->l4_off = pkt->l3_off + sizeof(*ip6);
	if (pkt->proto == IPV6_NEXTHDR_FRAGMENT) {
		pkt->fragment = 1;
		return PARSE_OK;
	}
	return parse_l4(data, data_end, pkt);
}

static __always_inline int parse_packet(void *data, void *data_end, struct packet *pkt)
{
	__u16 eth_proto = parse_eth(data, data_end, pkt);
	if (eth_proto == BE16(ETH_P_IP))
		return parse_ipv4(data, data_end, pkt);
	if (eth_proto == BE16(ETH_P_IPV6))
		return parse_ipv6(data, data_end, pkt);
	return PARSE_NOT_IP;
}

#endif
