/* Internet checksum helpers (RFC 1071, incremental update per RFC 1624). */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

#include <linux/ip.h>

static __always_inline __u16 fold_csum(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Checksum of a 20-byte IPv4 header whose check field is zero. Summing the
 * raw 16-bit words is byte-order neutral, so no conversions are needed. */
static __always_inline __u16 ipv4_header_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return fold_csum(sum);
}

#define IPV4_OPTION_WORDS 20 /* 16-bit words of options at most: IHL 15 */

/* Whether the IPv4 header at ip (ihl 32-bit words) sums to its checksum: the
 * check a host makes before it answers. Every word read is bounds-checked;
 * each unrolled read is at a constant offset (the verifier refuses arithmetic
 * on a packet pointer that a loop bound would bring). */
static __always_inline int ipv4_header_valid(const struct iphdr *ip, const void *data_end,
					     __u32 ihl)
{
	if ((const void *)(ip + 1) > data_end || ihl < 5)
		return 0;
	const __u16 *w = (const __u16 *)ip;
	__u64 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	const __u16 *option = (const __u16 *)(ip + 1);
	__u32 option_words = (ihl - 5) * 2;
#pragma unroll
	for (int i = 0; i < IPV4_OPTION_WORDS; i++) {
		if (i < option_words) {
			if ((const void *)(option + i + 1) > data_end)
				return 0;
			sum += option[i];
		}
	}
	return fold_csum(sum) == 0;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), on raw (network-order) words. */
static __always_inline void csum_replace16(__u16 *check, __u16 old, __u16 new)
{
	__u64 sum = (__u16)~*check;
	sum += (__u16)~old;
	sum += new;
	*check = fold_csum(sum);
}

#endif
