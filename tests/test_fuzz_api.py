"""A property-based fuzz campaign against a real lbd, straight to its socket.

hypothesis generates API requests, valid and invalid (adversarial addresses
and VIP texts, control characters, huge and non-finite numbers, unknown
fields, apply documents with junk), and sends them one after another to one
lbd, whose state therefore wanders. After each request:

- lbd answers (and keeps answering);
- a refusal carries one of the documented codes (INVALID_ARGUMENT, NOT_FOUND,
  ALREADY_EXISTS, RESOURCE_EXHAUSTED, FAILED_PRECONDITION), never INTERNAL or
  UNKNOWN, and changed neither the export nor state.json nor the maps;
- an accepted change round-trips: applying the export changes nothing, and
  state.json holds the export;
- the maps equal what a fresh reconcile of the exported state builds in maps
  of its own, with the health lbd reports (compared whenever no health or
  load reconcile ran meanwhile and no load adaptation is in force).

`make test` runs XDPLB_FUZZ_API_EXAMPLES requests (default 150); `make fuzz`
runs the long campaign and prints its figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lbd_helpers import lab_with_lbd
from xdplb import state as xs
from xdplb.datapath import MapSizes
from xdplb.reconciler import Reconciler, Runtime, read_view
from xdplb.v1 import lb_pb2 as pb
from xdplb.v1 import lb_pb2_grpc as pb_grpc

pytestmark = pytest.mark.netns
EXAMPLES = int(os.environ.get("XDPLB_FUZZ_API_EXAMPLES", "150"))
SIZES = MapSizes(max_vips=8, max_backends=32, ring_entries=6 * 65537, conn_entries=4096)
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.FAILED_PRECONDITION}

# --- what requests are made of ----------------------------------------------------------

def mostly(valid, nasty, one_in: int = 6):
    """`valid` most of the time, `nasty` one time in `one_in` (hypothesis starts from,
    and shrinks toward, the valid side)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: nasty if i == one_in - 1 else valid)


NASTY_TEXT = st.sampled_from([
    "", " ", "\x00", "a\r\nb", "\t", "%", "ï", "10.0.0.1%eth0", "fd00::1%x", "fd00::1:80",
    "::ffff:10.0.0.1", "999.1.1.1", "[fd00::1]", "x" * 5000, "/", "..", "🙂", "\u2028",
]) | st.text(max_size=20)
def word(*valid: str):
    """One of `valid` most of the time, else nasty text."""
    return mostly(st.sampled_from(valid), NASTY_TEXT)


VIPS = mostly(st.sampled_from(["10.200.0.10:80/tcp", "10.200.0.11/udp",
                               "[fd00:200::10]:443/tcp", "10.200.0.12:8080/udp",
                               "[fd00:200::11]/tcp"]),
              NASTY_TEXT.map(lambda t: f"{t}:80/tcp") | NASTY_TEXT)
ADDRESSES = word(*["10.100.10.2", "10.100.11.2", "10.1.0.1", "10.1.0.2",
                                    "fd00:100:10::2", "fd00:100:11::2"])
INTS = st.integers(-5, 70_000) | st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, 0.5, 1.0, 30.0, -1.0])
PRIMES = st.sampled_from([251, 1009, 4099, 65537, 4100, 3, 2])


def optional(strategy):
    """Given one time in three; else left out (lbd's default)."""
    return st.integers(0, 2).flatmap(lambda i: strategy if i == 2 else st.none())


@st.composite
def checks(draw) -> pb.HealthCheck | None:
    fields = {
        "kind": optional(word(*["none", "tcp", "http", "https", "grpc"])),
        "port": optional(mostly(st.sampled_from([0, 80, 8081]), st.integers(0, 70_000))),
        "path": optional(word(*["/", "/healthz", "/a?b=c"])),
        "host": optional(word(*["lab", "lab:8080"])),
        "expect_status": optional(mostly(st.lists(st.integers(200, 204), min_size=1,
                                                  max_size=3),
                                         st.lists(st.integers(0, 1000), max_size=20))),
        "body": optional(word(*["ok", ""])),
        "grpc_service": optional(word(*["", "lb.v1"])),
        "interval_ms": optional(mostly(st.integers(1000, 5000), st.integers(0, 5_000_000))),
        "timeout_ms": optional(mostly(st.integers(100, 1000), st.integers(0, 5_000_000))),
        "rise": optional(mostly(st.integers(1, 5), st.integers(0, 200))),
        "fall": optional(mostly(st.integers(1, 5), st.integers(0, 200))),
        "via": optional(word(*["backend", "vip"])),
    }
    given = {k: v for k, v in ((k, draw(s)) for k, s in fields.items()) if v is not None}
    return pb.HealthCheck(**given) if given or draw(st.booleans()) else None


