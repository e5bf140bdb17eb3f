"""lbd's events as typed objects.

Everything worth telling an operator (a start, an API change, a reconcile, a
health verdict, the moment the datapath holds it, a load adaptation, a next-hop
or BGP change) is one of these. The log line, the metrics and the Watch stream
each render what they need from the fields; nothing parses the message text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class Event:
    """The common part: when, and the VIP and backend it is about ("" when none)."""

    KIND: ClassVar[str] = ""
    vip: str = field(default="", kw_only=True)
    backend: str = field(default="", kw_only=True)
    time: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        return self.KIND

    def message(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Lifecycle(Event):
    """lbd started, stopped, or attached something."""

    phase: str  # start | stop
    text: str

    @property
    def kind(self) -> str:
        return self.phase

    def message(self) -> str:
        return self.text


@dataclass(frozen=True)
class Changed(Event):
    """A change of the desired state (API, apply, host drain), as described."""

    KIND: ClassVar[str] = "change"
    description: str

    def message(self) -> str:
        return self.description


@dataclass(frozen=True)
class Reconciled(Event):
    """A reconcile that wrote the maps; with a VIP, the ring positions it rewrote."""

    KIND: ClassVar[str] = "reconcile"
    reason: str
    summary: str = ""
    positions: int = 0

    def message(self) -> str:
        if self.vip:
            return f"ring of {self.vip}: {self.positions} positions written"
        return f"{self.reason}: {self.summary}"


@dataclass(frozen=True)
class HealthTransition(Event):
    """A check's verdict changed, or its hold-down for flapping began or ended."""

    KIND: ClassVar[str] = "health"
    check: str  # what is probed, e.g. "http 10.1.0.1:80/healthz"
    up: bool
    reason: str  # the last result (timeout, refused, status 503, ...) or why it changed
    detail: str = ""  # how the verdict came about, in parentheses
    note: str = ""  # about the hold-down, after a semicolon

    def message(self) -> str:
        state = "up" if self.up else "down"
        detail = f" ({self.detail})" if self.detail else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.check} is {state}: {self.reason}{detail}{note}"


@dataclass(frozen=True)
class Realised(Event):
    """The datapath holds a backend's verdict: the reconcile that writes it ran."""

    KIND: ClassVar[str] = "realised"
    up: bool
    positions: int  # its ring positions now
    lag_s: float | None  # since the verdict, when known

    def message(self) -> str:
        state = "up" if self.up else "down"
        lag = "" if self.lag_s is None else f", {self.lag_s:.2f} s after the verdict"
        return (f"{self.backend} of {self.vip}: {state} is realised in the datapath "
                f"({self.positions} ring positions{lag})")


@dataclass(frozen=True)
class VipServing(Event):
    """A VIP's ring, as written, went from no healthy backend to some, or back."""

    KIND: ClassVar[str] = "vip"
    up: bool
    healthy: int  # healthy backends now
    backends: int

    def message(self) -> str:
        if self.up:
            return f"{self.vip} is up: {self.healthy} of {self.backends} backends healthy"
        return f"{self.vip} is down: no healthy backend (of {self.backends})"


@dataclass(frozen=True)
class HostDrainChanged(Event):
    """The host was drained (every VIP withdrawn from BGP) or put back in service."""

    KIND: ClassVar[str] = "change"
    drained: bool

    def message(self) -> str:
        return ("drain host: withdraw every VIP" if self.drained
                else "undrain host: announce VIPs again")


@dataclass(frozen=True)
class CapacityNotice(Event):
    """Load feedback or slow start: a weight step, a deferral, a load source's state."""

    KIND: ClassVar[str] = "capacity"
    text: str

    def message(self) -> str:
        return f"{self.vip}: {self.text}"


@dataclass(frozen=True)
class NexthopChanged(Event):
    KIND: ClassVar[str] = "nexthop"
    old: str
    new: str

    def message(self) -> str:
        return f"next hop changed from {self.old} to {self.new}"


@dataclass(frozen=True)
class BgpNotice(Event):
    """An announcement, a withdrawal, or BIRD refusing one."""

    KIND: ClassVar[str] = "bgp"
    text: str

    def message(self) -> str:
        return self.text


@dataclass(frozen=True)
class Overflow(Event):
    """Sent to a watcher that stopped reading, before it is cut off."""

    KIND: ClassVar[str] = "overflow"

    def message(self) -> str:
        return "watch stream fell behind; reconnect"


class Observer(Protocol):
    """What the controller tells the metrics as it happens (xdplb.metrics implements it;
    the controller knows only this)."""

    def observe_check(self, kind: str, seconds: float) -> None: ...

    def observe_transition(self, event: HealthTransition) -> None: ...

    def observe_settle(self, report: Any) -> None: ...

    def observe_reconcile(self, report: Any) -> None: ...

    def observe_state_write(self) -> None: ...

    def observe_api_request(self, method: str, code: str) -> None: ...

    def observe_hook(self, hook: str, outcome: str) -> None: ...
