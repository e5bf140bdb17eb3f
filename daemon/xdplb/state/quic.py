"""QUIC VIPs: their QUIC-LB configuration and their backends' server IDs.

A QUIC VIP's backends issue connection IDs carrying a server ID (xdplb.quiclb);
the datapath reads it and sends the packet to that server's backend whatever
the client's address. The datapath's table of servers is indexed by the server
ID itself (bpf/balancer.c quic_servers), so server IDs are unique across all
QUIC VIPs of a state, at most the map size max_backends - 1, and fit in the
VIP's server-ID length. A backend added without one is given the smallest free
ID when the change is applied: the same state gives the same IDs on every host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from xdplb.state.rules import LimitExceeded, StateError, _fail, _int_in

MAX_SERVER_ID_LEN = 8  # octets the datapath reads (structs.QUIC_SID_MAX_LEN)
MAX_ROTATION = 6  # 0b111 marks connection IDs no configuration routes
MAX_SERVER_ID = 0xFFFF  # the largest backend map (max_backends 65536) less entry 0


@dataclass(frozen=True)
class QuicConfig:
    """A QUIC VIP's QUIC-LB configuration (plaintext): server-ID length in octets
    and the rotation codepoint its connection IDs carry."""

    server_id_len: int = 2
    rotation: int = 0

    def validate(self, where: str) -> None:
        _int_in(f"{where}.server_id_len", self.server_id_len, 1, MAX_SERVER_ID_LEN)
        _int_in(f"{where}.rotation", self.rotation, 0, MAX_ROTATION)

    @property
    def max_server_id(self) -> int:
        return min(MAX_SERVER_ID, 256 ** self.server_id_len - 1)


def quic_to_dict(quic: QuicConfig) -> dict[str, Any]:
    return {"server_id_len": quic.server_id_len, "rotation": quic.rotation}


def quic_from_dict(table: Any, where: str) -> QuicConfig:
    """[vips.quic] as read by model.StrictTable (absent fields take the defaults)."""
    quic = QuicConfig(server_id_len=table.take("server_id_len", int, 2),
                      rotation=table.take("rotation", int, 0))
    table.done()
    quic.validate(where)
    return quic


class _Backend(Protocol):
    address: str
    server_id: int


class _Vip(Protocol):
    key: Any
    quic: QuicConfig | None
    backends: Mapping[str, _Backend]


def validate_server_ids(vips: Iterable[_Vip], max_backends: int) -> None:
    """Each server ID names one backend of one QUIC VIP, and fits the map."""
    owner: dict[int, str] = {}
    for vip in vips:
        for backend in vip.backends.values():
            where = f"VIP {vip.key} backend {backend.address}.server_id"
            if vip.quic is None:
                if backend.server_id:
                    raise _fail(where, "only the backends of a QUIC VIP have one")
                continue
            _int_in(where, backend.server_id, 1, vip.quic.max_server_id)
            if backend.server_id > max_backends:
                raise LimitExceeded(f"{where}: {backend.server_id} exceeds the limit of "
                                    f"{max_backends} (map size max_backends)")
            other = owner.setdefault(backend.server_id, f"{backend.address} of VIP {vip.key}")
            if other != f"{backend.address} of VIP {vip.key}":
                raise _fail(where, f"{backend.server_id} is already the server ID of "
                                   f"{other}")


def free_server_ids(vips: Iterable[_Vip], max_backends: int) -> Iterable[int]:
    """Server IDs no backend has, smallest first."""
    used = {b.server_id for v in vips for b in v.backends.values() if b.server_id}
    return (i for i in range(1, min(MAX_SERVER_ID, max_backends) + 1) if i not in used)


def unassigned(vips: Iterable[_Vip]) -> list[tuple[Any, str]]:
    """(VIP key, address) of the QUIC VIPs' backends without a server ID, in a fixed
    order (VIPs, then addresses, sorted), so every host assigns the same."""
    from xdplb.state.addresses import ip_sort_key

    found = []
    for vip in sorted(vips, key=lambda v: v.key):
        if vip.quic is None:
            continue
        found += [(vip.key, a) for a in sorted(vip.backends, key=ip_sort_key)
                  if not vip.backends[a].server_id]
    return found


def check_server_id_change(vip: _Vip, address: str, before: int, after: int) -> None:
    """A document may leave a backend's server ID out (it is kept), never change it:
    the clients of its connections hold connection IDs carrying the old one."""
    if after and before and after != before:
        raise StateError(
            f"VIP {vip.key} backend {address}.server_id: {before} cannot become {after} "
            "here: connections to the backend carry the old one. Use lbctl backend set "
            "--server-id with --force-server-id, or remove and add the backend")