@st.composite
def capacities(draw) -> pb.Capacity | None:
    if draw(st.integers(0, 3)):
        return None
    return pb.Capacity(source=draw(word(*["none", "push", "prometheus"])),
                       metric=draw(word(*["q", "load"])),
                       target=draw(mostly(st.sampled_from([1.0, 8.0]), FLOATS)),
                       smoothing=draw(mostly(st.just(0.3), FLOATS)),
                       port=draw(mostly(st.just(9400), INTS)) % 2**32)


def vip_settings(draw) -> dict:
    settings_ = {
        "hash": draw(optional(word(*["5tuple", "source"]))),
        "encap": draw(optional(word(*["ipip", "gue"]))),
        "ring_size": draw(optional(PRIMES)),
        "panic_threshold": draw(optional(mostly(st.sampled_from([0.0, 0.5]), FLOATS))),
        "when_none_healthy": draw(optional(word(*["drop", "all"]))),
        "slow_start_s": draw(optional(mostly(st.sampled_from([0.0, 0.0, 5.0]), FLOATS))),
        "check": draw(checks()), "capacity": draw(capacities()),
    }
    return {k: v for k, v in settings_.items() if v is not None}


JSON_JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(
    max_size=10), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def documents(draw) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=50))
    vips = []
    for _ in range(draw(st.integers(0, 3))):
        vip = {"vip": draw(VIPS)}
        if draw(st.booleans()):
            vip["backends"] = [{"address": draw(ADDRESSES),
                                "weight": draw(st.integers(-1, 10_001))}
                               for _ in range(draw(st.integers(0, 3)))]
        if draw(st.integers(0, 4)) == 0:
            vip[draw(st.sampled_from(["hash", "ring_size", "check", "junk"]))] = draw(JSON_JUNK)
        vips.append(vip)
    return json.dumps({"version": draw(st.sampled_from([1, 1, 1, 2])), "vips": vips})


@st.composite
def requests(draw) -> tuple[str, object]:
    method = draw(st.sampled_from(["AddVip"] * 3 + ["AddBackend"] * 4 + ["Apply"] * 2 + [
        "SetVip", "SetVip", "SetBackend", "SetBackend", "DeleteVip", "DeleteBackend",
        "DrainHost", "ReportLoad", "CountFlows"]))
    vip = draw(VIPS)
    if method == "AddVip":
        return method, pb.AddVipRequest(vip=pb.Vip(vip=vip, **vip_settings(draw)))
    if method == "SetVip":
        return method, pb.SetVipRequest(vip=vip, **vip_settings(draw))
    if method == "DeleteVip":
        return method, pb.VipRef(vip=vip)
    if method == "AddBackend":
        backend = pb.Backend(address=draw(ADDRESSES), weight=draw(st.integers(0, 20_000)),
                             drained=draw(st.booleans()))
        check = draw(checks())
        if check is not None:
            backend.check.CopyFrom(check)
        return method, pb.AddBackendRequest(vip=vip, backend=backend)
    if method == "SetBackend":
        request = pb.SetBackendRequest(vip=vip, address=draw(ADDRESSES),
                                       clear_check=draw(st.booleans()))
        if draw(st.booleans()):
            request.weight = draw(st.integers(0, 20_000))
        if draw(st.booleans()):
            request.drained = draw(st.booleans())
        return method, request
    if method == "DeleteBackend":
        return method, pb.BackendRef(vip=vip, address=draw(ADDRESSES))
    if method == "Apply":
        return method, pb.ApplyRequest(document=draw(documents()), dry_run=draw(st.booleans()))
    if method == "DrainHost":  # never a real wait: the campaign must not sleep
        return method, pb.DrainHostRequest(undo=True, wait_s=draw(FLOATS),
                                           quiet_s=draw(FLOATS))
    if method == "ReportLoad":
        return method, pb.ReportLoadRequest(address=draw(ADDRESSES), value=draw(FLOATS),
                                            vip=draw(st.sampled_from(["", "10.200.0.10:80/tcp"])))
    return method, pb.CountFlowsRequest(vip=vip, address=draw(ADDRESSES),
                                        active_within_s=draw(FLOATS))


