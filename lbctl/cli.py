"""lbctl: the command line of lbd, the xdplb load balancer daemon.

    lbctl vip add 10.0.0.10:80/tcp --hash source
    lbctl backend add 10.0.0.10:80/tcp 10.1.0.1 --weight 200
    lbctl vip list
    lbctl apply -f lb.toml --dry-run

Arguments are checked here before any call, so a malformed VIP, address or
value is a usage error; whether the change is allowed is lbd's decision.

Exit codes: 0 success; 1 lbd refused the request or could not be reached
(one line on stderr: "lbctl: ..."); 2 usage error (also one line).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import click
from click.core import ParameterSource
from click.shell_completion import get_completion_class

from lbctl import output
from lbctl.client import (
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT_S,
    EndpointError,
    LbdClient,
    choose_endpoint,
)
from lbctl.fleet import fleet
from lbctl.options import (
    ADDRESS,
    PROG_NAME,
    SERVER_ID,
    VIP,
    WEIGHT,
    LbctlGroup,
    OneLineUsageError,
    address_argument,
    build_add_backend,
    build_add_vip,
    build_capacity,
    build_check,
    build_set_backend,
    build_set_vip,
    check_options,
    given_settings,
    output_option,
    read_document,
    take_capacity_options,
    take_check_options,
    take_quic_options,
    vip_argument,
    vip_spec_options,
)
from xdplb import __version__, state
from xdplb.state import VipKey
from xdplb.v1 import lb_pb2

SHELLS = ("bash", "zsh", "fish")




# --- the command tree ----------------------------------------------------------------


@click.group(name=PROG_NAME, cls=LbctlGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name=PROG_NAME,
                      message="%(prog)s %(version)s")
@click.option("--socket", "socket_path", metavar="PATH", default=DEFAULT_SOCKET,
              envvar="LBCTL_SOCKET", show_default=True, show_envvar=True,
              help="lbd's unix socket.")
@click.option("--address", metavar="HOST:PORT",
              help="Reach lbd over TCP with TLS instead of the socket.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="CA certificates (PEM) that sign lbd's certificate (default: the system's).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Client certificate (PEM) for mutual TLS; needs --key.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Client private key (PEM) for mutual TLS; needs --cert.")
@click.option("--insecure", is_flag=True,
              help="Plaintext TCP; only with a loopback --address.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_TIMEOUT_S, show_default=True, metavar="SECONDS",
              help="Deadline of each call to lbd.")
@click.pass_context
def cli(ctx: click.Context, timeout: float, **connection: Any) -> None:
    """Control lbd, the xdplb XDP load balancer daemon."""
    socket_given = ctx.get_parameter_source("socket_path") == ParameterSource.COMMANDLINE
    try:
        endpoint = choose_endpoint(socket_given=socket_given, **connection)
    except EndpointError as error:
        raise OneLineUsageError(str(error), ctx) from None
    if ctx.obj is None:  # tests hand in a stand-in client as obj
        client = LbdClient(endpoint, timeout)
        ctx.call_on_close(client.close)
        ctx.obj = client


def _print_changes(response: lb_pb2.ChangeResponse, dry_run: bool = False) -> None:
    """The change lines on stdout, and only them, so nothing to change prints nothing there."""
    for line in response.changes:
        click.echo(line)
    if not response.changes:
        click.echo("no change", err=True)
    if dry_run:
        click.echo("(dry run: nothing was changed)", err=True)


def _require_some(command: str, settings: Mapping[str, Any]) -> None:
    if not given_settings(settings):
        raise OneLineUsageError(f"{command}: nothing to set (see {PROG_NAME} {command} --help)")


@cli.group()
def vip() -> None:
    """Virtual services: what clients connect to."""


@vip.command("add")
@vip_argument
@vip_spec_options
@click.pass_obj
def vip_add(client: LbdClient, vip_key: VipKey, **options: Any) -> None:
    """Add a VIP.

    VIP is ADDRESS[:PORT]/PROTOCOL: 10.0.0.10:80/tcp, [2001:db8::10]:443/udp,
    or 10.0.0.10/tcp for every port. Options left out take lbd's defaults."""
    check = build_check(**take_check_options(options))
    options["capacity"] = build_capacity(**take_capacity_options(options))
    quic = take_quic_options(options, vip_key)
    options["quic"] = quic.get("quic")
    _print_changes(client.call("AddVip", build_add_vip(vip_key, check, **options)))


