"""TCP checks without a task each: non-blocking connects watched by one epoll."""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import math
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from xdplb.health.probes import _LINGER_RST, Probe, Result
from xdplb.health.verdicts import Verdict

log = logging.getLogger("xdplb.health")

def _errno_reason(err: int) -> str:
    return {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
            errno.ETIMEDOUT: "timeout"}.get(err) or os.strerror(err).lower()


_SOCK_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_ERR_OR_HUP = select.EPOLLERR | select.EPOLLHUP
_ONE_WRITABLE = select.EPOLLOUT | select.EPOLLONESHOT
MAX_IDLE_SOCKETS = 256  # per (family, fwmark): connected-and-reset sockets kept for reuse


_AF_UNSPEC_ADDRESS = struct.pack("H14x", socket.AF_UNSPEC)


def _libc_connect() -> Callable[[int, bytes, int], int] | None:
    """The C library's connect(fd, address, length), for connect(fd, AF_UNSPEC), which
    Python's socket.connect refuses on an AF_INET(6) socket; None where it cannot be had
    (then every check gets a new socket)."""
    try:
        import ctypes

        connect = ctypes.CDLL(None, use_errno=True).connect
    except (ImportError, OSError, AttributeError):
        return None
    connect.restype = ctypes.c_int  # arguments: int, bytes and int convert as they are
    return connect


class _TcpProber:
    """Non-blocking connects watched by one epoll (itself watched by the event loop):
    a TCP check costs a few dict operations, no task, future or timer.

    A socket whose connect succeeded is dissolved with connect(AF_UNSPEC), which resets
    the connection as a close with SO_LINGER 0 would (RST, no TIME_WAIT, the local port
    released), and is kept for a later check: Linux lets a TCP socket connect again
    after that, keeping its options (SO_LINGER, SO_MARK) and its place in the epoll
    (armed one-shot, re-armed per connect). So a check costs three system calls
    (connect, epoll_ctl, the resetting connect) instead of five (socket, setsockopt,
    connect, epoll_ctl, close) and no socket allocated or freed; every check is still a
    new connection (new port, full handshake) judged the same way. A socket whose
    check failed or timed out is closed; sockets are the C type (_socket.socket), so
    nothing of socket.socket's Python layer runs per check. Results go to
    `done(verdict, result, started)`; `expire` times out the overdue."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 done: Callable[[Verdict, Result, float], None]):
        self._loop, self._done = loop, done
        self._epoll = select.epoll()
        self._pending: dict[int, tuple[_socket.socket, Verdict, float]] = {}
        # One queue per timeout value: deadlines in each come in order.
        self._deadlines: dict[float, deque[tuple[float, int, tuple]]] = {}
        self._idle: dict[tuple[int, int], list[_socket.socket]] = {}
        self._connect = _libc_connect()
        loop.add_reader(self._epoll.fileno(), self._ready)

    def _new_socket(self, probe: Probe) -> _socket.socket:
        sock = _socket.socket(probe.family, _SOCK_NONBLOCKING_STREAM)
        try:
            if probe.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, probe.fwmark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self, verdict: Verdict, now: float) -> bool:
        """Starts a check; False when no socket could be had (retry later)."""
        probe = verdict.probe
        idle = self._idle.get(probe.socket_kind)
        sock = idle.pop() if idle else None
        if sock is not None:
            try:
                if sock.connect_ex(probe.sockaddr) != errno.EINPROGRESS:
                    raise OSError
                self._epoll.modify(sock.fileno(), _ONE_WRITABLE)
            except OSError:
                sock.close()  # judged on a new socket below, exactly as without reuse
                sock = None
        if sock is None:
            try:
                sock = self._new_socket(probe)
            except OSError as exc:  # EMFILE and the like: a fault of ours, not the backend's
                log.warning("%s: no socket for a check: %s", probe.describe(), exc)
                return False
            try:
                err = sock.connect_ex(probe.sockaddr)
            except OSError as exc:  # an address the kernel refuses outright
                err = exc.errno or errno.EINVAL
            if err != errno.EINPROGRESS:
                sock.close()
                self._done(verdict, Result(err == 0, "ok" if err == 0 else _errno_reason(err),
                                           time.monotonic() - now), now)
                return True
            self._epoll.register(sock.fileno(), _ONE_WRITABLE)
        fd = sock.fileno()
        entry = self._pending[fd] = (sock, verdict, now)
        timeout = probe.timeout_ms / 1000
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = deque()
        queue.append((now + timeout, fd, entry))
        return True

    def _ready(self) -> None:
        events = self._epoll.poll(0)
        now = time.monotonic()
        pending, done, connect = self._pending, self._done, self._connect
        for fd, event in events:
            entry = pending.pop(fd, None)
            if entry is None:
                continue
            sock, verdict, started = entry
            # SO_ERROR only when the connect failed: a success is EPOLLOUT alone.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if event & _ERR_OR_HUP else 0
            if err:
                sock.close()
                done(verdict, Result(False, _errno_reason(err), now - started), started)
                continue
            kind = verdict.probe.socket_kind
            idle = self._idle.get(kind)
            if idle is None:
                idle = self._idle[kind] = []
            if (connect is not None and len(idle) < MAX_IDLE_SOCKETS
                    and connect(fd, _AF_UNSPEC_ADDRESS, 16) == 0):
                idle.append(sock)  # reset; its next connect is a new connection
            else:
                sock.close()  # with SO_LINGER 0: a reset; closing also leaves the epoll
            done(verdict, Result(True, "ok", now - started), started)

    def expire(self, now: float) -> None:
        pending = self._pending
        for queue in self._deadlines.values():
            while queue and queue[0][0] <= now:
                _, fd, entry = queue.popleft()
                if pending.get(fd) is not entry:
                    continue  # answered already (its socket may serve another check now)
                del pending[fd]
                entry[0].close()
                self._done(entry[1], Result(False, "timeout", now - entry[2]), entry[2])

    def next_deadline(self) -> float:
        return min((q[0][0] for q in self._deadlines.values() if q), default=math.inf)

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        for sock, _, _ in self._pending.values():
            sock.close()
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
        self._pending.clear()
        self._deadlines.clear()
        self._idle.clear()
        self._epoll.close()
