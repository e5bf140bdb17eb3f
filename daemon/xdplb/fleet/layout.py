"""What the fleet keeps in etcd, and the pure rules every host applies to it.

Under the prefix P:
  P/state               the desired state (the state file's form) and who wrote it:
                        its mod_revision is the state's revision, and every change
                        is one transaction conditional on it (compare-and-swap)
  P/hosts/<host>        a host's last report (kept after it goes: "lease expired")
  P/live/<host>         empty, under the host's lease: present while it is alive
  P/health/<host>       the host's own verdicts of fleet-scoped backends, under its lease

A host's lease lapsing removes its live key and its verdicts at once: the
other hosts then decide without it. Every host reads the same keys at the same
revision and applies the same functions below, so they reach the same rings.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xdplb.state import DesiredState, MemberId, StateError


@dataclass(frozen=True)
class Keys:
    prefix: str

    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    @property
    def all(self) -> bytes:
        return self._key("")

    @property
    def state(self) -> bytes:
        return self._key("state")

    @property
    def hosts(self) -> bytes:
        return self._key("hosts", "")

    def host(self, name: str) -> bytes:
        return self._key("hosts", name)

    @property
    def live(self) -> bytes:
        return self._key("live", "")

    def live_host(self, name: str) -> bytes:
        return self._key("live", name)

    @property
    def health(self) -> bytes:
        return self._key("health", "")

    def health_of(self, name: str) -> bytes:
        return self._key("health", name)

    @staticmethod
    def name_under(directory: bytes, key: bytes) -> str:
        return key[len(directory):].decode(errors="replace")


@dataclass(frozen=True)
class FleetState:
    """The shared desired state as one revision of the store holds it."""

    state: DesiredState
    revision: int  # the state key's mod_revision; 0: the prefix was never written
    changed_at: float = 0.0
    changed_by: str = ""
    write: str = ""  # the writer's id for this write: a timed-out writer finds its own


def encode_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def encode_state(state: DesiredState, changed_at: float, by: str, write: str) -> bytes:
    return encode_json({"state": state.to_dict(), "changed_at": changed_at, "by": by,
                        "write": write})


def decode_state(key: bytes, value: bytes, mod_revision: int) -> FleetState:
    """The desired state the state key holds; StateError says why it cannot be read."""
    where = f"etcd key {key.decode(errors='replace')} (revision {mod_revision})"
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{where}: not JSON: {exc}") from None
    if not isinstance(data, dict) or "state" not in data:
        raise StateError(f"{where}: not a desired state written by lbd")
    state = DesiredState.from_dict(data["state"], where)
    changed_at = data.get("changed_at", 0.0)
    return FleetState(state, mod_revision,
                      float(changed_at) if isinstance(changed_at, int | float) else 0.0,
                      str(data.get("by", "")), str(data.get("write", "")))


# --- health agreement ---------------------------------------------------------------

def member_text(member: MemberId) -> str:
    key, address = member
    return f"{key}|{address}"


def encode_verdicts(verdicts: Mapping[MemberId, bool]) -> bytes:
    return encode_json({member_text(m): up for m, up in sorted(verdicts.items())})


def decode_verdicts(value: bytes) -> dict[str, bool]:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, bool)}


def quorum_of(configured: int, reporters: int) -> int:
    """How many hosts must see a backend down: the VIP's health_quorum, or (0) a
    majority of the live hosts that report the backend."""
    return configured if configured else reporters // 2 + 1


def agreed_verdicts(members: Mapping[MemberId, int],
                    reports: Mapping[str, Mapping[str, bool]]) -> dict[MemberId, bool]:
    """Per fleet-scoped backend (with its VIP's configured quorum): serving unless
    a quorum of the hosts reporting it see it down. A backend no live host
    reports yet is left out (the host's own verdict stands until one does)."""
    agreed: dict[MemberId, bool] = {}
    for member, configured in members.items():
        text = member_text(member)
        seen = [verdicts[text] for verdicts in reports.values() if text in verdicts]
        if seen:
            agreed[member] = seen.count(False) < quorum_of(configured, len(seen))
    return agreed


# --- host reports and drift ---------------------------------------------------------

@dataclass(frozen=True)
class HostReport:
    """What a host says it realises; written when any of it changes."""

    host: str
    version: str
    revision: int  # the desired state's revision its maps realise
    fingerprints: Mapping[str, str] = field(default_factory=dict)  # VIP -> ring fingerprint
    addresses: tuple[str, ...] = ()
    drained: bool = False
    bgp: str = ""  # "off", or the sessions and what is announced
    down: tuple[str, ...] = ()  # backends its own checks see down ("VIP|address")
    refused_revision: int = 0  # a newer revision it could not realise (see its log)
    refused_reason: str = ""
    reported_at: float = 0.0

    def to_json(self) -> bytes:
        return encode_json({**self.__dict__, "fingerprints": dict(self.fingerprints),
                            "addresses": list(self.addresses), "down": list(self.down)})

    @classmethod
    def from_json(cls, name: str, value: bytes) -> HostReport:
        try:
            data = json.loads(value)
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            known["addresses"] = tuple(known.get("addresses", ()))
            known["down"] = tuple(known.get("down", ()))
            return cls(**known)
        except (TypeError, ValueError, KeyError):
            return cls(host=name, version="?", revision=0, refused_reason="unreadable report")

    def same_content(self, other: HostReport | None) -> bool:
        return other is not None and {**self.__dict__, "reported_at": 0} == {
            **other.__dict__, "reported_at": 0}


def drift_of(reports: Mapping[str, HostReport], live: set[str],
             newest: int) -> dict[str, list[str]]:
    """Per host, why it does not match the fleet (empty: it does)."""
    usual: dict[str, str] = {}  # per VIP, the fingerprint most hosts at the newest revision have
    at_newest = [r for name, r in reports.items() if name in live and r.revision == newest]
    for vip in {v for r in at_newest for v in r.fingerprints}:
        counts = Counter(r.fingerprints.get(vip, "") for r in at_newest)
        usual[vip] = max(sorted(counts), key=lambda fp: counts[fp])
    drift: dict[str, list[str]] = {}
    for name, report in sorted(reports.items()):
        reasons: list[str] = []
        if name not in live:
            reasons.append("lease expired")
        if report.revision < newest:
            reasons.append(f"behind: realises revision {report.revision} of {newest}")
        if report.refused_revision:
            reasons.append(f"refused revision {report.refused_revision}: "
                           f"{report.refused_reason}")
        if report.revision == newest:
            differing = sorted(vip for vip, fp in usual.items()
                               if report.fingerprints.get(vip, "") != fp)
            if differing:
                reasons.append(f"ring differs at revision {newest}: {', '.join(differing)}")
        drift[name] = reasons
    return drift
