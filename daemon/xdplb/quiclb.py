"""Routable QUIC connection IDs, the backend's side: the plaintext algorithm of
the IETF draft "QUIC-LB: Generating Routable QUIC Connection IDs"
(draft-ietf-quic-load-balancers).

A CID this module makes is ``first octet | server ID | nonce``:

* first octet: 3 config-rotation bits (most significant), then 5 bits giving the
  length of the rest of the CID (always encoded here: ``cid_len - 1``). Rotation
  0b111 is reserved for CIDs a load balancer cannot route, so a configuration
  uses 0..6;
* server ID: ``server_id_len`` octets (1..8: the datapath reads at most 8) that
  the load balancer maps to this backend;
* nonce: ``nonce_len`` random octets (at least 4), so that two CIDs of one
  server cannot be linked by an observer. QUIC v1 caps a CID at 20 octets,
  hence ``server_id_len + nonce_len <= 19``.

Server IDs are opaque bytes here. xdplb's load balancer reads one as a
big-endian integer (leading octets zero) that indexes its table of servers:
1 .. [maps] max_backends - 1, so at most 65535. server_id_bytes() and
server_id_value() convert between the two. Short nonces collide sooner: with
N CIDs of one server alive at once, two equal ones appear with probability
about N**2 / 2**(8 * nonce_len + 1), so pick nonce_len with that in mind.

Pure Python on purpose: xdplb.quiclb_aioquic wires it into an aioquic server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

ROTATION_MAX = 6
UNROUTABLE_ROTATION = 0b111
SERVER_ID_LEN_MAX = 8  # what the datapath reads
NONCE_LEN_MIN = 4
MAX_CID_LEN = 20  # QUIC v1
SERVER_ID_VALUE_MAX = 0xFFFF  # what the load balancer's side accepts


def _check_int(name: str, value: int, low: int, high: int, why: str = "") -> None:
    # bool is an int: a True rotation is a bug, not rotation 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}..{high}{why}, got {value!r}")


@dataclass(frozen=True)
class QuicLbConfig:
    """One QUIC-LB configuration: what a backend and the load balancer agree on."""

    rotation: int
    server_id_len: int
    nonce_len: int

    def __post_init__(self) -> None:
        _check_int("rotation", self.rotation, 0, ROTATION_MAX,
                   " (0b111 is reserved for unroutable CIDs)")
        _check_int("server_id_len", self.server_id_len, 1, SERVER_ID_LEN_MAX)
        _check_int("nonce_len", self.nonce_len, NONCE_LEN_MIN,
                   MAX_CID_LEN - 1 - self.server_id_len,
                   f" (server_id_len + nonce_len <= {MAX_CID_LEN - 1})")

    @property
    def cid_len(self) -> int:
        return 1 + self.server_id_len + self.nonce_len

    @property
    def first_octet(self) -> int:
        return self.rotation << 5 | (self.cid_len - 1)


def encode_cid(config: QuicLbConfig, server_id: bytes, nonce: bytes) -> bytes:
    """The CID carrying `server_id`, with the given nonce (tests pass their own)."""
    if len(server_id) != config.server_id_len:
        raise ValueError(f"server ID is {len(server_id)} octets, "
                         f"the configuration's server_id_len is {config.server_id_len}")
    if len(nonce) != config.nonce_len:
        raise ValueError(f"nonce is {len(nonce)} octets, "
                         f"the configuration's nonce_len is {config.nonce_len}")
    return bytes([config.first_octet]) + bytes(server_id) + bytes(nonce)


def new_cid(config: QuicLbConfig, server_id: bytes,
            urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh CID for `server_id`; the random nonce keeps CIDs unlinkable."""
    return encode_cid(config, server_id, urandom(config.nonce_len))


def rotation_of(cid: bytes) -> int:
    """The config-rotation bits of a CID (UNROUTABLE_ROTATION: no configuration)."""
    if not cid:
        raise ValueError("an empty CID has no config-rotation bits")
    return cid[0] >> 5


def server_id_of(config: QuicLbConfig, cid: bytes) -> bytes | None:
    """The server ID in `cid`, or None when this configuration cannot route it."""
    if len(cid) < 1 + config.server_id_len:
        return None
    rotation = rotation_of(cid)
    # a CID of another configuration (or of none) holds no server ID of this one
    if rotation == UNROUTABLE_ROTATION or rotation != config.rotation:
        return None
    return bytes(cid[1:1 + config.server_id_len])


def server_id_bytes(value: int, length: int) -> bytes:
    """`value` as a server ID of `length` octets, big-endian, leading octets zero."""
    _check_int("server ID length", length, 1, SERVER_ID_LEN_MAX)
    high = min(SERVER_ID_VALUE_MAX, 256 ** length - 1)
    _check_int("server ID", value, 1, high, f" to fit in {length} octet(s)")
    return value.to_bytes(length, "big")


def server_id_value(sid: bytes) -> int:
    """The integer a server ID stands for: the inverse of server_id_bytes()."""
    _check_int("server ID length", len(sid), 1, SERVER_ID_LEN_MAX)
    value = int.from_bytes(sid, "big")
    _check_int("server ID", value, 1, SERVER_ID_VALUE_MAX)
    return value