# --- the rig -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from xdplb.datapath import Balancer

    with lab_with_lbd("xtfuzz", tmp_path_factory.mktemp("lbd"), SIZES, n_backends=2) as (
            _, lbd):
        fresh = Balancer(SIZES)  # the reference: maps of the test's own, never attached
        channel = grpc.insecure_channel(f"unix://{lbd.socket}", options=[
            ("grpc.max_receive_message_length", xs.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", xs.MAX_MESSAGE_BYTES)])
        stub = pb_grpc.LoadBalancerStub(channel)
        events: list[tuple[float, str]] = []
        watch = stub.Watch(pb.WatchRequest())

        def follow() -> None:
            try:
                for event in watch:
                    events.append((time.monotonic(), event.kind))
            except grpc.RpcError:
                pass  # cancelled at the end

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        try:
            yield lbd, stub, fresh, events
        finally:
            watch.cancel()
            watcher.join(timeout=10)
            channel.close()
            fresh.close()


def explained(events: list[tuple[float, str]], since: float, kinds: tuple[str, ...],
              wait_s: float = 3.0) -> bool:
    """Whether lbd told of a change of one of `kinds` since `since` (test time of
    receipt). The Watch stream may deliver it a moment after the maps changed:
    wait up to wait_s for it before calling the change unexplained."""
    deadline = time.monotonic() + wait_s
    while True:
        if any(t >= since and kind in kinds for t, kind in list(events)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def lbd_maps(lbd) -> dict:
    maps = lbd.maps()
    try:
        return read_view(maps)
    finally:
        maps.close()


def observed(lbd, stub) -> tuple[str, bytes]:
    document = stub.GetState(pb.GetStateRequest(), timeout=30).document
    return document, lbd.state_file.read_bytes() if lbd.state_file.exists() else b""


def fresh_reconcile(fresh, stub, document: str) -> dict | None:
    """What a reconcile of `document` writes into maps of its own, with the health lbd
    reports; None when load adaptation or slow start is in force (weights lbd does not
    report exactly)."""
    desired = xs.DesiredState.from_dict(json.loads(document))
    healthy = {}
    for vip in stub.ListVips(pb.ListVipsRequest(), timeout=30).vips:
        key = xs.VipKey.parse(vip.vip)
        for backend in vip.backends:
            status = backend.status
            if status.load_state not in ("", "none", "waiting") or status.capacity_factor not in (
                    0.0, 1.0) or status.slow_start_factor not in (0.0, 1.0):
                return None
            healthy[(key, backend.address)] = status.healthy
    reconciler = Reconciler(fresh)
    reconciler.reconcile(xs.DesiredState(), Runtime())  # empty first: a clean slate
    reconciler.reconcile(desired, Runtime(healthy=healthy))
    return read_view(fresh)


def test_generated_requests_keep_every_invariant(rig):
    lbd, stub, fresh, events = rig
    from tests.lbd_helpers import running_and_empty

    running_and_empty(lbd)
    tally: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(requests())
    def campaign(call: tuple[str, object]) -> None:
        method, request = call
        before, started = observed(lbd, stub), time.monotonic()
        maps_before = lbd_maps(lbd)
        try:
            getattr(stub, method)(request, timeout=60)
            outcome = "ok"
        except grpc.RpcError as error:
            assert error.code() in DOCUMENTED, (method, error.code(), error.details())
            assert len(error.details()) < 2000
            outcome = error.code().name
        tally[f"{method} {outcome}"] += 1
        after = observed(lbd, stub)
        if outcome != "ok":
            assert after == before, f"{method} refused ({outcome}) yet changed the state"
            if lbd_maps(lbd) == maps_before:
                tally["maps compared"] += 1
            else:  # only a health, capacity or reconcile event of lbd's own may explain it
                assert explained(events, started, ("reconcile", "health", "capacity",
                                                   "realised")), \
                    f"{method} refused yet changed the maps"
            return
        document, on_disk = after
        if on_disk:
            assert json.loads(on_disk) == json.loads(document)
        again = stub.Apply(pb.ApplyRequest(document=document), timeout=60)
        assert list(again.changes) == [], "the export does not round-trip"
        expected = fresh_reconcile(fresh, stub, document)
        if expected is None:
            return
        if lbd_maps(lbd) == expected:
            tally["maps compared"] += 1
        else:  # a verdict or load change since `started` may explain it
            assert explained(events, started, ("health", "capacity", "realised")), \
                f"after {method}: maps differ from a fresh build"

    campaign()
    assert lbd.proc is not None and lbd.proc.poll() is None, "lbd died"
    accepted = sum(n for k, n in tally.items() if k.endswith(" ok"))
    refused = sum(n for k, n in tally.items() if not k.endswith(" ok") and " " in k
                  and not k.startswith("maps"))
    assert accepted and refused, dict(tally)
    report = os.environ.get("XDPLB_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(f"api: {accepted + refused} requests, {accepted} accepted, {refused} "
                    f"refused, maps compared {tally['maps compared']} times; "
                    f"{dict(sorted(tally.items()))}\n")
