"""lbd's link to the fleet's etcd: a mirror of the prefix kept current by one
watch, the writes of changes (compare-and-swap), this host's lease, report
and health verdicts.

Forwarding never waits for etcd: lbd starts on its last-known local copy and
the link catches up in the background. While etcd cannot be reached, the
mirror stays as last seen (the host keeps its last agreed health view), and
changes are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from xdplb.fleet.etcd import (
    Etcd,
    EtcdUnavailable,
    KeyValue,
    WatchLost,
    compare_mod_revision,
    delete,
    put,
)
from xdplb.fleet.layout import (
    FleetState,
    HostReport,
    Keys,
    agreed_verdicts,
    decode_state,
    decode_verdicts,
    drift_of,
    encode_state,
    encode_verdicts,
)
from xdplb.fleet.settings import HOST_NAME, FleetConfig
from xdplb.state import DesiredState, MemberId, StateError, shown

log = logging.getLogger("xdplb.fleet")
RETRY_S = 1.0  # after etcd failed us: wait, then read everything again
REPORT_EVERY_S = 1.0  # how often the report is compared with the last one written
CONFIRM_S = 1.0  # after a write timed out: how long the stored state is asked for


class FleetUnavailable(RuntimeError):
    """etcd cannot take the change now (unreachable, no quorum): nothing changed."""


class FleetConflict(StateError):
    """The desired state changed underneath the request: nothing changed; retry."""


@dataclass
class FleetView:
    """What the status and metrics read."""

    enabled: bool = True
    connected: bool = False
    error: str = ""
    newest: FleetState | None = None
    reports: dict[str, HostReport] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)

    def drift(self) -> dict[str, list[str]]:
        newest = self.newest.revision if self.newest else 0
        return drift_of(self.reports, self.live, newest)

    def behind_s(self, revision: int, now: float) -> float:
        if self.newest is None or revision >= self.newest.revision:
            return 0.0
        return max(0.0, now - self.newest.changed_at)


class FleetLink:
    def __init__(self, config: FleetConfig, *, on_state: Callable[[FleetState], None],
                 on_health: Callable[[], None], report: Callable[[], HostReport]):
        self.config = config
        self.host = config.host_name
        self.keys = Keys(config.prefix)
        self.etcd = Etcd(config)
        self._on_state, self._on_health, self._report = on_state, on_health, report
        self.mirror: dict[bytes, KeyValue] = {}
        self.view = FleetView()
        self.read_once = False  # the prefix was read at least once since start
        self.lease = 0
        self.verdicts: dict[MemberId, bool] = {}  # to publish (fleet-scoped backends)
        self._published_verdicts: bytes | None = None
        self._published_report: HostReport | None = None
        self._agreed: dict[MemberId, bool] = {}  # kept as last computed while cut off
        self._wake = asyncio.Event()  # something to publish

    # -- running --

    async def run(self) -> None:
        """Read, watch, repeat: every failure ends in a fresh full read."""
        tasks = [asyncio.create_task(self._keep_lease()),
                 asyncio.create_task(self._keep_publishing())]
        try:
            while True:
                try:
                    revision = await self._read_all()
                    await self._follow(revision + 1)
                except (EtcdUnavailable, WatchLost) as exc:
                    self._cut_off(str(exc))
                except Exception:
                    log.exception("fleet: following etcd failed")
                    self._cut_off("internal error (see lbd's log)")
                await asyncio.sleep(RETRY_S)
        finally:
            for task in tasks:
                task.cancel()

    async def close(self) -> None:
        """A clean stop gives the lease back: the others stop counting this host now."""
        if self.lease:
            with contextlib.suppress(EtcdUnavailable, Exception):
                await asyncio.wait_for(self.etcd.revoke(self.lease), 2.0)
        await self.etcd.close()

    def _cut_off(self, reason: str) -> None:
        if self.view.connected:
            log.warning("fleet: etcd lost: %s; forwarding on revision %s", reason,
                        self.view.newest.revision if self.view.newest else 0)
        self.view.connected, self.view.error = False, reason

    async def _read_all(self) -> int:
        snapshot = await self.etcd.prefix(self.keys.all)
        self.mirror = {kv.key: kv for kv in snapshot.kvs}
        self.read_once = True
        self.view.connected, self.view.error = True, ""
        self._mirror_changed(state=True, health=True)
        return snapshot.revision

    async def _follow(self, start: int) -> None:
        async for _, events in self.etcd.watch(self.keys.all, start):
            state = health = False
            for event in events:
                if event.type == event.DELETE:
                    self.mirror.pop(event.kv.key, None)
                else:
                    self.mirror[event.kv.key] = event.kv
                state |= event.kv.key == self.keys.state
                health |= event.kv.key.startswith((self.keys.health, self.keys.live))
            self.view.connected, self.view.error = True, ""
            self._mirror_changed(state, health)

    def _mirror_changed(self, state: bool, health: bool) -> None:
        self.view.reports = {
            Keys.name_under(self.keys.hosts, key): HostReport.from_json(
                Keys.name_under(self.keys.hosts, key), kv.value)
            for key, kv in self.mirror.items() if key.startswith(self.keys.hosts)}
        self.view.live = {Keys.name_under(self.keys.live, key) for key in self.mirror
                          if key.startswith(self.keys.live)}
        if state:
            self._state_changed()
        if health:
            self._on_health()

    def _state_changed(self) -> None:
        kv = self.mirror.get(self.keys.state)
        if kv is None:
            self.view.newest = FleetState(DesiredState(), 0)
            return
        try:
            newest = decode_state(kv.key, kv.value, kv.mod_revision)
        except StateError as exc:
            log.error("fleet: %s; forwarding on the last state this host realised", exc)
            self.view.newest = FleetState(DesiredState(), kv.mod_revision)
            return
        self.view.newest = newest
        self._on_state(newest)

    # -- writing the desired state --

    async def commit(self, old: DesiredState, new: DesiredState, base: int) -> int:
        """Writes new if the stored state is still the one at revision base (which
        old is); its revision. FleetConflict when it is not, FleetUnavailable when
        etcd cannot say."""
        if base == 0 and old.vips:
            raise StateError(f"fleet prefix {self.config.prefix}: this host has not read a "
                             "desired state from it yet (empty, or etcd not reached since "
                             "start); to put this host's state there: lbctl fleet import")
        write = uuid.uuid4().hex
        value = encode_state(new, time.time(), self.host, write)
        try:
            done, revision = await self.etcd.txn(
                [compare_mod_revision(self.keys.state, base)], [put(self.keys.state, value)])
        except EtcdUnavailable as exc:
            return await self._confirm(write, exc)
        if not done:
            stored = await self._stored_state_revision()
            raise FleetConflict(f"the desired state changed underneath you (now revision "
                                f"{stored or 'unknown'}; this change was checked against "
                                f"{base}): nothing was changed; retry")
        return revision  # a write's answer carries the revision it made

    async def _stored_state_revision(self) -> int:
        with contextlib.suppress(EtcdUnavailable):
            snapshot = await self.etcd.range(self.keys.state)
            return snapshot.kvs[0].mod_revision if snapshot.kvs else 0
        return 0

    async def _confirm(self, write: str, exc: Exception) -> int:
        """A write whose answer was lost may have landed: the stored state says (asked
        briefly: the request's whole answer must come within lbctl's deadline)."""
        with contextlib.suppress(EtcdUnavailable):
            snapshot = await self.etcd.range(self.keys.state, timeout_s=CONFIRM_S)
            if snapshot.kvs:
                stored = decode_state(self.keys.state, snapshot.kvs[0].value,
                                      snapshot.kvs[0].mod_revision)
                if stored.write == write:
                    return stored.revision
            raise FleetUnavailable(f"etcd did not take the change ({exc}): nothing was "
                                   "changed") from None
        raise FleetUnavailable(f"etcd cannot be reached ({exc}): the change was not "
                               "confirmed and this lbd cannot tell whether it was stored; "
                               "see lbctl fleet status once etcd answers") from None

    async def import_state(self, state: DesiredState) -> int:
        """Writes state into a prefix that holds none yet (local -> etcd mode)."""
        value = encode_state(state, time.time(), self.host, uuid.uuid4().hex)
        try:
            done, revision = await self.etcd.txn([compare_mod_revision(self.keys.state, 0)],
                                                 [put(self.keys.state, value)])
        except EtcdUnavailable as exc:
            raise FleetUnavailable(f"etcd: {exc}") from None
        if done:
            return revision
        stored = await self._stored_state_revision()
        raise FleetConflict(f"fleet prefix {self.config.prefix} already holds a desired "
                            f"state (revision {stored}): import writes only into an "
                            "empty prefix; nothing was changed")

    async def forget(self, host: str) -> None:
        """Removes a gone host's last report; refused while its lease lives."""
        if not HOST_NAME.match(host):
            raise StateError(f"host {shown(host)}: not a host name")
        try:
            done, _ = await self.etcd.txn([compare_mod_revision(self.keys.live_host(host), 0)],
                                          [delete(self.keys.host(host))])
        except EtcdUnavailable as exc:
            raise FleetUnavailable(f"etcd: {exc}") from None
        if not done:
            raise StateError(f"host {host}: its lease is alive; stop its lbd first")

    # -- this host: lease, report, verdicts --

    def agreed(self, local: Mapping[MemberId, bool],
               members: Mapping[MemberId, int]) -> dict[MemberId, bool]:
        """The verdicts of fleet-scoped backends the quorum decides (while cut off
        from etcd: as last decided); the others are local's."""
        if self.view.connected:
            reports = {Keys.name_under(self.keys.health, key): decode_verdicts(kv.value)
                       for key, kv in self.mirror.items() if key.startswith(self.keys.health)}
            self._agreed = agreed_verdicts(members, reports)
        merged = dict(local)
        merged.update({m: up for m, up in self._agreed.items() if m in members})
        return merged

    def publish_verdicts(self, verdicts: Mapping[MemberId, bool]) -> None:
        self.verdicts = dict(verdicts)
        self._wake.set()

    def report_changed(self) -> None:
        self._wake.set()

    async def _keep_lease(self) -> None:
        while True:
            try:
                if not self.lease or await self.etcd.keepalive(self.lease) <= 0:
                    await self._register()
            except EtcdUnavailable as exc:
                self._cut_off(str(exc))
            await asyncio.sleep(max(0.5, self.config.lease_ttl_s / 4))

    async def _register(self) -> None:
        self.lease = await self.etcd.grant(self.config.lease_ttl_s)
        self._published_verdicts, self._published_report = None, None
        await self.etcd.txn([], [put(self.keys.live_host(self.host), b"", self.lease)])
        log.info("fleet: host %s registered under lease %x", self.host, self.lease)
        self._wake.set()

    async def _keep_publishing(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REPORT_EVERY_S)
            self._wake.clear()
            if not self.lease:
                continue
            try:
                await self._publish()
            except EtcdUnavailable as exc:
                self._cut_off(str(exc))

    async def _publish(self) -> None:
        ops = []
        verdicts = encode_verdicts(self.verdicts)
        if verdicts != self._published_verdicts:
            ops.append(put(self.keys.health_of(self.host), verdicts, self.lease))
        report = self._report()
        if not report.same_content(self._published_report):
            ops.append(put(self.keys.host(self.host), report.to_json()))
        if ops:
            await self.etcd.txn([], ops)
            self._published_verdicts, self._published_report = verdicts, report
