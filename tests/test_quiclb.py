"""Tests for xdplb.quiclb (QUIC-LB connection IDs, plaintext algorithm) and for
xdplb.quiclb_aioquic: a real aioquic server on 127.0.0.1 whose every CID must
carry its server ID."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionId
from aioquic.quic.events import QuicEvent, StreamDataReceived

from tests.certs import self_signed
from xdplb.quiclb import (
    QuicLbConfig,
    encode_cid,
    new_cid,
    rotation_of,
    server_id_bytes,
    server_id_of,
    server_id_value,
)
from xdplb.quiclb_aioquic import QuicLbConnection, serve

ALPN = ["xdplb-quiclb-test"]


def test_the_drafts_unencrypted_vector_byte_for_byte() -> None:
    config = QuicLbConfig(rotation=0, server_id_len=3, nonce_len=4)
    cid = encode_cid(config, bytes.fromhex("c4605e"), bytes.fromhex("4504cc4f"))
    assert cid == bytes.fromhex("07c4605e4504cc4f")
    assert server_id_of(config, cid) == bytes.fromhex("c4605e")


@pytest.mark.parametrize("server_id_len", range(1, 9))
def test_every_server_id_len_round_trips(server_id_len: int) -> None:
    sid = bytes(range(0xA1, 0xA1 + server_id_len))
    for nonce_len in sorted({4, 5, 8, 19 - server_id_len}):
        for rotation in range(7):
            config = QuicLbConfig(rotation, server_id_len, nonce_len)
            nonce = bytes(range(0x10, 0x10 + nonce_len))
            cid = encode_cid(config, sid, nonce)
            assert len(cid) == config.cid_len == 1 + server_id_len + nonce_len <= 20
            assert cid == bytes([rotation << 5 | (config.cid_len - 1)]) + sid + nonce
            assert rotation_of(cid) == rotation
            assert server_id_of(config, cid) == sid


def test_new_cid_draws_the_nonce_and_two_cids_differ() -> None:
    config = QuicLbConfig(rotation=2, server_id_len=2, nonce_len=6)
    asked: list[int] = []

    def fake_urandom(n: int) -> bytes:
        asked.append(n)
        return b"\x5a" * n

    assert new_cid(config, b"\x0a\x0b", urandom=fake_urandom) == bytes.fromhex(
        "480a0b5a5a5a5a5a5a")
    assert asked == [6]
    first, second = new_cid(config, b"\x0a\x0b"), new_cid(config, b"\x0a\x0b")
    assert first != second
    assert server_id_of(config, first) == server_id_of(config, second) == b"\x0a\x0b"


def test_the_configuration_is_frozen_and_its_limits_are_accepted() -> None:
    for rotation, sid_len, nonce_len in [(0, 1, 4), (6, 8, 11), (6, 1, 18), (3, 8, 4)]:
        assert QuicLbConfig(rotation, sid_len, nonce_len).cid_len == 1 + sid_len + nonce_len
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuicLbConfig(0, 2, 6).rotation = 1  # type: ignore[misc]


@pytest.mark.parametrize(("rotation", "server_id_len", "nonce_len", "field"), [
    (7, 2, 6, "rotation"),  # 0b111: reserved for unroutable CIDs
    (-1, 2, 6, "rotation"),
    (True, 2, 6, "rotation"),
    (0, 0, 6, "server_id_len"),
    (0, 9, 6, "server_id_len"),
    (0, 2, 3, "nonce_len"),
    (0, 8, 12, "nonce_len"),  # 21 octets: past QUIC v1's 20
    (0, 1, 19, "nonce_len"),
])
def test_the_configuration_refuses(rotation: int, server_id_len: int, nonce_len: int,
                                   field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be an integer \d+\.\.\d+"):
        QuicLbConfig(rotation, server_id_len, nonce_len)


def test_a_server_id_or_nonce_of_the_wrong_length_is_refused() -> None:
    config = QuicLbConfig(rotation=1, server_id_len=2, nonce_len=6)
    for sid in (b"", b"\x0a", b"\x00\x0a\x0b"):
        with pytest.raises(ValueError, match="server_id_len is 2"):
            encode_cid(config, sid, bytes(6))
        with pytest.raises(ValueError, match="server_id_len is 2"):
            new_cid(config, sid)
    for nonce in (bytes(5), bytes(7)):
        with pytest.raises(ValueError, match="nonce_len is 6"):
            encode_cid(config, b"\x0a\x0b", nonce)


def test_server_id_of_returns_none_for_what_this_configuration_cannot_route() -> None:
    config = QuicLbConfig(rotation=1, server_id_len=3, nonce_len=4)
    cid = encode_cid(config, b"\x01\x02\x03", bytes(4))
    for short in (b"", cid[:1], cid[:3]):
        assert server_id_of(config, short) is None
    assert server_id_of(config, cid[:4]) == b"\x01\x02\x03"  # the nonce is not read
    for rotation in (0, 2, 6):
        other = encode_cid(QuicLbConfig(rotation, 3, 4), b"\x01\x02\x03", bytes(4))
        assert server_id_of(config, other) is None
    unroutable = bytes([0b111 << 5 | 7]) + cid[1:]
    assert rotation_of(unroutable) == 0b111
    assert server_id_of(config, unroutable) is None
    with pytest.raises(ValueError, match="empty CID"):
        rotation_of(b"")


def test_server_id_integers_round_trip() -> None:
    assert server_id_bytes(0x0A0B, 2) == b"\x0a\x0b"
    assert server_id_bytes(1, 8) == bytes(7) + b"\x01"
    assert server_id_bytes(255, 1) == b"\xff"
    assert server_id_bytes(0xFFFF, 3) == b"\x00\xff\xff"
    for length in range(1, 9):
        for value in (1, 0xFF, 0x100, 0xFFFF):
            if value < 256 ** length:
                assert server_id_value(server_id_bytes(value, length)) == value


@pytest.mark.parametrize(("value", "length", "message"), [
    (0, 2, "server ID must be"),
    (256, 1, "server ID must be"),
    (0x10000, 3, "server ID must be"),  # fits in 3 octets, past the LB's 1..65535
    (-1, 2, "server ID must be"),
    (1, 0, "server ID length must be"),
    (1, 9, "server ID length must be"),
])
def test_server_id_bytes_refuses(value: int, length: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server_id_bytes(value, length)


@pytest.mark.parametrize(("sid", "message"), [
    (b"\x00\x00", "server ID must be"),
    (b"\x01\x00\x00", "server ID must be"),
    (b"", "server ID length must be"),
    (bytes(8) + b"\x01", "server ID length must be"),
])
def test_server_id_value_refuses(sid: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        server_id_value(sid)


# --- aioquic ---------------------------------------------------------------

LB = QuicLbConfig(rotation=1, server_id_len=2, nonce_len=6)
SERVER_ID = server_id_bytes(0x0A0B, 2)


def server_configuration(tmp_path: Path, cid_len: int = LB.cid_len) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=ALPN,
                               connection_id_length=cid_len)
    config.load_cert_chain(*self_signed(tmp_path))
    return config


class EchoProtocol(QuicConnectionProtocol):
    """Sends every stream's data back on the same stream (no task to clean up)."""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, event.end_stream)
            self.transmit()


