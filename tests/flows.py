"""Scapy flows from the lab's client, counted per flow at each backend.

The sender writes raw frames on the client's eth0 in rounds (one packet per
flow per round), bounded in rounds and time. The counters are packet
sockets on each backend's eth0: they see what the decapsulator hands the
kernel, so a frame counts where the balancer really sent it.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from xdplb_lab.lab import LbLab

ETH_P_ALL = 0x0003


@dataclass
class FlowTraffic:
    """Established-looking TCP flows (ACK with payload) from the client to a VIP."""

    topo: LbLab
    vip: str
    port: int
    sports: list[int]
    sent: Counter = field(default_factory=Counter)

    def frames(self) -> dict[int, bytes]:
        eth = Ether(src=self.topo.client_if.mac, dst=self.topo.router_client_if.mac)
        return {sport: bytes(eth / IP(src=self.topo.client_if.ipv4, dst=self.vip, ttl=64)
                             / TCP(sport=sport, dport=self.port, flags="A", seq=1000, ack=1)
                             / b"xdplb-flow")
                for sport in self.sports}

    def send_rounds(self, rounds: int, interval_s: float,
                    stop: threading.Event | None = None) -> None:
        """Sends up to `rounds` rounds, one every interval_s, until `stop` is set."""
        frames = self.frames()
        with self.topo.client.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((self.topo.client_if.name, 0))
            next_round = time.monotonic()
            for _ in range(rounds):
                if stop is not None and stop.is_set():
                    return
                for sport, frame in frames.items():
                    sock.send(frame)
                    self.sent[sport] += 1
                next_round += interval_s
                time.sleep(max(0.0, next_round - time.monotonic()))


class BackendCounters:
    """Counts, per backend, the flow packets (by client source port) it received."""

    def __init__(self, topo: LbLab, vip: str, port: int):
        self.topo, self.vip, self.port = topo, vip, port
        self._vip = socket.inet_aton(vip)
        self._client = socket.inet_aton(topo.client_if.ipv4)
        self.counts: list[Counter] = [Counter() for _ in topo.backends]
        self._socks = []
        for host in topo.backends:
            sock = host.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.bind(("eth0", 0))
            sock.setblocking(False)
            self._socks.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _match(self, frame: bytes) -> int | None:
        """The client source port of one of our flow packets (IPv4 TCP to the VIP's
        port from the client), read straight from the bytes: the counter must keep up
        with the sender on a busy machine."""
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return None
        ihl = (frame[14] & 0x0F) * 4
        if frame[30:34] != self._vip or frame[26:30] != self._client or len(frame) < 14 + ihl + 4:
            return None
        tcp = 14 + ihl
        if int.from_bytes(frame[tcp + 2:tcp + 4], "big") != self.port:
            return None
        return int.from_bytes(frame[tcp:tcp + 2], "big")

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.1)
            for sock in ready:
                while True:
                    try:
                        frame, meta = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if meta[2] == socket.PACKET_OUTGOING:
                        continue
                    sport = self._match(frame)
                    if sport is not None:
                        self.counts[self._socks.index(sock)][sport] += 1

    def settle(self, expected_total: int, timeout: float = 60.0, idle_s: float = 3.0) -> None:
        """Waits until `expected_total` packets were counted, or the count made no
        progress for idle_s (the rest is lost), at most `timeout`."""
        deadline = time.monotonic() + timeout
        last, progress = self.total(), time.monotonic()
        while self.total() < expected_total and time.monotonic() < deadline:
            time.sleep(0.05)
            if self.total() != last:
                last, progress = self.total(), time.monotonic()
            elif time.monotonic() - progress > idle_s:
                break
        time.sleep(0.2)  # anything beyond the expected total would show up now

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts)

    def backends_of(self, sport: int) -> list[int]:
        return [i for i, c in enumerate(self.counts) if c[sport]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._socks:
            sock.close()
