"""The package an LB host gets: the wheel is built from the tracked files,
installed by the documented steps into a new venv, runs without a compiler on
the PATH (the Maglev fill is compiled in and builds the same ring as the pure
fallback), and its systemd unit verifies and scores as docs/operating.md says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import pytest

from xdplb import maglev

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/xdplb"  # where docs/operating.md installs
# The install steps (docs/operating.md) that put lbd in place, with PREFIX spelled out there.
INSTALL_STEPS = [
    "python3 -m venv --system-site-packages {prefix}",
    "{prefix}/bin/pip install --require-hashes --no-deps -r requirements-runtime.lock",
    "{prefix}/bin/pip install --no-deps xdplb-*.whl",
    "cp {prefix}/lib/python3.11/site-packages/xdplb/lbd.service /etc/systemd/system/",
]
# The step docs/backend-hosts.md adds on a backend host (the same venv and wheel).
BACKEND_UNIT_STEP = ("cp {prefix}/lib/python3.11/site-packages/xdplb/xdplb-backend.service "
                     "/etc/systemd/system/")
UNITS = ("lbd.service", "xdplb-backend.service")
MAX_EXPOSURE = 5.0
RING_WEIGHTS = {f"10.1.{i // 200}.{i % 200 + 1}": 100 + i for i in range(300)}


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                            **kwargs)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `make wheel` builds, from a copy of the tracked files only."""
    source = tmp_path_factory.mktemp("source")
    tracked = run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, tracked):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(source)])
    [built] = dist.glob("xdplb-*.whl")
    return built


@pytest.fixture(scope="module")
def root(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root where the documented install steps ran (PREFIX inside it)."""
    guide = (REPO / "docs" / "operating.md").read_text()
    for step in INSTALL_STEPS:
        assert step.format(prefix=PREFIX) in guide, f"docs/operating.md no longer says: {step}"
    backend_guide = (REPO / "docs" / "backend-hosts.md").read_text()
    for step in [*INSTALL_STEPS[:3], BACKEND_UNIT_STEP]:
        assert step.format(prefix=PREFIX) in backend_guide, \
            f"docs/backend-hosts.md no longer says: {step}"
    root = tmp_path_factory.mktemp("root")
    prefix = root / PREFIX.lstrip("/")
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(prefix)])
    run([f"{prefix}/bin/pip", "install", "--quiet", "--require-hashes", "--no-deps", "-r",
         str(REPO / "requirements-runtime.lock")])
    run([f"{prefix}/bin/pip", "install", "--quiet", "--no-deps", str(wheel)])
    site = prefix / "lib" / "python3.11" / "site-packages"
    for unit in UNITS:
        (units / unit).write_bytes((site / "xdplb" / unit).read_bytes())
    return root


def without_compiler(prefix: Path) -> dict[str, str]:
    """An environment whose PATH has the venv alone: no gcc, cc or clang."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "PYTHONPATH")}
    env["PATH"] = str(prefix / "bin")
    return env


def test_the_wheel_carries_the_compiled_fill_and_what_lbd_loads(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"xdplb/_maglev\.cpython-311-x86_64-linux-gnu\.so", n)
               for n in names)
    assert "xdplb/_maglev.c" not in names
    for needed in ("xdplb/bpf/balancer.c", "xdplb/bpf/decap.c", "xdplb/lbd.service",
                   "xdplb/xdplb-backend.service", "xdplb/backendhost/cli.py",
                   "xdplb/v1/lb_pb2.py", "lbctl/cli.py", "xdplb/alerts/xdplb-rules.yml",
                   "xdplb/dashboards/grafana-xdplb.json"):
        assert needed in names, needed
    assert re.search(r"^Requires-Dist: grpcio>=", zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("METADATA"))).decode(), re.M)
    assert not any("scapy" in n for n in names)


def test_the_wheel_ships_only_the_product(wheel: Path) -> None:
    """No lab, demo, test server or bench-only program: an LB host or a backend host
    gets what it runs, and the decapsulator."""
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/", 1)[0] for n in names if not n.startswith("xdplb-")}
    assert packages == {"xdplb", "lbctl"}
    for absent in ("lab", "demo", "backend_server", "load_server", "vm", "trafficgen",
                   "bench_", "pass.c"):
        assert not [n for n in names if absent in n.rsplit("/", 1)[-1]], absent
    bpf = sorted(n.rsplit("/", 1)[-1] for n in names if n.startswith("xdplb/bpf/"))
    assert bpf == ["__init__.py", "balancer.c", "csum.h", "decap.c", "encap.h", "hash.h",
                   "hc_encap.h", "icmp.h", "parse.h", "quic.h", "syn_probe.h", "xdplb_structs.h"]


def test_lbd_runs_and_builds_rings_without_a_compiler(root: Path, tmp_path: Path) -> None:
    prefix = root / PREFIX.lstrip("/")
    env = without_compiler(prefix)
    for compiler in ("gcc", "cc", "clang"):
        probe = subprocess.run(["/bin/sh", "-c", f"command -v {compiler}"], env=env,
                               capture_output=True, text=True, check=False)
        assert probe.returncode != 0, f"{compiler} is on the test's PATH"
    lbd_version = run([str(prefix / "bin" / "lbd"), "--version"], env=env).stdout
    assert re.fullmatch(r"lbd \d+\.\d+\.\d+\S*\n", lbd_version)
    config = tmp_path / "lbd.toml"
    config.write_text('interfaces = ["eth0"]\n')
    assert run([str(prefix / "bin" / "lbd"), "--check-config", str(config)],
               env=env).stdout == f"{config}: ok\n"
    assert run([str(prefix / "bin" / "xdplb-backend"), "--version"],
               env=env).stdout == "xdplb-backend " + lbd_version.split()[1] + "\n"
    script = ("import json, sys\nfrom xdplb import maglev\n"
              "ring = maglev.build_ring(json.loads(sys.argv[1]), 65537)\n"
              "print(maglev.native_available(), maglev.native_library_path())\n"
              "sys.stdout.write(ring.table.tobytes().hex())\n")
    out = run([str(prefix / "bin" / "python"), "-c", script, json.dumps(RING_WEIGHTS)],
              env=env, cwd=tmp_path).stdout
    header, table = out.split("\n", 1)
    native, path = header.split(" ", 1)
    assert native == "True" and path.startswith(str(prefix))
    with mock.patch.object(maglev, "_native_fill", return_value=None):
        fallback = maglev.build_ring(RING_WEIGHTS, 65537)
    assert bytes.fromhex(table) == fallback.table.tobytes()


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_verifies_once_installed(root: Path, unit: str) -> None:
    # verify resolves units and ExecStart inside --root: give it systemd's own units.
    system = root / "usr" / "lib" / "systemd"
    system.mkdir(parents=True, exist_ok=True)
    if not (system / "system").exists():
        run(["cp", "-a", "/usr/lib/systemd/system", str(system)])
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                             f"/etc/systemd/system/{unit}"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_scores_at_most_five(root: Path, unit: str) -> None:
    path = root / "etc" / "systemd" / "system" / unit
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    score = float(re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)",
                            result.stdout)[1])
    assert score <= MAX_EXPOSURE, result.stdout
    text = path.read_text()
    raw = " CAP_NET_RAW" if unit == "lbd.service" else ""  # tcp-syn checks' raw socket
    assert (f"\nCapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN{raw} CAP_SYS_ADMIN\n"
            in text)
    if unit == "lbd.service":
        assert "\nRestart=always\n" in text
    else:  # re-applied at every boot
        assert "\nWantedBy=multi-user.target\n" in text and "\nType=oneshot\n" in text
