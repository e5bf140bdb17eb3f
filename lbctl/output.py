"""Rendering lbd's answers: aligned tables for people, JSON for programs.

JSON (`-o json`)
----------------
Each read command prints one JSON object made from the response message by a
single rule, so the keys are stable and lb.proto documents them:

* keys are the proto field names (snake_case) and every field is present;
* an unset optional field or sub-message is null (a backend's "check": null
  means the backend uses its VIP's check);
* repeated fields are arrays, maps are objects, and 64-bit counters are JSON
  numbers (not strings as in protobuf's canonical JSON mapping).

  vip list      {"vips": [VIP, ...]}
  vip show      VIP
  backend list  {"vip": str, "backends": [BACKEND, ...]}
  stats         {"traffic": [TRAFFIC, ...], "counters": [{"name": str, "value": int}, ...]}
  status        {"version": str, "uptime_s": float,
                 "interfaces": [{"name": str, "prog_id": int, "mode": str}, ...],
                 "nexthop_mac": str, "nexthop_source": str, "state_file": str,
                 "pin_dir": str, "vips": int, "backends": int, "max_vips": int,
                 "max_backends": int, "ring_entries_used": int, "ring_entries": int,
                 "last_reconcile": RECONCILE | null, "vip_status": [VIP, ...]}

  VIP        {"vip": "10.0.0.10:80/tcp", "hash": str, "encap": str, "ring_size": int,
              "check": CHECK, "panic_threshold": float, "when_none_healthy": str,
              "backends": [BACKEND, ...],
              "status": {"mode": str, "vip_id": int, "healthy_backends": int,
                         "serving_backends": int, "packets": int, "bytes": int,
                         "ring_fingerprint": str, "announced": bool,
                         "unsettled_positions": int}}
  BACKEND    {"address": str, "weight": int, "drained": bool, "check": CHECK | null,
              "status": {"healthy": bool, "available": bool, "index": int,
                         "ring_positions": int, "effective_weight": int,
                         "packets": int, "bytes": int, "health": str,
                         "last_result": str, "check_latency_ms": float,
                         "since": float (unix time of the verdict, 0: never),
                         "check": str, "health_realised": bool (the maps hold
                         the verdict), "realised_since": float (unix time the
                         maps got what they hold), ...}}
  CHECK      {"kind": str, "port": int, "path": str, "host": str, "expect_status": [int],
              "body": str, "grpc_service": str, "interval_ms": int, "timeout_ms": int,
              "rise": int, "fall": int, "via": str ("backend" or "vip")}
  TRAFFIC    {"vip": str, "backend": str ("" for the VIP's own totals),
              "packets": int, "bytes": int}
  RECONCILE  {"map_writes": int, "ring_positions": {VIP: int}, "duration_ms": float}

`lbctl export` prints the state document itself (the shape of
xdplb.state.DesiredState.to_dict), which is what `lbctl apply -f` reads.

Tables
------
Like `ipvsadm -Ln`: two header lines (VIP columns, then the indented backend
columns), then each VIP on one line followed by its backends, each kind of
line aligned on its own. WEIGHT is the configured weight, EFF the one the ring
uses (0 when down or drained; scaled by load feedback and slow start); LOAD is
the smoothed load and its age, or why there is none. A backend's STATE is
drained, or its health: up, down,
unchecked (no verdict yet), held-down (flapping) or not-checked (check none),
followed by "(leaving ring)" or "(joining ring)" while the datapath does not
hold that verdict yet (the reconcile that writes it comes within 200 ms);
LAST is its last check's result and latency, SINCE how long its verdict holds;
AVAIL says whether the datapath may pick it; RING is its number of ring
positions and SHARE their fraction of the ring; FLOWS its connection-table
entries active within flows.active_window_s when the table was last swept
("-" before the first sweep); CHECK "-" means it uses the VIP's check. A QUIC
VIP's backends also show their QUIC-LB SERVER-ID.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from xdplb.v1 import lb_pb2

VIP_COLUMNS = ("VIP", "HASH", "ENCAP", "RING", "MODE", "HEALTHY", "SERVING", "PACKETS", "BYTES",
               "CHECK")
BACKEND_COLUMNS = ("ADDRESS", "WEIGHT", "EFF", "STATE", "AVAIL", "RING", "SHARE", "FLOWS",
                   "PACKETS", "BYTES", "LOAD", "LAST", "SINCE", "CHECK")
FLOW_COLUMNS = ("CLIENT", "VIP", "PORT", "BACKEND", "IDLE")
ARROW = "  -> "
FORMATS = ("table", "json")


# --- JSON -------------------------------------------------------------------------


def message_to_json(message: Message) -> dict[str, Any]:
    """The message as plain JSON data: every field, by its proto name."""
    return {field.name: _field_to_json(message, field) for field in message.DESCRIPTOR.fields}


def _field_to_json(message: Message, field: FieldDescriptor) -> Any:
    value = getattr(message, field.name)
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        return {key: _value_to_json(item, value_field) for key, item in value.items()}
    if field.is_repeated:
        return [_value_to_json(item, field) for item in value]
    if field.has_presence and not message.HasField(field.name):
        return None
    return _value_to_json(value, field)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _value_to_json(value: Any, field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value  # ints (64-bit too), floats, bools and strings map as they are


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"


# --- the commands' renderings ----------------------------------------------------------


def render_vip_list(response: lb_pb2.ListVipsResponse, fmt: str) -> str:
    if fmt == "json":
        return dump_json(message_to_json(response))
    return vips_table(response.vips)


def render_vip(vip: lb_pb2.Vip, fmt: str) -> str:
    if fmt == "json":
        return dump_json(message_to_json(vip))
    return vips_table([vip]) + "\n" + vip_details(vip)


def render_backend_list(vip: lb_pb2.Vip, fmt: str) -> str:
    if fmt == "json":
        return dump_json({"vip": vip.vip,
                          "backends": [message_to_json(b) for b in vip.backends]})
    rows = [BACKEND_COLUMNS, *(_backend_row(vip, backend) for backend in vip.backends)]
    if vip.HasField("quic"):  # a QUIC VIP: which server ID routes to each backend
        rows = [(*rows[0], "SERVER-ID"), *((*row, str(b.server_id or "-")) for row, b in
                                           zip(rows[1:], vip.backends, strict=True))]
    return _lines(align(rows))


def render_flows(pages: Sequence[lb_pb2.ListFlowsResponse], fmt: str) -> str:
    """The flows of consecutive pages, then how much of the table they cover."""
    flows = [flow for page in pages for flow in page.flows]
    first, last = pages[0], pages[-1]
    read = sum(page.entries_read for page in pages)
    complete = last.next_set >= last.total_sets
    if fmt == "json":
        return dump_json({"flows": [message_to_json(f) for f in flows],
                          "from_set": first.from_set, "next_set": last.next_set,
                          "total_sets": last.total_sets, "entries_read": read,
                          "complete": complete})
    rows = [FLOW_COLUMNS, *((_host_port(f.client, f.client_port), f.vip or "(removed VIP)",
                             str(f.port), f.backend, f"{f.idle_s}s") for f in flows)]
    sets = last.next_set - first.from_set
    footer = (f"{len(flows)} flows; read sets {first.from_set}..{last.next_set - 1} of "
              f"{last.total_sets} ({_share(sets, last.total_sets)}), {read} entries")
    footer += " (to the end)" if complete else f"; go on with --from-set {last.next_set}"
    return _lines([*align(rows), footer])


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_stats(response: lb_pb2.StatsResponse, fmt: str) -> str:
    if fmt == "json":
        return dump_json(message_to_json(response))
    text = traffic_table(response.traffic)
    counters = response.counters
    if counters:
        rows = [("COUNTER", "VALUE"), *((c.name, str(c.value)) for c in counters)]
        text += "\n" + _lines(align(rows))
    return text


def render_status(response: lb_pb2.StatusResponse, fmt: str) -> str:
    if fmt == "json":
        return dump_json(message_to_json(response))
    text = _lines(align(_status_rows(response)))
    if response.bgp.enabled:
        text += "\n" + _lines(align(_bgp_rows(response)))
    if response.vip_status:
        rows = [("VIP", "MODE", "HEALTHY", "SERVING", "PACKETS", "BYTES", "ANNOUNCED", "RING"),
                *(_vip_status_row(vip) for vip in response.vip_status)]
        text += "\n" + _lines(align(rows))
    return text


def _bgp_rows(status: lb_pb2.StatusResponse) -> list[tuple[str, str]]:
    bgp = status.bgp
    rows = [("bgp", "drained: every VIP withdrawn" if status.host_drained else "announcing")]
    rows += [("session", f"{s.name} {s.state} {s.info}".rstrip()) for s in bgp.sessions]
    rows += [("announced", ", ".join(bgp.announced) or "-")]
    if bgp.error:
        rows.append(("bgp error", bgp.error))
    return rows


def _majority(values: list[str | None]) -> str | None:
    """The most common value; ties go to the one seen first."""
    counts: dict[str | None, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def render_fingerprints(rings: dict[str, dict[str, str]], fmt: str) -> tuple[str, list[str]]:
    """Per VIP, each host's ring fingerprint; and the hosts that disagree with the
    majority on any VIP (ties: with the first host; a missing VIP differs).

    JSON: {"vips": {VIP: {HOST: fingerprint or null}}, "differing": [HOST, ...]}."""
    hosts = list(rings)
    vips = sorted({vip for ring in rings.values() for vip in ring})
    majority = {v: _majority([rings[h].get(v) for h in hosts]) for v in vips}
    differing = [h for h in hosts if any(rings[h].get(v) != majority[v] for v in vips)]
    if fmt == "json":
        table = {v: {h: rings[h].get(v) for h in hosts} for v in vips}
        return dump_json({"vips": table, "differing": differing}), differing
    rows = [("VIP", *hosts)]
    rows += [(v, *((rings[h].get(v) or "missing")[:16] for h in hosts)) for v in vips]
    return _lines(align(rows)), differing


# --- tables --------------------------------------------------------------------------


def align(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart, without trailing blanks."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _lines(lines: Iterable[str]) -> str:
    return "".join(line + "\n" for line in lines)


def vips_table(vips: Sequence[lb_pb2.Vip]) -> str:
    """VIP lines each followed by its indented backend lines, as ipvsadm -Ln lays them out."""
    vip_lines = iter(align([VIP_COLUMNS, *(_vip_row(vip) for vip in vips)]))
    backend_rows = [_indent(BACKEND_COLUMNS)]
    backend_rows += [_indent(_backend_row(vip, b)) for vip in vips for b in vip.backends]
    backend_lines = iter(align(backend_rows))
    lines = [next(vip_lines), next(backend_lines)]
    for vip in vips:
        lines.append(next(vip_lines))
        lines.extend(next(backend_lines) for _ in vip.backends)
    return _lines(lines)


def _indent(row: Sequence[str]) -> tuple[str, ...]:
    return (ARROW + row[0], *row[1:])


def _vip_row(vip: lb_pb2.Vip) -> tuple[str, ...]:
    status = vip.status
    return (vip.vip, _optional(vip, "hash"), _optional(vip, "encap"), _optional(vip, "ring_size"),
            status.mode or "-", f"{status.healthy_backends}/{len(vip.backends)}",
            str(status.serving_backends), str(status.packets), str(status.bytes),
            short_check(vip.check) if vip.HasField("check") else "-")


def _backend_row(vip: lb_pb2.Vip, backend: lb_pb2.Backend) -> tuple[str, ...]:
    status = backend.status
    return (backend.address, _optional(backend, "weight"), str(status.effective_weight),
            backend_state(backend), "yes" if status.available else "no",
            str(status.ring_positions), _share(status.ring_positions, vip.ring_size),
            str(status.active_flows) if status.HasField("active_flows") else "-",
            str(status.packets), str(status.bytes), load_cell(status),
            last_check(status), since(status.since),
            short_check(backend.check) if backend.HasField("check") else "-")


def load_cell(status: lb_pb2.BackendStatus) -> str:
    """The smoothed load and its age when load feedback is on; else why not."""
    if status.load_state in ("", "none"):
        return "-"
    if status.load_state == "ok":
        return f"{status.load:.3g} ({status.load_age_s:.0f}s)"
    return status.load_state


def last_check(status: lb_pb2.BackendStatus) -> str:
    if not status.last_result:
        return "-"
    return f"{status.last_result} {status.check_latency_ms:.1f}ms"


def since(unix_time: float, now: float | None = None) -> str:
    """An age like 5s, 3m, 2h, 4d: how long a verdict has held."""
    if not unix_time:
        return "-"
    age = max(0.0, (time.time() if now is None else now) - unix_time)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= seconds:
            return f"{int(age // seconds)}{unit}"
    return f"{int(age)}s"


def backend_state(backend: lb_pb2.Backend) -> str:
    """drained, or the health verdict, with what the datapath still does meanwhile: a
    verdict the maps do not hold yet shows as "down (leaving ring)" or "up (joining
    ring)" until the reconcile that writes it."""
    if backend.drained:
        return "drained"
    status = backend.status
    health = status.health or ("up" if status.healthy else "down")
    if status.health_realised:
        return health
    return f"{health} (joining ring)" if health == "up" else f"{health} (leaving ring)"


