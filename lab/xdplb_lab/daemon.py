"""Running the real lbd and lbctl in a lab: for the tests and the demo.

lbd runs in the lab's lb namespace on eth1, named after the lab's run id,
so its pinned maps go with the lab (Lab.close, or remove_stale after a
crash). lbctl runs as the operator would: the installed console script,
talking to lbd's socket.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xdplb.datapath import PIN_ROOT, MapSizes, PinnedMaps
from xdplb_lab.lab import LbLab

READY_TIMEOUT_S = 60.0  # compiling the balancer with bcc takes a few seconds


class LbdError(RuntimeError):
    """lbd did not come up; the message carries the end of its log."""


def console_script(name: str) -> str:
    """The console script installed next to this interpreter (the venv's)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise LbdError(f"{path} is missing: run `make setup`")
    return str(path)


class LabLbd:
    """One lbd in a lab's lb namespace, with its own state dir, socket and log."""

    def __init__(self, topo: LbLab, workdir: Path, extra_args: Sequence[str] = (),
                 sizes: MapSizes | None = None, config_extra: str = ""):
        self.topo = topo
        self.workdir = workdir
        self.name = topo.lab.runid
        self.socket = workdir / "lbd.sock"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "lbd.log"
        self.extra_args = list(extra_args)
        self.sizes = sizes or MapSizes()
        self.config_extra = config_extra  # TOML put before [maps] in the config lbd is given
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def config_path(self) -> Path:
        return self.workdir / "lbd.toml"

    @property
    def pin_dir(self) -> Path:
        return PIN_ROOT / self.name

    def write_config(self) -> None:
        s = self.sizes
        self.config_path.write_text(
            "# written by xdplb_lab.daemon for one lab run\n"
            f"{self.config_extra}\n[maps]\n"
            f"max_vips = {s.max_vips}\nmax_backends = {s.max_backends}\n"
            f"ring_entries = {s.ring_entries}\nconn_entries = {s.conn_entries}\n")

    def maps(self) -> PinnedMaps:
        """lbd's pinned maps, opened read-only-by-convention for inspection."""
        return PinnedMaps(self.pin_dir, self.sizes)

    def argv(self) -> list[str]:
        return [console_script("lbd"), "--config", str(self.config_path),
                "--interface", self.topo.lb_iface.name,
                "--name", self.name, "--state-dir", str(self.state_dir),
                "--socket", str(self.socket), *self.extra_args]

    def start(self, wait: bool = True) -> subprocess.Popen[Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = self.log_path.open("a")
        # share_mounts: lbd must pin in the host's bpffs, where a restarted lbd looks.
        self.proc = self.topo.lb.popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                       share_mounts=True)
        log.close()
        if wait:
            self.wait_ready()
        return self.proc

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until lbd answers on its socket, or has exited (with its log in the error)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LbdError(f"lbd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.lbctl("status", "-o", "json").returncode == 0:
                return
            time.sleep(0.2)
        raise LbdError(f"lbd not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Signals lbd and waits for it; returns its exit status."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def lbctl(self, *args: str, user: int | None = None, timeout: float = 30.0,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Runs lbctl against this lbd; as another uid when `user` is given."""
        argv = [console_script("lbctl"), "--socket", str(self.socket), *args]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