@vip.command("set")
@vip_argument
@vip_spec_options
@click.pass_obj
def vip_set(client: LbdClient, vip_key: VipKey, **options: Any) -> None:
    """Change a VIP's settings; the rest stay as they are."""
    check = build_check(**take_check_options(options))
    options["capacity"] = build_capacity(**take_capacity_options(options))
    options.update(take_quic_options(options, vip_key))
    _require_some("vip set", {**options, "check": check})
    _print_changes(client.call("SetVip", build_set_vip(vip_key, check, **options)))


@vip.command("del")
@vip_argument
@click.pass_obj
def vip_del(client: LbdClient, vip_key: VipKey) -> None:
    """Remove a VIP and its backends."""
    _print_changes(client.call("DeleteVip", lb_pb2.VipRef(vip=str(vip_key))))


@vip.command("list")
@output_option
@click.pass_obj
def vip_list(client: LbdClient, output_format: str) -> None:
    """Every VIP with its backends and their state."""
    response = client.call("ListVips", lb_pb2.ListVipsRequest())
    click.echo(output.render_vip_list(response, output_format), nl=False)


@vip.command("show")
@vip_argument
@output_option
@click.pass_obj
def vip_show(client: LbdClient, vip_key: VipKey, output_format: str) -> None:
    """One VIP in full: settings, checks, backends, status."""
    response = client.call("GetVip", lb_pb2.VipRef(vip=str(vip_key)))
    click.echo(output.render_vip(response, output_format), nl=False)


@cli.group()
def backend() -> None:
    """The real servers behind a VIP."""


@backend.command("add")
@vip_argument
@address_argument
@click.option("--weight", type=WEIGHT, metavar="N",
              help=f"Share of new flows (lbd's default: {state.DEFAULT_WEIGHT}; 0: none).")
@click.option("--drain", "drained", is_flag=True, default=None,
              help="Add it drained: no new flows.")
@check_options
@click.option("--server-id", type=SERVER_ID, metavar="N",
              help="A QUIC VIP's backend: its QUIC-LB server ID (lbd's default: the "
                   "smallest free one).")
@click.pass_obj
def backend_add(client: LbdClient, vip_key: VipKey, address: str, **options: Any) -> None:
    """Add backend ADDRESS to VIP.

    Without check options the backend uses the VIP's check."""
    check = build_check(**take_check_options(options))
    request = build_add_backend(vip_key, address, check, **options)
    _print_changes(client.call("AddBackend", request))


@backend.command("set")
@vip_argument
@address_argument
@click.option("--weight", type=WEIGHT, metavar="N", help="Share of new flows (0: none).")
@click.option("--drain/--undrain", "drained", default=None,
              help="Stop or resume new flows; established flows stay.")
@check_options
@click.option("--vip-check", "clear_check", is_flag=True,
              help="Drop the backend's own check: use the VIP's again.")
@click.option("--server-id", type=SERVER_ID, metavar="N",
              help="A QUIC VIP's backend: a new server ID (needs --force-server-id).")
@click.option("--force-server-id", is_flag=True, default=None,
              help="Change the server ID although clients hold connection IDs with the "
                   "old one (their connections leave this backend).")
