"""lbd: the xdplb daemon.

Loads the state file (refusing a bad one), reuses the pinned maps, realises
the state, attaches the balancer (atomically replacing a running one), then
serves the API and keeps the datapath's clock and next hop current. SIGTERM
leaves the datapath forwarding unless --detach-on-exit was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click

from xdplb import __version__, api, metrics, nexthop
from xdplb.config import ConfigError, DaemonConfig, load_config, split_host_port
from xdplb.controller import Controller
from xdplb.datapath import DatapathError, remove_pins
from xdplb.hooks import HookRunner
from xdplb.nexthop import NexthopError
from xdplb.reconciler import ReconcileError
from xdplb.state import Limits
from xdplb.store import StateStore, StoreError, check_state_file

log = logging.getLogger("xdplb.lbd")
STARTUP_ERRORS = (StoreError, DatapathError, NexthopError, api.ApiError, ReconcileError,
                  OSError)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """Control characters as escapes: one event is one log line, whatever it quotes."""
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode(), text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = "".join(f" {k}={v}" for k in ("event", "vip", "backend")
                        if (v := getattr(record, k, "")))
        line = one_line(f"{stamp}Z {record.levelname.lower()} {record.getMessage()}{extra}")
        if record.exc_info:  # a traceback follows its line, indented
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n    {one_line(row)}" for row in trace.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": record.created, "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        for key in ("event", "vip", "backend"):
            if value := getattr(record, key, ""):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET, if any."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


async def _every(seconds: float, action: Callable[[], Awaitable[None]], what: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:
            log.exception("%s failed; retrying in %.0f s", what, seconds)


async def _tick(controller: Controller) -> None:
    controller.tick()


async def _follow_nexthop(controller: Controller) -> None:
    # pyroute2's synchronous API runs its own event loop: keep it off this one.
    controller.use_nexthop(await asyncio.to_thread(controller.find_nexthop))


async def _refresh_bgp(controller: Controller) -> None:
    controller.retry_announce()
    await asyncio.to_thread(controller.bgp_state)


async def serve_until_stopped(controller: Controller) -> None:
    config = controller.config
    registry, controller.metrics = metrics.make_registry(controller.views)
    if config.hooks.any:
        controller.hooks = HookRunner(config.hooks, controller.metrics.observe_hook)
    server = await api.serve(controller)
    metrics_server = None
    if config.metrics_listen:
        host, port = split_host_port(config.metrics_listen, "metrics.listen")
        metrics_server = await metrics.serve_metrics(registry, host, port)
        log.info("metrics on http://%s/metrics", config.metrics_listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    health = controller.start_health()
    capacity = controller.start_capacity()
    fleet = controller.start_fleet() if config.fleet.enabled else None
    if fleet is not None:
        controller.fleet_addresses = await asyncio.to_thread(
            nexthop.interface_addresses, config.interfaces)
        log.info("fleet: host %s follows %s under %s", fleet.host, ", ".join(config.fleet.etcd),
                 config.fleet.prefix)
    tasks = [
        asyncio.create_task(health.run_batches()),
        asyncio.create_task(capacity.run()),
        asyncio.create_task(_every(1.0, lambda: _tick(controller), "clock tick")),
        asyncio.create_task(_every(config.flows.settle_interval_s, controller.settle_flows,
                                   "flow table sweep")),
        asyncio.create_task(_every(config.nexthop.refresh_s,
                                   lambda: _follow_nexthop(controller), "next hop refresh")),
        asyncio.create_task(_every(5.0, lambda: _refresh_bgp(controller), "BGP status")),
    ]
    if fleet is not None:
        tasks.append(asyncio.create_task(fleet.run()))
    log.info("API on unix:%s%s", config.api.socket,
             f" and {config.api.listen}" if config.api.listen else "")
    notify_systemd("READY=1")
    await stopping.wait()
    notify_systemd("STOPPING=1")
    for task in tasks:
        task.cancel()
    await health.close()
    await capacity.close()
    if fleet is not None:
        await fleet.close()
    if controller.hooks is not None:
        await controller.hooks.close()
    if metrics_server is not None:
        metrics_server.close()
    await api.stop(server, config.api.socket)


LOCK_DIR = Path("/run/xdplb")


class InstanceLock:
    """Held while lbd runs; refused() removes the lock file if this start made it."""

    def __init__(self, path: Path, created: bool):
        self.path, self.created = path, created

    def refused(self) -> None:
        if self.created:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def instance_lock(name: str) -> Iterator[InstanceLock]:
    """One lbd per instance name: the maps pinned under that name are its alone."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"{name}.lock"
    created = not path.exists()
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise api.ApiError(f"instance {name!r}: another lbd (pid {holder}) runs it "
                               f"(lock {path})") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield InstanceLock(path, created)


