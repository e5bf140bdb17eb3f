/* xdplb balancer: Maglev-hash L4 forwarding with DSR encapsulation.
 *
 * Only this file touches maps: bcc rewrites map calls in the main file, and
 * keeping every lookup here makes the per-packet map traffic easy to audit.
 * Map sizes arrive as -D flags from daemon/xdplb/datapath/balancer.py:
 *   MAX_VIPS, MAX_BACKENDS, RING_ENTRIES,
 *   VIP_INDEX_BITS (the VIP index has 2^bits slots),
 *   CONN_SET_BITS (the flow table has 2^bits sets of FLOW_WAYS flows),
 * and XDPLB_PIN_DIR (a string) when the maps are pinned for reuse across
 * daemon restarts; HC_MARK_BASE and HC_MARK_MASK, the socket marks of health
 * checks sent through the tunnel (xdplb_hc_encap below).
 *
 * Per-packet cost on this machine kind is dominated by kernel calls (every
 * helper or non-inlined map lookup costs 10-35 ns), so the fast path uses
 * only maps whose lookups the verifier inlines: arrays and per-CPU arrays.
 * The `vips` and `vip_addrs` hash maps are consulted only when the VIP index
 * cannot answer, or for a port-less VIP. The connection table is an array
 * of sets too, rather than an LRU hash map, whose update costs 150-500 ns
 * here.
 */
#include <uapi/linux/bpf.h>

#include "xdplb_structs.h"
#include "parse.h"
#include "hash.h"
#include "encap.h"
#include "icmp.h"
#include "hc_encap.h"
#include "quic.h"
#include "syn_probe.h"

/* A health check through the tunnel carries mark HC_MARK_BASE | index: the
 * bits outside HC_MARK_MASK are its backend entry's index. */
#ifndef HC_MARK_BASE
#define HC_MARK_BASE 0x58440000U
#endif
#ifndef HC_MARK_MASK
#define HC_MARK_MASK 0xffff0000U
#endif

#ifdef XDPLB_PIN_DIR
#define XDPLB_MAP(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, size, XDPLB_PIN_DIR "/" #name, flags)
#else
#define XDPLB_MAP(type, key, leaf, name, size, flags) \
	BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif

XDPLB_MAP("array", __u32, __u64, addr_filter, ADDR_FILTER_WORDS, 0);
XDPLB_MAP("hash", struct addr16, struct vip_addr_meta, vip_addrs, MAX_VIPS, 0);
XDPLB_MAP("hash", struct vip_key, struct vip_meta, vips, MAX_VIPS, 0);
#define VIP_INDEX_SLOTS (1U << VIP_INDEX_BITS)
XDPLB_MAP("array", __u32, struct vip_index_slot, vip_index, VIP_INDEX_SLOTS, 0);
XDPLB_MAP("array", __u32, __u32, ring, RING_ENTRIES, 0);
XDPLB_MAP("array", __u32, struct backend, backends, MAX_BACKENDS, 0);
/* The flow table is shared by all CPUs: a flow's packets may arrive on
 * several (a veth runs XDP on the sender's CPU; RSS tables change), and a
 * SYN that re-chooses a reused 4-tuple must replace the one entry every CPU
 * will find. Sets are locked only by writers, for nanoseconds. */
#define CONN_SETS (1U << CONN_SET_BITS)
XDPLB_MAP("array", __u32, struct flow_set, conns, CONN_SETS, 0);
XDPLB_MAP("array", __u32, struct lb_config, config, 1, 0);
XDPLB_MAP("percpu_array", __u32, struct traffic_counters, vip_stats, MAX_VIPS, 0);
XDPLB_MAP("percpu_array", __u32, struct traffic_counters, backend_stats, MAX_BACKENDS, 0);
XDPLB_MAP("percpu_array", __u32, struct global_counters, global_stats, 1, 0);
XDPLB_MAP("percpu_array", __u32, struct flood_state, flood, 1, 0);
XDPLB_MAP("percpu_array", __u32, struct hc_counters, hc_stats, 1, 0);
/* The table sweep's (xdplb_settle below): each VIP's ring by vip_id, the
 * sweep's cursor and totals, and one bit per ring entry that an entry
 * naming another backend than the entry's slot holds. */
XDPLB_MAP("array", __u32, struct vip_ring, vip_rings, MAX_VIPS, 0);
XDPLB_MAP("array", __u32, struct settle_state, settle, 1, 0);
#define SETTLE_WORDS ((RING_ENTRIES + 63) / 64)
XDPLB_MAP("array", __u32, __u64, settle_blocked, SETTLE_WORDS, 0);
/* The sweep's census: its window and total, and active entries per backend
 * index; and the per-CPU count of flows evicted from full sets. */
XDPLB_MAP("array", __u32, struct flow_census, flow_census, 1, 0);
XDPLB_MAP("array", __u32, __u32, flow_active, MAX_BACKENDS, 0);
XDPLB_MAP("percpu_array", __u32, struct flow_events, flow_events, 1, 0);
/* QUIC VIPs: the backend entry of each server ID (an ID indexes the array:
 * IDs are 1..MAX_BACKENDS-1), and the per-CPU counters of their packets. */