@click.pass_obj
def backend_set(client: LbdClient, vip_key: VipKey, address: str, clear_check: bool,
                **options: Any) -> None:
    """Change a backend's settings; the rest stay as they are."""
    if options["force_server_id"] and options["server_id"] is None:
        raise OneLineUsageError("--force-server-id goes with --server-id")
    check = build_check(**take_check_options(options))
    if clear_check and check is not None:
        raise OneLineUsageError("--vip-check drops the backend's own check: "
                                "it cannot be combined with check options")
    # clear_check False is no request to change anything, unlike drained False (--undrain).
    _require_some("backend set", {**options, "check": check, "clear_check": clear_check or None})
    request = build_set_backend(vip_key, address, check, clear_check, **options)
    _print_changes(client.call("SetBackend", request))


@backend.command("del")
@vip_argument
@address_argument
@click.pass_obj
def backend_del(client: LbdClient, vip_key: VipKey, address: str) -> None:
    """Remove backend ADDRESS from VIP."""
    ref = lb_pb2.BackendRef(vip=str(vip_key), address=address)
    _print_changes(client.call("DeleteBackend", ref))


@backend.command("drain")
@vip_argument
@address_argument
@click.option("--wait", is_flag=True, help="Wait until no flow of it is active any more.")
@click.option("--timeout", "deadline_s", type=click.FloatRange(min=1, max=86400),
              default=600.0, show_default=True, metavar="S", help="Give up waiting after S.")
@click.option("--active-within", "active_within_s", type=click.FloatRange(min=1, max=86400),
              default=60.0, show_default=True, metavar="S",
              help="A flow that sent a packet within S seconds counts as active.")
@click.pass_obj
def backend_drain(client: LbdClient, vip_key: VipKey, address: str, wait: bool,
                  deadline_s: float, active_within_s: float) -> None:
    """Stop new flows to ADDRESS (weight kept for undrain); established flows stay.

    With --wait, prints progress until none of its flows is active, so a deploy
    tool can take the backend away; exits 1 if --timeout passes first."""
    request = lb_pb2.SetBackendRequest(vip=str(vip_key), address=address, drained=True)
    _print_changes(client.call("SetBackend", request))
    if not wait:
        return
    started = time.monotonic()
    count_request = lb_pb2.CountFlowsRequest(vip=str(vip_key), address=address,
                                             active_within_s=active_within_s)
    while True:
        count = client.call("CountFlows", count_request)
        waited = time.monotonic() - started
        click.echo(f"{waited:5.0f}s  {count.flows} flows in the connection table, "
                   f"{count.active} active within {active_within_s:g} s")
        if count.active == 0:
            click.echo(f"{address} is idle")
            return
        if waited >= deadline_s:
            click.echo(f"lbctl: {address} still has {count.active} active flows after "
                       f"{deadline_s:g} s", err=True)
            sys.exit(1)
        time.sleep(min(1.0, max(0.0, deadline_s - waited)))


@backend.command("report")
@click.argument("address", type=ADDRESS)
@click.argument("value", type=click.FloatRange(0))
@click.option("--vip", "vip_key", type=VIP, help="Only this VIP (default: every VIP whose "
              "capacity source is push and that has the backend).")
@click.pass_obj
def backend_report(client: LbdClient, address: str, value: float,
                   vip_key: VipKey | None) -> None:
    """Report a backend's current LOAD (for VIPs with --capacity push)."""
    request = lb_pb2.ReportLoadRequest(address=address, value=value,
                                       vip="" if vip_key is None else str(vip_key))
    response = client.call("ReportLoad", request)
    click.echo(f"load {value:g} of {address} applied to {response.accepted} VIP backend(s)")


@backend.command("list")
@vip_argument
@output_option
@click.pass_obj
def backend_list(client: LbdClient, vip_key: VipKey, output_format: str) -> None:
    """The backends of VIP and their state.

    CHECK "-" means the backend uses the VIP's check."""
    response = client.call("GetVip", lb_pb2.VipRef(vip=str(vip_key)))
    click.echo(output.render_backend_list(response, output_format), nl=False)


