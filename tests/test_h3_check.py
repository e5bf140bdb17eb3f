"""The h3 check kind: run_probe against a real aioquic HTTP/3 server on loopback
(answers by path: 200 with a body, 503, or never), judged as http checks are;
and the check's settings as the state takes or refuses them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from tests.certs import self_signed
from xdplb.health import GrpcChannels, Probe, run_probe
from xdplb.state import BackendSpec, HealthCheck, StateError, VipKey, default_vip


class Paths(QuicConnectionProtocol):
    """/ok: 200 "ready"; /fail: 503; /never: no answer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self._http.handle_event(event):
            if not isinstance(h3_event, HeadersReceived):
                continue
            path = dict(h3_event.headers)[b":path"]
            SEEN.append((path, dict(h3_event.headers)[b":authority"]))
            if path == b"/never":
                continue
            status = b"200" if path == b"/ok" else b"503"
            self._http.send_headers(h3_event.stream_id, [(b":status", status)])
            self._http.send_data(h3_event.stream_id, b"ready", end_stream=True)
        self.transmit()


SEEN: list[tuple[bytes, bytes]] = []


def probe(port: int, path: str, **check) -> Probe:
    return Probe.of(HealthCheck(kind="h3", path=path, timeout_ms=400, interval_ms=1000,
                                **check), "127.0.0.1", port)


async def results(tmp_path: Path, probes: list[tuple[str, dict]]) -> list[tuple[bool, str]]:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    configuration.load_cert_chain(*self_signed(tmp_path))
    server = await serve("127.0.0.1", 0, configuration=configuration, create_protocol=Paths)
    port = server._transport.get_extra_info("sockname")[1]
    channels = GrpcChannels()
    try:
        found = []
        for path, check in probes:
            result = await run_probe(probe(port, path, **check), channels)
            found.append((result.ok, result.reason))
        return found
    finally:
        server.close()
        await channels.close()


@pytest.mark.timeout(60)
def test_an_h3_check_judges_status_body_and_silence(tmp_path: Path) -> None:
    SEEN.clear()
    found = asyncio.run(results(tmp_path, [
        ("/ok", {}),
        ("/ok", {"body": "ready"}),
        ("/ok", {"body": "steady"}),
        ("/fail", {}),
        ("/fail", {"expect_status": (503,)}),
        ("/ok", {"host": "inference.example:443"}),
        ("/never", {}),
    ]))
    assert found == [(True, "ok"), (True, "ok"), (False, "body lacks 'steady'"),
                     (False, "status 503"), (True, "ok"), (True, "ok"), (False, "timeout")]
    # The authority is the Host setting, else the address.
    assert SEEN[0] == (b"/ok", b"127.0.0.1") and SEEN[5] == (b"/ok", b"inference.example:443")


@pytest.mark.timeout(30)
def test_an_h3_check_of_a_port_without_a_server_is_a_timeout() -> None:
    async def lone() -> tuple[bool, str]:
        channels = GrpcChannels()
        try:
            result = await run_probe(probe(9, "/"), channels)  # discard: nothing answers
            return result.ok, result.reason
        finally:
            await channels.close()

    assert asyncio.run(lone()) == (False, "timeout")


def test_h3_checks_go_to_the_backend_not_through_the_vip() -> None:
    key = VipKey("10.200.0.10", 443, "udp")
    vip = default_vip(key, ring_size=1009, check=HealthCheck(kind="h3", path="/healthz"),
                      backends={"10.1.0.1": BackendSpec("10.1.0.1")})
    vip.validate("VIP")
    with pytest.raises(StateError, match="an h3 check speaks QUIC over UDP"):
        HealthCheck(kind="h3", via="vip").validate("check")
