"""Changes: the one way desired state changes (apply_changes), and diff."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from xdplb.state.addresses import (
    VipKey,
    canonical_address,
    ip_sort_key,
)
from xdplb.state.model import (
    BackendSpec,
    DesiredState,
    Limits,
    VipSpec,
)
from xdplb.state.quic import check_server_id_change, free_server_ids, unassigned
from xdplb.state.rules import (
    MAX_STATE_BYTES,
    AlreadyExists,
    LimitExceeded,
    NotFound,
    StateError,
    shown,
)

# --- changes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One requested change. `apply` works on the dict copy that apply_changes owns."""

    kind: ClassVar[str] = ""

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _existing(vips: Mapping[VipKey, VipSpec], key: VipKey) -> VipSpec:
    if key not in vips:
        raise NotFound(f"VIP {key}: no such VIP")
    return vips[key]


def _with_backend(vip: VipSpec, backend: BackendSpec) -> VipSpec:
    """`vip` with `backend` added, or put in place of the one with its address."""
    return dataclasses.replace(vip, backends={**vip.backends, backend.address: backend})


def _existing_backend(vip: VipSpec, address: str) -> BackendSpec:
    address = canonical_address(address, "backend address")
    if address not in vip.backends:
        raise NotFound(f"VIP {vip.key}: no backend {address}")
    return vip.backends[address]


@dataclass(frozen=True)
class AddVip(Change):
    vip: VipSpec
    kind: ClassVar[str] = "vip-add"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        if self.vip.key in vips:
            raise AlreadyExists(f"VIP {self.vip.key}: already exists")
        vips[self.vip.key] = self.vip

    def describe(self) -> str:
        return (f"add VIP {self.vip.key} (hash {self.vip.hash}, encap {self.vip.encap}, "
                f"ring {self.vip.ring_size}, {len(self.vip.backends)} backends)")


@dataclass(frozen=True)
class RemoveVip(Change):
    key: VipKey
    kind: ClassVar[str] = "vip-del"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        _existing(vips, self.key)
        del vips[self.key]

    def describe(self) -> str:
        return f"remove VIP {self.key}"


VIP_SETTABLE = ("hash", "encap", "ring_size", "check", "panic_threshold", "when_none_healthy",
                "capacity", "slow_start_s", "quic", "health_scope", "health_quorum")
BACKEND_SETTABLE = ("weight", "drained", "check")


