"""BIRD for the BGP lab: a daemon per namespace, driven through birdc, and the
configurations of an LB host and of the router."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdplb_lab.lab import (
    ROUTER_CLIENT_V4,
    Host,
)

BIRD = shutil.which("bird", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/bird"
BIRDC = shutil.which("birdc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/birdc"
ROUTER_AS = 65000
LB_AS = 65001
BGP_ESTABLISH_TIMEOUT_S = 30.0
# BGP timers for a lab: sessions come up in about a second and a silent peer is
# dropped after the 3 s hold time (the smallest BGP allows). A lost link is
# noticed at once: `check link` on the router's sessions.
BGP_TIMERS = """\
  hold time 3;
  keepalive time 1;
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 5;"""


def lb_v4(i: int) -> str:
    """IPv4 address of LB host i (0-based) on its link to the router."""
    return f"10.100.{2 + i}.2"


def router_lb_v4(i: int) -> str:
    return f"10.100.{2 + i}.1"


def lb_v6(i: int) -> str:
    return f"fd00:100:{2 + i}::2"


def router_lb_v6(i: int) -> str:
    return f"fd00:100:{2 + i}::1"


class BirdError(RuntimeError):
    """BIRD did not start, or did not reach the state asked for in time."""


# `birdc show protocols`: Name Proto Table State Since Info (Since: a time, or date and time)
_PROTOCOL = re.compile(r"^(?P<name>\S+)\s+(?P<proto>BGP|Device|Kernel|Static)\s+\S+\s+"
                       r"(?P<state>\S+)\s+(?:\d{4}-\d\d-\d\d\s+)?\S+\s*(?P<info>.*)$")


@dataclass
class Bird:
    """One BIRD daemon in one namespace: its config, control socket, pid file and log."""

    host: Host
    workdir: Path
    config: str
    proc: subprocess.Popen[Any] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "bird.conf"

    @property
    def socket(self) -> Path:
        return self.workdir / "bird.ctl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bird.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        check = subprocess.run([BIRD, "-p", "-c", str(self.config_path)], capture_output=True,
                               text=True, timeout=10, check=False)
        if check.returncode != 0:
            raise BirdError(f"{self.config_path}: {check.stderr.strip() or check.stdout}")
        with self.log_path.open("a") as log:
            # -f: stays in the foreground, so this Popen is BIRD and the lab kills it.
            self.proc = self.host.popen(
                [BIRD, "-f", "-c", self.config_path, "-s", self.socket,
                 "-P", self.workdir / "bird.pid"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BirdError(f"BIRD in {self.host.name} exited with {self.proc.returncode}: "
                                f"{self.log_tail()}")
            if self.socket.exists() and self.birdc("show", "status", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise BirdError(f"BIRD in {self.host.name}: no control socket after 10 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def birdc(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([BIRDC, "-s", str(self.socket), *command], capture_output=True,
                                text=True, timeout=10, check=False)
        if check and result.returncode != 0:
            raise BirdError(f"birdc {' '.join(command)}: {result.stderr or result.stdout}")
        return result

    def protocols(self) -> dict[str, tuple[str, str]]:
        """BGP protocol name -> (state, info) as `show protocols` says."""
        out = self.birdc("show", "protocols").stdout
        return {m["name"]: (m["state"], m["info"].strip())
                for m in map(_PROTOCOL.match, out.splitlines()) if m and m["proto"] == "BGP"}

    def established(self) -> set[str]:
        return {name for name, (_, info) in self.protocols().items()
                if info.startswith("Established")}

    def wait_established(self, names: Sequence[str],
                         timeout: float = BGP_ESTABLISH_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if set(names) <= self.established():
                return time.monotonic() - started
            time.sleep(0.1)
        raise BirdError(f"BGP in {self.host.name} not established after {timeout:.0f} s: "
                        f"{self.protocols()}")

    def route_sources(self, prefix: str) -> set[str]:
        """The protocols BIRD learned `prefix` from (the router: one per LB host session)."""
        out = self.birdc("show", "route", prefix, check=False).stdout
        return set(re.findall(r"unicast \[(\S+)\s", out))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def lb_bird_config(i: int, include_dir: Path, local_as: int = LB_AS) -> str:
    """BIRD on LB host i: lbd's include files in two static protocols, exported over eBGP."""
    return f"""\
# BIRD on LB host lb{i + 1}, written by xdplb_lab.bgp. lbd rewrites the two
# include files (route P blackhole; lines) and runs `birdc configure`.
log stderr all;
timeformat log iso long ms;
router id {lb_v4(i)};
protocol device {{ scan time 10; }}
protocol static vips4 {{
  ipv4;
  include "{include_dir}/vips4.conf";
}}
protocol static vips6 {{
  ipv6;
  include "{include_dir}/vips6.conf";
}}
template bgp uplink {{
  local as {local_as};
{BGP_TIMERS}
}}
protocol bgp router4 from uplink {{
  local {lb_v4(i)} as {local_as};
  neighbor {router_lb_v4(i)} as {ROUTER_AS};
  ipv4 {{ import none; export where proto = "vips4"; }};
}}
protocol bgp router6 from uplink {{
  local {lb_v6(i)} as {local_as};
  neighbor {router_lb_v6(i)} as {ROUTER_AS};
  ipv6 {{ import none; export where proto = "vips6"; }};
}}
"""


def router_bird_config(n_lbs: int, lb_as: Sequence[int]) -> str:
    """BIRD on the router: a session per LB host and family; ECMP into the kernel."""
    sessions = "".join(f"""\
protocol bgp lb{i + 1}v4 from lbhost {{
  local {router_lb_v4(i)} as {ROUTER_AS};
  neighbor {lb_v4(i)} as {lb_as[i]};
  ipv4 {{ import all; export none; }};
}}
protocol bgp lb{i + 1}v6 from lbhost {{
  local {router_lb_v6(i)} as {ROUTER_AS};
  neighbor {lb_v6(i)} as {lb_as[i]};
  ipv6 {{ import all; export none; next hop prefer global; }};
}}
""" for i in range(n_lbs))
    return f"""\
# BIRD on the router, written by xdplb_lab.bgp.
log stderr all;
timeformat log iso long ms;
router id {ROUTER_CLIENT_V4};
protocol device {{ scan time 10; }}
# merge paths: the VIP learned from every LB host becomes one ECMP route.
protocol kernel kernel4 {{
  ipv4 {{ import none; export all; }};
  merge paths on;
}}
protocol kernel kernel6 {{
  ipv6 {{ import none; export all; }};
  merge paths on;
}}
template bgp lbhost {{
  local as {ROUTER_AS};
{BGP_TIMERS}
  check link yes;
}}
{sessions}"""