def _share(positions: int, ring_size: int) -> str:
    return f"{100 * positions / ring_size:.1f}%" if ring_size else "-"


def _optional(message: Message, name: str) -> str:
    return str(getattr(message, name)) if message.HasField(name) else "-"


def vip_details(vip: lb_pb2.Vip) -> str:
    """What the table leaves out: the checks in full and the failure policy."""
    rows = [("id", str(vip.status.vip_id)),
            ("unsettled ring positions", str(vip.status.unsettled_positions)),
            ("check", describe_check(vip.check) if vip.HasField("check") else "-"),
            ("panic threshold", _panic_threshold(vip)),
            ("when none healthy", _optional(vip, "when_none_healthy"))]
    if vip.HasField("quic"):
        rows.append(("quic", f"QUIC-LB server IDs of {vip.quic.server_id_len or 2} octets, "
                             f"rotation {vip.quic.rotation}"))
    if vip.health_scope == "fleet":
        quorum = vip.health_quorum or "a majority"
        rows.append(("health scope", f"fleet: down when {quorum} of the LB hosts checking a "
                                     "backend see it down"))
    rows += [(f"check of {b.address}", describe_check(b.check))
             for b in vip.backends if b.HasField("check")]
    return _lines(align(rows))


def _panic_threshold(vip: lb_pb2.Vip) -> str:
    if not vip.HasField("panic_threshold"):
        return "-"
    return "off" if vip.panic_threshold == 0 else f"{vip.panic_threshold:g}"


