"""The h3 check: one HTTP/3 GET over a new QUIC connection (aioquic), judged as an
http check is (status among expect_status, body containing `body`).

Each check makes a QUIC handshake (TLS 1.3, certificates not verified: a
backend is probed by address, as https checks are) and closes the connection
once the response is in. A server that does not answer is a timeout (UDP has
no refusal a client can rely on).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent

READ_LIMIT = 64 * 1024  # as much of the body as an http check reads


class _H3Get(QuicConnectionProtocol):
    """One GET on one connection; `answer` resolves to (status, body) or an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self.answer: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._status = 0
        self._body = b""

    def get(self, authority: str, path: str) -> None:
        stream_id = self._quic.get_next_available_stream_id()
        self._http.send_headers(stream_id, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()),
            (b":path", path.encode()), (b"user-agent", b"xdplb-health")], end_stream=True)
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.answer.done():
            why = event.reason_phrase or event.error_code
            self.answer.set_exception(ConnectionError(f"closed by the server: {why}"))
        for h3_event in self._http.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            status = dict(event.headers).get(b":status", b"")
            self._status = int(status) if status.isdigit() else 0
        elif isinstance(event, DataReceived):
            self._body = (self._body + event.data)[:READ_LIMIT]
        else:
            return
        if event.stream_ended and not self.answer.done():
            self.answer.set_result((self._status, self._body))


def _sni(host: str) -> str | None:
    """The TLS server name of a Host value: its name; none for an address."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip("[]")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name or None
    return None


def _socket(family: int, fwmark: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def get(address: str, port: int, path: str, host: str,
              fwmark: int = 0) -> tuple[int, bytes]:
    """(status, body) of `GET path` on a new QUIC connection to address:port."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                      verify_mode=ssl.CERT_NONE, server_name=_sni(host))
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _H3Get(QuicConnection(configuration=configuration)),
        sock=_socket(family, fwmark))
    try:
        protocol.connect((address, port))
        await protocol.wait_connected()
        protocol.get(host, path)
        return await protocol.answer
    finally:
        protocol.close()
        transport.close()