@cli.command()
@click.argument("vip_key", metavar="[VIP]", type=VIP, required=False)
@click.option("--rate", is_flag=True,
              help="Packets/s and bytes/s over --interval, instead of totals.")
@click.option("--interval", type=click.FloatRange(min=0.1, max=3600), default=1.0,
              show_default=True, metavar="S", help="Seconds between the two readings.")
@click.option("--watch", is_flag=True, help="Refresh in place every --interval (implies --rate).")
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="With --watch: stop after N refreshes.")
@output_option
@click.pass_obj
def stats(client: LbdClient, vip_key: VipKey | None, rate: bool, interval: float, watch: bool,
          count: int | None, output_format: str) -> None:
    """Traffic per VIP and backend, and datapath counters.

    With --rate, like `ipvsadm --rate`: the rates over one interval."""
    request = lb_pb2.StatsRequest(vip="" if vip_key is None else str(vip_key))
    if not (rate or watch):
        click.echo(output.render_stats(client.call("GetStats", request), output_format),
                   nl=False)
        return
    before, taken = client.call("GetStats", request), time.monotonic()
    refreshes = 0
    while True:
        time.sleep(interval)
        after, now = client.call("GetStats", request), time.monotonic()
        text = output.render_rates(before, after, now - taken, output_format)
        click.echo(("\x1b[H\x1b[2J" if watch and output_format == "table" else "") + text,
                   nl=False)
        refreshes += 1
        if not watch or (count is not None and refreshes >= count):
            return
        before, taken = after, now


@cli.command()
@click.argument("vip_key", metavar="[VIP]", type=VIP, required=False)
@click.option("--backend", "address", type=ADDRESS, metavar="ADDRESS",
              help="Only the flows on this backend (of VIP, or of any VIP).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
              metavar="N", help="Stop after N flows.")
@click.option("--from-set", type=click.IntRange(min=0), default=0, metavar="N",
              help="Start at set N of the table (what a listing that stopped says).")
@output_option
@click.pass_obj
def flows(client: LbdClient, vip_key: VipKey | None, address: str | None, limit: int,
          from_set: int, output_format: str) -> None:
    """Entries of the connection table: client, VIP, backend, seconds idle.

    Read a page at a time (each bounded in time, no set locked) until --limit
    flows or the end of the table; the last line says how much was read and,
    if it stopped early, where to go on."""
    pages = []
    while True:
        page = client.call("ListFlows", lb_pb2.ListFlowsRequest(
            vip="" if vip_key is None else str(vip_key), backend=address or "",
            limit=limit - sum(len(p.flows) for p in pages), from_set=from_set))
        pages.append(page)
        from_set = page.next_set
        if page.limit_reached or page.next_set >= page.total_sets:
            break
    click.echo(output.render_flows(pages, output_format), nl=False)


@cli.command("drain-host")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, max=86400), default=0.0,
              metavar="S", help="Wait up to S seconds for new flows to stop (0: don't wait).")
@click.option("--quiet", "quiet_s", type=click.FloatRange(min=0.5, max=3600), default=5.0,
              show_default=True, metavar="S",
              help="Seconds without a new flow that count as drained.")
@click.option("--undo", is_flag=True, help="Announce the VIPs again.")
@click.pass_obj
def drain_host(client: LbdClient, wait_s: float, quiet_s: float, undo: bool) -> None:
    """Maintenance: withdraw every VIP from BGP so routers send flows elsewhere.

    Established flows keep being forwarded. With --wait, returns once no new
    flow arrived for --quiet seconds; exits 1 if the wait ran out first."""
    request = lb_pb2.DrainHostRequest(undo=undo, wait_s=wait_s, quiet_s=quiet_s)
    timeout = max(client.timeout, wait_s + 10)
    response = client.call("DrainHost", request, timeout=timeout)
    click.echo(response.message)
    if wait_s and not undo and not response.drained:
        sys.exit(1)


