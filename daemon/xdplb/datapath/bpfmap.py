"""Maps through their file descriptors, with the layouts of structs.py."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from xdplb.datapath.errors import DatapathError, raise_errno
from xdplb.datapath.loader import bcc_module

K = TypeVar("K", bound=ct.Structure | ct.c_uint32)
V = TypeVar("V", bound=ct.Structure | ct.c_uint32 | ct.c_uint16)


class BpfMap(Generic[K, V]):
    """A map accessed through its fd with the key and value types of structs.py."""

    def __init__(self, name: str, fd: int, key_type: type[K], value_type: type[V]):
        self.name, self.fd = name, fd
        self.key_type, self.value_type = key_type, value_type

    def get(self, key: K) -> V | None:
        value = self.value_type()
        if libbcc().bpf_lookup_elem(self.fd, ct.byref(key), ct.byref(value)) != 0:
            if ct.get_errno() == errno.ENOENT:
                return None
            raise_errno(f"lookup in {self.name}")
        return value

    def put(self, key: K, value: V) -> None:
        if libbcc().bpf_update_elem(self.fd, ct.byref(key), ct.byref(value), 0) != 0:
            raise_errno(f"update of {self.name}")

    def delete(self, key: K) -> bool:
        if libbcc().bpf_delete_elem(self.fd, ct.byref(key)) == 0:
            return True
        if ct.get_errno() == errno.ENOENT:
            return False
        raise_errno(f"delete from {self.name}")
        return False

    def keys(self) -> Iterator[K]:
        key, next_key = self.key_type(), self.key_type()
        first = True
        while True:
            prev = None if first else ct.byref(key)
            if libbcc().bpf_get_next_key(self.fd, prev, ct.byref(next_key)) != 0:
                return
            first = False
            ct.memmove(ct.byref(key), ct.byref(next_key), ct.sizeof(key))
            yield self.key_type.from_buffer_copy(key)

    def items(self) -> Iterator[tuple[K, V]]:
        for key in self.keys():
            value = self.get(key)
            if value is not None:  # deleted since the key was listed
                yield key, value

    def read_array(self, count: int, chunk: int = 65536) -> ct.Array:
        """Values 0..count-1 of an array map, a chunk of entries per syscall."""
        return self.read_range(0, count, chunk)

    def read_range(self, start: int, count: int, chunk: int = 65536) -> ct.Array:
        """Values start..start+count-1 of an array map, a chunk per syscall."""
        values = (self.value_type * count)()
        keys = (ct.c_uint32 * max(1, min(chunk, count)))()
        size = ct.sizeof(self.value_type)
        # A batch continues after the key its cursor holds: the one before start.
        cursor, done = ct.c_uint32(max(start - 1, 0)), 0
        while done < count:
            n = ct.c_uint32(min(chunk, count - done))
            batch = (self.value_type * n.value).from_address(ct.addressof(values) + done * size)
            first = done == 0 and start == 0
            rc = libbcc().bpf_lookup_batch(self.fd, None if first else ct.byref(cursor),
                                         ct.byref(cursor), ct.byref(keys), ct.byref(batch),
                                         ct.byref(n))
            if rc != 0 and ct.get_errno() != errno.ENOENT:
                raise_errno(f"batch lookup in {self.name}")
            done += n.value
            if rc != 0 or n.value == 0:
                break
        if done != count:
            raise DatapathError(f"batch lookup in {self.name}: read {done} of {count} "
                                f"from {start}")
        return values

    def values_batch(self, chunk: int = 8192) -> Iterator[list[Any]]:
        """Every value, a chunk of entries per syscall: a scan (e.g. of the
        connection table). Each chunk's values are valid until the next one."""
        keys = (self.key_type * chunk)()
        values = (self.value_type * chunk)()
        cursor, first = ct.c_uint32(0), True
        while True:
            n = ct.c_uint32(chunk)
            rc = libbcc().bpf_lookup_batch(self.fd, None if first else ct.byref(cursor),
                                         ct.byref(cursor), ct.byref(keys), ct.byref(values),
                                         ct.byref(n))
            if rc != 0 and ct.get_errno() != errno.ENOENT:
                raise_errno(f"batch scan of {self.name}")
            first = False
            if n.value:
                yield values[:n.value]
            if rc != 0:
                return

    def put_batch(self, keys: ct.Array, values: ct.Array) -> None:
        """One syscall for many updates (hash and array maps)."""
        count = ct.c_uint32(len(keys))
        if count.value == 0:
            return
        if libbcc().bpf_update_batch(self.fd, ct.byref(keys), ct.byref(values),
                                   ct.byref(count)) != 0:
            raise_errno(f"batch update of {self.name} ({len(keys)} entries)")


class PerCpuArray(Generic[V]):
    """A per-CPU array whose values are summed field by field on read."""

    def __init__(self, name: str, fd: int, value_type: type[V]):
        self.name, self.fd, self.value_type = name, fd, value_type
        self.ncpus = len(bcc_module().utils.get_possible_cpus())
        # The kernel copies each CPU's value rounded up to 8 bytes.
        self._stride = (ct.sizeof(value_type) + 7) // 8 * 8

    def read(self, index: int) -> dict[str, int]:
        buf = (ct.c_char * (self._stride * self.ncpus))()
        key = ct.c_uint32(index)
        if libbcc().bpf_lookup_elem(self.fd, ct.byref(key), buf) != 0:
            raise_errno(f"lookup of {self.name}[{index}]")
        totals = dict.fromkeys((f for f, _ in self.value_type._fields_), 0)
        for cpu in range(self.ncpus):
            value = self.value_type.from_buffer_copy(buf, cpu * self._stride)
            for field in totals:
                totals[field] += getattr(value, field)
        return totals

    def clear(self, index: int) -> None:
        buf = (ct.c_char * (self._stride * self.ncpus))()
        key = ct.c_uint32(index)
        if libbcc().bpf_update_elem(self.fd, ct.byref(key), buf, 0) != 0:
            raise_errno(f"reset of {self.name}[{index}]")


def libbcc() -> Any:
    return bcc_module().libbcc.lib


class _MapInfo(ct.Structure):
    """The head of the kernel's struct bpf_map_info (uapi/linux/bpf.h)."""

    _fields_: ClassVar = [("type", ct.c_uint32), ("id", ct.c_uint32),
                          ("key_size", ct.c_uint32), ("value_size", ct.c_uint32),
                          ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                          ("name", ct.c_char * 16), ("rest", ct.c_uint8 * 64)]


def pinned_map_shape(path: Path) -> tuple[int, int, int]:
    """(key size, value size, entries) of the map pinned at path."""
    fd = libbcc().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise_errno(f"opening pinned map {path}")
    try:
        info = _MapInfo()
        size = ct.c_uint32(ct.sizeof(info))
        if libbcc().bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
            raise_errno(f"reading what {path} is")
        return info.key_size, info.value_size, info.max_entries
    finally:
        os.close(fd)
