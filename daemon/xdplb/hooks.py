"""Hooks: commands lbd runs when a backend, a VIP or the host changes state.

Configured in lbd's `[hooks]` table, each an argv list (no shell): the event
goes to the command as JSON on stdin and as XDPLB_* environment variables.
A hook never holds up lbd: commands run as child processes awaited on the
event loop, at most `max_running` at a time, each killed (its whole process
group) after `timeout_s`. The events of one subject (a backend, a VIP, the
host) run in the order they happened, so a "down" hook never overtakes the
"up" that followed it. Past MAX_PENDING waiting runs, new ones are dropped.
Every run is counted by outcome (xdplb_hook_runs_total) and every failure
logged with the command's exit status and the start of its stderr.

The events are what the datapath realises, not what was asked for: a backend
is down once the maps no longer send it new flows (the "realised" event), a
VIP is down once no backend of it is healthy in the ring lbd wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xdplb.events import Event, HostDrainChanged, Realised, VipServing

log = logging.getLogger("xdplb.hooks")
HOOK_NAMES = ("on_backend_up", "on_backend_down", "on_vip_up", "on_vip_down",
              "on_host_drained", "on_host_in_service")
OUTCOMES = ("ok", "failed", "timeout", "error", "dropped")
MAX_PENDING = 1000
STDERR_SHOWN = 300  # bytes of a failed hook's stderr put in the log line
ENV_PASSED = ("PATH", "LANG", "LC_ALL", "TZ")  # from lbd's environment; the rest is XDPLB_*


class HookConfigError(ValueError):
    pass


@dataclass(frozen=True)
class HooksConfig:
    on_backend_up: tuple[str, ...] = ()
    on_backend_down: tuple[str, ...] = ()
    on_vip_up: tuple[str, ...] = ()
    on_vip_down: tuple[str, ...] = ()
    on_host_drained: tuple[str, ...] = ()
    on_host_in_service: tuple[str, ...] = ()
    timeout_s: float = 10.0
    max_running: int = 4

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in HOOK_NAMES)

    def problems(self) -> list[str]:
        """Every refusal, as "hooks.key: reason"."""
        found = []
        for name in HOOK_NAMES:
            argv = getattr(self, name)
            if argv:
                found += [f"hooks.{name}: {p}" for p in _argv_problems(argv)]
        if not 0.1 <= self.timeout_s <= 300:
            found.append(f"hooks.timeout_s: {self.timeout_s} must be 0.1..300 seconds")
        if not 1 <= self.max_running <= 64:
            found.append(f"hooks.max_running: {self.max_running} must be 1..64")
        return found


def _argv_problems(argv: tuple[str, ...]) -> list[str]:
    if not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        return ["must be a list of non-empty strings (the command and its arguments)"]
    command = Path(argv[0])
    if not command.is_absolute():
        return [f"{argv[0]} must be an absolute path (hooks run without a shell or PATH)"]
    if not command.is_file():
        return [f"{argv[0]} does not exist"]
    if not os.access(command, os.X_OK):
        return [f"{argv[0]} is not executable"]
    return []


def hooks_from_table(table: Any) -> HooksConfig:
    """[hooks] as read by config.StrictTable (argv lists become tuples)."""
    values: dict[str, Any] = {}
    for f in fields(HooksConfig):
        default = getattr(HooksConfig, f.name)
        if f.name in HOOK_NAMES:
            argv = table.take(f.name, list, list(default))
            values[f.name] = tuple(argv)
        elif f.name == "timeout_s":
            values[f.name] = float(table.take(f.name, (int, float), default))
        else:
            values[f.name] = table.take(f.name, int, default)
    table.done()
    return HooksConfig(**values)


@dataclass(frozen=True)
class HookRun:
    hook: str
    subject: str  # runs of one subject keep their order
    payload: dict[str, Any]


def hook_run(event: Event) -> HookRun | None:
    """The hook an event calls for, with what the command is told; None: no hook."""
    base = {"time": event.time, "host": socket.gethostname(), "vip": event.vip,
            "backend": event.backend, "message": event.message()}
    if isinstance(event, Realised):
        hook = "on_backend_up" if event.up else "on_backend_down"
        return HookRun(hook, f"backend {event.vip} {event.backend}",
                       {**base, "event": hook.removeprefix("on_"),
                        "ring_positions": event.positions})
    if isinstance(event, VipServing):
        hook = "on_vip_up" if event.up else "on_vip_down"
        return HookRun(hook, f"vip {event.vip}",
                       {**base, "event": hook.removeprefix("on_"),
                        "healthy_backends": event.healthy, "backends": event.backends})
    if isinstance(event, HostDrainChanged):
        hook = "on_host_drained" if event.drained else "on_host_in_service"
        return HookRun(hook, "host", {**base, "event": hook.removeprefix("on_")})
    return None


def environment(run: HookRun) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    for key, value in run.payload.items():
        env[f"XDPLB_{key.upper()}"] = str(value)
    env["XDPLB_HOOK"] = run.hook
    return env


class HookRunner:
    """Runs the configured hooks for lbd's events (Controller.publish hands each over)."""

    def __init__(self, config: HooksConfig, count: Callable[[str, str], None] | None = None):
        self.config = config
        self._count = count or (lambda hook, outcome: None)
        self._slots = asyncio.Semaphore(config.max_running)
        self._last: dict[str, asyncio.Task[None]] = {}  # per subject: its latest run
        self._tasks: set[asyncio.Task[None]] = set()
        self._children: set[asyncio.subprocess.Process] = set()

    def handle(self, event: Event) -> None:
        run = hook_run(event)
        if run is None or not getattr(self.config, run.hook):
            return
        if len(self._tasks) >= MAX_PENDING:
            log.warning("hook %s dropped: %d runs already waiting", run.hook, MAX_PENDING)
            self._count(run.hook, "dropped")
            return
        task = asyncio.get_running_loop().create_task(
            self._after(self._last.get(run.subject), run))
        self._last[run.subject] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t, s=run.subject: self._done(t, s))

    def _done(self, task: asyncio.Task[None], subject: str) -> None:
        self._tasks.discard(task)
        if self._last.get(subject) is task:
            del self._last[subject]

    async def _after(self, previous: asyncio.Task[None] | None, run: HookRun) -> None:
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(previous)
        async with self._slots:
            outcome = await self._run(run)
        self._count(run.hook, outcome)

    async def _run(self, run: HookRun) -> str:
        argv = getattr(self.config, run.hook)
        # stdin is a pipe already holding the event (far less than a pipe's buffer):
        # a command that exits without reading it breaks nothing.
        stdin, feed = os.pipe()
        try:
            os.write(feed, json.dumps(run.payload).encode() + b"\n")
        finally:
            os.close(feed)
        try:
            child = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=environment(run), start_new_session=True)
        except OSError as exc:
            log.warning("hook %s (%s) could not start: %s", run.hook, argv[0], exc)
            return "error"
        finally:
            os.close(stdin)
        self._children.add(child)
        try:
            stderr, _ = await asyncio.wait_for(
                asyncio.gather(_head(child.stderr), child.wait()), self.config.timeout_s)
        except TimeoutError:
            _kill_group(child)
            await child.wait()
            log.warning("hook %s (%s) killed after %g s", run.hook, argv[0],
                        self.config.timeout_s)
            return "timeout"
        finally:
            self._children.discard(child)
        if child.returncode != 0:
            said = stderr[:STDERR_SHOWN].decode(errors="replace").strip().replace("\n", " | ")
            log.warning("hook %s (%s) exited %s: %s", run.hook, argv[0], child.returncode,
                        said or "(nothing on stderr)")
            return "failed"
        return "ok"

    async def close(self) -> None:
        """At lbd's exit: waiting runs are dropped, running commands killed."""
        for task in list(self._tasks):
            task.cancel()
        for child in list(self._children):
            _kill_group(child)
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _head(stream: asyncio.StreamReader | None) -> bytes:
    """The first STDERR_SHOWN bytes of a stream read to its end (the rest discarded)."""
    kept = b""
    while stream is not None and (chunk := await stream.read(65536)):
        kept = (kept + chunk)[:STDERR_SHOWN]
    return kept


def _kill_group(child: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
