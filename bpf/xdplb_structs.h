/* Layouts shared by the BPF programs and the control plane.
 *
 * Mirrored field for field by daemon/xdplb/structs.py; tests/test_structs.py
 * compares both sides against the layouts bcc derives from this file, so a
 * change here without the matching change there fails the tests.
 *
 * Byte order: addresses and ports are kept in network byte order, exactly as
 * they appear in packets, so the fast path never converts them.
 */
#ifndef XDPLB_STRUCTS_H
#define XDPLB_STRUCTS_H

/* An IPv4 or IPv6 address in one 16-byte shape. IPv4 is stored in its
 * IPv4-mapped IPv6 form (::ffff:a.b.c.d) so that one key type serves both
 * families and an IPv4 address can never alias an IPv6 one. */
struct addr16 {
	__u32 w[4];
};

/* Key of the `vips` map: one service. port 0 = every port (a port-less VIP). */
struct vip_key {
	struct addr16 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

#define VIP_F_HASH_SRC_ONLY (1U << 0) /* client affinity: ring keyed by source address */
#define VIP_F_GUE (1U << 1)           /* encapsulate in UDP (GUE variant 1) */
/* A UDP VIP whose packets carry QUIC: those whose destination connection ID
 * holds a QUIC-LB server ID (bpf/quic.h) go to that server's backend. The
 * flags also hold the server ID's length in octets (1..QUIC_SID_MAX_LEN) and
 * the configuration's rotation codepoint (0..6). */
#define VIP_F_QUIC (1U << 2)
#define VIP_QUIC_SID_LEN_SHIFT 8
#define VIP_QUIC_ROTATION_SHIFT 12
#define QUIC_SID_MAX_LEN 8

/* Value of the `vips` map. The ring lives at ring[ring_offset .. +ring_size):
 * one map update swaps all three, so a resize or move is atomic for packets. */
struct vip_meta {
	__u32 vip_id; /* index into vip_stats; part of the flow key */
	__u32 ring_offset;
	__u32 ring_size;
	__u32 flags;
};

/* Ring entries: a backend index, and the "unsettled" bit. A slot is
 * settled while every flow-table entry whose flow hashes onto it names the
 * slot's backend, so an established packet there may take the ring's answer
 * without reading the table (bpf/balancer.c choose_backend). The control
 * plane sets the bit in the very store that gives the slot a different
 * backend, and clears it only after a sweep of the table found no entry
 * naming another backend (daemon/xdplb/reconciler/reconciler.py settle). */
#define RING_UNSETTLED (1U << 31)
#define RING_BACKEND_MASK (RING_UNSETTLED - 1)

/* Value of the `vip_rings` array, indexed by vip_id: where a flow-table
 * entry's flow lands in its VIP's ring, for the table sweep (the entry's key
 * holds only the vip_id). Zero ring_size: no VIP has that id. */
struct vip_ring {
	struct addr16 addr; /* the VIP's address: the flow hash's destination */
	__u32 ring_offset;
	__u32 ring_size;
	__u32 flags;        /* the VIP's VIP_F_* */
	__u8 proto;
	__u8 ipv6;
	__u16 pad;
	__u32 changed_s;    /* lb_config.now_s when the VIP's ring last changed */
};

/* Value of the `vip_addrs` map (key: struct addr16): every address that has
 * a VIP, with what the exact (address, port, protocol) lookup cannot tell. */
#define VIP_ADDR_F_PORTLESS_TCP (1U << 0)
#define VIP_ADDR_F_PORTLESS_UDP (1U << 1)
struct vip_addr_meta {
	__u32 flags;
};

/* Value of the `backends` array; index 0 is reserved for "no backend". */
#define BACKEND_F_IPV6 (1U << 0)
#define BACKEND_F_AVAILABLE (1U << 1) /* cleared by the control plane when down */
struct backend {
	struct addr16 addr; /* IPv4 backends: mapped form, like every address */
	__u32 flags;
	/* The VIP this entry serves (a backend of two VIPs has two entries, with
	 * health of their own). Unused by the datapath: it makes the maps
	 * self-describing, so a restarted control plane rebuilds its index
	 * table from them. */
	__u32 vip_id;
};

/* The VIP index: an array probed inline in front of the `vips` hash map,
 * which stays the source of truth (bpf/balancer.c explains the probing,
 * daemon/xdplb/datapath/vip_index.py VipTable the update protocol). A slot is
 * rewritten by the control plane in three map updates bracketed by `seq`:
 *   1. seq odd,  old content;  2. seq odd, new content;  3. seq even, new content.
 * A reader reads seq, the content, seq again, and uses the content only if
 * both reads are equal and even; otherwise it asks the hash map. */
#define VIP_SLOT_EMPTY 0     /* never used since the last clean-up: ends a probe */
#define VIP_SLOT_LIVE 1      /* holds key -> meta */
#define VIP_SLOT_TOMBSTONE 2 /* deleted: a probe goes on past it */
#define VIP_INDEX_PROBES 4   /* slots a lookup probes before asking the hash map */
struct vip_index_slot {
	__u32 seq;   /* even: stable; odd: being rewritten */
	__u32 state; /* VIP_SLOT_* */
	struct vip_key key;
	struct vip_meta meta;
};

/* A client's flow to one VIP. The VIP's address, port and protocol are
 * implied by vip_id; dport is kept because a port-less VIP sees many
 * destination ports. */
struct flow_key {
	struct addr16 src;
	__u16 sport;
	__u16 dport;
	__u32 vip_id;
};

/* The `conns` flow table: one array, shared by every CPU, of sets of
 * FLOW_WAYS flows; a flow lives in set flow_set_hash(key) >> (64 -
 * CONN_SET_BITS) (bpf/hash.h). A set is two cache lines. Way i is empty
 * while backend[i] is 0. last_seen[i] is lb_config.now_s modulo 2^16 when
 * the flow last sent a packet (ages are taken modulo 2^16 too).
 *
 * seq is odd while a writer rewrites the set. A datapath writer takes it
 * from even to odd with a compare-and-swap, so two CPUs never rewrite one
 * set at once, and back to even when done; a reader accepts what it read
 * only between two equal even reads of seq (bpf/balancer.c). */
#define FLOW_WAYS 4
struct flow_set {
	struct flow_key key[FLOW_WAYS];
	__u32 backend[FLOW_WAYS];
	__u16 last_seen[FLOW_WAYS];
	__u64 seq; /* 64 bits: the width of the atomics every BPF target has */
};

/* The VIP address filter: a bitmap over a hash of the destination address,
 * ADDR_FILTER_WORDS u64 words in an array (whose lookup the verifier
 * inlines). A clear bit proves the address has no VIP, so the host's own
 * traffic costs one bit test; a set bit sends the packet to the VIP maps. */
#define ADDR_FILTER_WORDS 1024

/* Per-CPU packets and bytes of one VIP or one backend. */
struct traffic_counters {
	__u64 packets;
	__u64 bytes;
};

/* Per-CPU global counters. The first group are outcomes: every packet the
 * balancer sees increments exactly one of them, so their sum is the number
 * of packets seen. The second group counts events along the way. */
struct global_counters {
	/* outcomes */
	__u64 pass_not_vip;            /* not for a VIP service: handed to the kernel */
	__u64 pass_unparsed;           /* not IP, or an IP header we cannot read */
	__u64 pass_unconfigured;       /* VIP packet before the next hop is configured */
	__u64 tx_forwarded;            /* encapsulated to a backend */
	__u64 tx_icmp_echo_reply;      /* ping of a VIP answered here */
	__u64 tx_icmp_error_forwarded; /* ICMP error about a VIP flow sent to its backend */
	__u64 tx_icmp_too_big;         /* too big after encapsulation: told the client */
	__u64 drop_fragment;           /* IP fragment addressed to a VIP */
	__u64 drop_malformed;          /* VIP packet whose L4 header is truncated or lies */
	__u64 drop_no_backend;         /* VIP has no backend to send to */
	__u64 drop_too_big;            /* too big, and no ICMP may be sent (IPv4 without DF) */
	__u64 drop_encap_failed;       /* the kernel refused to grow or shrink the frame */
	/* events */
	__u64 conn_hit;
	__u64 conn_miss;
	__u64 conn_rechosen;          /* recorded backend unavailable: flow re-chosen */
	__u64 new_flows;              /* flows that took the ring */
	__u64 new_flows_unrecorded;   /* new-flow rate above the limit: not recorded */
	__u64 conn_busy;              /* the flow's set was being rewritten by another
				       * CPU: the flow took the ring, or was not recorded */
	__u64 conn_settled;           /* established packets sent to their settled ring
				       * slot's backend without reading the table */
};

/* Value of the single-entry `config` array. */
#define CONFIG_F_READY (1U << 0) /* nexthop_mac set; until then VIP traffic is passed */
struct lb_config {
	__u8 nexthop_mac[6];
	__u16 mtu;                  /* largest outer IP packet that may leave, in bytes */
	__u16 gue_port;             /* network order */
	__u16 pad;
	__u32 flags;
	__u32 encap_src4;           /* outer IPv4 source: base | (flow hash & hostmask) */
	__u32 encap_src4_hostmask;  /* network order */
	struct addr16 encap_src6;   /* outer IPv6 source: w[3] takes hash bits */
	__u32 encap_src6_hostmask;  /* network order, applied to w[3] */
	__u32 max_new_flows_per_cpu; /* per second; 0 = no limit */
	__u32 now_s;                 /* a seconds clock the control plane advances */
	/* Established packets on settled ring slots skip the flow table except
	 * during one second in every settled_refresh_s (a power of two), which
	 * refreshes last_seen and records flows first seen mid-stream; 0: every
	 * packet reads the table. */
	__u32 settled_refresh_s;
};

/* The table sweep's state: the single entry of the `settle` array, set up by
 * the control plane, advanced by each run of xdplb_settle (bpf/balancer.c),
 * which sweeps up to SETTLE_SETS_PER_RUN sets from next_set, stopping at
 * end_set. */
struct settle_state {
	__u32 next_set;
	__u32 end_set;
	__u32 idle_timeout_s; /* entries holding a slot idle longer are removed; 0: none */
	__u32 now_s;          /* lb_config.now_s, as last_seen compares to it */
	__u64 entries;        /* entries seen */
	__u64 blocking;       /* entries naming another backend than their slot's */
	__u64 expired;        /* entries removed as idle */
	__u64 busy;           /* sets a datapath writer held through every try */
};

/* The sweep's census (the single entry of `flow_census`, bpf/balancer.c):
 * the control plane sets active_window_s before a sweep; the sweep counts
 * entries seen within it, in total here and per backend in `flow_active`.
 * Kept apart from settle_state so maps pinned by an older release keep
 * their layout: a release adds maps, it never reshapes one. */
struct flow_census {
	__u32 active_window_s;
	__u32 pad;
	__u64 active; /* entries whose last packet is at most active_window_s old */
};

/* Per-CPU flow-table events that need their own map for the same reason. */
struct flow_events {
	__u64 evicted; /* a full set gave up the flow seen longest ago for a new one */
};

/* One entry of `quic_servers`, indexed by a QUIC-LB server ID read as a
 * big-endian integer: the backend entry it routes to, and that entry's VIP
 * (a server ID routes only its own VIP's packets). Rewritten under seq as
 * the VIP index is (daemon/xdplb/datapath/quic.py QuicServerTable), so a
 * packet never takes a torn entry; backend 0: no server has this ID. */
struct quic_server {
	__u32 seq;
	__u32 vip_id;
	__u32 backend;
	__u32 pad;
};

/* Per-CPU counters of QUIC VIPs' packets (events: each packet's outcome is
 * counted in global_counters as any other's). routed: by the server ID in
 * its connection ID; every other counter is a packet that took the 5-tuple
 * path (ring and connection table), and why. */
struct quic_counters {
	__u64 routed;
	__u64 client_cid;     /* Initial or 0-RTT: a connection ID the client chose */
	__u64 other_version;  /* a long header of a version other than 1 and 2 */
	__u64 other_config;   /* rotation bits of another configuration, or 0b111 */
	__u64 short_cid;      /* the connection ID is shorter than its server ID */
	__u64 not_quic;       /* a short header without the fixed bit, or no payload */
	__u64 unknown_server; /* no backend of this VIP has the server ID */
	__u64 server_down;    /* the server ID's backend may not take new packets */
	__u64 busy;           /* the server ID's entry was being rewritten */
};

/* A half-open check (kind tcp-syn) of one probe slot (bpf/syn_probe.h): lbd
 * writes addr, port and a fresh cookie with outcome SYN_PENDING, then sends
 * the SYN (seq = cookie, from port SYN_PORT_BASE + slot % SYN_PORTS); the
 * balancer sets outcome from the reply whose ack is cookie + 1. */
#define SYN_PORT_BASE 61000 /* above Linux's default ephemeral range (32768..60999) */
#define SYN_PORTS 4096
#define SYN_PENDING 0
#define SYN_OPEN 1    /* a SYN-ACK: the port listens */
#define SYN_REFUSED 2 /* a RST: the port is closed */
struct syn_probe {
	struct addr16 addr;
	__u32 cookie;
	__u16 port;  /* network order */
	__u8 ipv6;
	__u8 outcome;
	/* A check through the VIP (addr and port are the VIP's): the backend entry
	 * its SYN was tunnelled to, and the RST is; 0: the backend's own address. */
	__u32 backend;
	__u32 pad;
};

/* Per-CPU counters of half-open check replies. */
struct syn_counters {
	__u64 open;      /* a SYN-ACK recorded and answered with a RST */
	__u64 refused;   /* a RST recorded */
	__u64 unmatched; /* a SYN-ACK or RST to a probe port that no probe expects: passed */
	__u64 rst_error; /* recorded, but the RST could not be built: dropped */
};

/* Per-CPU state of the new-flow rate limiter. */
struct flood_state {
	__u64 window_start_ns;
	__u64 new_flows;
};

/* Per-CPU counters of the health-check encapsulation at tc egress
 * (bpf/hc_encap.h): marked packets only, each counted once. */
struct hc_counters {
	__u64 encapsulated;     /* sent through the tunnel to the mark's backend */
	__u64 drop_unknown;     /* the mark names no backend entry of the packet's VIP */
	__u64 drop_unparsed;    /* not an IP packet with a readable TCP/UDP header */
	__u64 drop_too_big;     /* longer than the MTU once encapsulated */
	__u64 drop_encap_failed; /* the kernel refused to grow the packet */
};

/* Per-CPU counters of the backend-side decapsulator. */
struct decap_counters {
	__u64 decapsulated;
	__u64 passed;
};

#endif