XDPLB_MAP("array", __u32, struct quic_server, quic_servers, MAX_BACKENDS, 0);
XDPLB_MAP("percpu_array", __u32, struct quic_counters, quic_stats, 1, 0);
/* Half-open checks in flight, one per probe slot, and their replies' counters
 * (bpf/syn_probe.h; daemon/xdplb/datapath/syn_probes.py). */
XDPLB_MAP("array", __u32, struct syn_probe, syn_probes, MAX_BACKENDS, 0);
XDPLB_MAP("percpu_array", __u32, struct syn_counters, syn_stats, 1, 0);

static __always_inline void count_vip(__u32 vip_id, __u32 bytes)
{
	struct traffic_counters *c = vip_stats.lookup(&vip_id);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void count_backend(__u32 idx, __u32 bytes)
{
	struct traffic_counters *c = backend_stats.lookup(&idx);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline int may_be_vip_addr(const struct packet *pkt)
{
	__u64 h = addr_filter_hash(&pkt->dst, pkt->ipv6);
	__u32 word = FILTER_WORD(h);
	__u64 *bits = addr_filter.lookup(&word);
	return bits && (*bits & (1ULL << FILTER_BIT(h)));
}

#define xdplb_barrier() asm volatile("" ::: "memory")
#define VIP_INDEX_ASK_HASH (-1)

/* The VIP index: open addressing over an array, probing at most
 * VIP_INDEX_PROBES slots from the key's home slot. Returns 1 with the meta
 * copied to *out, 0 when the key is certainly not a VIP (an EMPTY slot ends
 * the probe: the control plane keeps every VIP of the hash map before the
 * first EMPTY slot of its chain), or VIP_INDEX_ASK_HASH: probes exhausted (a
 * full chain may have overflowed into the hash map alone) or a slot being
 * rewritten.
 *
 * Torn-write safety (the writer is daemon/xdplb/datapath/vip_index.py VipTable): each
 * slot is rewritten in three whole-value map updates, each changing either
 * seq or the content but never both: (1) seq odd, old content; (2) seq odd,
 * new content; (3) seq even, new content. The reader copies the content
 * between two reads of seq and accepts it only when both are equal and even:
 * content read during (2), the only update that changes it, is bracketed by
 * an odd seq or by two different seqs. x86 keeps loads in order and the
 * updates' stores in order; the compiler barriers keep clang from moving the
 * loads across the seq reads. Rejected reads fall back to the hash map,
 * whose updates replace a whole element. */
static __always_inline int vip_index_find(const struct vip_key *want, struct vip_meta *out)
{
	__u32 home = vip_index_hash(want) >> (64 - VIP_INDEX_BITS);
#pragma unroll
	for (int i = 0; i < VIP_INDEX_PROBES; i++) {
		__u32 k = (home + i) & (VIP_INDEX_SLOTS - 1);
		struct vip_index_slot *s = vip_index.lookup(&k);
		if (!s)
			return VIP_INDEX_ASK_HASH;
		__u32 seq = *(volatile __u32 *)&s->seq;
		xdplb_barrier();
		__u32 state = s->state;
		int match = s->key.addr.w[0] == want->addr.w[0] &&
			    s->key.addr.w[1] == want->addr.w[1] &&
			    s->key.addr.w[2] == want->addr.w[2] &&
			    s->key.addr.w[3] == want->addr.w[3] && s->key.port == want->port &&
			    s->key.proto == want->proto;
		*out = s->meta;
		xdplb_barrier();
		if (*(volatile __u32 *)&s->seq != seq || (seq & 1))
			return VIP_INDEX_ASK_HASH;
		if (state == VIP_SLOT_EMPTY)
			return 0;
		if (state == VIP_SLOT_LIVE && match)
			return 1;
	}
	return VIP_INDEX_ASK_HASH;
}

static __always_inline int lookup_vip(const struct vip_key *key, struct vip_meta *out)
{
	int found = vip_index_find(key, out);
	if (found != VIP_INDEX_ASK_HASH)
		return found;
	struct vip_meta *vip = vips.lookup((struct vip_key *)key);
	if (!vip)
		return 0;
	*out = *vip;
	return 1;
}

/* The exact (address, port, protocol) VIP, else the port-less one, copied
 * to *out. The exact hit, the common case, costs an inlined index probe. */
static __always_inline int find_vip(const struct addr16 *addr, __u16 port, __u8 proto,
				    struct vip_meta *out)
{
	struct vip_key key = {.addr = *addr, .port = port, .proto = proto};
	if (lookup_vip(&key, out))
		return 1;
	struct vip_addr_meta *am = vip_addrs.lookup(&key.addr);
	__u32 portless = proto == IPPROTO_TCP ? VIP_ADDR_F_PORTLESS_TCP
			 : proto == IPPROTO_UDP ? VIP_ADDR_F_PORTLESS_UDP : 0;
	if (!am || !(am->flags & portless))
		return 0;
	key.port = 0;
	return lookup_vip(&key, out);
}

static __always_inline __u32 hash_for_vip(const struct vip_meta *vip, const struct packet *flow)
{
	if (vip->flags & VIP_F_HASH_SRC_ONLY)
		return source_hash(&flow->src, flow->ipv6);
	return flow_hash(&flow->src, &flow->dst, flow->sport, flow->dport, flow->proto,
			 flow->ipv6);
}

/* The backend index the VIP's Maglev ring holds for this hash; 0 = none. */
static __always_inline __u32 ring_pick(const struct vip_meta *vip, __u32 hash)
{
	__u32 slot = vip->ring_offset + ring_slot(hash, vip->ring_size);
	__u32 *backend = ring.lookup(&slot);
	return backend ? *backend & RING_BACKEND_MASK : 0;
}

/* Above the configured rate of new flows per CPU, new flows still follow the
 * ring but are not recorded, so a SYN flood or a scan cannot evict the
 * established flows from the connection table. */
static __always_inline int may_record_flow(const struct lb_config *cfg)
{
	if (!cfg->max_new_flows_per_cpu)
		return 1;
	__u64 now = bpf_ktime_get_coarse_ns();
	__u32 zero = 0;
	struct flood_state *fs = flood.lookup(&zero);
	if (!fs)
		return 1;
	if (now - fs->window_start_ns >= NSEC_PER_SEC) {
		fs->window_start_ns = now;
		fs->new_flows = 0;
	}
	return ++fs->new_flows <= cfg->max_new_flows_per_cpu;
}

static __always_inline int is_usable(const struct backend *be)
{
	return be && (be->flags & BACKEND_F_AVAILABLE);
}

/* The settled-slot fast path: the ring's backend for an established packet
 * whose ring slot is settled (RING_UNSETTLED clear) and usable, outside the
 * flow's refresh seconds; 0 when the flow table must be read. On a settled
 * slot every entry names the slot's backend, so the table would answer the
 * same, and at 1M flows its read is a DRAM miss that costs more than the
 * rest of the packet. A refresh second, one in settled_refresh_s of the
 * seconds a flow sends in (hash.h refresh_second), still reads the table:
 * it keeps last_seen fresh and records flows first seen mid-stream. */
static __always_inline __u32 settled_pick(const struct vip_meta *vip, __u32 hash,
					  const struct lb_config *cfg, struct backend **be)
{
	__u32 refresh = cfg->settled_refresh_s;
	if (!refresh || refresh_second(hash, cfg->now_s, refresh))
		return 0;
	__u32 slot = vip->ring_offset + ring_slot(hash, vip->ring_size);
	__u32 *entry = ring.lookup(&slot);
	if (!entry)
		return 0;
	__u32 idx = *entry;
	if (!idx || (idx & RING_UNSETTLED))
		return 0;
	*be = backends.lookup(&idx);
	return is_usable(*be) ? idx : 0;
}

/* The flow table's set for a key. */
static __always_inline struct flow_set *flow_set_of(const struct flow_key *key)
{
	__u32 set = flow_set_hash(key) >> (64 - CONN_SET_BITS);
	return conns.lookup(&set);
}

static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

#define FLOW_NONE (-1)
#define FLOW_BUSY (-2)
/* A writer holds a set for a few nanoseconds: a reader that meets one
 * tries again, a bounded number of times. */
#define FLOW_READ_TRIES 4

/* The way holding the key, with its backend copied to *backend; FLOW_NONE;
 * or FLOW_BUSY when every try met a writer. What is read counts only
 * between two equal even reads of seq; x86 keeps loads in order and the
 * compiler barriers keep clang from moving them across the seq reads. */
static __always_inline int flow_find(struct flow_set *set, const struct flow_key *key,
				     __u32 *backend)
{
#pragma unroll
	for (int t = 0; t < FLOW_READ_TRIES; t++) {
		__u64 seq = *(volatile __u64 *)&set->seq;
		xdplb_barrier();
		int way = FLOW_NONE;
		__u32 found = 0;
#pragma unroll
		for (int i = 0; i < FLOW_WAYS; i++) {
			if (way == FLOW_NONE && flow_key_eq(&set->key[i], key)) {
				way = i;
				found = set->backend[i];
			}
		}
		xdplb_barrier();
		if (!(seq & 1) && *(volatile __u64 *)&set->seq == seq) {
			*backend = found;
			return found ? way : FLOW_NONE;
		}
	}
	return FLOW_BUSY;
}

/* Takes the set for writing (seq even -> odd). 0 when another CPU holds it:
 * the caller leaves the set alone rather than wait. */
static __always_inline int flow_set_lock(struct flow_set *set)
{
	__u64 seq = *(volatile __u64 *)&set->seq;
	if (seq & 1)
		return 0;
	return __sync_val_compare_and_swap(&set->seq, seq, seq + 1) == seq;
}

/* seq odd -> even; a locked add, so every store before it is visible first. */
static __always_inline void flow_set_unlock(struct flow_set *set)
{
	__sync_fetch_and_add(&set->seq, 1);
}

/* A full set gave up a flow (flow_events.evicted): the table's pressure, as
 * operators watch it. */
static __always_inline void count_eviction(void)
{
	__u32 zero = 0;
	struct flow_events *ev = flow_events.lookup(&zero);
	if (ev)
		ev->evicted++;
}

/* Records key -> backend: in the key's own way if it has one, else in an
 * empty one, else in place of the flow seen longest ago (the lowest way
 * among equals; counted as an eviction). Returns -1, having changed
 * nothing, when another CPU was rewriting the set. */
static __always_inline int flow_record(struct flow_set *set, const struct flow_key *key,
				       __u32 backend, __u16 now)
{
	if (!flow_set_lock(set))
		return -1;
	int way = 0, own = -1, empty = -1;
	__u16 oldest_age = 0;
#pragma unroll
	for (int i = 0; i < FLOW_WAYS; i++) {
		if (!set->backend[i]) {
			if (empty < 0)
				empty = i;
			continue;
		}
		if (flow_key_eq(&set->key[i], key))
			own = i;
		__u16 age = now - set->last_seen[i];
		if (age > oldest_age) {
			oldest_age = age;
			way = i;
		}
	}
	int evicted = own < 0 && empty < 0;
	if (own >= 0)
		way = own;
	else if (empty >= 0)
		way = empty;
	way &= FLOW_WAYS - 1;
	set->key[way] = *key;
	set->backend[way] = backend;
	set->last_seen[way] = now;
	flow_set_unlock(set);
	if (evicted)
		count_eviction();
	return 0;
}

/* Chooses the flow's backend: the connection table for a known flow whose
 * backend is still available, the ring otherwise (and then records it).
 * Returns the backend's index (0 = none) and sets *be to its entry. */
static __always_inline __u32 choose_backend(const struct vip_meta *vip, const struct packet *pkt,
					    __u32 hash, const struct lb_config *cfg,
					    struct global_counters *gc, struct backend **be)
{
	struct flow_key key __attribute__((aligned(8))) = {
		.src = pkt->src, .sport = pkt->sport, .dport = pkt->dport, .vip_id = vip->vip_id,
	};
	int syn = pkt->proto == IPPROTO_TCP &&
		  (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	__u16 now = cfg->now_s;
	__u32 idx;
	if (!syn) {
		idx = settled_pick(vip, hash, cfg, be);
		if (idx) {
			gc->conn_settled++;
			return idx;
		}
	}
	int way = FLOW_NONE;
	struct flow_set *set = flow_set_of(&key);
	if (!set)
		return 0;

	if (!syn) {
		__u32 recorded = 0;
		way = flow_find(set, &key, &recorded);
		if (way >= 0) {
			idx = recorded;
			*be = backends.lookup(&idx);
			if (is_usable(*be)) {
				gc->conn_hit++;
				/* A store only once a second, unlocked: at worst it
				 * freshens a flow that just replaced this one. */
				__u16 *seen = &set->last_seen[way & (FLOW_WAYS - 1)];
				if (*seen != now)
					*seen = now;
				return idx;
			}
			gc->conn_rechosen++;
			idx = ring_pick(vip, hash);
			*be = backends.lookup(&idx);
			if (idx && flow_record(set, &key, idx, now))
				gc->conn_busy++;
			return idx;
		}
		if (way == FLOW_NONE)
			gc->conn_miss++;
	}

	/* A packet counts in conn_busy once, whether its read or its write met
	 * another CPU's writer. */
	int busy = way == FLOW_BUSY;
	idx = ring_pick(vip, hash);
	*be = backends.lookup(&idx);
	if (!idx) {
		gc->conn_busy += busy;
		return 0;
	}
	gc->new_flows++;
	if (may_record_flow(cfg)) {
		if (flow_record(set, &key, idx, now))
			busy = 1;
	} else {
		gc->new_flows_unrecorded++;
	}
	gc->conn_busy += busy;
	return idx;
}

/* Encapsulates the whole packet to backend `idx`. Too-big packets are
 * answered or dropped, and every outcome is counted. */
static __always_inline int send_to_backend(struct xdp_md *ctx, const struct packet *pkt,
					   __u32 idx, const struct backend *be, __u32 hash,
					   int gue, const struct lb_config *cfg,
					   struct global_counters *gc, int icmp_error,
					   __u32 frame_len)
{
	if (!idx || !be) {
		gc->drop_no_backend++;
		return XDP_DROP;
	}
	__u32 overhead = encap_overhead(be->flags & BACKEND_F_IPV6, gue);
	if (pkt->l3_len + overhead > cfg->mtu) {
		/* IPv4 without DF would need fragmenting, which XDP cannot do. ICMP
		 * errors are never answered with another ICMP error. */
		if ((!pkt->ipv6 && !pkt->df) || icmp_error ||
		    send_too_big(ctx, pkt, cfg->mtu - overhead)) {
			gc->drop_too_big++;
			return XDP_DROP;
		}
		gc->tx_icmp_too_big++;
		return XDP_TX;
	}
	if (encapsulate(ctx, pkt, be, cfg, hash, gue)) {
		gc->drop_encap_failed++;
		return XDP_DROP;
	}
	if (icmp_error)
		gc->tx_icmp_error_forwarded++;
	else
		gc->tx_forwarded++;
	count_backend(idx, frame_len);
	return XDP_TX;
}

/* An ICMP error about a VIP flow goes to the backend that owns the flow, found
 * the way the flow's own packets find it; nothing is recorded for it. */
static __always_inline int forward_icmp_error(struct xdp_md *ctx, const struct packet *pkt,
					      const struct lb_config *cfg,
					      struct global_counters *gc, __u32 frame_len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct packet flow = {};
	if (parse_icmp_error(data, data_end, pkt, &flow)) {
		gc->pass_not_vip++;
		return XDP_PASS;
	}
	struct vip_meta meta;
	if (!find_vip(&flow.dst, flow.dport, flow.proto, &meta)) {
		gc->pass_not_vip++;
		return XDP_PASS;
	}
	const struct vip_meta *vip = &meta;
	count_vip(vip->vip_id, frame_len);
	__u32 hash = hash_for_vip(vip, &flow);
	struct flow_key key __attribute__((aligned(8))) = {
		.src = flow.src, .sport = flow.sport, .dport = flow.dport, .vip_id = vip->vip_id,
	};
	struct flow_set *set = flow_set_of(&key);
	__u32 idx = 0;
	if (set)
		flow_find(set, &key, &idx); /* a busy set leaves idx 0: the ring answers */
	struct backend *be = backends.lookup(&idx);
	if (!is_usable(be)) {
		idx = ring_pick(vip, hash);
		be = backends.lookup(&idx);
	}
	return send_to_backend(ctx, pkt, idx, be, hash, vip->flags & VIP_F_GUE, cfg, gc,
			       1, frame_len);
}

static __always_inline int handle_icmp(struct xdp_md *ctx, const struct packet *pkt,
				       const struct lb_config *cfg, struct global_counters *gc,
				       __u32 frame_len)
{
	if (is_echo_request(pkt)) {
		if (icmp_echo_reply((void *)(long)ctx->data, (void *)(long)ctx->data_end, pkt)) {
			gc->drop_malformed++;
			return XDP_DROP;
		}
		gc->tx_icmp_echo_reply++;
		return XDP_TX;
	}
	if (is_icmp_error(pkt))
		return forward_icmp_error(ctx, pkt, cfg, gc, frame_len);
	gc->pass_not_vip++;
	return XDP_PASS;
}

/* The backend entry a server ID routes `vip`'s packets to; 0 when none may
 * take them (the entry is read between two equal, even seqs, as the VIP
 * index's slots are). */
static __always_inline __u32 quic_server_backend(__u64 sid, const struct vip_meta *vip,
						 struct quic_counters *qc, struct backend **be)
{
	if (sid == 0 || sid >= MAX_BACKENDS) {
		qc->unknown_server++;
		return 0;
	}
	__u32 key = sid;
	struct quic_server *server = quic_servers.lookup(&key);
	if (!server) {
		qc->unknown_server++;
		return 0;
	}
	__u32 seq = *(volatile __u32 *)&server->seq;
	xdplb_barrier();
	__u32 vip_id = server->vip_id;
	__u32 idx = server->backend;
	xdplb_barrier();
	if (*(volatile __u32 *)&server->seq != seq || (seq & 1)) {
		qc->busy++;
		return 0;
	}
	if (!idx || vip_id != vip->vip_id) {
		qc->unknown_server++;
		return 0;
	}
	*be = backends.lookup(&idx);
	if (!is_usable(*be)) {
		qc->server_down++;
		return 0;
	}
	qc->routed++;
	return idx;
}

/* A QUIC VIP's packet whose connection ID names a server goes to that
 * server's backend, whatever its 4-tuple, without the connection table;
 * 0: the packet takes the 5-tuple path (counted by why). */
static __always_inline __u32 quic_pick(struct xdp_md *ctx, const struct packet *pkt,
				       const struct vip_meta *vip, struct backend **be)
{
	__u32 zero = 0;
	struct quic_counters *qc = quic_stats.lookup(&zero);
	if (!qc || pkt->proto != IPPROTO_UDP)
		return 0;
	__u64 sid = 0;
	int found = quic_server_id((void *)(long)ctx->data, (void *)(long)ctx->data_end, pkt,
				   (vip->flags >> VIP_QUIC_SID_LEN_SHIFT) & 0xf,
				   (vip->flags >> VIP_QUIC_ROTATION_SHIFT) & 0x7, &sid);
	switch (found) {
	case QUIC_BY_CID:
		return quic_server_backend(sid, vip, qc, be);
	case QUIC_CLIENT_CID:
		qc->client_cid++;
		break;
	case QUIC_OTHER_VERSION:
		qc->other_version++;
		break;
	case QUIC_OTHER_CONFIG:
		qc->other_config++;
		break;
	case QUIC_SHORT_CID:
		qc->short_cid++;
		break;
	default:
		qc->not_quic++;
	}
	return 0;
}

static __always_inline int forward(struct xdp_md *ctx, const struct packet *pkt,
				   const struct vip_meta *vip, const struct lb_config *cfg,
				   struct global_counters *gc, __u32 frame_len)
{
	count_vip(vip->vip_id, frame_len);
	__u32 hash = hash_for_vip(vip, pkt);
	struct backend *be = NULL;
	__u32 idx = 0;
	if (vip->flags & VIP_F_QUIC)
		idx = quic_pick(ctx, pkt, vip, &be);
	if (!idx)
		idx = choose_backend(vip, pkt, hash, cfg, gc, &be);
	return send_to_backend(ctx, pkt, idx, be, hash, vip->flags & VIP_F_GUE, cfg, gc,
			       0, frame_len);
}

/* The RST of a check through the VIP (just written over the frame, L2 as
 * received: to the VIP from this host) goes to the checked backend as clients'
 * packets do: through the tunnel, with the VIP's encapsulation. Sent back to the
 * VIP unencapsulated it would reach whichever backend the VIP's ring gives it.
 * 0 on success. */
static __always_inline int tunnel_syn_rst(struct xdp_md *ctx, __u32 idx)
{
	__u32 zero = 0;
	struct lb_config *cfg = config.lookup(&zero);
	struct backend *be = backends.lookup(&idx);
	if (!cfg || !(cfg->flags & CONFIG_F_READY) || !be)
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct packet rst = {};
	struct vip_meta vip;
	if (parse_packet(data, data_end, &rst) != PARSE_OK ||
	    !find_vip(&rst.dst, rst.dport, IPPROTO_TCP, &vip) || vip.vip_id != be->vip_id)
		return -1;
	return encapsulate(ctx, &rst, be, cfg, hash_for_vip(&vip, &rst),
			   (vip.flags & VIP_F_GUE) != 0);
}

/* Slots sharing one probe port: slot = port - SYN_PORT_BASE + k * SYN_PORTS. */
#define SYN_SLOT_WAYS ((MAX_BACKENDS + SYN_PORTS - 1) / SYN_PORTS)

/* A reply to a half-open check (bpf/syn_probe.h): XDP_TX (a SYN-ACK, answered
 * with a RST), XDP_DROP (a RST), or -1: not a reply any probe expects. Runs
 * only for TCP to a non-VIP address with SYN-ACK or RST set. */
static __always_inline int handle_syn_reply(struct xdp_md *ctx, const struct packet *pkt)
{
	__u8 flags = pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST);
	int open = flags == (TCP_FLAG_SYN | TCP_FLAG_ACK);
	if (!open && flags != (TCP_FLAG_RST | TCP_FLAG_ACK))
		return -1;
	__u32 port = BE16(pkt->dport);
	if (port < SYN_PORT_BASE || port >= SYN_PORT_BASE + SYN_PORTS)
		return -1;
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct tcphdr *tcp = data + HDR_OFF(pkt->l4_off);
	if ((void *)(tcp + 1) > data_end)
		return -1;
	__u32 ack = tcp->ack_seq;
	__u32 zero = 0;
	struct syn_counters *sc = syn_stats.lookup(&zero);
	if (!sc)
		return -1;
	struct syn_reply r = {.src = pkt->src, .dst = pkt->dst, .sport = pkt->sport,
			      .dport = pkt->dport, .ack = ack};
	__u32 cookie = BE32(r.ack) - 1;
	for (__u32 way = 0; way < SYN_SLOT_WAYS; way++) {
		__u32 slot = port - SYN_PORT_BASE + way * SYN_PORTS;
		struct syn_probe *probe = syn_probes.lookup(&slot);
		if (!probe)
			break;
		/* port 0: a slot never armed (no check has port 0) */
		if (!probe->port || probe->cookie != cookie || probe->port != pkt->sport ||
		    probe->ipv6 != pkt->ipv6 || !addr_eq(&probe->addr, &pkt->src))
			continue;
		probe->outcome = open ? SYN_OPEN : SYN_REFUSED;
		if (!open) {
			sc->refused++;
			return XDP_DROP;
		}
		__u32 tunnel_to = probe->backend;
		if (write_syn_rst(ctx, pkt, &r, !tunnel_to) ||
		    (tunnel_to && tunnel_syn_rst(ctx, tunnel_to))) {
			sc->rst_error++;
			return XDP_DROP;
		}
		sc->open++;
		return XDP_TX;
	}
	sc->unmatched++;
	return -1;
}

/* A packet to an address that is not a VIP: the kernel's, unless it is a reply
 * to a half-open check. */
static __always_inline int not_vip(struct xdp_md *ctx, const struct packet *pkt, int parsed,
				   struct global_counters *gc)
{
	if (parsed == PARSE_OK && pkt->proto == IPPROTO_TCP && !pkt->fragment &&
	    (pkt->tcp_flags & TCP_FLAG_ACK) && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST))) {
		int verdict = handle_syn_reply(ctx, pkt);
		if (verdict >= 0)
			return verdict;
	}
	gc->pass_not_vip++;
	return XDP_PASS;
}

