"""An aioquic server whose connection IDs carry a QUIC-LB server ID
(xdplb.quiclb), so xdplb can route its QUIC packets even after the client's
address changes (aioquic is a dependency of the package).

aioquic has no option for custom CIDs, so QuicLbConnection, a QuicConnection
subclass, swaps them in at the two places aioquic draws them from os.urandom
(aioquic/quic/connection.py, 1.7.2):

* the initial CID, made in QuicConnection.__init__ (about line 306) and kept
  three times: ``_host_cids[0].cid``, ``host_cid`` (what packets are sent
  from) and ``_local_initial_source_connection_id`` (a transport parameter
  the client checks against the CID it saw);
* the CIDs handed out in NEW_CONNECTION_ID frames, which
  ``_replenish_connection_ids`` (about line 3114) appends to ``_host_cids``
  before they are written: each is replaced while still unsent.

QuicConfiguration.connection_id_length must be the QUIC-LB CID length, since
aioquic parses short headers with it. Two CIDs stay unroutable by design, and
take the load balancer's 5-tuple path: the client's first Initial DCID (the
client picks it) and a Retry's source CID.

aioquic's asyncio server builds a plain QuicConnection itself
(aioquic/asyncio/server.py, QuicServer.datagram_received, about line 187), hands
it to ``create_protocol`` and only then files the connection under
``connection.host_cid``. serve() below uses that hook to turn the new, still
unused connection into a QuicLbConnection in place: a new object would leave the
server's CID map pointing at aioquic's random CID.
"""

from __future__ import annotations

from typing import Any, cast

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio import serve as aioquic_serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from xdplb.quiclb import QuicLbConfig, new_cid


def check_configuration(configuration: QuicConfiguration, quic_lb: QuicLbConfig,
                        server_id: bytes) -> None:
    """Refuse a QUIC configuration or server ID that cannot carry `quic_lb`'s CIDs."""
    if configuration.connection_id_length != quic_lb.cid_len:
        raise ValueError(
            f"QuicConfiguration.connection_id_length is {configuration.connection_id_length},"
            f" the QUIC-LB CID length is {quic_lb.cid_len} (1 + server_id_len + nonce_len)")
    if len(server_id) != quic_lb.server_id_len:
        raise ValueError(f"server ID is {len(server_id)} octets, "
                         f"the QUIC-LB server_id_len is {quic_lb.server_id_len}")


class QuicLbConnection(QuicConnection):
    """A QuicConnection whose every issued CID routes to `server_id` under `quic_lb`."""

    def __init__(self, *, quic_lb: QuicLbConfig, server_id: bytes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._use_quic_lb(quic_lb, server_id)

    @classmethod
    def adopt(cls, connection: QuicConnection, quic_lb: QuicLbConfig,
              server_id: bytes) -> QuicLbConnection:
        """Turn a connection that aioquic built, before it sends or receives, into one."""
        connection.__class__ = cls
        adopted = cast(QuicLbConnection, connection)
        adopted._use_quic_lb(quic_lb, server_id)
        return adopted

    def _use_quic_lb(self, quic_lb: QuicLbConfig, server_id: bytes) -> None:
        check_configuration(self._configuration, quic_lb, server_id)
        # Once a CID has been sent or a path exists, the peer may already know it.
        if self._host_cid_seq != 1 or self._network_paths:
            raise RuntimeError("QUIC-LB CIDs must be set before the connection is used")
        self._quic_lb = quic_lb
        self._quic_lb_server_id = bytes(server_id)
        cid = new_cid(quic_lb, self._quic_lb_server_id)
        self._host_cids[0].cid = cid
        self.host_cid = cid
        self._local_initial_source_connection_id = cid

    def _replenish_connection_ids(self) -> None:
        # aioquic decides how many CIDs to issue (the peer's limit); only their
        # bytes change, before NEW_CONNECTION_ID frames are written from the list.
        first_new = self._host_cid_seq
        super()._replenish_connection_ids()
        for host_cid in self._host_cids:
            if host_cid.sequence_number >= first_new:
                host_cid.cid = new_cid(self._quic_lb, self._quic_lb_server_id)


async def serve(host: str, port: int, *, configuration: QuicConfiguration,
                quic_lb: QuicLbConfig, server_id: bytes,
                create_protocol: Any = QuicConnectionProtocol,
                **kwargs: Any) -> QuicServer:
    """aioquic.asyncio.serve(), with every connection a QuicLbConnection.

    The other keyword arguments (stream_handler, retry, session tickets) are
    aioquic's. Close the server with its close() as usual."""
    check_configuration(configuration, quic_lb, server_id)  # at start, not per connection

    def create_lb_protocol(connection: QuicConnection, **protocol_kwargs: Any) -> Any:
        QuicLbConnection.adopt(connection, quic_lb, server_id)
        return create_protocol(connection, **protocol_kwargs)

    return await aioquic_serve(host, port, configuration=configuration,
                               create_protocol=create_lb_protocol, **kwargs)