@asynccontextmanager
async def loopback_client(port: int, cafile: Path) -> AsyncIterator[QuicConnectionProtocol]:
    """aioquic's client, bound to 127.0.0.1 (aioquic.asyncio.connect binds to ::)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name="localhost")
    config.load_verify_locations(cafile=str(cafile))
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(QuicConnection(configuration=config)),
        local_addr=("127.0.0.1", 0))
    try:
        protocol.connect(("127.0.0.1", port))
        await protocol.wait_connected()
        yield protocol
    finally:
        protocol.close()
        await protocol.wait_closed()
        transport.close()


def peer_cids(connection: QuicConnection) -> list[QuicConnectionId]:
    """Every CID of the server the client holds (aioquic/quic/connection.py, 1.7.2):
    the one in use, the spares from NEW_CONNECTION_ID, those reserved for paths."""
    reserved = [p.peer_cid for p in connection._network_paths if p.peer_cid is not None]
    return [connection._peer_cid, *connection._peer_cid_available, *reserved]


async def echo_and_collect(tmp_path: Path) -> tuple[bytes, list[QuicConnectionId],
                                                     list[QuicConnection]]:
    """Runs a QUIC-LB server and a client on loopback: the echo, the client's view of the
    server's CIDs once it has every one the server issued, and the server's connections."""
    server_connections: list[QuicConnection] = []

    def create_protocol(connection: QuicConnection, **kwargs: object) -> EchoProtocol:
        server_connections.append(connection)
        return EchoProtocol(connection, **kwargs)  # type: ignore[arg-type]

    server: QuicServer = await serve("127.0.0.1", 0, configuration=server_configuration(tmp_path),
                                     quic_lb=LB, server_id=SERVER_ID,
                                     create_protocol=create_protocol)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        async with loopback_client(port, tmp_path / "cert.pem") as client:
            reader, writer = await client.create_stream()
            writer.write(b"ping over a routable CID")
            writer.write_eof()
            echoed = await reader.read()
            await client.ping()
            [server_connection] = server_connections
            issued = {c.sequence_number for c in server_connection._host_cids}
            # NEW_CONNECTION_ID frames may trail the echo: wait for all of them.
            while {c.sequence_number for c in peer_cids(client._quic)} != issued:
                await asyncio.sleep(0.01)
            return echoed, peer_cids(client._quic), server_connections
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_an_aioquic_server_issues_only_routable_cids(tmp_path: Path) -> None:
    echoed, cids, server_connections = asyncio.run(
        asyncio.wait_for(echo_and_collect(tmp_path), timeout=20))
    assert echoed == b"ping over a routable CID"
    assert [type(c) for c in server_connections] == [QuicLbConnection]
    # the initial CID (sequence 0) and the NEW_CONNECTION_ID ones (1..7: aioquic's limit)
    assert sorted(c.sequence_number for c in cids) == list(range(8))
    first_octet = 0b001 << 5 | (LB.cid_len - 1)
    assert len({c.cid for c in cids}) == len(cids)
    for cid in cids:
        assert len(cid.cid) == LB.cid_len == 9, cid
        assert cid.cid[:3] == bytes([first_octet]) + b"\x0a\x0b", cid
        assert server_id_of(LB, cid.cid) == SERVER_ID
        assert server_id_value(server_id_of(LB, cid.cid)) == 0x0A0B


def test_the_quic_cid_length_must_be_the_quic_lb_one(tmp_path: Path) -> None:
    configuration = server_configuration(tmp_path, cid_len=8)
    with pytest.raises(ValueError, match="connection_id_length is 8, the QUIC-LB CID length is 9"):
        QuicLbConnection(quic_lb=LB, server_id=SERVER_ID, configuration=configuration,
                         original_destination_connection_id=bytes(8))

    async def start() -> None:
        await serve("127.0.0.1", 0, configuration=configuration, quic_lb=LB,
                    server_id=SERVER_ID)

    with pytest.raises(ValueError, match="connection_id_length is 8"):
        asyncio.run(start())  # refused before any socket is bound


def test_a_connection_is_adopted_only_before_it_is_used(tmp_path: Path) -> None:
    configuration = server_configuration(tmp_path)
    with pytest.raises(ValueError, match="server ID is 3 octets"):
        QuicLbConnection(quic_lb=LB, server_id=b"\x00\x0a\x0b", configuration=configuration,
                         original_destination_connection_id=bytes(8))
    fresh = QuicConnection(configuration=configuration, original_destination_connection_id=b"x")
    adopted = QuicLbConnection.adopt(fresh, LB, SERVER_ID)
    assert adopted is fresh and isinstance(fresh, QuicLbConnection)
    assert server_id_of(LB, fresh.host_cid) == SERVER_ID
    assert fresh._host_cids[0].cid == fresh._local_initial_source_connection_id \
        == fresh.host_cid
    client = QuicConnection(configuration=QuicConfiguration(is_client=True,
                                                            connection_id_length=LB.cid_len))
    client.connect(("127.0.0.1", 4433), now=0.0)
    with pytest.raises(RuntimeError, match="before the connection is used"):
        QuicLbConnection.adopt(client, LB, SERVER_ID)