def _check_fields(settings: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    for name in settings:
        if name not in allowed:
            raise StateError(f"{what}: {shown(name)} cannot be set "
                             f"(settable: {', '.join(allowed)})")


@dataclass(frozen=True)
class SetVip(Change):
    key: VipKey
    settings: Mapping[str, Any]
    kind: ClassVar[str] = "vip-set"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        _check_fields(self.settings, VIP_SETTABLE, f"VIP {self.key}")
        vip = dataclasses.replace(_existing(vips, self.key), **self.settings)
        if vip.quic is None:  # no longer QUIC: its backends' server IDs are free again
            vip = dataclasses.replace(vip, backends={
                a: dataclasses.replace(b, server_id=0) for a, b in vip.backends.items()})
        vips[self.key] = vip

    def describe(self) -> str:
        return f"set VIP {self.key} " + _describe_settings(self.settings)


@dataclass(frozen=True)
class AddBackend(Change):
    key: VipKey
    backend: BackendSpec
    kind: ClassVar[str] = "backend-add"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        address = canonical_address(self.backend.address, "backend address")
        if address in vip.backends:
            raise AlreadyExists(f"VIP {self.key}: backend {address} already exists")
        backend = dataclasses.replace(self.backend, address=address)
        vips[self.key] = _with_backend(vip, backend)

    def describe(self) -> str:
        state = " drained" if self.backend.drained else ""
        return f"add backend {self.backend.address} weight {self.backend.weight}{state} " \
               f"to VIP {self.key}"


@dataclass(frozen=True)
class RemoveBackend(Change):
    key: VipKey
    address: str
    kind: ClassVar[str] = "backend-del"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        backend = _existing_backend(vip, self.address)
        rest = {a: b for a, b in vip.backends.items() if a != backend.address}
        vips[self.key] = dataclasses.replace(vip, backends=rest)

    def describe(self) -> str:
        return f"remove backend {self.address} from VIP {self.key}"


@dataclass(frozen=True)
class SetBackend(Change):
    key: VipKey
    address: str
    settings: Mapping[str, Any]
    kind: ClassVar[str] = "backend-set"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        backend = _existing_backend(vip, self.address)
        _check_fields(self.settings, BACKEND_SETTABLE, f"backend {backend.address}")
        updated = dataclasses.replace(backend, **self.settings)
        vips[self.key] = _with_backend(vip, updated)

    def describe(self) -> str:
        return f"set backend {self.address} of VIP {self.key} " + _describe_settings(
            self.settings)


@dataclass(frozen=True)
class ReassignServerId(Change):
    """A backend's server ID changed on purpose (lbctl backend set --server-id
    --force-server-id): clients holding connection IDs with the old one lose
    their connections to it, unless the ring sends them there anyway."""

    key: VipKey
    address: str
    server_id: int
    kind: ClassVar[str] = "backend-server-id"

    def apply(self, vips: dict[VipKey, VipSpec]) -> None:
        vip = _existing(vips, self.key)
        if vip.quic is None:
            raise StateError(f"VIP {self.key}: not a QUIC VIP: its backends have no server ID")
        backend = _existing_backend(vip, self.address)
        updated = dataclasses.replace(backend, server_id=self.server_id)
        vips[self.key] = _with_backend(vip, updated)

    def describe(self) -> str:
        return f"set backend {self.address} of VIP {self.key} server_id={self.server_id}"


def _describe_settings(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={'(check)' if k == 'check' else v}" for k, v in settings.items())


def assign_server_ids(vips: dict[VipKey, VipSpec], limits: Limits) -> None:
    """Gives each QUIC VIP backend without a server ID the smallest free one."""
    free = iter(free_server_ids(vips.values(), limits.max_backends))
    for key, address in unassigned(vips.values()):
        vip = vips[key]
        server_id = next(free, None)
        if server_id is None or server_id > vip.quic.max_server_id:
            raise LimitExceeded(
                f"VIP {key} backend {address}: no free server ID (at most "
                f"{min(limits.max_backends, vip.quic.max_server_id)} with "
                f"{vip.quic.server_id_len}-octet server IDs and map size max_backends)")
        backend = dataclasses.replace(vip.backends[address], server_id=server_id)
        vips[key] = _with_backend(vip, backend)


def apply_changes(state: DesiredState, changes: Iterable[Change],
                  limits: Limits) -> DesiredState:
    """The one way desired state changes: all of `changes` or none of them."""
    vips = dict(state.vips)
    for change in changes:
        change.apply(vips)
    assign_server_ids(vips, limits)
    new = DesiredState(vips)
    new.validate(limits)
    size = len(json.dumps(new.to_dict(), separators=(",", ":")))
    if size > MAX_STATE_BYTES:
        raise LimitExceeded(f"the state would take {size} bytes (compact JSON), more than "
                            f"the limit of {MAX_STATE_BYTES}: the API could not return it")
    return new


def diff(old: DesiredState, new: DesiredState) -> list[Change]:
    """The changes that turn `old` into `new` (what `lbctl apply` does)."""
    changes: list[Change] = []
    for key in sorted(set(old.vips) - set(new.vips)):
        changes.append(RemoveVip(key))
    for key in sorted(set(new.vips) - set(old.vips)):
        changes.append(AddVip(new.vips[key]))
    for key in sorted(set(old.vips) & set(new.vips)):
        changes.extend(_vip_diff(old.vips[key], new.vips[key]))
    return changes


def _vip_diff(old: VipSpec, new: VipSpec) -> list[Change]:
    changes: list[Change] = []
    settings = {name: getattr(new, name) for name in VIP_SETTABLE
                if getattr(old, name) != getattr(new, name)}
    if settings:
        changes.append(SetVip(new.key, settings))
    for address in sorted(set(old.backends) - set(new.backends), key=ip_sort_key):
        changes.append(RemoveBackend(new.key, address))
    for address in sorted(set(new.backends) - set(old.backends), key=ip_sort_key):
        changes.append(AddBackend(new.key, new.backends[address]))
    for address in sorted(set(old.backends) & set(new.backends), key=ip_sort_key):
        before, after = old.backends[address], new.backends[address]
        if new.quic is not None and old.quic is not None:
            check_server_id_change(new, address, before.server_id, after.server_id)
        elif new.quic is not None and after.server_id:  # becoming QUIC: as the document says
            changes.append(ReassignServerId(new.key, address, after.server_id))
        changed = {name: getattr(after, name) for name in BACKEND_SETTABLE
                   if getattr(before, name) != getattr(after, name)}
        if changed:
            changes.append(SetBackend(new.key, address, changed))
    return changes
