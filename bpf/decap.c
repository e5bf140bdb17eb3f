/* xdplb backend-side decapsulator.
 *
 * Runs on a backend host: strips IPIP, IP6IP6, IPv4-in-IPv6 and GUE (UDP to
 * the configured port) addressed to one of this host's tunnel addresses and
 * passes the inner packet up the stack. The backend, holding the VIP on its
 * loopback, then answers the client directly. Hosts with kernel tunnel
 * devices may use those instead; this program needs no kernel module.
 * MAX_DECAP_ADDRS arrives as a -D flag, XDPLB_PIN_DIR (a string) when the
 * maps are pinned.
 */
#include <uapi/linux/bpf.h>

#include "xdplb_structs.h"
#include "parse.h"
#include "encap.h"

/* With XDPLB_PIN_DIR the maps are pinned there (xdplb-backend setup), so a
 * later run of the tool, and its doctor, find the addresses and counters. */
#ifdef XDPLB_PIN_DIR
#define DECAP_MAP(type, key, leaf, name, size) \
	BPF_TABLE_PINNED(type, key, leaf, name, size, XDPLB_PIN_DIR "/" #name)
#else
#define DECAP_MAP(type, key, leaf, name, size) BPF_TABLE(type, key, leaf, name, size)
#endif

DECAP_MAP("hash", struct addr16, __u32, decap_addrs, MAX_DECAP_ADDRS);
DECAP_MAP("array", __u32, __u16, decap_gue_port, 1); /* network order; 0 = GUE off */
DECAP_MAP("percpu_array", __u32, struct decap_counters, decap_stats, 1);

/* Returns the outer headers' length, or 0 when the packet is not a tunnel
 * packet for this host; sets the inner EtherType. */
static __always_inline __u32 tunnel_overhead(void *data, void *data_end, struct packet *outer,
					     __u16 *inner_proto)
{
	__u32 overhead = outer->l4_off - outer->l3_off;
	__u8 proto = outer->proto;
	if (proto == IPPROTO_UDP) {
		__u32 zero = 0;
		__u16 *port = decap_gue_port.lookup(&zero);
		if (!port || !*port || outer->dport != *port)
			return 0;
		__u8 *inner = data + HDR_OFF(outer->l4_off) + sizeof(struct udphdr);
		if ((void *)(inner + 1) > data_end)
			return 0;
		proto = (*inner >> 4) == 6 ? IPPROTO_IPV6_INNER : IPPROTO_IPIP_INNER;
		overhead += sizeof(struct udphdr);
	}
	if (proto == IPPROTO_IPIP_INNER)
		*inner_proto = BE16(ETH_P_IP);
	else if (proto == IPPROTO_IPV6_INNER)
		*inner_proto = BE16(ETH_P_IPV6);
	else
		return 0;
	return overhead;
}

int xdplb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct decap_counters *stats = decap_stats.lookup(&zero);
	if (!stats)
		return XDP_PASS;

	struct packet outer = {};
	__u16 inner_proto = 0;
	__u32 overhead = 0;
	if (parse_packet(data, data_end, &outer) == PARSE_OK && !outer.fragment &&
	    decap_addrs.lookup(&outer.dst))
		overhead = tunnel_overhead(data, data_end, &outer, &inner_proto);
	if (!overhead) {
		stats->passed++;
		return XDP_PASS;
	}

	struct l2_header l2;
	if (save_l2(data, data_end, &outer, &l2) || bpf_xdp_adjust_head(ctx, overhead)) {
		stats->passed++;
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	/* Keep both MACs: the frame stays addressed to this host. */
	if (!write_l2(data, data_end, &l2, l2.our_mac, l2.peer_mac, inner_proto))
		return XDP_DROP; /* unreachable: the frame only shrank */
	stats->decapsulated++;
	return XDP_PASS;
}
