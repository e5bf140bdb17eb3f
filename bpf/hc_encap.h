/* Health checks through the tunnel: the tc egress side.
 *
 * lbd's checks "via the VIP" are ordinary TCP connections from this host to
 * VIP:port whose socket carries a mark (SO_MARK) naming one backend entry.
 * At tc egress on the interfaces the balancer serves, such a packet is
 * encapsulated to that backend exactly as the XDP balancer encapsulates a
 * client's packet (encap.h writes the same outer headers), so the check
 * travels the path clients' packets travel: tunnel, backend decapsulation,
 * VIP on the backend, direct reply.
 *
 * This file grows the skb and writes the headers; balancer.c, which owns the
 * maps, decides whether and to whom.
 */
#ifndef XDPLB_HC_ENCAP_H
#define XDPLB_HC_ENCAP_H

#include <linux/pkt_cls.h>

#include "encap.h"

/* Makes the whole packet directly readable (0 on success): parse.h checks
 * the IP header's length against the linear data. Check packets are small
 * (a SYN, a request line), but the stack may put a payload in page frags. */
static __always_inline int hc_pull_headers(struct __sk_buff *skb)
{
	if ((long)skb->data_end - (long)skb->data >= skb->len)
		return 0;
	return bpf_skb_pull_data(skb, skb->len);
}

/* Prepends the outer headers between the link-layer header and the packet,
 * and sends the frame to the next hop. The kernel is told the packet is now
 * encapsulated (BPF_F_ADJ_ROOM_ENCAP_*), so a checksum or segmentation left
 * to the device is done on the inner headers. Returns 0, or -1 when the skb
 * could not be grown or is shorter than its headers. */
static __always_inline int hc_encapsulate(struct __sk_buff *skb, const struct packet *pkt,
					  const struct backend *be, const struct lb_config *cfg,
					  __u32 hash, int gue)
{
	int outer_ipv6 = (be->flags & BACKEND_F_IPV6) != 0;
	__u64 flags = (outer_ipv6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) |
		      (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0);
	if (bpf_skb_adjust_room(skb, encap_overhead(outer_ipv6, gue), BPF_ADJ_ROOM_MAC, flags))
		return -1;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l3_off = HDR_OFF(pkt->l3_off); /* ETH_HLEN, or + 4 with a VLAN tag */
	if (data + ETH_HLEN > data_end || data + l3_off > data_end || l3_off < ETH_HLEN)
		return -1;
	__builtin_memcpy(data, cfg->nexthop_mac, ETH_ALEN);
	/* The EtherType naming the L3 header is the last field before it, with or
	 * without a VLAN tag. */
	__u16 *eth_proto = data + l3_off - sizeof(__u16);
	if ((void *)(eth_proto + 1) > data_end)
		return -1;
	*eth_proto = outer_ipv6 ? BE16(ETH_P_IPV6) : BE16(ETH_P_IP);
	void *p = data + l3_off;
	return write_outer_headers(p, data_end, pkt, be, cfg, hash, gue, outer_ipv6);
}

#endif
