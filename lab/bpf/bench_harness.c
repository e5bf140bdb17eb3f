/* Benchmark harness for BPF_PROG_TEST_RUN with repeat=N.
 *
 * The kernel runs a program N times on the same buffer, so after the first
 * run a forwarding program would measure its own output. Before every run
 * this harness moves the frame start back to where it was and restores the
 * first RESTORE_LEN bytes, then tail-calls the program under test.
 *
 * Its own cost must be the same whatever the target does, or subtracting it
 * is wrong: bpf_xdp_adjust_head is therefore called on every run, with a
 * delta of 0 when the target left the frame's length alone (it costs the
 * same as any other delta). The benchmark measures the harness with
 * bench_trivial as its target and subtracts that, which removes the
 * harness's work and BPF_PROG_TEST_RUN's fixed per-run cost alike.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

#define RESTORE_LEN 64

struct saved_frame {
	__u32 len;
	__u8 bytes[RESTORE_LEN];
};

BPF_PROG_ARRAY(bench_target, 1);
BPF_ARRAY(bench_frame, struct saved_frame, 1);

int bench_harness(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct saved_frame *frame = bench_frame.lookup(&zero);
	if (!frame)
		return XDP_ABORTED;
	int delta = (int)(ctx->data_end - ctx->data) - (int)frame->len;
	if (bpf_xdp_adjust_head(ctx, delta)) /* unconditional: a constant cost */
		return XDP_ABORTED;
	if (bpf_xdp_store_bytes(ctx, 0, frame->bytes, RESTORE_LEN))
		return XDP_ABORTED;
	bench_target.call(ctx, 0);
	return XDP_ABORTED;
}

/* The target whose cost is zero by definition: the harness's baseline. */
int bench_trivial(struct xdp_md *ctx)
{
	return XDP_TX;
}

/* The least a forwarding XDP program can do: the method's sanity check. */
int bench_mac_swap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	__u8 tmp[ETH_ALEN];
	__builtin_memcpy(tmp, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, tmp, ETH_ALEN);
	return XDP_TX;
}
