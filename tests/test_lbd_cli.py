"""lbd's command line without a running daemon: --version, --help, and
--check-config, which reports every problem of a configuration (and of a
state file) at once and touches nothing."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import click
import pytest

from xdplb import lbd
from xdplb.datapath import PIN_ROOT
from xdplb_lab.daemon import console_script

GOOD = 'interfaces = ["eth0"]\n'


def run_lbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([console_script("lbd"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_version_comes_from_the_package_metadata() -> None:
    result = run_lbd("--version")
    assert (result.returncode, result.stdout) == (0, f"lbd {version('xdplb')}\n")


def test_every_option_is_explained_in_help() -> None:
    missing = [p.name for p in lbd.main.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []
    text = run_lbd("--help").stdout
    for param in lbd.main.params:
        for flag in param.opts:
            assert flag in text, flag


def test_a_good_config_checks_ok(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text(GOOD)
    result = run_lbd("--check-config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")


def test_every_problem_is_reported_at_once_with_file_key_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text('interfaces = ["eth0"]\nxdp_mode = "turbo"\nmtu = "1500"\nbogus = 1\n'
                    '[metrics]\nlistn = "127.0.0.1:9640"\n[maps]\nmax_vips = 0\n'
                    '[flows]\nsettled_refresh_s = 12\nidle_timeot_s = 60\n')
    result = run_lbd("--check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    where = f"lbd: config {path}: "
    assert sorted(result.stderr.splitlines()) == sorted(where + line for line in [
        "mtu: must be int, got '1500'",
        "metrics: unknown key 'listn' (did you mean 'listen'?)",
        "maps.max_vips: must be an integer >= 2, got 0",
        "flows: unknown key 'idle_timeot_s' (did you mean 'idle_timeout_s'?)",
        "unknown key 'bogus'",
        "xdp_mode: 'turbo' is not one of native, generic",
        "flows.settled_refresh_s 12: must be 0 or a power of two 2..1024",
    ])


def test_an_unreadable_config_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_bytes(b'interfaces = ["\xff"]\n')
    result = run_lbd("--check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"lbd: config {path}: not UTF-8 text: ")
    assert result.stderr.count("\n") == 1


def test_the_command_line_applies_on_top_of_the_checked_file(tmp_path: Path) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text("mtu = 1500\n")  # no interfaces in the file
    assert run_lbd("--check-config", str(path)).returncode == 2
    assert run_lbd("--check-config", str(path), "--interface", "eth9").returncode == 0


def test_a_state_file_is_checked_against_the_configs_map_sizes(tmp_path: Path) -> None:
    config = tmp_path / "lbd.toml"
    config.write_text(GOOD + "[maps]\nmax_vips = 2\n")
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 1, "vips": [
        {"vip": "10.0.0.1:80/tcp", "hash": "crc"},
        {"vip": "fd00::1:80/tcp"},
        {"vip": "10.0.0.2:80/tcp", "backnds": []},
    ]}))
    result = run_lbd("--check-config", str(config), "--state", str(state))
    assert result.returncode == 2
    where = f"lbd: state file {state}: state.vips"
    assert result.stderr.splitlines() == [
        f"{where}[0] (10.0.0.1:80/tcp).hash: 'crc' is not one of 5tuple, source",
        f"{where}[1].vip: VIP 'fd00::1:80/tcp' is ambiguous: write [fd00::1]:80/tcp for "
        "port 80, or [fd00::1:80]/tcp for every port of that address",
        f"{where}[2]: unknown key 'backnds' (did you mean 'backends'?)",
    ]
    state.write_text(json.dumps({"version": 1, "vips": [
        {"vip": f"10.0.0.{i}:80/tcp"} for i in (1, 2)]}))
    result = run_lbd("--check-config", str(config), "--state", str(state))
    assert result.returncode == 2
    assert result.stderr == (f"lbd: state file {state}: 2 VIPs exceed the limit of 1 "
                             "(map size max_vips)\n")
    state.write_bytes(b'{"version": 1, "vips": ["\xff"]}')
    result = run_lbd("--check-config", str(config), "--state", str(state))
    assert result.stderr == (f"lbd: state file {state}: not UTF-8 text (invalid start byte "
                             "at byte 25)\n")


def test_checking_touches_nothing(tmp_path: Path) -> None:
    name = f"xtcheck-{tmp_path.name}"
    config = tmp_path / "lbd.toml"
    config.write_text(GOOD + f'name = "{name}"\nstate_dir = "{tmp_path}/state"\n'
                      f'[api]\nsocket = "{tmp_path}/lbd.sock"\n')
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "vips": []}')
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_lbd("--check-config", str(config), "--state", str(state))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (PIN_ROOT / name).exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--state", "x.json"], "--state goes with --check-config"),
    (["--check-config", "a.toml", "--config", "b.toml"],
     "--check-config takes the file to check: leave out --config"),
])
def test_check_config_usage_errors(args: list[str], message: str) -> None:
    result = run_lbd(*args)
    assert result.returncode == 2
    assert message in result.stderr
