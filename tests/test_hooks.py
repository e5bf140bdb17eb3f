"""Hooks ([hooks] in lbd's config): real commands run for real events.

First the runner on its own, with real scripts: what a command is told (JSON on
stdin, XDPLB_* variables), one subject's runs in order, a hung command killed
at its timeout without holding anything else up, failures counted. Then lbd in
a lab with a hook script: a backend whose check fails, its VIP left without a
healthy backend, both coming back, and a host drain each run their hook with
what the datapath realised; `lbd --check-config` refuses bad hooks, all at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.lbd_helpers import lab_with_lbd, ok
from tests.test_lbd_cli import run_lbd
from xdplb.datapath import MapSizes
from xdplb.events import HostDrainChanged, Realised, VipServing
from xdplb.hooks import HookRunner, HooksConfig, hook_run

RECORDER = """#!/bin/sh
# Writes what it was told (its arguments, the XDPLB_* environment, stdin) to a file
# of its own in the directory $1, named by the time it ran: runs may overlap.
out="$1"; shift
mkdir -p "$out"
file="$out/$(date +%s%N)-$$"
{
  printf 'args=%s\\n' "$*"
  env | grep '^XDPLB_' | sort
  printf 'stdin='; cat
} > "$file.tmp"
mv "$file.tmp" "$file"
"""


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def records(path: Path) -> list[dict[str, str]]:
    """Each run the recorder wrote, in the order they started: args, XDPLB_*
    variables and stdin."""
    if not path.exists():
        return []
    runs = []
    for file in sorted(p for p in path.iterdir() if not p.name.endswith(".tmp")):
        run = {}
        for line in file.read_text().splitlines():
            key, _, value = line.partition("=")
            run[key] = value
        runs.append(run)
    return runs


def run_events(config: HooksConfig, events: list, settle_s: float = 10.0) -> Counter:
    """Hands `events` to a runner on a fresh event loop; waits for every run."""
    outcomes: Counter = Counter()

    async def main() -> None:
        runner = HookRunner(config, lambda hook, outcome: outcomes.update([(hook, outcome)]))
        for event in events:
            runner.handle(event)
        deadline = time.monotonic() + settle_s
        while runner._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await runner.close()

    asyncio.run(main())
    return outcomes


# --- the runner ---------------------------------------------------------------------------


def test_a_command_is_told_the_event_on_stdin_and_in_its_environment(tmp_path):
    out = tmp_path / "out"
    recorder = script(tmp_path, "record", RECORDER)
    config = HooksConfig(on_backend_down=(recorder, str(out), "down"))
    event = Realised(False, 0, 0.4, vip="10.0.0.10:80/tcp", backend="10.1.0.1", time=1700.5)
    assert run_events(config, [event]) == Counter({("on_backend_down", "ok"): 1})
    [run] = records(out)
    told = json.loads(run["stdin"])
    assert told == {"time": 1700.5, "host": os.uname().nodename, "vip": "10.0.0.10:80/tcp",
                    "backend": "10.1.0.1", "event": "backend_down", "ring_positions": 0,
                    "message": event.message()}
    assert run["args"] == "down"  # after the output path
    assert {k: v for k, v in run.items() if k.startswith("XDPLB_")} == {
        "XDPLB_HOOK": "on_backend_down", "XDPLB_EVENT": "backend_down",
        "XDPLB_VIP": "10.0.0.10:80/tcp", "XDPLB_BACKEND": "10.1.0.1", "XDPLB_TIME": "1700.5",
        "XDPLB_HOST": os.uname().nodename, "XDPLB_RING_POSITIONS": "0",
        "XDPLB_MESSAGE": event.message()}


def test_events_without_a_configured_hook_run_nothing(tmp_path):
    out = tmp_path / "out"
    config = HooksConfig(on_vip_down=(script(tmp_path, "record", RECORDER), str(out)))
    assert run_events(config, [Realised(True, 5, None, vip="v", backend="b"),
                               HostDrainChanged(True)]) == Counter()
    assert hook_run(HostDrainChanged(False)).hook == "on_host_in_service"
    assert not out.exists()


def test_one_subjects_runs_keep_their_order_while_others_run_beside_them(tmp_path):
    """A slow first run of a backend is not overtaken by its next event; another
    backend's run does not wait for it."""
    out = tmp_path / "out"
    slow_then_record = script(tmp_path, "hook", f"""#!/bin/sh
[ "$XDPLB_EVENT" = backend_down ] && [ "$XDPLB_BACKEND" = 10.1.0.1 ] && sleep 1
echo "$XDPLB_BACKEND $XDPLB_EVENT" >> {out}
""")
    config = HooksConfig(on_backend_down=(slow_then_record,), on_backend_up=(slow_then_record,),
                         max_running=4)
    events = [Realised(False, 0, None, vip="v", backend="10.1.0.1"),
              Realised(True, 9, None, vip="v", backend="10.1.0.1"),
              Realised(False, 0, None, vip="v", backend="10.1.0.2")]
    assert sum(run_events(config, events).values()) == 3
    assert out.read_text().splitlines() == [
        "10.1.0.2 backend_down", "10.1.0.1 backend_down", "10.1.0.1 backend_up"]


