"""One bounded HTTP GET, for health checks and load scrapes alike.

An HTTP/1.x GET with "Connection: close", read until the answer says enough
(the headers, and the body as far as Content-Length when the body matters),
the server closes, or `limit` bytes came: a server that ignores the close or
streams forever costs one read of `limit` bytes, never a hang. The caller
bounds the time (asyncio.timeout) and judges the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Response:
    raw: bytes  # what was read, at most the limit

    @property
    def head(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[0]

    @property
    def complete_head(self) -> bool:
        return b"\r\n\r\n" in self.raw

    @property
    def body(self) -> bytes:
        return self.raw.partition(b"\r\n\r\n")[2]

    @property
    def status_line(self) -> str:
        return self.raw.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def status(self) -> int | None:
        """The status code, None when this is no HTTP response."""
        parts = self.status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return None
        return int(parts[1])

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == wanted:
                return value.strip().decode("latin-1")
        return None

    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None and value.isdigit() else None


def _enough(raw: bytes, want_body: bool) -> bool:
    response = Response(raw)
    if not response.complete_head:
        return False
    if not want_body:
        return True
    length = response.content_length()
    return length is not None and len(response.body) >= length


async def get(address: str, port: int, path: str, *, host: str, limit: int,
              want_body: bool = True, extra_headers: str = "", version: str = "1.1",
              sock: socket.socket | None = None, tls: ssl.SSLContext | None = None,
              server_hostname: str | None = None) -> Response:
    """GET `path` from address:port (or over `sock`, already connected), with Host
    `host`. Reads until enough (see the module), the close, or `limit` bytes."""
    if sock is not None:
        reader, writer = await asyncio.open_connection(sock=sock, ssl=tls,
                                                       server_hostname=server_hostname)
    else:
        reader, writer = await asyncio.open_connection(address, port, ssl=tls,
                                                       server_hostname=server_hostname)
    try:
        writer.write(f"GET {path} HTTP/{version}\r\nHost: {host}\r\nUser-Agent: xdplb-lbd\r\n"
                     f"{extra_headers}Connection: close\r\n\r\n".encode())
        await writer.drain()
        raw = b""
        while len(raw) < limit and not _enough(raw, want_body):
            chunk = await reader.read(min(65536, limit - len(raw)))
            if not chunk:
                break
            raw += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return Response(raw)
