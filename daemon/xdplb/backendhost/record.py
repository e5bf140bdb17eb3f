"""What setup changed on this host, so teardown undoes that and nothing else.

Written atomically after every setup. What was already so before the first
setup (an address an operator put on lo, a sysctl already at the value
needed) is not recorded and teardown leaves it. A later setup adds to the
record and keeps the values found before the first one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xdplb.store import write_atomically


class RecordError(RuntimeError):
    pass


@dataclass
class RouteChange:
    family: int  # 4 | 6
    oif: str
    gateway: str
    advmss_before: int  # 0: none
    advmss: int


@dataclass
class SetupRecord:
    name: str
    pin_dir: str
    attached: dict[str, str] = field(default_factory=dict)  # interface -> native | generic
    addresses: list[str] = field(default_factory=list)  # added to lo by setup
    sysctls: dict[str, list[int]] = field(default_factory=dict)  # key -> [before, set]
    routes: list[RouteChange] = field(default_factory=list)
    tunnel_addresses: list[str] = field(default_factory=list)
    vips: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SetupRecord:
        routes = [RouteChange(**r) for r in data.pop("routes", [])]
        return cls(**data, routes=routes)


def load_record(path: Path) -> SetupRecord | None:
    """The record, None when setup never ran (or teardown removed it)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: {exc}; it is left untouched") from None
    try:
        return SetupRecord.from_dict(data)
    except TypeError as exc:
        raise RecordError(f"{path}: not a setup record ({exc}); it is left untouched") from None


def save_record(path: Path, record: SetupRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, record.to_json())