int xdplb_balancer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;
	__u32 zero = 0;
	struct global_counters *gc = global_stats.lookup(&zero);
	if (!gc)
		return XDP_PASS;

	struct packet pkt = {};
	int parsed = parse_packet(data, data_end, &pkt);
	if (parsed == PARSE_NOT_IP) {
		gc->pass_unparsed++;
		return XDP_PASS;
	}
	if (!may_be_vip_addr(&pkt))
		return not_vip(ctx, &pkt, parsed, gc);
	struct lb_config *cfg = config.lookup(&zero);
	if (!cfg || !(cfg->flags & CONFIG_F_READY)) {
		gc->pass_unconfigured++;
		return XDP_PASS;
	}
	if (parsed == PARSE_OK && !pkt.fragment) {
		struct vip_meta vip;
		if (find_vip(&pkt.dst, pkt.dport, pkt.proto, &vip))
			return forward(ctx, &pkt, &vip, cfg, gc, frame_len);
	}
	/* Not a service: the address filter may have matched by chance, so only
	 * a listed VIP address makes what follows ours to answer or drop. */
	if (!vip_addrs.lookup(&pkt.dst))
		return not_vip(ctx, &pkt, parsed, gc);
	if (pkt.fragment) {
		gc->drop_fragment++;
		return XDP_DROP;
	}
	if (parsed == PARSE_BAD_L4) {
		gc->drop_malformed++;
		return XDP_DROP;
	}
	if (pkt.proto == (pkt.ipv6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP))
		return handle_icmp(ctx, &pkt, cfg, gc, frame_len);
	gc->pass_not_vip++;
	return XDP_PASS;
}

