"""Real QUIC through a QUIC VIP: aioquic HTTP/3 servers on the lab's backends
issue QUIC-LB connection IDs (lab/xdplb_lab/quic_server.py, answering every
request with their name), a real aioquic HTTP/3 client in the client namespace
talks to the VIP, and lbd configures it with lbctl.

One connection keeps answering from the same backend while the client rebinds
to a new UDP port, moves to a second address, and a backend joins (the ring
changes), and after all of these together. The same migration with QUIC off
breaks the connection where the ring sends its new 4-tuple elsewhere: QUIC
routing is what saves it. A backend that goes down sends its connections
through the 5-tuple path (counted), and the others keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent

from tests.certs import self_signed
from tests.lbd_helpers import lab_with_lbd
from xdplb import maglev
from xdplb import structs as s
from xdplb.datapath import MapSizes

SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=8 * 1009, conn_entries=4096)
PORT, RING = 443, 1009
ROTATION = 1
SERVER_NAME = "xdplb-lab"
ANSWER_S = 3.0  # a request through the lab takes milliseconds


def certificate(workdir: Path) -> tuple[Path, Path]:
    return self_signed(workdir, SERVER_NAME, ())


def start_quic_server(topo, index: int, workdir: Path, cert: Path, key: Path) -> None:
    """backend{index}'s QUIC server (server ID index + 1), once it listens."""
    from xdplb_lab import lab as labmod

    ready = workdir / f"ready{index}"
    ready.unlink(missing_ok=True)
    topo.backends[index].popen([
        sys.executable, "-m", "xdplb_lab.quic_server", "--name", f"backend{index}",
        "--bind", labmod.VIP_V4, "--bind", topo.backend_v4[index],  # the VIP; checks
        "--port", str(PORT), "--server-id", str(index + 1),
        "--rotation", str(ROTATION), "--cert", str(cert), "--key", str(key),
        "--ready", str(ready)])
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, f"backend{index}'s QUIC server did not start"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def quic_lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quic")
    with lab_with_lbd("xtquic", workdir / "lbd", SIZES, n_backends=3) as (topo, lbd):
        cert, key = certificate(workdir)
        for i in range(len(topo.backends)):
            start_quic_server(topo, i, workdir, cert, key)
        topo.client.run(["ip", "addr", "add", f"{MOVED}/24", "dev", "eth0"])
        topo.quic_restart = lambda i: start_quic_server(topo, i, workdir, cert, key)
        yield topo, lbd, cert


MOVED = "10.100.1.3"  # the client's second address, on its link to the router


def lbctl_ok(lbd, *args: str) -> str:
    result = lbd.lbctl(*args)
    assert result.returncode == 0, f"lbctl {' '.join(args)}: {result.stderr}"
    return result.stdout


class H3Client(QuicConnectionProtocol):
    """HTTP/3 GETs on one connection; each resolves to the response body."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._answers: dict[int, asyncio.Future[bytes]] = {}
        self._bodies: dict[int, bytes] = {}

    async def get(self, path: str) -> str:
        stream_id = self._quic.get_next_available_stream_id()
        answer = self._answers[stream_id] = self._loop.create_future()
        self._http.send_headers(stream_id, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", SERVER_NAME.encode()),
            (b":path", path.encode())], end_stream=True)
        self.transmit()
        return (await answer).decode()

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self._http.handle_event(event):
            if isinstance(h3_event, DataReceived | HeadersReceived):
                stream = h3_event.stream_id
                if isinstance(h3_event, DataReceived):
                    self._bodies[stream] = self._bodies.get(stream, b"") + h3_event.data
                answer = self._answers.get(stream)
                if h3_event.stream_ended and answer is not None and not answer.done():
                    answer.set_result(self._bodies.pop(stream, b""))


class Client:
    """A real HTTP/3 client (aioquic) in the client namespace that can change its
    address and port mid-connection."""

    def __init__(self, topo, cafile: Path, vip: str):
        self.topo, self.vip = topo, vip
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                   server_name=SERVER_NAME)
        config.load_verify_locations(cafile=str(cafile))
        self.protocol = H3Client(QuicConnection(configuration=config))
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("", 0)

    def _socket(self, address: str, port: int) -> socket.socket:
        # Dual-stack, bound to the v4-mapped address: aioquic keeps the peer as a
        # v4-mapped 4-tuple and sends with it.
        sock = self.topo.client.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((f"::ffff:{address}", port))
        self.local = (address, sock.getsockname()[1])
        return sock

    async def connect(self, address: str, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.protocol, sock=self._socket(address, port))
        self.protocol.connect((f"::ffff:{self.vip}", PORT, 0, 0))
        await asyncio.wait_for(self.protocol.wait_connected(), ANSWER_S)

    async def move(self, address: str, port: int = 0) -> None:
        """Migrate: a new socket (new port, maybe a new address), a new connection ID."""
        loop = asyncio.get_running_loop()
        old = self.transport
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.protocol, sock=self._socket(address, port))
        self.protocol.change_connection_id()
        if old is not None:
            old.close()

    async def ask(self) -> str:
        """GET / over HTTP/3: the backend answers with its name."""
        return await asyncio.wait_for(self.protocol.get("/"), ANSWER_S)

    async def close(self) -> None:
        self.protocol.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.protocol.wait_closed(), 2)
        if self.transport is not None:
            self.transport.close()


@contextlib.asynccontextmanager
async def client(topo, cafile: Path, address: str, port: int = 0) -> AsyncIterator[Client]:
    from xdplb_lab import lab as labmod

    peer = Client(topo, cafile, labmod.VIP_V4)
    try:
        await peer.connect(address, port)
        yield peer
    finally:
        await peer.close()


def ring_backend(topo, addresses: list[str], src: str, sport: int) -> str:
    """The backend name the VIP's ring gives a 4-tuple (lbd builds the same ring)."""
    from xdplb_lab import lab as labmod

    ring = maglev.build_ring(dict.fromkeys(addresses, 100), RING)
    h = s.flow_hash(src, labmod.VIP_V4, sport, PORT, s.IPPROTO_UDP)
    address = ring.order[ring.table[s.ring_slot(h, RING)]]
    return f"backend{topo.backend_v4.index(address)}"


