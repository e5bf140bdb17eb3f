"""BPF_PROG_TEST_RUN: a program run on a frame (or an skb with a mark)."""

from __future__ import annotations

import ctypes as ct
import platform
from dataclasses import dataclass

from xdplb.datapath.errors import DatapathError, raise_errno

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {XDP_ABORTED: "ABORTED", XDP_DROP: "DROP", XDP_PASS: "PASS", XDP_TX: "TX"}
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_PROG_TEST_RUN = 10
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}

@dataclass(frozen=True)
class TestRunResult:
    verdict: int
    data: bytes
    duration_ns: int  # the kernel's average per run, an integer


class _TestRunAttr(ct.Structure):
    """The BPF_PROG_TEST_RUN member of union bpf_attr."""

    _fields_ = (
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("ctx_in", ct.c_uint64),
        ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
        ("pad", ct.c_uint32),
    )


class SkBuffCtx(ct.Structure):
    """The head of struct __sk_buff, as far as `mark`: the context a tc
    program's BPF_PROG_TEST_RUN takes (len and pkt_type must stay zero)."""

    _fields_ = (("len", ct.c_uint32), ("pkt_type", ct.c_uint32), ("mark", ct.c_uint32))


class XdpMd(ct.Structure):
    _fields_ = (
        ("data", ct.c_uint32),
        ("data_end", ct.c_uint32),
        ("data_meta", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32),
        ("rx_queue_index", ct.c_uint32),
        ("egress_ifindex", ct.c_uint32),
    )


_libc = ct.CDLL(None, use_errno=True)


def prog_test_run(
    prog_fd: int,
    frame: bytes,
    repeat: int = 1,
    *,
    ingress_ifindex: int = 0,
    flags: int = 0,
    batch_size: int = 0,
    ctx: ct.Structure | None = None,
) -> TestRunResult:
    """Runs an XDP program (or, with an skb `ctx`, a tc program) on `frame`
    in the kernel (BPF_PROG_TEST_RUN)."""
    syscall_nr = BPF_SYSCALL.get(platform.machine())
    if syscall_nr is None:
        raise DatapathError(f"BPF_PROG_TEST_RUN: unsupported machine {platform.machine()}")
    data_in = ct.create_string_buffer(frame, len(frame))
    data_out = ct.create_string_buffer(len(frame) + 512)  # room for encapsulation
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(frame),
        data_size_out=len(data_out),
        data_in=ct.addressof(data_in),
        data_out=ct.addressof(data_out),
        repeat=repeat,
        flags=flags,
        batch_size=batch_size,
    )
    if ctx is not None:
        attr.ctx_in, attr.ctx_size_in = ct.addressof(ctx), ct.sizeof(ctx)
    elif ingress_ifindex or flags:
        ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
        attr.ctx_in, attr.ctx_size_in = ct.addressof(ctx), ct.sizeof(ctx)
    if _libc.syscall(syscall_nr, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) != 0:
        raise_errno("BPF_PROG_TEST_RUN")
    return TestRunResult(attr.retval, data_out.raw[: attr.data_size_out], attr.duration)


def run_live_frames(prog_fd: int, frame: bytes, count: int, *, ingress_ifindex: int,
                    batch_size: int = 64) -> int:
    """BPF_PROG_TEST_RUN in live-frames mode: the XDP program runs `count` times on
    copies of `frame` as if received on `ingress_ifindex` (of the calling thread's
    netns), and each frame it returns XDP_TX for is transmitted there. Returns the
    kernel's average ns per frame. Some kernels refuse the mode (EPERM)."""
    syscall_nr = BPF_SYSCALL.get(platform.machine())
    if syscall_nr is None:
        raise DatapathError(f"BPF_PROG_TEST_RUN: unsupported machine {platform.machine()}")
    data_in = ct.create_string_buffer(frame, len(frame))
    # Live-frames mode takes no data_out (EINVAL otherwise).
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                        data_in=ct.addressof(data_in), repeat=count,
                        flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    attr.ctx_in, attr.ctx_size_in = ct.addressof(ctx), ct.sizeof(ctx)
    if _libc.syscall(syscall_nr, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) != 0:
        raise_errno("BPF_PROG_TEST_RUN (live frames)")
    return attr.duration
