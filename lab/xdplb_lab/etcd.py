"""A real etcd cluster in the lab: one member per namespace, linked to the router.

    etcd{i} eth0 ---- ethE{i} router     (10.100.{20+i}.0/24)

Members run Debian's etcd (etcd-server) with their own data directory under
the lab's work directory; the LB hosts reach them through the router, so a
blackhole route on an LB host cuts it off from etcd while its forwarding
goes on. Members are started, killed and restarted by the tests.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdplb_lab.lab import Host, Iface, Lab, LabError, _address_link, _default_via_router, _LinkPlan

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
CLIENT_PORT, PEER_PORT = 2379, 2380
HEALTHY_TIMEOUT_S = 30.0
ETCD_SUBNET_V4 = "10.100.20.0/22"  # every member's link: what cutting a host off blocks


def member_v4(i: int) -> str:
    return f"10.100.{20 + i}.2"


def _plan(i: int) -> _LinkPlan:
    return _LinkPlan((member_v4(i), f"10.100.{20 + i}.1"),
                     (f"fd00:100:{20 + i}::2", f"fd00:100:{20 + i}::1"))


@dataclass
class EtcdMember:
    index: int
    host: Host
    iface: Iface
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[Any] | None = None

    @property
    def name(self) -> str:
        return f"m{self.index}"

    @property
    def client_url(self) -> str:
        return f"http://{member_v4(self.index)}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{member_v4(self.index)}:{PEER_PORT}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    lab: Lab
    router: Host
    workdir: Path
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, i: int, existing: bool = False) -> None:
        member = self.members[i]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--initial-cluster", cluster, "--initial-cluster-token", self.lab.runid,
                "--initial-cluster-state", "existing" if existing else "new",
                "--logger", "zap", "--log-outputs", "stderr"]
        log = member.log_path.open("a")
        member.proc = member.host.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start_all(self) -> float:
        started = time.monotonic()
        for i in range(len(self.members)):
            self.start(i)
        self.wait_healthy()
        return time.monotonic() - started

    def kill(self, i: int) -> None:
        member = self.members[i]
        if member.running:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(timeout=10)

    def restart(self, i: int) -> None:
        self.start(i, existing=True)

    def etcdctl(self, *args: str, endpoints: list[str] | None = None,
                timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        argv = ["env", "ETCDCTL_API=3", ETCDCTL, "--endpoints",
                ",".join(endpoints or self.endpoints), "--command-timeout", "3s", *args]
        return self.router.run(argv, check=False, timeout=timeout)

    def wait_healthy(self, members: list[int] | None = None,
                     timeout: float = HEALTHY_TIMEOUT_S) -> float:
        """Until every given member (default: all running) answers a health check."""
        started = time.monotonic()
        wanted = [self.members[i] for i in members] if members is not None else [
            m for m in self.members if m.running]
        while time.monotonic() - started < timeout:
            result = self.etcdctl("endpoint", "health",
                                  endpoints=[m.client_url for m in wanted])
            if result.returncode == 0:
                return time.monotonic() - started
            for member in wanted:
                if not member.running:
                    raise LabError(f"etcd member {member.name} exited:\n{tail(member.log_path)}")
            time.sleep(0.2)
        raise LabError(f"etcd not healthy after {timeout:.0f} s: {result.stdout}{result.stderr}")

    def close(self) -> None:
        for i in range(len(self.members)):
            with contextlib.suppress(Exception):
                self.kill(i)
        shutil.rmtree(self.workdir, ignore_errors=True)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def add_etcd_cluster(lab: Lab, router: Host, workdir: Path, n: int = 3) -> EtcdCluster:
    """n member namespaces, each linked to the router; nothing started yet."""
    cluster = EtcdCluster(lab, router, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        host = lab.add_host(f"etcd{i}")
        iface, router_iface = lab.connect(host, router, "eth0", f"ethE{i}")
        _address_link(iface, router_iface, _plan(i))
        _default_via_router(iface, _plan(i))
        router.sysctl(f"net.ipv4.conf.{router_iface.name}.rp_filter", 0)
        member_dir = workdir / f"m{i}"
        member_dir.mkdir(parents=True, exist_ok=True)
        cluster.members.append(EtcdMember(i, host, iface, member_dir / "data",
                                          member_dir / "etcd.log"))
    return cluster


def cut_off(host: Host) -> None:
    """The host loses etcd (and only etcd): packets to the members' links go nowhere."""
    host.run(["ip", "route", "add", "blackhole", ETCD_SUBNET_V4])


def reconnect(host: Host) -> None:
    host.run(["ip", "route", "del", "blackhole", ETCD_SUBNET_V4])


def state_history(cluster: EtcdCluster, key: str, from_revision: int,
                  listen_s: float = 3.0) -> list[tuple[int, bytes]]:
    """Every version a key took from from_revision on, as (mod_revision, value): a
    bounded `etcdctl watch --rev` (it runs listen_s, then is stopped)."""
    import base64
    import json

    result = cluster.router.run(
        ["timeout", str(listen_s), "env", "ETCDCTL_API=3", ETCDCTL, "--endpoints",
         ",".join(cluster.endpoints), "watch", key, "--rev", str(from_revision), "-w", "json"],
        check=False, timeout=listen_s + 10)
    decoder, text, position = json.JSONDecoder(), result.stdout, 0
    versions: list[tuple[int, bytes]] = []
    while (position := _skip_blank(text, position)) < len(text):
        answer, position = decoder.raw_decode(text, position)
        for event in answer.get("Events") or []:
            kv = event["kv"]
            versions.append((int(kv["mod_revision"]), base64.b64decode(kv.get("value", ""))))
    return versions


def _skip_blank(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