/* The table sweep: run by the control plane through BPF_PROG_TEST_RUN, never
 * attached (daemon/xdplb/reconciler/reconciler.py settle). Each run sweeps up to
 * SETTLE_SETS_PER_RUN sets from the cursor in `settle`. An entry whose
 * backend is not its ring slot's holds that slot unsettled: the sweep sets
 * the slot's settle_blocked bit, unless the entry has been idle longer than
 * idle_timeout_s both since its last packet and since its VIP's ring last
 * changed, in which case it is removed. Only such entries are ever removed:
 * one that names its slot's backend holds nothing and sends every packet
 * where the ring would, so it stays until a new flow evicts it. The control
 * plane clears RING_UNSETTLED only on slots whose bit stayed clear through a
 * whole sweep that began after the slot's last change. The sweep also takes
 * the census of active entries (flow_census, flow_active). */
/* Sets each run of xdplb_settle sweeps: given by the loader (datapath/flow_table.py),
 * which counts runs with the same number. */
#ifndef SETTLE_SETS_PER_RUN
#error "SETTLE_SETS_PER_RUN comes from the loader (-D)"
#endif
/* A packet may stamp a second or two past the clock the sweep was given. */
#define SETTLE_CLOCK_SLACK_S 60

/* The ring slot a flow-table entry's flow hashes onto, the way the
 * balancer's packets of that flow compute it, and its VIP's ring entry;
 * -1 when no VIP has its id. */
