"""The lock files pin what pyproject.toml allows, and the generated API modules
agree with the pinned generator and the runtime floors.

A fresh machine installs requirements.lock (scripts/setup.sh), so these are
the versions the suite runs with; an edit of pyproject.toml that the lock
does not follow fails here rather than on a new machine later."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
V1 = REPO / "daemon" / "xdplb" / "v1"


def read_lock(name: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """{package: version} and {package: what the lock says requires it}."""
    pins: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    current = ""
    for line in (REPO / name).read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9._-]+)==([^ \\]+)", line):
            current = canonicalize_name(match[1])
            pins[current] = match[2]
            via[current] = set()
        elif (match := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)) and current:
            via[current].add(match[1].strip())
    return pins, via


def declared(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    items = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(text) for text in items]


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", ["dev"]),
                                              ("requirements-runtime.lock", [])])
def test_every_declared_dependency_is_pinned_within_its_range(lock: str,
                                                              extras: list[str]) -> None:
    pins, _ = read_lock(lock)
    for requirement in declared() + [r for e in extras for r in declared(e)]:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock}: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {name}=={pins[name]}, outside pyproject's {requirement}: "
            "run make lock")


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", ["dev"]),
                                              ("requirements-runtime.lock", [])])
def test_the_lock_asks_for_nothing_pyproject_dropped(lock: str, extras: list[str]) -> None:
    _, via = read_lock(lock)
    direct = {name for name, sources in via.items() if "xdplb (pyproject.toml)" in sources}
    wanted = {canonicalize_name(r.name)
              for r in declared() + [r for e in extras for r in declared(e)]}
    assert direct == wanted, "run make lock"


def test_every_pin_carries_hashes() -> None:
    for lock in ("requirements.lock", "requirements-runtime.lock"):
        text = (REPO / lock).read_text()
        pinned = re.findall(r"^[A-Za-z0-9._-]+==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}[ \\]*\n)+",
                            text, re.M)
        assert len(pinned) == len(read_lock(lock)[0]), f"{lock}: a pin without hashes"


def test_the_runtime_lock_agrees_with_the_full_one() -> None:
    full, _ = read_lock("requirements.lock")
    runtime, _ = read_lock("requirements-runtime.lock")
    assert {name: full.get(name) for name in runtime} == runtime
    assert "scapy" not in runtime and "pytest" not in runtime  # an LB host runs neither


def test_the_build_backend_is_the_locked_one() -> None:
    pins, _ = read_lock("requirements.lock")
    assert PYPROJECT["build-system"]["requires"] == [f"setuptools=={pins['setuptools']}"]


def test_the_generator_is_pinned_exactly_and_stamps_the_runtime_floor() -> None:
    """The generated modules refuse an older grpcio/protobuf at import time: the
    runtime floors must be their stamps, and the generator must be exact, or a
    new release changes the stamps (a stale-module failure, or an import error
    on an LB host with the floor's version)."""
    dev = {canonicalize_name(r.name): r for r in declared("dev")}
    runtime = {canonicalize_name(r.name): r for r in declared()}
    tools = str(dev["grpcio-tools"].specifier)
    assert tools.startswith("=="), "grpcio-tools must be pinned exactly"
    grpc_stamp = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'",
                           (V1 / "lb_pb2_grpc.py").read_text())[1]
    proto_stamp = re.search(r"Protobuf Python Version: ([0-9.]+)",
                            (V1 / "lb_pb2.py").read_text())[1]
    assert tools == f"=={grpc_stamp}"
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert str(runtime[name].specifier) == f">={grpc_stamp}", name
    assert str(runtime["protobuf"].specifier) == f">={proto_stamp}"
