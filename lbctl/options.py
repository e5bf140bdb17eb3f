"""What lbctl's commands share: one-line errors, the argument types (checked before
any call, as lbd would check them), the option groups, and the requests built from
them (only what was given is set)."""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import click
from click.exceptions import NoArgsIsHelpError
from click.shell_completion import CompletionItem

from lbctl import output
from lbctl.client import (
    EndpointError,
    LbdClient,
    LbdError,
    choose_endpoint,
)
from xdplb import maglev, state
from xdplb.state import StateError, VipKey
from xdplb.v1 import lb_pb2

PROG_NAME = "lbctl"
COMPLETION_TIMEOUT_S = 1.0  # a tab press must not hang on a daemon that is away

# --- errors: one line each ------------------------------------------------------------


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line, like lbd's refusals, not click's usage block."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{PROG_NAME}: {self.format_message()}", file=file, err=True)


class DaemonError(click.ClickException):
    """lbd refused the request or could not be reached (exit 1)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{PROG_NAME}: {self.format_message()}", file=file, err=True)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:
        raise  # a bare `lbctl vip` prints the help, as click does
    except OneLineUsageError:
        raise
    except click.UsageError as error:
        raise OneLineUsageError(error.format_message()) from error
    except LbdError as error:
        raise DaemonError(str(error)) from None


class LbctlGroup(click.Group):
    """The top-level group. Every subcommand is parsed and run inside it, so
    this is the one place where errors get their one-line form."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


# --- argument types ------------------------------------------------------------------


class VipType(click.ParamType):
    """ADDRESS[:PORT]/PROTOCOL, parsed as lbd parses it, into a VipKey."""

    name = "VIP"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> VipKey:
        if isinstance(value, VipKey):
            return value
        try:
            return VipKey.parse(value)
        except StateError as error:
            raise OneLineUsageError(str(error), ctx) from None

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(vip) for vip in _vips_for_completion(ctx)
                if vip.startswith(incomplete)]


class AddressType(click.ParamType):
    """A backend's IP address, in canonical form."""

    name = "ADDRESS"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            return state.canonical_address(value, "backend address")
        except StateError as error:
            raise OneLineUsageError(str(error), ctx) from None


class StatusCodesType(click.ParamType):
    """A comma-separated list of HTTP status codes: `200` or `200,204,301`."""

    name = "CODES"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        codes = [code.strip() for code in str(value).split(",")]
        for code in codes:
            if not (code.isdigit() and 100 <= int(code) <= 599):
                self.fail(f"{code!r} is not an HTTP status code 100..599", param, ctx)
        return tuple(int(code) for code in codes)


class RingSizeType(click.ParamType):
    """A Maglev ring size: a prime in 3..maglev.MAX_SIZE (a range error: exit 2)."""

    name = "PRIME"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        size = click.IntRange(3, maglev.MAX_SIZE).convert(value, param, ctx)
        if not maglev.is_prime(size):
            lower = next(n for n in range(size - 1, 1, -1) if maglev.is_prime(n))
            upper = next(n for n in range(size + 1, 2 * size) if maglev.is_prime(n))
            self.fail(f"{size} is not a prime (nearest primes: {lower}, {upper})", param, ctx)
        return size


VIP = VipType()
ADDRESS = AddressType()
# The ranges state.HealthCheck.validate enforces: lbd checks again, but here a
# bad value is a usage error before any call.
WEIGHT = click.IntRange(0, state.MAX_WEIGHT)
SERVER_ID = click.IntRange(1, 0xFFFF)
CHECK_PORT = click.IntRange(0, 65535)
CHECK_INTERVAL_MS = click.IntRange(100, 3_600_000)
CHECK_TIMEOUT_MS = click.IntRange(10, 3_600_000)
RISE_FALL = click.IntRange(1, 100)


# --- options shared by several commands --------------------------------------------------