def free_port_elsewhere(topo, addresses: list[str], src: str, avoid: str) -> int:
    """A client port whose 4-tuple the ring gives another backend than `avoid`."""
    for sport in range(52000, 53000):
        if ring_backend(topo, addresses, src, sport) != avoid:
            return sport
    raise AssertionError("every port maps to one backend")


@pytest.mark.netns
def test_a_connection_keeps_its_backend_through_rebinding_moving_and_a_ring_change(quic_lab):
    from xdplb_lab import lab as labmod

    topo, lbd, cafile = quic_lab
    vip = f"{labmod.VIP_V4}:{PORT}/udp"
    lbctl_ok(lbd, "vip", "add", vip, "--quic", "--quic-rotation", str(ROTATION),
             "--ring-size", str(RING), "--check", "none")
    try:
        for i in (0, 1):
            lbctl_ok(lbd, "backend", "add", vip, topo.backend_v4[i], "--server-id", str(i + 1))
        listing = lbctl_ok(lbd, "backend", "list", vip)
        assert listing.splitlines()[0].endswith("SERVER-ID")
        before = quic_counter(topo, "routed")

        async def scenario() -> list[str]:
            answers = []
            async with client(topo, cafile, labmod.CLIENT_V4) as peer:
                answers.append(await peer.ask())
                await peer.move(labmod.CLIENT_V4)  # (a) a new port
                answers.append(await peer.ask())
                await peer.move(MOVED)  # (b) a new address
                answers.append(await peer.ask())
                lbctl_ok(lbd, "backend", "add", vip, topo.backend_v4[2], "--server-id", "3")
                answers.append(await peer.ask())  # (c) the ring changed
                await peer.move(labmod.CLIENT_V4)  # (d) all of it at once
                answers.append(await peer.ask())
                await peer.move(MOVED, free_port_elsewhere(
                    topo, topo.backend_v4, MOVED, answers[0]))
                answers.append(await peer.ask())
            return answers

        answers = asyncio.run(scenario())
        assert len(set(answers)) == 1 and answers[0].startswith("backend"), answers
        assert quic_counter(topo, "routed") > before

        # A server ID changes only when forced; a TCP VIP cannot be a QUIC VIP.
        moved = lbd.lbctl("backend", "set", vip, topo.backend_v4[0], "--server-id", "9")
        assert moved.returncode == 1 and "--force-server-id" in moved.stderr, moved.stderr
        lbctl_ok(lbd, "backend", "set", vip, topo.backend_v4[0], "--server-id", "9",
                 "--force-server-id")
        listing = lbctl_ok(lbd, "backend", "list", vip).splitlines()
        assert [line.split()[-1] for line in listing[1:]] == ["9", "2", "3"]
        tcp = lbd.lbctl("vip", "add", f"{labmod.VIP_V4}:8443/tcp", "--quic")
        assert tcp.returncode == 2 and "QUIC runs over UDP" in tcp.stderr, tcp.stderr
    finally:
        lbctl_ok(lbd, "vip", "del", vip)


@pytest.mark.netns
def test_without_quic_routing_the_moved_connection_breaks_where_the_ring_moves_it(quic_lab):
    from xdplb_lab import lab as labmod

    topo, lbd, cafile = quic_lab
    vip = f"{labmod.VIP_V4}:{PORT}/udp"
    lbctl_ok(lbd, "vip", "add", vip, "--ring-size", str(RING), "--check", "none")
    try:
        addresses = topo.backend_v4[:2]
        for address in addresses:
            lbctl_ok(lbd, "backend", "add", vip, address)

        async def scenario() -> tuple[str, str, str]:
            async with client(topo, cafile, labmod.CLIENT_V4) as peer:
                first = await peer.ask()
                expected = ring_backend(topo, addresses, *peer.local)
                elsewhere = free_port_elsewhere(topo, addresses, labmod.CLIENT_V4, first)
                await peer.move(labmod.CLIENT_V4, elsewhere)
                try:
                    after = await peer.ask()
                except TimeoutError:
                    after = "no answer"
                return first, expected, after

        first, expected, after = asyncio.run(scenario())
        assert first == expected  # the 5-tuple path chose it
        assert after == "no answer"  # its new 4-tuple reached a server that does not know it
    finally:
        lbctl_ok(lbd, "vip", "del", vip)


