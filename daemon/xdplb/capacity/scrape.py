"""Reading a backend's load: scraping a Prometheus page, parsing the metric (the I/O)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from xdplb import httpget
from xdplb.health import connect_reason
from xdplb.state import (
    Capacity,
)

SCRAPE_LIMIT = 8 * 1024 * 1024  # bytes of one metrics page


class MalformedLoad(ValueError):
    """A metrics page without a usable value of the metric."""


class ScrapeError(OSError):
    """A metrics page could not be fetched; the message is the reason."""


def selector(metric: str, matchers: Mapping[str, str]) -> str:
    if not matchers:
        return metric
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"


def parse_load(text: str, metric: str, matchers: Mapping[str, str]) -> float:
    """The sum of the samples of `metric` matching every label matcher, from a
    Prometheus text page; MalformedLoad says why there is none."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(metric) and line[len(metric):len(metric) + 1] in ("{", " ", "\t"):
            lines.append(line)
    what = selector(metric, matchers)
    if not lines:
        raise MalformedLoad(f"no sample of {metric}")
    try:
        families = list(text_string_to_metric_families("\n".join(lines) + "\n"))
    except Exception as exc:  # the parser raises ValueError, and worse on some garbage
        raise MalformedLoad(f"{metric}: {exc}") from None
    total, found = 0.0, 0
    for family in families:
        for sample in family.samples:
            if sample.name != metric or any(sample.labels.get(k, "") != v
                                            for k, v in matchers.items()):
                continue
            value = float(sample.value)
            if not math.isfinite(value) or value < 0:
                raise MalformedLoad(f"{what} is {value:g}: not a load")
            total += value
            found += 1
    if not found:
        raise MalformedLoad(f"no sample of {what}")
    return total


def failure_reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ScrapeError) else connect_reason(exc)


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise ScrapeError("truncated chunked body")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise ScrapeError("bad chunked body") from None
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2:]
    raise ScrapeError("truncated chunked body")


async def scrape(address: str, port: int, path: str, timeout_s: float) -> str:
    """GET http://ADDRESS:PORT/PATH (HTTP/1.0: no keep-alive, no chunking asked
    for), bounded by timeout_s; the page as text, or ScrapeError/OSError."""
    host = f"[{address}]" if ":" in address else address
    async with asyncio.timeout(timeout_s):
        response = await httpget.get(address, port, path, host=f"{host}:{port}",
                                     limit=SCRAPE_LIMIT + 1, version="1.0",
                                     extra_headers="Accept: text/plain;version=0.0.4\r\n")
    if len(response.raw) > SCRAPE_LIMIT:
        raise ScrapeError(f"page over {SCRAPE_LIMIT // (1024 * 1024)} MiB")
    status = response.status
    if not response.complete_head or status is None:
        raise ScrapeError("not an HTTP response" if response.raw else "empty response")
    if status != 200:
        raise ScrapeError(f"status {status}")
    body = response.body
    if (response.header("transfer-encoding") or "").replace(" ", "").lower() == "chunked":
        body = dechunk(body)
    length = response.content_length()
    if length is not None:
        body = body[:length]
    return body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ScrapeKey:
    address: str
    port: int
    path: str
    interval_ms: int
    timeout_ms: int

    @classmethod
    def of(cls, capacity: Capacity, address: str) -> ScrapeKey:
        return cls(address, capacity.port, capacity.path, capacity.interval_ms,
                   capacity.timeout_ms)

    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{self.path}"