def short_check(check: lb_pb2.HealthCheck) -> str:
    """`tcp`, `tcp:8080`, `http:8080/healthz`: kind, port and path, for a table cell."""
    text = check.kind or "-"
    if check.port:
        text += f":{check.port}"
    if check.kind in ("http", "https") and check.path:
        text += check.path
    if check.via == "vip":
        text += "@vip"
    return text


def describe_check(check: lb_pb2.HealthCheck) -> str:
    """Every setting of a check that applies to its kind, in one line."""
    if check.kind == "none":
        return "none"
    parts = [check.kind or "-"]
    if check.HasField("port"):
        parts.append(f"port {check.port}" if check.port else "the VIP's port")
    if check.kind in ("http", "https"):
        parts += _given(check, ("path", "host", "body"))
        if check.expect_status:
            parts.append("status " + ",".join(map(str, check.expect_status)))
    if check.kind == "grpc" and check.grpc_service:
        parts.append(f"service {check.grpc_service}")
    parts += [f"every {check.interval_ms} ms"] if check.HasField("interval_ms") else []
    parts += [f"timeout {check.timeout_ms} ms"] if check.HasField("timeout_ms") else []
    parts += _given(check, ("rise", "fall"))
    if check.via == "vip":
        parts.append("through the VIP")
    return ", ".join(parts)


