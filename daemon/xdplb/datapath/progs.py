"""Loaded BPF programs found by id: what an interface has attached, by name."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from xdplb.datapath.bpfmap import libbcc
from xdplb.datapath.errors import raise_errno


class _ProgInfo(ct.Structure):
    """The head of the kernel's struct bpf_prog_info (uapi/linux/bpf.h), up to the
    name; the array pointers stay zero so the kernel fills in nothing else."""

    _fields_: ClassVar = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64), ("name", ct.c_char * 16)]


@contextmanager
def program_by_id(prog_id: int) -> Iterator[int]:
    """A file descriptor of the loaded program with this id, closed on the way out."""
    fd = libbcc().bpf_prog_get_fd_by_id(ct.c_uint32(prog_id))
    if fd < 0:
        raise_errno(f"opening BPF program id {prog_id}")
    try:
        yield fd
    finally:
        os.close(fd)


def program_name(prog_fd: int) -> str:
    """The name a program was loaded with (its function's, cut to 15 characters)."""
    info = _ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if libbcc().bpf_obj_get_info(prog_fd, ct.byref(info), ct.byref(size)) != 0:
        raise_errno("reading a BPF program's info")
    return info.name.decode(errors="replace")
