"""The `xdplb-backend` command: setup, teardown and doctor of a DSR backend host."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from xdplb import __version__
from xdplb.backendhost.doctor import diagnose, plan_from_record
from xdplb.backendhost.plan import BackendPlan, PlanError, read_plan
from xdplb.backendhost.record import RecordError, load_record
from xdplb.backendhost.setup import SetupError, setup, teardown
from xdplb.datapath import DatapathError

PROG_NAME = "xdplb-backend"


def plan_options(command: Any) -> Any:
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="TOML file with the plan (docs/backend-hosts.md); options add to it."),
        click.option("--interface", "interfaces", multiple=True, metavar="IFNAME",
                     help="Where tunnel packets arrive (repeatable)."),
        click.option("--tunnel-address", "tunnel_addresses", multiple=True, metavar="ADDR",
                     help="This host's address the LB hosts encapsulate to (repeatable)."),
        click.option("--vip", "vips", multiple=True, metavar="VIP",
                     help="A VIP served here: 10.0.0.10:80/tcp, [2001:db8::10]:443/tcp, "
                          "or a bare address (repeatable)."),
        click.option("--gue-port", type=click.IntRange(0, 65535), default=None,
                     metavar="PORT", help="UDP port of GUE encapsulation (0: off; 6080)."),
        click.option("--xdp-mode", type=click.Choice(["native", "generic"]), default=None,
                     help="How the decapsulator attaches (native)."),
        click.option("--clamp-mss/--no-clamp-mss", default=None,
                     help="Lower the default routes' advmss so segments fit once "
                          "encapsulated."),
        click.option("--name", default=None, metavar="NAME",
                     help="Instance name: pins and record are per name (default)."),
        click.option("--state-dir", default=None, metavar="DIR",
                     help="Where the record of what setup changed is kept "
                          "(/var/lib/xdplb-backend)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_plan(config_path: Path | None, **overrides: Any) -> BackendPlan:
    return read_plan(config_path, overrides)


def fail(message: str, code: int = 1) -> None:
    for line in message.splitlines():
        click.echo(f"{PROG_NAME}: {line}", err=True)
    sys.exit(code)


@click.group(name=PROG_NAME, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name=PROG_NAME,
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Make this host a DSR backend of xdplb, undo it, or find what is missing.

    Run as root on the backend host."""


@cli.command("setup")
@plan_options
def setup_command(config_path: Path | None, **overrides: Any) -> None:
    """Decapsulator, VIPs on lo, sysctls (and with --clamp-mss, route MSS).

    Idempotent: run it again after a change of the plan. Checks everything it
    can before changing anything; what it changed is recorded for teardown."""
    try:
        plan = load_plan(config_path, **overrides)
        for line in setup(plan):
            click.echo(line)
    except PlanError as exc:
        fail("\n".join(exc.problems), 2)
    except (SetupError, RecordError, DatapathError, OSError) as exc:
        fail(str(exc))


@cli.command("teardown")
@click.option("--name", default="default", show_default=True, metavar="NAME",
              help="The instance setup made.")
@click.option("--state-dir", default="/var/lib/xdplb-backend", show_default=True,
              metavar="DIR", help="Where setup keeps its record.")
def teardown_command(name: str, state_dir: str) -> None:
    """Undo what setup did (by its record); leave everything else alone."""
    plan = BackendPlan(name=name, state_dir=Path(state_dir))
    try:
        for line in teardown(plan):
            click.echo(line)
    except (RecordError, DatapathError, OSError) as exc:
        fail(str(exc))


@cli.command("doctor")
@plan_options
@click.option("--client", "clients", multiple=True, metavar="ADDR",
              help="A client address to check the return path to (route lookup only).")
@click.option("--sample", "sample_s", type=click.FloatRange(0.1, 60), default=1.0,
              show_default=True, metavar="S", help="Seconds to watch the tunnel counters.")
@click.option("--self-test", is_flag=True,
              help="Also run probes through the attached program and the stack.")
@click.option("-o", "--output", "output_format", type=click.Choice(["text", "json"]),
              default="text", show_default=True)
def doctor_command(config_path: Path | None, clients: tuple[str, ...], sample_s: float,
                   self_test: bool, output_format: str, **overrides: Any) -> None:
    """Check every condition a DSR backend needs; print each with the fix.

    Without a plan (no --config, --interface, ...) checks what setup was last
    asked for. Exits 0 when nothing failed, 1 otherwise."""
    try:
        plan = doctor_plan(config_path, overrides)
        by_family = {4 if ":" not in c else 6: c for c in clients}
        checks = diagnose(plan, by_family, sample_s)
        if self_test:
            from xdplb.backendhost.selftest import self_test as run_self_test

            checks += run_self_test(plan)
    except PlanError as exc:
        fail("\n".join(exc.problems), 2)
    except (RecordError, DatapathError, OSError) as exc:
        fail(str(exc))
    if output_format == "json":
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for check in checks:
            click.echo(check.render())
        failed = sum(c.status == "fail" for c in checks)
        click.echo(f"{len(checks)} checks, {failed} failed")
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


def doctor_plan(config_path: Path | None, overrides: dict[str, Any]) -> BackendPlan:
    listed = ("interfaces", "tunnel_addresses", "vips")
    plan = load_plan(config_path, **overrides)
    if config_path is None and not any(overrides.get(k) for k in listed):
        record = load_record(plan.record_path)
        if record is None:
            raise PlanError([f"no plan given and no setup record at {plan.record_path}: give "
                             "--config or --interface/--tunnel-address/--vip"])
        plan = plan_from_record(record, plan)
    plan.validate()
    return plan


def main() -> None:
    """The `xdplb-backend` console script."""
    cli.main(prog_name=PROG_NAME)


if __name__ == "__main__":
    main()
