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

/* The 20-byte outer IPv4 header as five u32 words, as they lie in memory.
 * The checksum is summed from the words while they are still in registers:
 * the ones' complement sum of 32-bit words, folded, equals that of the
 * 16-bit words (2^16 = 1 mod 0xffff), and it is byte-order neutral. */
static __always_inline int write_outer_ipv4(void *p, void *data_end, const struct packet *pkt,
					    const struct backend *be,
					    const struct lb_config *cfg, __u32 hash, int gue)
{
	__u32 *w = p;
	if ((void *)(w + 5) > data_end)
		return -1;
	__u32 tot_len = pkt->l3_len + encap_overhead(0, gue);
	/* version/IHL, TOS, total length */
	__u32 w0 = 0x45 | ((__u32)pkt->tos << 8) | ((__u32)BE16(tot_len) << 16);
	/* id = the hash's low 16 bits, DF copied from the inner header (RFC 2003) */
	__u32 w1 = (hash & 0xffff) | (pkt->df ? (__u32)IPV4_DF << 16 : 0);
	__u32 w2 = OUTER_TTL | ((__u32)outer_protocol(pkt, gue) << 8); /* checksum 0 */
	__u32 w3 = (cfg->encap_src4 & ~cfg->encap_src4_hostmask) |
		   (hash & cfg->encap_src4_hostmask);
	__u32 w4 = be->addr.w[3];
	__u64 sum = (__u64)w0 + w1 + w2 + w3 + w4;
	sum = (sum & 0xffff) + ((sum >> 16) & 0xffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	w[0] = w0;
	w[1] = w1;
	w[2] = w2 | ((__u32)(~sum & 0xffff) << 16);
	w[3] = w3;
	w[4] = w4;
	return 0;
}

static __always_inline int write_outer_ipv6(void *p, void *data_end, const struct packet *pkt,
					    const struct backend *be,
					    const struct lb_config *cfg, __u32 hash, int gue)
{
	__u32 *w = p;
	if ((void *)(w + 10) > data_end)
		return -1;
	/* The flow label carries the flow hash so that routers on the way to the
	 * backend can spread flows without looking past the outer header. */
	__u32 label = hash & IPV6_FLOW_LABEL_MASK;
	w[0] = BE32((6U << 28) | ((__u32)pkt->tos << 20) | label);
	__u32 payload_len = pkt->l3_len + (gue ? sizeof(struct udphdr) : 0);
	/* payload length, next header, hop limit */
	w[1] = (__u32)BE16(payload_len) | ((__u32)outer_protocol(pkt, gue) << 16) |
	       ((__u32)OUTER_TTL << 24);
	w[2] = cfg->encap_src6.w[0];
	w[3] = cfg->encap_src6.w[1];
	w[4] = cfg->encap_src6.w[2];
	w[5] = (cfg->encap_src6.w[3] & ~cfg->encap_src6_hostmask) |
	       (hash & cfg->encap_src6_hostmask);
	w[6] = be->addr.w[0];
	w[7] = be->addr.w[1];
	w[8] = be->addr.w[2];
	w[9] = be->addr.w[3];
	return 0;
}

/* UDP checksum zero: allowed for IPv4, and for IPv6 tunnels by RFC 6935/6936;
 * the inner packet carries its own checksums. */
static __always_inline int write_gue(void *p, void *data_end, const struct packet *pkt,
				     const struct lb_config *cfg, __u32 hash)
{
	__u32 *w = p;
	if ((void *)(w + 2) > data_end)
		return -1;
	__u32 sport = GUE_SPORT_BASE | (hash & GUE_SPORT_HASH_MASK);
	w[0] = (__u32)BE16(sport) | ((__u32)cfg->gue_port << 16);
	w[1] = (__u32)BE16(pkt->l3_len + sizeof(struct udphdr)); /* checksum 0 */
	return 0;
}

/* The outer IP header (and the GUE header) at p, the packet's own headers
 * following: what the balancer and the health checks' tc program both
 * write. */
static __always_inline int write_outer_headers(void *p, void *data_end, const struct packet *pkt,
					       const struct backend *be,
					       const struct lb_config *cfg, __u32 hash, int gue,
					       int outer_ipv6)
{
	int err;
	if (outer_ipv6) {
		err = write_outer_ipv6(p, data_end, pkt, be, cfg, hash, gue);
		p += sizeof(struct ipv6hdr);
	} else {
		err = write_outer_ipv4(p, data_end, pkt, be, cfg, hash, gue);
		p += sizeof(struct iphdr);
	}
	if (err)
		return -1;
	if (gue)
		return write_gue(p, data_end, pkt, cfg, hash);
	return 0;
}

/* Prepends the outer headers and rewrites the MACs towards the next hop.
 * Returns 0, or -1 if the frame could not be grown or was too short. The
 * Ethernet header (and VLAN tag) is read into registers before the frame
 * grows and written back at its new front. */
static __always_inline int encapsulate(struct xdp_md *ctx, const struct packet *pkt,
				       const struct backend *be, const struct lb_config *cfg,
				       __u32 hash, int gue)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN > data_end)
		return -1;
	/* This host's MAC (the frame's destination) becomes the source. */
	__u32 our_mac_lo = *(__u32 *)data;
	__u16 our_mac_hi = *(__u16 *)(data + 4);
	__u16 tpid = *(__u16 *)(data + 12);
	int outer_ipv6 = (be->flags & BACKEND_F_IPV6) != 0;
	if (bpf_xdp_adjust_head(ctx, -(int)encap_overhead(outer_ipv6, gue)))
		return -1;

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN > data_end)
		return -1;
	__u16 eth_proto = outer_ipv6 ? BE16(ETH_P_IPV6) : BE16(ETH_P_IP);
	*(__u32 *)data = *(const __u32 *)cfg->nexthop_mac;
	*(__u16 *)(data + 4) = *(const __u16 *)(cfg->nexthop_mac + 4);
	*(__u32 *)(data + 6) = our_mac_lo;
	*(__u16 *)(data + 10) = our_mac_hi;
	void *p = data + ETH_HLEN;
	if (!pkt->vlan) {
		*(__u16 *)(data + 12) = eth_proto;
	} else {
		struct vlan_hdr *vh = p;
		if ((void *)(vh + 1) > data_end)
			return -1;
		*(__u16 *)(data + 12) = tpid;
		vh->tci = pkt->vlan_tci;
		vh->encap_proto = eth_proto;
		p = vh + 1;
	}
	return write_outer_headers(p, data_end, pkt, be, cfg, hash, gue, outer_ipv6);
}

#endif