def raise_open_files_limit() -> None:
    """Up to a thousand check sockets may be open at once: the soft limit goes to
    the hard one (the unit file also sets LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def read_persisted(config: DaemonConfig) -> None:
    """Reads the state and host files, refusing a bad one (StoreError) before lbd
    creates anything: no socket, lock file or map is left by such a refusal."""
    store = StateStore(config.state_dir)
    store.load()
    store.load_host_drained()


def run(config: DaemonConfig) -> None:
    # Refusals first, before anything is created: a bad state or host file, another
    # lbd on the socket or on this instance's maps; then maps of another shape
    # (before any is loaded). A start that fails after that removes the maps it
    # made (maps a previous lbd left keep forwarding) and its lock file.
    read_persisted(config)
    api.claim_socket(config.api.socket)
    raise_open_files_limit()
    with instance_lock(config.name) as lock:
        fresh_maps = not config.pin_dir.exists()
        try:
            controller = Controller(config)
        except BaseException:
            if fresh_maps:
                remove_pins(config.pin_dir)
            lock.refused()
            raise
        try:
            controller.start()
        except BaseException:
            controller.abandon(unpin=fresh_maps)
            lock.refused()
            raise
        try:
            asyncio.run(serve_until_stopped(controller))
        finally:
            controller.stop(detach=config.detach_on_exit)


def check_files(config_path: Path | None, state_path: Path | None,
                overrides: dict[str, Any]) -> list[str]:
    """Every problem of the configuration (and of a state file, checked against the
    configuration's map sizes), one line each; nothing on the system is touched."""
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        return exc.problems
    if state_path is None:
        return []
    return [f"state file {state_path}: {p}" for p in check_state_file(
        state_path, Limits.of_map_sizes(config.maps))]


CONFIG_HELP = "TOML configuration file (see docs: the configuration reference)."


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="lbd",
                      message="%(prog)s %(version)s")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help=CONFIG_HELP)
@click.option("--check-config", "check_path", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Only check FILE (a configuration; the command line's options apply "
                   "on top, as at a start) and report every problem; exit 0 if there is "
                   "none, 2 if there is any. Touches nothing.")
@click.option("--state", "state_path", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --check-config: also check this state file (state.json) against "
                   "the configuration's map sizes.")
@click.option("--interface", "-i", "interfaces", multiple=True, metavar="IFNAME",
              help="Interface to attach the balancer to (repeatable; replaces the file's "
                   "interfaces).")
@click.option("--xdp-mode", type=click.Choice(["native", "generic"]), default=None,
              help="native: in the driver (the fast path); generic: in the kernel's stack "
                   "(any interface, slower). Default: native.")
@click.option("--name", default=None, help="Instance name: maps pinned under "
                                           "/sys/fs/bpf/xdplb/NAME. Default: default.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Where state.json (the desired state) and host.json (host drain) live. "
                   "Default: /var/lib/xdplb.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              metavar="PATH", help="API unix socket, mode 0600. Default: /run/xdplb/lbd.sock.")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Also serve the API on TCP (TLS, or --insecure on loopback).")
@click.option("--tls-cert", default=None, metavar="FILE",
              help="Server certificate (PEM) for --listen; needs --tls-key.")
@click.option("--tls-key", default=None, metavar="FILE",
              help="Server private key (PEM) for --listen; needs --tls-cert.")
@click.option("--client-ca", default=None, metavar="FILE",
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--insecure", is_flag=True, default=False,
              help="Plaintext on --listen; loopback addresses only.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="One line per event on stderr, as text or as JSON objects. Default: text.")
@click.option("--detach-on-exit", is_flag=True, default=None,
              help="On SIGTERM detach XDP and unpin the maps (default: keep forwarding).")
def main(config_path: Path | None, check_path: Path | None, state_path: Path | None,
         interfaces: tuple[str, ...], socket_path: str | None, **options: Any) -> None:
    """Run the xdplb daemon: the XDP balancer on the given interfaces, the API
    lbctl talks to, health checks, load feedback, BGP announcements and metrics.

    Exit codes: 0 stopped cleanly (or --check-config found nothing); 1 a start
    refused (state file, maps, another lbd); 2 a bad configuration or usage."""
    overrides = {"interfaces": interfaces, "socket": socket_path, **options}
    if state_path is not None and check_path is None:
        raise click.UsageError("--state goes with --check-config")
    if check_path is not None:
        if config_path is not None:
            raise click.UsageError("--check-config takes the file to check: leave out --config")
        problems = check_files(check_path, state_path, overrides)
        for line in problems:
            click.echo(f"lbd: {line}", err=True)
        if not problems:
            checked = f"{check_path}" + (f" and {state_path}" if state_path else "")
            click.echo(f"{checked}: ok")
        sys.exit(2 if problems else 0)
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(f"lbd: {line}", err=True)
        sys.exit(2)
    setup_logging(config.log_format)
    try:
        run(config)
    except STARTUP_ERRORS as exc:
        log.error("lbd: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
