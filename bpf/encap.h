/* Encapsulation for direct server return: IPv4-in-IPv4, IPv6-in-IPv6 and
 * IPv4-in-IPv6, optionally inside UDP (GUE variant 1: the inner IP packet
 * follows the UDP header directly). The inner packet is never touched; the
 * Ethernet header (and VLAN tag) moves to the new front of the frame.
 */
#ifndef XDPLB_ENCAP_H
#define XDPLB_ENCAP_H

#include "csum.h"
#include "parse.h"

#define OUTER_TTL 64
#define GUE_SPORT_BASE 0xc000  /* hash bits go into the ephemeral range */
#define GUE_SPORT_HASH_MASK 0x3fff
#define IPV6_FLOW_LABEL_MASK 0xfffff
#define IPPROTO_IPIP_INNER 4   /* IPv4 payload */
#define IPPROTO_IPV6_INNER 41  /* IPv6 payload */

/* The link-layer header saved before the frame is resized. */
struct l2_header {
	__u8 our_mac[6];  /* the frame's destination: this host */
	__u8 peer_mac[6]; /* the frame's source: who sent it to us */
	__u16 tpid;       /* the VLAN TPID when tagged */
	__u16 vlan_tci;
	__u8 vlan;
};

static __always_inline int save_l2(void *data, void *data_end, const struct packet *pkt,
				   struct l2_header *l2)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(l2->our_mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(l2->peer_mac, eth->h_source, ETH_ALEN);
	l2->tpid = eth->h_proto;
	l2->vlan_tci = pkt->vlan_tci;
	l2->vlan = pkt->vlan;
	return 0;
}

/* Writes the Ethernet (+VLAN) header at the frame's start and returns a
 * pointer just past it, or NULL when the frame is too short. */
static __always_inline void *write_l2(void *data, void *data_end, const struct l2_header *l2,
				      const __u8 *dst_mac, const __u8 *src_mac, __u16 eth_proto)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return NULL;
	__builtin_memcpy(eth->h_dest, dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src_mac, ETH_ALEN);
	if (!l2->vlan) {
		eth->h_proto = eth_proto;
		return eth + 1;
	}
	struct vlan_hdr *vh = (void *)(eth + 1);
	if ((void *)(vh + 1) > data_end)
		return NULL;
	eth->h_proto = l2->tpid;
	vh->tci = l2->vlan_tci;
	vh->encap_proto = eth_proto;
	return vh + 1;
}

static __always_inline __u32 encap_overhead(int outer_ipv6, int gue)
{
	return (outer_ipv6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr)) +
	       (gue ? sizeof(struct udphdr) : 0);
}

static __always_inline __u8 outer_protocol(const struct packet *pkt, int gue)
{
	if (gue)
		return IPPROTO_UDP;
	return pkt->ipv6 ? IPPROTO_IPV6_INNER : IPPROTO_IPIP_INNER;
}

static __always_inline void *write_outer_ipv4(void *p, void *data_end, const struct packet *pkt,
					      const struct backend *be,
					      const struct lb_config *cfg, __u32 hash, int gue)
{
	struct iphdr *ip = p;
	if ((void *)(ip + 1) > data_end)
		return NULL;
	*(__u8 *)ip = 0x45; /* version 4, IHL 5 */
	ip->tos = pkt->tos;
	ip->tot_len = BE16(pkt->l3_len + encap_overhead(0, gue));
	ip->id = (__u16)hash;
	ip->frag_off = pkt->df ? IPV4_DF : 0; /* RFC 2003: copy DF from the inner header */
	ip->ttl = OUTER_TTL;
	ip->protocol = outer_protocol(pkt, gue);
	ip->check = 0;
	ip->saddr = (cfg->encap_src4 & ~cfg->encap_src4_hostmask) |
		    (hash & cfg->encap_src4_hostmask);
	ip->daddr = be->addr.w[3];
	ip->check = ipv4_header_csum(ip);
	return ip + 1;
}

static __always_inline void *write_outer_ipv6(void *p, void *data_end, const struct packet *pkt,
					      const struct backend *be,
					      const struct lb_config *cfg, __u32 hash, int gue)
{
	struct ipv6hdr *ip6 = p;
	if ((void *)(ip6 + 1) > data_end)
		return NULL;
	/* The flow label carries the flow hash so that routers on the way to the
	 * backend can spread flows without looking past the outer header. */
	__u32 label = hash & IPV6_FLOW_LABEL_MASK;
	__u32 first_word = (6U << 28) | ((__u32)pkt->tos << 20) | label;
	*(__u32 *)ip6 = BE32(first_word);
	ip6->payload_len = BE16(pkt->l3_len + (gue ? sizeof(struct udphdr) : 0));
	ip6->nexthdr = outer_protocol(pkt, gue);
	ip6->hop_limit = OUTER_TTL;
	__builtin_memcpy(&ip6->saddr, &cfg->encap_src6, sizeof(ip6->saddr));
	ip6->saddr.in6_u.u6_addr32[3] = (cfg->encap_src6.w[3] & ~cfg->encap_src6_hostmask) |
					(hash & cfg->encap_src6_hostmask);
	__builtin_memcpy(&ip6->daddr, &be->addr, sizeof(ip6->daddr));
	return ip6 + 1;
}

/* UDP checksum zero: allowed for IPv4, and for IPv6 tunnels by RFC 6935/6936;
 * the inner packet carries its own checksums. */
static __always_inline int write_gue(void *p, void *data_end, const struct packet *pkt,
				     const struct lb_config *cfg, __u32 hash)
{
	struct udphdr *udp = p;
	if ((void *)(udp + 1) > data_end)
		return -1;
	udp->source = BE16(GUE_SPORT_BASE | (hash & GUE_SPORT_HASH_MASK));
	udp->dest = cfg->gue_port;
	udp->len = BE16(pkt->l3_len + sizeof(*udp));
	udp->check = 0;
	return 0;
}

/* Prepends the outer headers and rewrites the MACs towards the next hop.
 * Returns 0, or -1 if the frame could not be grown or was too short. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct packet *pkt,
				       const struct backend *be, const struct lb_config *cfg,
				       __u32 hash, int gue)
{
	struct l2_header l2;
	int outer_ipv6 = (be->flags & BACKEND_F_IPV6) != 0;
	if (save_l2((void *)(long)ctx->data, (void *)(long)ctx->data_end, pkt, &l2))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)encap_overhead(outer_ipv6, gue)))
		return -1;

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u16 eth_proto = outer_ipv6 ? BE16(ETH_P_IPV6) : BE16(ETH_P_IP);
	void *p = write_l2(data, data_end, &l2, cfg->nexthop_mac, l2.our_mac, eth_proto);
	if (!p)
		return -1;
	if (outer_ipv6)
		p = write_outer_ipv6(p, data_end, pkt, be, cfg, hash, gue);
	else
		p = write_outer_ipv4(p, data_end, pkt, be, cfg, hash, gue);
	if (!p)
		return -1;
	if (gue)
		return write_gue(p, data_end, pkt, cfg, hash);
	return 0;
}

#endif
