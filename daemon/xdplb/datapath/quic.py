"""The `quic_servers` array: which backend entry each QUIC-LB server ID names."""

from __future__ import annotations

import ctypes as ct
import threading

from xdplb import structs
from xdplb.datapath.bpfmap import BpfMap


class QuicServerTable:
    """Writes `quic_servers` (bpf/balancer.c quic_server_backend reads it), the
    only writer. An entry is indexed by the server ID read as a big-endian
    integer (1 .. entries - 1) and names a backend entry and its VIP.

    Each rewrite is three whole-value updates, as the VIP index's slots
    (datapath/vip_index.py VipTable, where the argument is made in full):
    (1) seq odd, old content; (2) seq odd, new content; (3) seq even, new
    content. The datapath uses an entry only between two equal, even reads of
    seq, so a packet never takes a backend of one rewrite and a VIP of
    another; it takes the 5-tuple path meanwhile. An entry left odd by a
    writer that died is rewritten when the next table is made (repair).
    """

    def __init__(self, array: BpfMap, entries: int):
        self.array, self.entries = array, entries
        self._lock = threading.Lock()
        self._mirror = [structs.QuicServer.from_buffer_copy(v)
                        for v in array.read_array(entries)]
        with self._lock:
            for server_id, entry in enumerate(self._mirror):
                if entry.seq & 1:
                    self._write(server_id, entry.vip_id, entry.backend)

    def get(self, server_id: int) -> tuple[int, int]:
        """(vip_id, backend index) of a server ID; backend 0: none."""
        entry = self._mirror[self._checked(server_id)]
        return entry.vip_id, entry.backend

    def put(self, server_id: int, vip_id: int, backend: int) -> None:
        with self._lock:
            entry = self._mirror[self._checked(server_id)]
            if (entry.vip_id, entry.backend) != (vip_id, backend) or entry.seq & 1:
                self._write(server_id, vip_id, backend)

    def clear(self, server_id: int) -> None:
        self.put(server_id, 0, structs.NO_BACKEND)

    def in_use(self) -> dict[int, tuple[int, int]]:
        """{server ID: (vip_id, backend)} of every entry that names a backend."""
        return {i: (e.vip_id, e.backend) for i, e in enumerate(self._mirror) if e.backend}

    def _checked(self, server_id: int) -> int:
        if not 1 <= server_id < self.entries:
            raise ValueError(f"server ID {server_id} is not in 1..{self.entries - 1}")
        return server_id

    def _write(self, server_id: int, vip_id: int, backend: int) -> None:
        key = ct.c_uint32(server_id)
        entry = structs.QuicServer.from_buffer_copy(self._mirror[server_id])
        if not entry.seq & 1:  # (1)
            entry.seq = (entry.seq + 1) & 0xFFFFFFFF
            self.array.put(key, entry)
        entry = structs.QuicServer(seq=entry.seq, vip_id=vip_id, backend=backend)  # (2)
        self.array.put(key, entry)
        entry.seq = (entry.seq + 1) & 0xFFFFFFFF  # (3)
        self.array.put(key, entry)
        self._mirror[server_id] = entry
