"""`lbctl fleet`: the LB hosts that share one desired state through etcd."""

from __future__ import annotations

import sys
import time

import click

from lbctl import output
from lbctl.client import LbdClient
from xdplb.v1 import lb_pb2


@click.group()
def fleet() -> None:
    """The fleet: LB hosts sharing one desired state through etcd ([fleet] in lbd's
    configuration). Any host's lbd answers for all of them."""


@fleet.command("status")
@click.option("-o", "--output", "output_format", type=click.Choice(output.FORMATS),
              default="table", show_default=True, help="Output format.")
@click.pass_obj
def fleet_status(client: LbdClient, output_format: str) -> None:
    """Every host side by side: the revision it realises, its ring fingerprints,
    BGP, drain, and drift (a host behind, with a differing ring, refusing a
    revision, or whose lease expired). Exits 1 when a host drifts."""
    response = client.call("FleetStatus", lb_pb2.FleetStatusRequest())
    if not response.enabled:
        raise click.ClickException("this lbd runs in local-file mode (no [fleet] etcd)")
    click.echo(render_fleet(response, output_format, time.time()), nl=False)
    drifting = [h.name for h in response.hosts if h.drift]
    if not response.connected:
        click.echo(f"lbctl: this lbd cannot reach etcd ({response.error}): hosts as last seen",
                   err=True)
    if drifting:
        click.echo(f"lbctl: drift on {', '.join(drifting)}", err=True)
    if drifting or not response.connected:
        sys.exit(1)


@fleet.command("import")
@click.pass_obj
def fleet_import(client: LbdClient) -> None:
    """Write this host's desired state into the fleet's prefix, which must hold
    none yet: the step from local-file mode to etcd mode (docs/fleet.md)."""
    response = client.call("FleetImport", lb_pb2.FleetImportRequest())
    click.echo(f"imported {response.vips} VIPs as revision {response.revision}")


@fleet.command("forget")
@click.argument("host")
@click.pass_obj
def fleet_forget(client: LbdClient, host: str) -> None:
    """Remove the last report of a host that is gone for good (refused while its
    lease is alive)."""
    client.call("FleetForget", lb_pb2.FleetForgetRequest(host=host))
    click.echo(f"forgot host {host}")


def render_fleet(response: lb_pb2.FleetStatusResponse, fmt: str, now: float) -> str:
    """JSON: the FleetStatusResponse message (lb.proto), every field present."""
    if fmt == "json":
        return output.dump_json(output.message_to_json(response))
    head = (f"fleet {response.prefix} on {response.endpoints}: desired state revision "
            f"{response.newest_revision}; this host ({response.host}) realises "
            f"{response.realised_revision}")
    rows = [("HOST", "LIVE", "REVISION", "BEHIND", "RINGS", "BGP", "DRAINED", "REPORTED",
             "DRIFT")]
    for host in response.hosts:
        rings = ",".join(f"{v}={fp[:8]}" for v, fp in sorted(host.fingerprints.items()))
        rows.append((host.name, "yes" if host.live else "no", str(host.revision),
                     f"{host.behind_s:.1f}s" if host.behind_s else "-", rings or "-",
                     host.bgp or "-", "yes" if host.drained else "no",
                     f"{max(0.0, now - host.reported_at):.0f}s ago",
                     "; ".join(host.drift) or "-"))
    return "".join(line + "\n" for line in [head, *output.align(rows)])
