"""The code's shape: no import cycle in xdplb, no module past ~600 lines, and
events are typed (nothing reads a message's text to learn what happened)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "xdplb"
MAX_LINES = 620
GENERATED_PACKAGES = ("v1", "etcdv3")  # protoc's output, not written here


def generated(path: Path) -> bool:
    return any(f"/{name}/" in str(path) for name in GENERATED_PACKAGES)


SOURCES = [p for root in ("daemon/xdplb", "lbctl", "lab/xdplb_lab")
           for p in sorted((REPO / root).rglob("*.py")) if not generated(p)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["xdplb", *parts])


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The xdplb modules `path` imports, anywhere in it (functions and TYPE_CHECKING
    blocks included): `from xdplb.a import b` imports xdplb.a.b if that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def test_xdplb_has_no_import_cycle() -> None:
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if not generated(p)}
    graph = {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}
    # A package's __init__ re-exporting its modules is not a cycle with them.
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep, [*path, dep])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])


def test_no_module_is_past_six_hundred_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_datapath_package_is_the_only_bcc_user() -> None:
    users = [str(p.relative_to(REPO)) for p in SOURCES
             if re.search(r"^\s*(import bcc|from bcc)", p.read_text(), re.M)]
    assert users == ["daemon/xdplb/datapath/loader.py"]


def test_nothing_reads_event_text() -> None:
    """Events are objects with fields; nobody searches or splits their message."""
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"message(\(\))?\.(split|startswith|partition)\(", text), path
        assert not re.search(r"[\"'] in (event\.|line\b|message\b)", text), path