static __always_inline __s64 settle_slot_of(const struct flow_key *key, struct vip_ring **vip)
{
	__u32 id = key->vip_id;
	struct vip_ring *vr = vip_rings.lookup(&id);
	if (!vr || !vr->ring_size)
		return -1;
	*vip = vr;
	__u32 hash = (vr->flags & VIP_F_HASH_SRC_ONLY)
			     ? source_hash(&key->src, vr->ipv6)
			     : flow_hash(&key->src, &vr->addr, key->sport, key->dport, vr->proto,
					 vr->ipv6);
	return vr->ring_offset + ring_slot(hash, vr->ring_size);
}

static __always_inline void settle_block(struct settle_state *st, __u32 slot)
{
	st->blocking++;
	__u32 word = slot / 64;
	__u64 *bits = settle_blocked.lookup(&word);
	if (bits)
		__sync_fetch_and_or(bits, 1ULL << (slot & 63));
}

/* Idle beyond the timeout since both its last packet and its VIP's last ring
 * change: before that change the entry may have been on a settled slot,
 * whose packets refresh last_seen only in their refresh seconds. */
static __always_inline int settle_idle(const struct settle_state *st, __u16 last_seen,
				       const struct vip_ring *vr)
{
	if (!st->idle_timeout_s)
		return 0;
	__u16 age = (__u16)st->now_s - last_seen;
	if (age > (__u16)(0xffff - SETTLE_CLOCK_SLACK_S))
		return 0; /* stamped after the sweep's clock: fresh */
	return age > st->idle_timeout_s &&
	       (__s64)st->now_s - (__s64)vr->changed_s > (__s64)st->idle_timeout_s;
}

