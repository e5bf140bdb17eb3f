"""Half-open TCP checks (kind tcp-syn): no socket per check, no handshake in this
host's TCP stack.

Each batch of due checks is armed in the balancer's syn_probes map with one
syscall (the backend, its port, a fresh random 32-bit cookie per check), then
one bare SYN per check (sequence number = cookie, source port SYN_PORT_BASE +
slot % SYN_PORTS) leaves through a send-only raw socket (IPPROTO_RAW: it
receives nothing, so the stack keeps no state and sees no reply). The
balancer catches the reply on the LB's interfaces (bpf/syn_probe.h): a
SYN-ACK acknowledging the cookie is recorded as open and answered with a RST
by XDP_TX, a RST as refused; neither reaches the stack, which therefore never
answers them. Outcomes are read from the map in one batched read every
POLL_S while checks are out; a check without one by its timeout has timed out.
"""

from __future__ import annotations

import asyncio
import ctypes as ct
import errno
import ipaddress
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from xdplb import structs
from xdplb.health.probes import Probe, Result
from xdplb.health.verdicts import Verdict

POLL_S = 0.005  # outcomes are read this often while checks are out
SOURCE_TTL_S = 30.0  # a backend's source address (the route's) is looked up again after this
SYN_WINDOW = 64240
_PROBE_SIZE = ct.sizeof(structs.SynProbe)
_ENTRY = structs.SYN_PROBE_PACKING
_PORT_BASE, _PORTS = structs.SYN_PORT_BASE, structs.SYN_PORTS
_COOKIE_AT = structs.SynProbe.cookie.offset
_OUTCOME_AT = structs.SynProbe.outcome.offset
_REASONS = {structs.SYN_OPEN: "ok", structs.SYN_REFUSED: "refused"}


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


class SynPacket:
    """One backend's SYN with source port and sequence number 0, and the sum its
    checksum starts from: a check writes its port and cookie and the checksum that
    goes with them."""

    def __init__(self, source: str, target: str, dport: int, mark: int = 0,
                 backend: int = 0):
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(target)
        tcp = struct.pack("!HHIIBBHHH", 0, dport, 0, 0, 5 << 4, 0x02, SYN_WINDOW, 0, 0)
        if dst.version == 4:
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP,
                             0, src.packed, dst.packed)  # the kernel fills in the checksum
            pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, 20)
        else:
            ip = struct.pack("!IHBB16s16s", 6 << 28, 20, socket.IPPROTO_TCP, 64, src.packed,
                             dst.packed)
            pseudo = src.packed + dst.packed + struct.pack("!IxxxB", 20, socket.IPPROTO_TCP)
        self.source = source
        self.expires = 0.0  # when the source address is looked up again
        self.frame = bytes(ip + tcp)
        self.tcp_at = len(ip)
        self.base = _sum16(pseudo) + _sum16(tcp)
        self.destination = (target, 0)
        # What the balancer's syn_probes entry holds of it, but the cookie and outcome.
        self.entry_head = structs.Addr16.of(target).w[:]
        self.port_be = structs.port_be(dport)
        self.ipv6 = dst.version == 6
        # A check through the VIP: the socket mark that has tc tunnel the SYN to the
        # backend, and the backend entry the balancer tunnels the RST to.
        self.mark = struct.pack("=I", mark) if mark else b""
        self.backend = backend

    def with_port_and_cookie(self, sport: int, cookie: int) -> bytearray:
        total = _fold(self.base + sport + (cookie >> 16) + (cookie & 0xFFFF))
        frame = bytearray(self.frame)
        struct.pack_into("!HHI", frame, self.tcp_at, sport, frame[self.tcp_at + 2] << 8
                         | frame[self.tcp_at + 3], cookie)
        struct.pack_into("!H", frame, self.tcp_at + 16, ~total & 0xFFFF)
        return frame


class _Pending:
    __slots__ = ("cookie", "deadline", "slot", "started", "verdict")

    def __init__(self, verdict: Verdict, slot: int, cookie: int, started: float,
                 deadline: float):
        self.verdict, self.slot, self.cookie = verdict, slot, cookie
        self.started, self.deadline = started, deadline