@cli.command()
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@output_option
@click.pass_obj
def compare(client: LbdClient, hosts: tuple[str, ...], output_format: str) -> None:
    """Compare the ring fingerprints of several LB hosts' lbd.

    HOST is a socket path (/run/xdplb/lbd.sock) or HOST:PORT (TLS with the
    global --ca/--cert/--key). Exits 1 and names the hosts whose rings differ."""
    rings: dict[str, dict[str, str]] = {}
    for host in hosts:
        peer = client.for_endpoint(host)
        try:
            status = peer.call("GetStatus", lb_pb2.StatusRequest())
        finally:
            peer.close()
        rings[host] = {v.vip: v.status.ring_fingerprint for v in status.vip_status}
    text, differing = output.render_fingerprints(rings, output_format)
    click.echo(text, nl=False)
    if differing:
        click.echo(f"lbctl: rings differ on {', '.join(differing)}", err=True)
        sys.exit(1)


@cli.command()
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="Stop after N events.")
@output_option
@click.pass_obj
def events(client: LbdClient, count: int | None, output_format: str) -> None:
    """Follow lbd's events: API changes, reconciles (ring positions moved),
    health transitions, next-hop changes. One line each (-o json: one JSON
    object per line)."""
    for seen, event in enumerate(client.stream("Watch", lb_pb2.WatchRequest()), start=1):
        click.echo(output.render_event(event, output_format))
        if count is not None and seen >= count:
            return


@cli.command()
@output_option
@click.pass_obj
def status(client: LbdClient, output_format: str) -> None:
    """lbd itself: interfaces, next hop, capacity, VIP modes."""
    response = client.call("GetStatus", lb_pb2.StatusRequest())
    click.echo(output.render_status(response, output_format), nl=False)


@cli.command()
@click.option("-f", "--file", "path", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Desired state: TOML if it ends in .toml, else JSON; - reads JSON from stdin.")
@click.option("--dry-run", is_flag=True, help="Print the changes without making them.")
@click.pass_obj
def apply(client: LbdClient, path: str, dry_run: bool) -> None:
    """Make lbd's state what FILE says.

    VIPs and backends that FILE leaves out are removed. Prints each change."""
    request = lb_pb2.ApplyRequest(document=read_document(path), dry_run=dry_run)
    _print_changes(client.call("Apply", request), dry_run)


@cli.command()
@click.pass_obj
def export(client: LbdClient) -> None:
    """Print the desired state as JSON.

    It is the document `lbctl apply -f` takes: exporting and applying it back
    changes nothing."""
    document = client.call("GetState", lb_pb2.GetStateRequest()).document
    click.echo(pretty_document(document), nl=False)


def pretty_document(document: str) -> str:
    try:
        return output.dump_json(json.loads(document))
    except ValueError:
        return document if document.endswith("\n") else document + "\n"  # show it as it came


@cli.command()
@click.argument("shell", metavar="SHELL", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(lbctl completion bash)"
    zsh:   eval "$(lbctl completion zsh)"
    fish:  lbctl completion fish | source"""
    root = ctx.find_root()
    prog_name = root.info_name or PROG_NAME
    # The variable click's own `_LBCTL_COMPLETE=bash_source lbctl` reads.
    complete_var = f"_{prog_name}_COMPLETE".replace("-", "_").upper()
    completer = get_completion_class(shell)
    if completer is None:  # cannot happen for SHELLS; a usage error rather than a traceback
        raise OneLineUsageError(f"no completion for {shell}")
    click.echo(completer(root.command, {}, prog_name, complete_var).source(), nl=False)


cli.add_command(fleet)


def main() -> None:
    """The `lbctl` console script."""
    cli.main(prog_name=PROG_NAME)


if __name__ == "__main__":
    main()
