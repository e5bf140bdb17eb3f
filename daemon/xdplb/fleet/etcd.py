"""A small asyncio client of etcd's v3 gRPC API (the stubs in xdplb.etcdv3).

What lbd needs and nothing more: ranges, transactions, a prefix watch and a
lease. One channel per endpoint; a call that finds its member unreachable
moves on to the next, all within one deadline, because an etcd call without
a deadline hangs as long as the cluster has no quorum. Watches ask for a
leader ("hasleader"), so a member cut off from its cluster ends the stream
instead of going silent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from xdplb.etcdv3 import kv_pb2, rpc_pb2
from xdplb.etcdv3 import rpc_pb2_grpc as rpc
from xdplb.fleet.settings import FleetConfig

KeyValue = kv_pb2.KeyValue
Event = kv_pb2.Event
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
# etcd refuses pings more often than every 5 s (GOAWAY too_many_pings).
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 3_000),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2_000)]


class EtcdUnavailable(RuntimeError):
    """No member answered within the deadline (unreachable, or no quorum)."""


class WatchLost(RuntimeError):
    """The watch ended (member gone, no leader, compacted): start again from a read."""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with prefix."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class Snapshot:
    revision: int  # the store's revision the read saw
    kvs: tuple[KeyValue, ...]


def compare_mod_revision(key: bytes, revision: int) -> rpc_pb2.Compare:
    """key's last change is at revision (0: key does not exist)."""
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, mod_revision=revision,
                           result=rpc_pb2.Compare.EQUAL)


def compare_range_empty(prefix: bytes) -> rpc_pb2.Compare:
    """No key under prefix (a range compare is true of no key at all)."""
    return rpc_pb2.Compare(key=prefix, range_end=prefix_end(prefix),
                           target=rpc_pb2.Compare.VERSION, version=0,
                           result=rpc_pb2.Compare.EQUAL)


def put(key: bytes, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))


def _credentials(config: FleetConfig) -> grpc.ChannelCredentials | None:
    if not any(url.startswith("https:") for url in config.etcd):
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(config.ca), read(config.key), read(config.cert))


class Etcd:
    def __init__(self, config: FleetConfig):
        self.timeout_s = config.timeout_s
        credentials = _credentials(config)
        self._stubs: list[tuple[str, grpc.aio.Channel]] = []
        for url in config.etcd:
            parts = urlsplit(url)
            target = f"{parts.hostname}:{parts.port}"
            if ":" in (parts.hostname or ""):
                target = f"[{parts.hostname}]:{parts.port}"
            channel = (grpc.aio.secure_channel(target, credentials, _CHANNEL_OPTIONS)
                       if credentials else grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS))
            self._stubs.append((url, channel))
        self._next = 0  # the member that answered last is asked first

    async def close(self) -> None:
        for _, channel in self._stubs:
            await channel.close()

    async def _call(self, service: type, method: str, request: object,
                    timeout_s: float | None = None) -> object:
        """One unary call, member after member, within one deadline."""
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        errors: list[str] = []
        attempt = 0
        while (left := deadline - time.monotonic()) > 0.05:
            index = (self._next + attempt) % len(self._stubs)
            url, channel = self._stubs[index]
            per_member = left if attempt >= len(self._stubs) - 1 else min(left, 1.5)
            try:
                answer = await getattr(service(channel), method)(
                    request, timeout=per_member, wait_for_ready=attempt >= len(self._stubs))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                errors.append(f"{url}: {exc.details() or exc.code().name}")
                attempt += 1
                if attempt % len(self._stubs) == 0:
                    await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                continue
            self._next = index
            return answer
        seen = "; ".join(errors[-len(self._stubs):]) or "no answer"
        raise EtcdUnavailable(f"etcd did not answer within {timeout_s:g} s ({seen})")

    async def range(self, key: bytes, range_end: bytes = b"", revision: int = 0,
                    timeout_s: float | None = None) -> Snapshot:
        answer = await self._call(rpc.KVStub, "Range", rpc_pb2.RangeRequest(
            key=key, range_end=range_end, revision=revision), timeout_s)
        return Snapshot(answer.header.revision, tuple(answer.kvs))

    async def prefix(self, prefix: bytes) -> Snapshot:
        return await self.range(prefix, prefix_end(prefix))

    async def txn(self, compare: Sequence[rpc_pb2.Compare], success: Sequence[rpc_pb2.RequestOp],
                  failure: Sequence[rpc_pb2.RequestOp] = ()) -> tuple[bool, int]:
        """(succeeded, the store's revision after the transaction)."""
        answer = await self._call(rpc.KVStub, "Txn", rpc_pb2.TxnRequest(
            compare=compare, success=success, failure=failure))
        return answer.succeeded, answer.header.revision

    async def grant(self, ttl_s: int) -> int:
        answer = await self._call(rpc.LeaseStub, "LeaseGrant",
                                  rpc_pb2.LeaseGrantRequest(TTL=ttl_s))
        return answer.ID

    async def revoke(self, lease: int) -> None:
        await self._call(rpc.LeaseStub, "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=lease))

    async def keepalive(self, lease: int) -> int:
        """Refreshes the lease once; its remaining TTL (0: it has expired)."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(len(self._stubs) * 2):
            index = (self._next + attempt) % len(self._stubs)
            stream = rpc.LeaseStub(self._stubs[index][1]).LeaseKeepAlive(
                timeout=max(0.1, min(1.5, deadline - time.monotonic())))
            try:
                await stream.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
                answer = await stream.read()
                await stream.done_writing()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE or time.monotonic() >= deadline:
                    break
                continue
            finally:
                stream.cancel()
            if answer is grpc.aio.EOF:
                continue
            return answer.TTL
        raise EtcdUnavailable(f"etcd did not refresh lease {lease:x} within "
                              f"{self.timeout_s:g} s")

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[
            tuple[int, tuple[Event, ...]]]:
        """(revision, events) for every change under prefix from start_revision on;
        WatchLost when the stream ends for any reason."""
        _, channel = self._stubs[self._next]
        stream = rpc.WatchStub(channel).Watch(metadata=(("hasleader", "true"),))
        try:
            await stream.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision,
                progress_notify=True)))
            while True:
                answer = await stream.read()
                if answer is grpc.aio.EOF:
                    raise WatchLost("the watch stream ended")
                if answer.compact_revision:
                    raise WatchLost(f"revision {start_revision} is compacted")
                if answer.canceled:
                    raise WatchLost(f"watch canceled: {answer.cancel_reason or 'no reason'}")
                if answer.events:
                    yield answer.header.revision, tuple(answer.events)
        except grpc.aio.AioRpcError as exc:
            self._next = (self._next + 1) % len(self._stubs)
            raise WatchLost(f"watch: {exc.details() or exc.code().name}") from None
        finally:
            stream.cancel()
