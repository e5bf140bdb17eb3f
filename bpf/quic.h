/* QUIC connection-ID routing: reads the QUIC-LB server ID (plaintext
 * algorithm of draft-ietf-quic-load-balancers) from a UDP packet's
 * destination connection ID, using only the version-invariant header
 * (RFC 8999) and the long-header types of versions 1 and 2.
 *
 * A connection ID the server chose carries [first octet: rotation (3 bits),
 * length or random (5 bits)][server ID][nonce...]. Short headers always carry
 * one; of the long headers only Handshake packets do: Initial and 0-RTT carry
 * the client's random choice, and Retry and Version Negotiation never come
 * from clients. Everything else takes the 5-tuple path. Every read is
 * checked against the end of the UDP payload and of the frame.
 */
#ifndef XDPLB_QUIC_H
#define XDPLB_QUIC_H

#include <linux/udp.h>

#include "parse.h"

#define QUIC_LONG_HEADER 0x80
#define QUIC_FIXED_BIT 0x40
#define QUIC_VERSION_1 0x00000001U
#define QUIC_VERSION_2 0x6b3343cfU
#define QUIC_MAX_CID_LEN 20
/* Offsets in the UDP payload: a long header's DCID length and DCID; a short
 * header's DCID. */
#define QUIC_LONG_DCID_LEN_OFF 5
#define QUIC_LONG_DCID_OFF 6
#define QUIC_SHORT_DCID_OFF 1

enum quic_cid {
	QUIC_BY_CID,        /* *sid holds the server ID */
	QUIC_CLIENT_CID,
	QUIC_OTHER_VERSION,
	QUIC_OTHER_CONFIG,
	QUIC_SHORT_CID,
	QUIC_NOT_QUIC,
};

/* A Handshake packet's long-header type: 2 in version 1, 3 in version 2
 * (RFC 9369 renumbered the types). */
static __always_inline int quic_is_handshake(__u32 version, __u8 first)
{
	__u8 type = (first >> 4) & 3;
	return version == QUIC_VERSION_1 ? type == 2 : type == 3;
}

/* The server ID of a UDP packet (parse_l4 checked its header lies in the
 * packet) whose VIP's configuration has sid_len-octet server IDs and the
 * rotation codepoint `rotation`. */
static __always_inline int quic_server_id(void *data, void *data_end, const struct packet *pkt,
					  __u32 sid_len, __u32 rotation, __u64 *sid)
{
	struct udphdr *udp = data + HDR_OFF(pkt->l4_off);
	if ((void *)(udp + 1) > data_end)
		return QUIC_NOT_QUIC;
	__u8 *payload = (__u8 *)(udp + 1);
	__u32 len = BE16(udp->len) - sizeof(*udp); /* parse_l4: at least the header */
	if (len < 1 || payload + 1 > (__u8 *)data_end)
		return QUIC_NOT_QUIC;
	__u8 first = payload[0];
	__u32 at = QUIC_SHORT_DCID_OFF;
	__u32 cid_len = QUIC_MAX_CID_LEN; /* a short header does not say: what is there */
	if (first & QUIC_LONG_HEADER) {
		if (len < QUIC_LONG_DCID_OFF || payload + QUIC_LONG_DCID_OFF > (__u8 *)data_end)
			return QUIC_SHORT_CID;
		__u32 version = ((__u32)payload[1] << 24) | ((__u32)payload[2] << 16) |
				((__u32)payload[3] << 8) | payload[4];
		if (version != QUIC_VERSION_1 && version != QUIC_VERSION_2)
			return QUIC_OTHER_VERSION;
		if (!quic_is_handshake(version, first))
			return QUIC_CLIENT_CID;
		at = QUIC_LONG_DCID_OFF;
		cid_len = payload[QUIC_LONG_DCID_LEN_OFF];
	} else if (!(first & QUIC_FIXED_BIT)) {
		return QUIC_NOT_QUIC;
	}
	/* The first octet and the server ID, within the DCID and the payload. */
	if (cid_len < 1 + sid_len || len < at + 1 + sid_len)
		return QUIC_SHORT_CID;
	__u8 *cid = payload + at;
	if (cid + 1 > (__u8 *)data_end)
		return QUIC_SHORT_CID;
	if ((cid[0] >> 5) != rotation)
		return QUIC_OTHER_CONFIG; /* rotation is 0..6: 0b111 never matches */
	__u64 value = 0;
#pragma unroll
	for (int i = 0; i < QUIC_SID_MAX_LEN; i++) {
		if (i >= sid_len)
			break;
		__u8 *octet = cid + 1 + i;
		/* Opaque to clang, so each octet keeps its own check against the end
		 * of the frame (merged checks are what the verifier refuses). */
		asm volatile("" : "+r"(octet));
		if (octet + 1 > (__u8 *)data_end)
			return QUIC_SHORT_CID;
		value = (value << 8) | *octet;
	}
	*sid = value;
	return QUIC_BY_CID;
}

#endif
