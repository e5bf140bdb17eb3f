"""Compiling and loading programs with bcc: the only place bcc is imported.

Sources live in the package (xdplb.bpf); compile_program also takes a source
elsewhere (the lab's bench-only programs) with the package's headers on the
include path."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

from xdplb.datapath.errors import DatapathError

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "xdplb"


def bpf_source_dir() -> Path:
    """Where the C sources are: shipped inside the package as xdplb.bpf."""
    return Path(str(importlib.resources.files("xdplb.bpf")))


def bcc_module() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise DatapathError(
            "cannot import bcc: run `make setup` (Debian's python3-bpfcc in a "
            "venv made with --system-site-packages)"
        ) from exc
    return bcc


def ensure_bpffs() -> None:
    if not os.path.ismount(BPFFS):
        raise DatapathError(f"bpffs is not mounted on {BPFFS}: mount -t bpf bpf {BPFFS}")


def _cflags(defines: dict[str, str]) -> list[str]:
    flags = [f"-I{bpf_source_dir()}", "-Wno-unused-function", "-Wno-macro-redefined"]
    return flags + [f"-D{k}={v}" for k, v in defines.items()]


def compile_program(source: str | Path, defines: dict[str, str]) -> Any:
    """A module of bpf/ (a name) or any C file (a path), the package's headers on
    the include path, with `defines` as -D flags."""
    bcc = bcc_module()
    path = source if isinstance(source, Path) else bpf_source_dir() / source
    try:
        return bcc.BPF(src_file=str(path).encode(), cflags=_cflags(defines))
    except Exception as exc:
        raise DatapathError(f"compiling {path} failed: {exc}") from exc


def load_xdp(bpf: Any, function: str) -> Any:
    try:
        return bpf.load_func(function.encode(), bcc_module().BPF.XDP)
    except Exception as exc:
        raise DatapathError(f"loading XDP program {function} failed: {exc}") from exc


def load_sched_cls(bpf: Any, function: str) -> Any:
    try:
        return bpf.load_func(function.encode(), bcc_module().BPF.SCHED_CLS)
    except Exception as exc:
        raise DatapathError(f"loading tc program {function} failed: {exc}") from exc