def _given(message: Message, names: Iterable[str]) -> list[str]:
    return [f"{name} {getattr(message, name)}" for name in names
            if message.HasField(name) and getattr(message, name) != ""]


def traffic_table(traffic: Sequence[lb_pb2.TrafficStats]) -> str:
    """Each VIP's totals, then its backends' counts indented below it."""
    rows: list[tuple[str, str, str]] = [("VIP", "PACKETS", "BYTES")]
    for vip, entries in _by_vip(traffic).items():
        total = next((e for e in entries if not e.backend), None)
        rows.append((vip, *_counts(total)))
        rows += [(ARROW + e.backend, *_counts(e)) for e in entries if e.backend]
    return _lines(align(rows))


def _by_vip(traffic: Iterable[lb_pb2.TrafficStats]) -> dict[str, list[lb_pb2.TrafficStats]]:
    groups: dict[str, list[lb_pb2.TrafficStats]] = {}
    for entry in traffic:
        groups.setdefault(entry.vip, []).append(entry)
    return groups


def _counts(entry: lb_pb2.TrafficStats | None) -> tuple[str, str]:
    return ("-", "-") if entry is None else (str(entry.packets), str(entry.bytes))


def _status_rows(status: lb_pb2.StatusResponse) -> list[tuple[str, str]]:
    rows = [("version", status.version or "-"), ("uptime", format_duration(status.uptime_s))]
    rows += [("interface", _describe_interface(i)) for i in status.interfaces]
    nexthop = status.nexthop_mac or "-"
    if status.nexthop_source:
        nexthop += f" ({status.nexthop_source})"
    rows += [("nexthop", nexthop), ("state file", status.state_file or "-"),
             ("pin dir", status.pin_dir or "-"),
             ("vips", f"{status.vips} of {status.max_vips}"),
             ("backends", f"{status.backends} of {status.max_backends}"),
             ("ring entries", f"{status.ring_entries_used} of {status.ring_entries}"
                              f" ({_share(status.ring_entries_used, status.ring_entries)})")]
    rows.append(("host", _describe_host(status)))
    rows.append(("flow table", _describe_flow_table(status.flow_table)))
    if status.HasField("last_reconcile"):
        last = status.last_reconcile
        rows.append(("last reconcile", f"{last.map_writes} map writes in "
                                       f"{last.duration_ms:.1f} ms"))
    return rows