def _apply_options(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


# Their destinations are "check_" + the HealthCheck field, which take_check_options relies on.
check_options = _apply_options([
    click.option("--check", "check_kind", type=click.Choice(state.CHECK_KINDS),
                 help="Health check kind."),
    click.option("--check-port", "check_port", type=CHECK_PORT, metavar="PORT",
                 help="Port to probe (0: the VIP's port)."),
    click.option("--check-path", "check_path", metavar="PATH", help="HTTP(S) path, e.g. /healthz."),
    click.option("--check-host", "check_host", metavar="HOST",
                 help="HTTP Host header (default: the backend address)."),
    click.option("--check-status", "check_expect_status", type=StatusCodesType(),
                 help="Expected HTTP status codes, e.g. 200,204."),
    click.option("--check-body", "check_body", metavar="TEXT",
                 help="Text the HTTP body must contain."),
    click.option("--check-grpc-service", "check_grpc_service", metavar="NAME",
                 help="Service name asked of grpc.health.v1."),
    click.option("--check-interval", "check_interval_ms", type=CHECK_INTERVAL_MS, metavar="MS",
                 help="Milliseconds between probes."),
    click.option("--check-timeout", "check_timeout_ms", type=CHECK_TIMEOUT_MS, metavar="MS",
                 help="Milliseconds a probe may take."),
    click.option("--rise", "check_rise", type=RISE_FALL, metavar="N",
                 help="Successes in a row that make a backend healthy."),
    click.option("--fall", "check_fall", type=RISE_FALL, metavar="N",
                 help="Failures in a row that make a backend unhealthy."),
    click.option("--check-via", "check_via", type=click.Choice(state.CHECK_VIAS),
                 help="Probe the backend's own address (backend), or connect to the VIP "
                      "through the tunnel to this backend (vip: tcp, http, https)."),
])

# Their destinations are "capacity_" + the Capacity field (take_capacity_options).
capacity_options = _apply_options([
    click.option("--capacity", "capacity_source", type=click.Choice(state.LOAD_SOURCES),
                 help="Load feedback: none, prometheus (lbd polls each backend), push "
                      "(lbctl backend report)."),
    click.option("--capacity-metric", "capacity_metric", metavar="NAME",
                 help="Prometheus metric carrying a backend's load."),
    click.option("--capacity-labels", "capacity_labels", metavar='NAME="VALUE",...',
                 help="Only samples with these labels."),
    click.option("--capacity-port", "capacity_port", type=click.IntRange(1, 65535),
                 metavar="PORT", help="The backends' metrics port."),
    click.option("--capacity-path", "capacity_path", metavar="PATH",
                 help="The backends' metrics path (default /metrics)."),
    click.option("--capacity-target", "capacity_target",
                 type=click.FloatRange(0, min_open=True), metavar="LOAD",
                 help="The load a backend should carry at its configured weight."),
    click.option("--capacity-interval", "capacity_interval_ms",
                 type=click.IntRange(100, 3_600_000), metavar="MS", help="Polling interval."),
    click.option("--capacity-timeout", "capacity_timeout_ms", type=click.IntRange(10, 3_600_000),
                 metavar="MS", help="Polling timeout."),
    click.option("--smoothing", "capacity_smoothing", type=click.FloatRange(0, 1, min_open=True),
                 metavar="ALPHA", help="EWMA weight of each load sample."),
    click.option("--min-factor", "capacity_min_factor",
                 type=click.FloatRange(0, 1, min_open=True), metavar="F",
                 help="Lowest capacity factor (weight multiplier)."),
    click.option("--max-factor", "capacity_max_factor", type=click.FloatRange(1, 10),
                 metavar="F", help="Highest capacity factor."),
    click.option("--hysteresis", "capacity_hysteresis", type=click.FloatRange(0, 0.9),
                 metavar="FRACTION", help="Factor changes smaller than this are ignored."),
    click.option("--churn-budget", "capacity_churn_budget",
                 type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION",
                 help="Ring fraction adaptation may rewrite per window."),
    click.option("--churn-window", "capacity_churn_window_s", type=click.FloatRange(1, 3600),
                 metavar="S", help="The churn budget's window."),
    click.option("--stale-after", "capacity_stale_after_ms",
                 type=click.IntRange(100, 86_400_000), metavar="MS",
                 help="Older load samples fall back to the configured weight."),
])

vip_spec_options = _apply_options([
    click.option("--hash", type=click.Choice(state.HASH_MODES),
                 help="Flow hash: the 5-tuple, or the source address only."),
    click.option("--encap", type=click.Choice(state.ENCAPSULATIONS),
                 help="Encapsulation to the backends."),
    click.option("--ring-size", type=RingSizeType(), metavar="PRIME",
                 help=f"Maglev ring size, a prime (lbd's default: {maglev.DEFAULT_SIZE})."),
    check_options,
    click.option("--panic-threshold", type=click.FloatRange(0.0, 1.0), metavar="FRACTION",
                 help="Below this healthy fraction use every backend (0: off)."),
    click.option("--when-none-healthy", type=click.Choice(state.WHEN_NONE_HEALTHY),
                 help="With no healthy backend: drop, or use all of them."),
    capacity_options,
    click.option("--slow-start", "slow_start_s", type=click.FloatRange(0, 3600), metavar="S",
                 help="New or recovered backends ramp up to their weight over S seconds."),
    click.option("--quic/--no-quic", "quic_enabled", default=None,
                 help="A UDP VIP carrying QUIC: packets go to the backend whose server ID "
                      "their connection ID carries (QUIC-LB), whatever the client's address."),
    click.option("--quic-server-id-len", "quic_server_id_len", type=click.IntRange(1, 8),
                 metavar="N", help="Octets of a QUIC-LB server ID (lbd's default: 2)."),
    click.option("--quic-rotation", "quic_rotation", type=click.IntRange(0, 6), metavar="N",
                 help="The QUIC-LB configuration's rotation codepoint (lbd's default: 0)."),
    click.option("--health-scope", type=click.Choice(state.HEALTH_SCOPES),
                 help="Whose checks take a backend out: this host's (host, the default), or "
                      "a quorum of the fleet's LB hosts (fleet; needs lbd with [fleet])."),
    click.option("--health-quorum", type=click.IntRange(0, state.MAX_HEALTH_QUORUM),
                 metavar="N", help="With --health-scope fleet: LB hosts that must see a "
                                   "backend down (0: a majority of those checking it)."),
])

output_option = click.option(
    "-o", "--output", "output_format", type=click.Choice(output.FORMATS), default="table",
    show_default=True, help="Output format (JSON shapes: see lbctl/output.py).")

vip_argument = click.argument("vip_key", metavar="VIP", type=VIP)
address_argument = click.argument("address", type=ADDRESS)


# --- building requests: only what was given is set ---------------------------------------


def given_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the user gave: click leaves an absent option None."""
    return {name: value for name, value in settings.items() if value is not None}


def take_check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove the check options from a command's options; return them by HealthCheck field."""
    names = [name for name in options if name.startswith("check_")]
    return {name.removeprefix("check_"): options.pop(name) for name in names}


def take_capacity_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove the capacity options from a command's options; return them by Capacity field."""
    names = [name for name in options if name.startswith("capacity_")]
    return {name.removeprefix("capacity_"): options.pop(name) for name in names}


def take_quic_options(options: dict[str, Any], vip: VipKey) -> dict[str, Any]:
    """Remove the QUIC options; return the request fields they make (quic, clear_quic)."""
    enabled = options.pop("quic_enabled")
    given = given_settings({"server_id_len": options.pop("quic_server_id_len"),
                            "rotation": options.pop("quic_rotation")})
    if enabled is False:
        if given:
            raise OneLineUsageError("--no-quic cannot be combined with --quic-* options")
        return {"clear_quic": True}
    if not enabled and not given:
        return {}
    if vip.protocol != "udp":
        raise OneLineUsageError(f"{vip}: QUIC runs over UDP, a {vip.protocol} VIP cannot be "
                                "a QUIC VIP")
    return {"quic": lb_pb2.QuicConfig(**given)}


def build_capacity(**settings: Any) -> lb_pb2.Capacity | None:
    given = given_settings(settings)
    return lb_pb2.Capacity(**given) if given else None


def build_check(**settings: Any) -> lb_pb2.HealthCheck | None:
    """A HealthCheck with only the given settings (HealthCheck fields), or None if none was."""
    given = given_settings(settings)
    return lb_pb2.HealthCheck(**given) if given else None


def build_add_vip(vip: VipKey, check: lb_pb2.HealthCheck | None = None,
                  **settings: Any) -> lb_pb2.AddVipRequest:
    """`settings` are Vip fields (hash, encap, ring_size, ...); None means not given."""
    spec = lb_pb2.Vip(vip=str(vip), **given_settings({**settings, "check": check}))
    return lb_pb2.AddVipRequest(vip=spec)


def build_set_vip(vip: VipKey, check: lb_pb2.HealthCheck | None = None,
                  **settings: Any) -> lb_pb2.SetVipRequest:
    return lb_pb2.SetVipRequest(vip=str(vip), **given_settings({**settings, "check": check}))


def build_add_backend(vip: VipKey, address: str, check: lb_pb2.HealthCheck | None = None,
                      **settings: Any) -> lb_pb2.AddBackendRequest:
    """`settings` are Backend fields (weight, drained); None means not given."""
    backend = lb_pb2.Backend(address=address, **given_settings({**settings, "check": check}))
    return lb_pb2.AddBackendRequest(vip=str(vip), backend=backend)


def build_set_backend(vip: VipKey, address: str, check: lb_pb2.HealthCheck | None = None,
                      clear_check: bool = False, **settings: Any) -> lb_pb2.SetBackendRequest:
    return lb_pb2.SetBackendRequest(vip=str(vip), address=address, clear_check=clear_check,
                                    **given_settings({**settings, "check": check}))


def read_document(path: str) -> str:
    """The desired-state file as JSON text: TOML if it ends in .toml, else JSON; - is stdin."""
    name = "<stdin>" if path == "-" else path
    kind = "TOML" if path.lower().endswith(".toml") else "JSON"
    try:
        raw = sys.stdin.buffer.read() if path == "-" else _read_bytes(path)
        data = tomllib.loads(raw.decode()) if kind == "TOML" else json.loads(raw)
        # TOML dates have no JSON form: as strings lbd refuses them by name.
        return json.dumps(data, default=str)
    except OSError as error:
        raise OneLineUsageError(f"cannot read {name}: {error.strerror}") from None
    except RecursionError:
        raise OneLineUsageError(f"{name}: not valid {kind}: nested too deeply") from None
    except ValueError as error:  # also UnicodeDecodeError, and integers of 4300+ digits
        raise OneLineUsageError(f"{name}: not valid {kind}: {error}") from None


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _vips_for_completion(ctx: click.Context) -> list[str]:
    """lbd's VIPs, or none when lbd cannot tell: completion never reports an error."""
    connection = {k: v for k, v in ctx.find_root().params.items() if k != "timeout"}
    try:
        client = LbdClient(choose_endpoint(**connection), COMPLETION_TIMEOUT_S)
        try:
            response = client.call("ListVips", lb_pb2.ListVipsRequest())
        finally:
            client.close()
    except (EndpointError, LbdError):
        return []
    return [vip.vip for vip in response.vips]