def quic_counter(topo, outcome: str) -> int:
    metrics = topo.lb.run(["curl", "-sS", "--max-time", "5",
                           "http://127.0.0.1:9640/metrics"]).stdout
    found = re.search(rf'^xdplb_quic_packets_total{{outcome="{outcome}"}} (\S+)$', metrics,
                      re.M)
    assert found, outcome
    return int(float(found[1]))


def wait_health(lbd, vip: str, address: str, health: str, timeout: float = 10.0) -> None:
    """Until lbctl shows the backend's verdict as `health`, realised in the maps."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        listing = json.loads(lbctl_ok(lbd, "backend", "list", vip, "-o", "json"))
        status = next(b["status"] for b in listing["backends"] if b["address"] == address)
        if status["health"] == health and status["health_realised"]:
            return
        assert time.monotonic() < deadline, (address, status)
        time.sleep(0.1)


@pytest.mark.netns
def test_a_down_backend_fails_its_connections_over_by_the_5tuple_path(quic_lab):
    """Its connections' packets take the 5-tuple path (server_down), which sends them
    to a server that does not know them; the other backend's connection is untouched."""
    from xdplb_lab import lab as labmod

    topo, lbd, cafile = quic_lab
    vip = f"{labmod.VIP_V4}:{PORT}/udp"
    lbctl_ok(lbd, "vip", "add", vip, "--quic", "--quic-rotation", str(ROTATION),
             "--ring-size", str(RING), "--check", "tcp", "--check-port", "80",
             "--check-interval", "200", "--rise", "1", "--fall", "1")
    victim = None
    try:
        for i in (0, 1):
            lbctl_ok(lbd, "backend", "add", vip, topo.backend_v4[i], "--server-id", str(i + 1))
            wait_health(lbd, vip, topo.backend_v4[i], "up")

        async def scenario() -> tuple[str, str]:
            nonlocal victim
            async with contextlib.AsyncExitStack() as stack:
                peers: dict[str, Client] = {}
                for _ in range(40):  # new connections until each backend holds one
                    peer = await stack.enter_async_context(
                        client(topo, cafile, labmod.CLIENT_V4))
                    peers.setdefault(await peer.ask(), peer)
                    if len(peers) == 2:
                        break
                assert sorted(peers) == ["backend0", "backend1"], sorted(peers)
                victim = 0
                labmod.stop_backend_server(topo, victim)
                wait_health(lbd, vip, topo.backend_v4[victim], "down")
                survivor = await peers["backend1"].ask()
                try:
                    failed = await peers["backend0"].ask()
                except TimeoutError:
                    failed = "no answer"
                return survivor, failed

        down_before = quic_counter(topo, "server_down")
        survivor, failed = asyncio.run(scenario())
        assert survivor == "backend1"
        assert failed == "no answer"
        assert quic_counter(topo, "server_down") > down_before
    finally:
        if victim is not None:
            labmod.start_http_backends(topo, decap=False)  # the stopped one starts again
        lbctl_ok(lbd, "vip", "del", vip)


@pytest.mark.netns
def test_h3_checks_follow_a_real_http3_server(quic_lab):
    """An h3 check GETs the path over HTTP/3 from each backend's aioquic server: both
    up; one server stopped goes down by timeout while the other stays up; restarted,
    it comes back."""
    from xdplb_lab import lab as labmod

    topo, lbd, _ = quic_lab
    vip = f"{labmod.VIP_V4}:{PORT}/udp"
    lbctl_ok(lbd, "vip", "add", vip, "--quic", "--quic-rotation", str(ROTATION),
             "--ring-size", str(RING), "--check", "h3", "--check-path", "/healthz",
             "--check-interval", "300", "--check-timeout", "250", "--rise", "1", "--fall", "2")
    stopped = False
    try:
        for i in (0, 1):
            lbctl_ok(lbd, "backend", "add", vip, topo.backend_v4[i], "--server-id", str(i + 1))
            wait_health(lbd, vip, topo.backend_v4[i], "up")
        labmod.stop_backend_server(topo, 1, "xdplb_lab.quic_server")
        stopped = True
        wait_health(lbd, vip, topo.backend_v4[1], "down")
        import json

        listing = json.loads(lbctl_ok(lbd, "backend", "list", vip, "-o", "json"))
        status = {b["address"]: b["status"] for b in listing["backends"]}
        assert status[topo.backend_v4[0]]["health"] == "up"
        assert status[topo.backend_v4[1]]["last_result"] == "timeout"
        assert status[topo.backend_v4[0]]["check"] == f"h3 {topo.backend_v4[0]}:443/healthz"
        topo.quic_restart(1)
        stopped = False
        wait_health(lbd, vip, topo.backend_v4[1], "up")
    finally:
        if stopped:
            topo.quic_restart(1)
        lbctl_ok(lbd, "vip", "del", vip)
