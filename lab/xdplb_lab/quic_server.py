"""A lab backend's QUIC server: answers every stream with its name (and, over
HTTP/3, every request with 200 and its name, for h3 checks), and issues
QUIC-LB connection IDs with its server ID (xdplb.quiclb_aioquic), so a QUIC VIP
routes a connection's packets to it whatever the client's address.

Run inside a backend namespace, bound to the VIP (on lo): a UDP reply leaves
from the address it is sent from, and the client expects the VIP. Touches
--ready once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived

from xdplb.quiclb import QuicLbConfig, server_id_bytes
from xdplb.quiclb_aioquic import serve

ALPN = ["xdplb-lab", *H3_ALPN]


def name_protocol(name: str) -> type[QuicConnectionProtocol]:
    class NameProtocol(QuicConnectionProtocol):
        """Each stream the client ends is answered with the server's name; over
        HTTP/3, each request with 200 and the name."""

        _http: H3Connection | None = None

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, HandshakeCompleted) and event.alpn_protocol in H3_ALPN:
                self._http = H3Connection(self._quic)
            if self._http is not None:
                for h3_event in self._http.handle_event(event):
                    if isinstance(h3_event, HeadersReceived) and h3_event.stream_ended:
                        self._http.send_headers(h3_event.stream_id, [(b":status", b"200")])
                        self._http.send_data(h3_event.stream_id, name.encode(), end_stream=True)
                self.transmit()
            elif isinstance(event, StreamDataReceived) and event.end_stream:
                self._quic.send_stream_data(event.stream_id, name.encode(), end_stream=True)
                self.transmit()

    return NameProtocol


async def run(args: argparse.Namespace) -> None:
    quic_lb = QuicLbConfig(rotation=args.rotation, server_id_len=args.server_id_len,
                           nonce_len=args.nonce_len)
    configuration = QuicConfiguration(is_client=False, alpn_protocols=ALPN,
                                      connection_id_length=quic_lb.cid_len)
    configuration.load_cert_chain(args.cert, args.key)
    servers = [await serve(address, args.port, configuration=configuration, quic_lb=quic_lb,
                           server_id=server_id_bytes(args.server_id, args.server_id_len),
                           create_protocol=name_protocol(args.name))
               for address in args.bind]
    Path(args.ready).touch()
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", action="append", required=True, help="an address (the VIP)")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--server-id", type=int, required=True)
    parser.add_argument("--server-id-len", type=int, default=2)
    parser.add_argument("--rotation", type=int, default=0)
    parser.add_argument("--nonce-len", type=int, default=6)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ready", required=True)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