def _describe_flow_table(table: lb_pb2.FlowTableStatus) -> str:
    if not table.swept_at:
        return f"{table.capacity} entries; not swept yet"
    return (f"{table.entries} of {table.capacity} entries "
            f"({_share(table.entries, table.capacity)}), {table.active} active within "
            f"{table.active_window_s}s, swept {since(table.swept_at)} ago; "
            f"{table.evicted} evicted")


def _describe_host(status: lb_pb2.StatusResponse) -> str:
    if not status.host_drained:
        return "in service"
    if status.bgp.enabled:
        return "drained: every VIP withdrawn from BGP (drain-host --undo ends it)"
    return ("drained, but BGP is disabled: no route was withdrawn, routers still send "
            "traffic here (drain-host --undo ends it)")


def _describe_interface(interface: lb_pb2.Interface) -> str:
    if not interface.prog_id:
        return f"{interface.name} (nothing attached)"
    return f"{interface.name} {interface.mode or '-'} prog {interface.prog_id}"


def _vip_status_row(vip: lb_pb2.Vip) -> tuple[str, ...]:
    status = vip.status
    return (vip.vip, status.mode or "-", str(status.healthy_backends),
            str(status.serving_backends), str(status.packets), str(status.bytes),
            "yes" if status.announced else "no", status.ring_fingerprint[:16] or "-")


def format_duration(seconds: float) -> str:
    """`3d 4h 5m 6s`, leaving out leading zero units."""
    remaining = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        count, remaining = divmod(remaining, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    parts.append(f"{remaining}s")
    return " ".join(parts)


def _rate_rows(before: lb_pb2.StatsResponse, after: lb_pb2.StatsResponse,
               seconds: float) -> list[dict[str, Any]]:
    earlier = {(e.vip, e.backend): e for e in before.traffic}
    rows = []
    for entry in after.traffic:
        old = earlier.get((entry.vip, entry.backend))
        packets = entry.packets - (old.packets if old else 0)
        size = entry.bytes - (old.bytes if old else 0)
        rows.append({"vip": entry.vip, "backend": entry.backend,
                     "packets_per_s": max(0, packets) / seconds,
                     "bytes_per_s": max(0, size) / seconds})
    return rows


def render_rates(before: lb_pb2.StatsResponse, after: lb_pb2.StatsResponse, seconds: float,
                 fmt: str) -> str:
    """Packets/s and bytes/s per VIP and backend between two readings.

    JSON: {"interval_s": float, "rates": [{"vip", "backend", "packets_per_s",
    "bytes_per_s"}]} with backend "" for a VIP's own totals."""
    rows = _rate_rows(before, after, seconds)
    if fmt == "json":
        return dump_json({"interval_s": seconds, "rates": rows})
    table: list[tuple[str, ...]] = [("VIP", "PKTS/S", "BYTES/S")]
    for row in rows:
        name = ARROW + row["backend"] if row["backend"] else row["vip"]
        table.append((name, f"{row['packets_per_s']:.1f}", f"{row['bytes_per_s']:.1f}"))
    return f"rates over {seconds:.1f} s\n" + _lines(align(table))


def render_event(event: lb_pb2.Event, fmt: str) -> str:
    """One line: time, kind, VIP/backend when there is one, message.

    JSON: {"time": float, "kind": str, "vip": str, "backend": str, "message": str}."""
    if fmt == "json":
        return json.dumps({"time": event.time, "kind": event.kind, "vip": event.vip,
                           "backend": event.backend, "message": event.message})
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    return f"{stamp} {event.kind:<9} {event.message}"