def test_a_hung_command_is_killed_at_its_timeout_and_failures_are_counted(tmp_path):
    hung = script(tmp_path, "hung", "#!/bin/sh\nsleep 60 &\nwait\n")  # a child too
    failing = script(tmp_path, "failing", "#!/bin/sh\necho 'no pager configured' >&2\nexit 3\n")
    config = HooksConfig(on_vip_down=(hung,), on_vip_up=(failing,),
                         on_host_drained=(str(tmp_path / "missing"),), timeout_s=0.5)
    started = time.monotonic()
    outcomes = run_events(config, [VipServing(False, 0, 2, vip="v1"),
                                   VipServing(True, 1, 2, vip="v2"), HostDrainChanged(True)])
    assert time.monotonic() - started < 5
    assert outcomes == Counter({("on_vip_down", "timeout"): 1, ("on_vip_up", "failed"): 1,
                                ("on_host_drained", "error"): 1})


def test_check_config_refuses_bad_hooks_all_at_once(tmp_path):
    not_executable = tmp_path / "plain"
    not_executable.write_text("#!/bin/sh\n")
    path = tmp_path / "lbd.toml"
    path.write_text('interfaces = ["eth0"]\n[hooks]\non_backend_down = ["notify-send"]\n'
                    f'on_vip_down = ["{tmp_path}/missing"]\n'
                    f'on_vip_up = ["{not_executable}"]\non_host_drained = []\n'
                    'on_backend_up = "/bin/true"\ntimeout_s = 0\nmax_runing = 2\n')
    result = run_lbd("--check-config", str(path))
    assert result.returncode == 2
    where = f"lbd: config {path}: "
    assert sorted(result.stderr.splitlines()) == sorted(where + line for line in [
        "hooks: unknown key 'max_runing' (did you mean 'max_running'?)",
        "hooks.on_backend_up: must be list, got '/bin/true'",
        "hooks.on_backend_down: notify-send must be an absolute path (hooks run without a "
        "shell or PATH)",
        f"hooks.on_vip_down: {tmp_path}/missing does not exist",
        f"hooks.on_vip_up: {not_executable} is not executable",
        "hooks.timeout_s: 0.0 must be 0.1..300 seconds",
    ])


# --- lbd in a lab -------------------------------------------------------------------------

SIZES = MapSizes(max_vips=4, max_backends=16, ring_entries=4 * 1009, conn_entries=4096)
VIP = "10.200.0.10:80/tcp"


@pytest.fixture(scope="module")
def hooked(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hooks")
    out = workdir / "hooks.out"
    recorder = script(workdir, "record", RECORDER)
    hooks = "\n".join(f'{name} = ["{recorder}", "{out}"]' for name in (
        "on_backend_up", "on_backend_down", "on_vip_up", "on_vip_down", "on_host_drained",
        "on_host_in_service"))
    with lab_with_lbd("xthook", workdir / "lbd", SIZES, n_backends=2,
                      config_extra=f"[hooks]\n{hooks}\ntimeout_s = 5\n") as (topo, lbd):
        yield topo, lbd, out


def wait_runs(out: Path, count: int, timeout: float = 20.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while len(records(out)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a run beyond the expected ones would show up now
    return records(out)


def told(run: dict[str, str]) -> tuple[str, str, str]:
    data = json.loads(run["stdin"])
    return data["event"], data["vip"], data["backend"]


def test_lbd_runs_its_hooks_for_what_the_datapath_realises(hooked):
    from xdplb_lab import lab as labmod

    topo, lbd, out = hooked
    first, second = topo.backend_v4
    ok(lbd, "vip", "add", VIP, "--ring-size", "1009", "--check", "tcp", "--check-port", "80",
       "--check-interval", "200", "--rise", "1", "--fall", "1")
    ok(lbd, "backend", "add", VIP, first)
    ok(lbd, "backend", "add", VIP, second)
    # A new backend joins the ring once its first check passes; the VIP, added with
    # none, is up with the first.
    runs = wait_runs(out, 3)
    assert sorted(told(r) for r in runs) == [
        ("backend_up", VIP, first), ("backend_up", VIP, second), ("vip_up", VIP, "")]
    joined = json.loads(next(r for r in runs if told(r)[0] == "vip_up")["stdin"])
    assert (joined["healthy_backends"], joined["backends"]) == (1, 1)

    # The only listener of `first` stops: it leaves the ring; then `second` too.
    labmod.stop_backend_server(topo, 0)
    runs = wait_runs(out, 4)
    assert [told(r) for r in runs[3:]] == [("backend_down", VIP, first)]
    assert json.loads(runs[3]["stdin"])["ring_positions"] == 0
    labmod.stop_backend_server(topo, 1)
    runs = wait_runs(out, 6)
    assert sorted(told(r) for r in runs[4:]) == [("backend_down", VIP, second),
                                                  ("vip_down", VIP, "")]
    vip_down = json.loads(next(r for r in runs if told(r)[0] == "vip_down")["stdin"])
    assert (vip_down["healthy_backends"], vip_down["backends"]) == (0, 2)

    labmod.start_http_backends(topo)  # both listen again
    runs = wait_runs(out, 9)
    assert sorted(told(r) for r in runs[6:]) == [
        ("backend_up", VIP, first), ("backend_up", VIP, second), ("vip_up", VIP, "")]

    ok(lbd, "drain-host")
    ok(lbd, "drain-host", "--undo")
    runs = wait_runs(out, 11)
    assert [told(r)[0] for r in runs[9:]] == ["host_drained", "host_in_service"]
    assert len(runs) == 11
    metrics = topo.lb.run(["curl", "-sS", "--max-time", "5",
                           "http://127.0.0.1:9640/metrics"]).stdout
    assert 'xdplb_hook_runs_total{hook="on_backend_down",outcome="ok"} 2.0' in metrics
    assert 'xdplb_hook_runs_total{hook="on_vip_up",outcome="ok"} 2.0' in metrics
    assert 'outcome="failed"' not in metrics and 'outcome="timeout"' not in metrics