class SynProber:
    """The same face as the TCP engine (start, expire, next_deadline, close), plus
    flush: the checks started in one scheduler tick leave together.

    Slots are taken in turn around the table (a check's slot is free again once it
    is answered or has timed out), so the checks out occupy one window of it, the
    newest just before `_next`: a read of outcomes covers that window alone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: object,
                 done: Callable[[Verdict, Result, float], None]):
        self._loop, self._table, self._done = loop, table, done
        self._ring: int = table.slots
        self._sockets: dict[int, socket.socket] = {}
        self._sources: dict[str, tuple[str, float]] = {}
        self._packets: dict[Probe, SynPacket] = {}
        self._next = 0
        self._batch: list[tuple[Verdict, float, int]] = []
        self._pending: dict[int, _Pending] = {}  # by slot
        # One queue per timeout value: deadlines in each come in order.
        self._deadlines: dict[float, deque[_Pending]] = {}
        self._poll: asyncio.TimerHandle | None = None

    def release(self, probe: Probe) -> None:
        """The probe is gone (a check of it still out finishes unheeded)."""
        self._packets.pop(probe, None)

    # -- sending --

    def start(self, verdict: Verdict, now: float) -> bool:
        """Queues a check for the next flush; False when every slot holds a check
        still out (the scheduler tries again shortly)."""
        slot = self._next
        if slot in self._pending:
            return False
        self._next = (slot + 1) % self._ring
        self._batch.append((verdict, now, slot))
        return True

    def flush(self) -> None:
        """Arms and sends the checks queued since the last flush."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        cookies = struct.unpack(f"={len(batch)}I", os.urandom(4 * len(batch)))
        ready: list[tuple[_Pending, SynPacket]] = []
        packets, now = self._packets, time.monotonic()
        for (verdict, started, slot), cookie in zip(batch, cookies, strict=True):
            packet = packets.get(verdict.probe)
            if packet is None or packet.expires <= now:
                try:
                    packet = self._packet_of(verdict.probe, now)
                except OSError as exc:  # no route to the backend, and the like
                    self._done(verdict, Result(False, _errno_reason(exc), 0.0), started)
                    continue
            entry = _Pending(verdict, slot, cookie, started,
                             started + verdict.probe.timeout_ms / 1000)
            ready.append((entry, packet))
        if not ready:
            return
        self._table.arm_raw([e.slot for e, _ in ready], b"".join(
            _ENTRY.pack(*p.entry_head, e.cookie, p.port_be, p.ipv6, structs.SYN_PENDING,
                        p.backend, 0)
            for e, p in ready))
        sockets = (self._socket(False), self._socket(True))
        for entry, packet in ready:
            frame = packet.with_port_and_cookie(
                _PORT_BASE + entry.slot % _PORTS, entry.cookie)
            try:
                if packet.mark:
                    sockets[packet.ipv6].sendmsg(
                        [frame], [(socket.SOL_SOCKET, socket.SO_MARK, packet.mark)], 0,
                        packet.destination)
                else:
                    sockets[packet.ipv6].sendto(frame, packet.destination)
            except OSError as exc:
                self._done(entry.verdict, Result(False, _errno_reason(exc),
                                                 time.monotonic() - entry.started),
                           entry.started)
                continue
            self._pending[entry.slot] = entry
            timeout = entry.deadline - entry.started
            queue = self._deadlines.get(timeout)
            if queue is None:
                queue = self._deadlines[timeout] = deque()
            queue.append(entry)
        self._arm_poll()

    def _packet_of(self, probe: Probe, now: float) -> SynPacket:
        """The probe's SYN template, made again when its source address may have
        changed (the route's, looked up every SOURCE_TTL_S)."""
        packet = self._packets.get(probe)
        source = self._source_of(probe, now)
        if packet is None or packet.source != source:
            packet = self._packets[probe] = SynPacket(
                source, probe.address, probe.port, probe.fwmark,
                self._table.backend_of_mark(probe.fwmark))
        packet.expires = self._sources[probe.address][1]
        return packet

    def _source_of(self, probe: Probe, now: float) -> str:
        """The address this host sends from to the backend (its route's), cached."""
        known = self._sources.get(probe.address)
        if known is not None and known[1] > now:
            return known[0]
        with socket.socket(probe.family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe.address, probe.port or 9))
            source = udp.getsockname()[0]
        self._sources[probe.address] = (source, now + SOURCE_TTL_S)
        return source

    def _socket(self, ipv6: bool) -> socket.socket:
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        sock = self._sockets.get(family)
        if sock is None:
            # IPPROTO_RAW: send-only, the IP header is ours (IPv4: the kernel fills in
            # its checksum); nothing is ever delivered to it.
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._sockets[family] = sock
        return sock

    # -- outcomes --

    def _arm_poll(self) -> None:
        if self._poll is None and self._pending:
            self._poll = self._loop.call_later(POLL_S, self._read)

    def _read(self) -> None:
        self._poll = None
        self.collect(time.monotonic())
        self._arm_poll()

    def collect(self, now: float) -> None:
        """The outcomes the balancer recorded for the checks out: one read of the
        window of slots they occupy (two where it wraps around the table's end)."""
        if not self._pending:
            return
        ring, newest = self._ring, self._next
        span = max((newest - slot) % ring or ring for slot in self._pending)
        first = (newest - span) % ring
        raw = self._table.read_raw(first, min(span, ring - first))
        if first + span > ring:
            raw += self._table.read_raw(0, first + span - ring)
        finished = []
        for slot, entry in self._pending.items():
            at = ((slot - first) % ring) * _PROBE_SIZE
            outcome = raw[at + _OUTCOME_AT]
            if outcome and int.from_bytes(raw[at + _COOKIE_AT:at + _COOKIE_AT + 4],
                                          "little") == entry.cookie:
                finished.append((entry, outcome))
        for entry, outcome in finished:
            del self._pending[entry.slot]
            self._done(entry.verdict, Result(outcome == structs.SYN_OPEN, _REASONS[outcome],
                                             now - entry.started), entry.started)

    def expire(self, now: float) -> None:
        if self.next_deadline() > now:
            return
        self.collect(now)  # an answer the last read missed is not a timeout
        for queue in self._deadlines.values():
            while queue and queue[0].deadline <= now:
                entry = queue.popleft()
                if self._pending.get(entry.slot) is not entry:
                    continue  # answered already
                del self._pending[entry.slot]
                self._done(entry.verdict, Result(False, "timeout", now - entry.started),
                           entry.started)

    def next_deadline(self) -> float:
        earliest = math.inf
        for queue in self._deadlines.values():
            while queue and self._pending.get(queue[0].slot) is not queue[0]:
                queue.popleft()  # answered
            if queue and queue[0].deadline < earliest:
                earliest = queue[0].deadline
        return earliest

    def __len__(self) -> int:
        return len(self._pending) + len(self._batch)

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._pending.clear()
        self._deadlines.clear()
        self._batch.clear()


def _errno_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "unreachable"
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)
