/* XDP_PASS, nothing else. Attached to the router-side veth of a lab: a frame
 * XDP_TX'd into a veth is only received by the peer when the peer runs NAPI,
 * and on the kernels we test an XDP program is what reliably turns it on
 * (enabling GRO alone was measured not to). */
#include <uapi/linux/bpf.h>

int xdplb_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