/* Removes the ways in `idle` that still hold what `seen` read. A way
 * rewritten since, or a set another CPU holds, keeps its entry, which then
 * holds its slot (at[way]) like any other. The set is held only for the
 * compares: a reader meeting it tries again a few times, then takes the ring. */
static __always_inline void settle_expire(struct settle_state *st, struct flow_set *set,
					  const struct flow_set *seen, __u32 idle,
					  const __u32 *at)
{
	__u32 kept = idle;
	if (flow_set_lock(set)) {
#pragma unroll
		for (int i = 0; i < FLOW_WAYS; i++) {
			if ((idle & (1U << i)) && set->backend[i] == seen->backend[i] &&
			    set->last_seen[i] == seen->last_seen[i] &&
			    flow_key_eq(&set->key[i], &seen->key[i])) {
				set->backend[i] = 0;
				kept &= ~(1U << i);
			}
		}
		flow_set_unlock(set);
	}
#pragma unroll
	for (int i = 0; i < FLOW_WAYS; i++) {
		if (kept & (1U << i))
			settle_block(st, at[i]);
		else if (idle & (1U << i))
			st->expired++;
	}
}

/* An entry whose last packet is at most census->active_window_s old counts
 * as active, in total and for its backend. */
static __always_inline void census_count(struct flow_census *census,
					 const struct settle_state *st, __u16 last_seen,
					 __u32 backend)
{
	__u16 age = (__u16)st->now_s - last_seen;
	if (age > (__u16)(0xffff - SETTLE_CLOCK_SLACK_S))
		age = 0; /* stamped after the sweep's clock */
	if (age > census->active_window_s)
		return;
	census->active++;
	__u32 *n = flow_active.lookup(&backend);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void settle_set(struct settle_state *st, struct flow_census *census,
				       __u32 index)
{
	struct flow_set *set = conns.lookup(&index);
	if (!set)
		return;
	struct flow_set seen;
	int stable = 0;
#pragma unroll
	for (int t = 0; t < FLOW_READ_TRIES; t++) {
		if (stable)
			break;
		__u64 seq = *(volatile __u64 *)&set->seq;
		xdplb_barrier();
		__builtin_memcpy(&seen, set, sizeof(seen));
		xdplb_barrier();
		stable = !(seq & 1) && *(volatile __u64 *)&set->seq == seq;
	}
	if (!stable) {
		st->busy++; /* the sweep vouches for nothing this time */
		return;
	}
	__u32 idle = 0;
	__u32 at[FLOW_WAYS] = {};
#pragma unroll
	for (int i = 0; i < FLOW_WAYS; i++) {
		__u32 backend = seen.backend[i];
		if (!backend)
			continue;
		st->entries++;
		census_count(census, st, seen.last_seen[i], backend);
		struct vip_ring *vr = NULL;
		__s64 slot = settle_slot_of(&seen.key[i], &vr);
		if (slot < 0 || !vr)
			continue; /* no VIP has its id: it holds no slot */
		__u32 s = slot;
		__u32 *entry = ring.lookup(&s);
		if (!entry || (*entry & RING_BACKEND_MASK) == backend)
			continue;
		at[i] = s;
		if (settle_idle(st, seen.last_seen[i], vr))
			idle |= 1U << i;
		else
			settle_block(st, s);
	}
	if (idle)
		settle_expire(st, set, &seen, idle, at);
}

int xdplb_settle(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct settle_state *st = settle.lookup(&zero);
	struct flow_census *census = flow_census.lookup(&zero);
	if (!st || !census)
		return XDP_ABORTED;
#pragma clang loop unroll(disable)
	for (int i = 0; i < SETTLE_SETS_PER_RUN; i++) {
		__u32 index = st->next_set;
		if (index >= st->end_set || index >= CONN_SETS)
			break;
		settle_set(st, census, index);
		st->next_set = index + 1;
	}
	return XDP_PASS;
}

/* tc egress: health checks through the tunnel (bpf/hc_encap.h).
 *
 * An unmarked packet, anything the host sends that is not such a check, is
 * left alone at the cost of one compare. A marked one must be a TCP/UDP
 * packet to a VIP whose backend entry the mark names (the entry's vip_id is
 * the VIP's): it is encapsulated to that backend with the VIP's
 * encapsulation, whether the backend is marked available or not (a down
 * backend is checked too, to come back). Any other marked packet is
 * dropped and counted: its check then fails, which is the truth. */
int xdplb_hc_encap(struct __sk_buff *skb)
{
	if ((skb->mark & HC_MARK_MASK) != HC_MARK_BASE)
		return TC_ACT_OK;
	__u32 zero = 0;
	struct hc_counters *hc = hc_stats.lookup(&zero);
	if (!hc)
		return TC_ACT_SHOT;
	__u32 idx = skb->mark & ~HC_MARK_MASK;
	struct backend *be = backends.lookup(&idx);
	struct lb_config *cfg = config.lookup(&zero);
	if (!idx || !be || !be->vip_id || !cfg || !(cfg->flags & CONFIG_F_READY)) {
		hc->drop_unknown++;
		return TC_ACT_SHOT;
	}
	struct packet pkt = {};
	if (hc_pull_headers(skb)) {
		hc->drop_unparsed++;
		return TC_ACT_SHOT;
	}
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (parse_packet(data, data_end, &pkt) != PARSE_OK || pkt.fragment ||
	    (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)) {
		hc->drop_unparsed++;
		return TC_ACT_SHOT;
	}
	struct vip_meta vip;
	if (!find_vip(&pkt.dst, pkt.dport, pkt.proto, &vip) || vip.vip_id != be->vip_id ||
	    (pkt.ipv6 && !(be->flags & BACKEND_F_IPV6))) {
		hc->drop_unknown++;
		return TC_ACT_SHOT;
	}
	int gue = (vip.flags & VIP_F_GUE) != 0;
	/* A GSO packet is cut to the MTU after this hook; anything else must fit. */
	if (!skb->gso_size &&
	    pkt.l3_len + encap_overhead(be->flags & BACKEND_F_IPV6, gue) > cfg->mtu) {
		hc->drop_too_big++;
		return TC_ACT_SHOT;
	}
	if (hc_encapsulate(skb, &pkt, be, cfg, hash_for_vip(&vip, &pkt), gue)) {
		hc->drop_encap_failed++;
		return TC_ACT_SHOT;
	}
	hc->encapsulated++;
	return TC_ACT_OK;
}
