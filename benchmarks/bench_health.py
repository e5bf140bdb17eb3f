"""Benchmark xdplb.health: checks one core sustains, and the checker's CPU at 10,000 backends.

Usage: python benchmarks/bench_health.py [--json PATH] [--quick]
                                         [--only throughput|lb-host|loopback]

The real HealthChecker runs in this process, driven through update() with a
desired state and a fake apply callback (lbd's controller is the only thing
left out). Its listeners run in a separate process, so their CPU is not
counted: on 127.0.0.1 (every 127/8 address is local, so each backend has an
address of its own) a TCP server that accepts and holds each connection until
the check resets it (as a server waiting for a request does), an HTTP server
answering 200 and closing, and a gRPC server answering grpc.health.v1 Check SERVING.
CPU is this process's time.process_time() (user + system, every thread,
gRPC's own included) over a measuring window after a warm-up.

1. Checks per CPU-second, per kind: PROBES checks at a 10 ms interval (far
   below the 100 ms lbd accepts: only to keep every check due, so the
   checker is saturated); checks completed / CPU seconds is what one core
   sustains. Baseline, measured in the same run against the same listeners:
   a bare asyncio loop doing the same network work with the same
   concurrency and nothing else (TCP: connect and reset; HTTP: connect,
   GET, read to the end; gRPC: Check on a kept channel); ratio = checker /
   baseline, i.e. what scheduling, timeouts, verdicts and jitter cost.
2. 10,000 TCP-checked backends (10 VIPs x 1000) at a 1 s interval, the
   checks spread over the interval as after a restart (verdicts seeded),
   with lbd's own check-latency histogram observed as lbd does. Target:
   under 30% of one core. Measured twice:

   a. LB host (the figure that counts): the backends are "other hosts".
      The checker runs in a network namespace of its own (the LB side),
      pinned to CPU 0; the listeners in another (the backend side), pinned
      to CPU 1; the two are joined by a veth pair whose ends run threaded
      NAPI (GRO on, TSO off, /sys/class/net/<dev>/threaded = 1), each end's
      NAPI kthread pinned to its side's CPU. A frame sent into a veth is
      then received by its peer's NAPI thread, so what the backend side's
      kernel does (SYN, ACK and RST received, SYN-ACK sent) runs on CPU 1,
      and what the LB side's kernel does runs on CPU 0: in the checker's
      system calls (connect and its SYN, epoll, the reset) and in the
      LB-side NAPI thread (SYN-ACK received, ACK sent, the
      checker woken). Counted as the LB host's cost: the checker's user and
      system time (CLOCK_PROCESS_CPUTIME_ID, split by getrusage), the
      LB-side NAPI thread's run time and that of every kernel thread bound
      to CPU 0 (ksoftirqd/0, kworkers; /proc/<pid>/schedstat), and CPU 0's
      irq and softirq time (/proc/stat). This kernel accounts time by ticks
      (no IRQ time accounting), so a softirq is charged to the task it
      interrupted and also shows in /proc/stat's softirq column: adding the
      column errs high, never low. Not counted, and shown apart: CPU 1's
      backend side (its NAPI thread, the listener process), and CPU 0's
      busy time in all (wall minus idle), which also holds whatever other
      process the scheduler put there. Baseline: bare blocking connects with
      a reset close, one after another, run the same way (LB namespace,
      CPU 0) and charged the same way. The listener is the TCP server of
      part 1 (holding each connection until the check's reset), in the
      backend namespace: every address of 198.19.0.0/16 is local there.
      Then, in the same namespaces against the same listener, half-open checks
      (kind tcp-syn) at 10,000 and 50,000 backends: the balancer is attached to
      the LB side's veth (compiled before the window) and catches the SYN-ACKs,
      answering each with a RST by XDP_TX; charged the same way. Target: at most
      5% of one core at 10,000, and 0.15 of the tcp checker's cost per check.
      The backend end runs a pass-everything XDP program throughout (see
      RemoteBackends).
   b. Loopback (both ends charged): the listeners on 127/8 in another
      process, as in part 1: the kernel work of both ends of every
      handshake (the listener's SYN, ACK and RST handling too) runs in the
      checker's system calls and is charged to it. Baseline: bare blocking
      connects with a reset close on loopback, at the same rate.

Part 2a needs root (namespaces), iproute2, ethtool and two CPUs; the
namespaces and veths it makes have a name unique to the run and are removed
on the way out, failure or not (xdplb_lab.lab). Traffic stays inside them
(198.18.0.0/15, the range set aside for benchmarks, routed only there).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import resource
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Lets the benchmark run from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from timing import write_json

from xdplb import health as hc
from xdplb.metrics import ControlPlaneMetrics
from xdplb.state import BackendSpec, DesiredState, HealthCheck, VipKey, VipSpec
from xdplb_lab import lab as L
from xdplb_lab.programs import attach_pass

PROBES = 256
FAST_INTERVAL_MS = 10
WARMUP_S, WINDOW_S = 1.0, 3.0
SCALE_BACKENDS, SCALE_VIPS, SCALE_INTERVAL_MS = 10_000, 10, 1000
SCALE_WARMUP_S, SCALE_WINDOW_S = 2.0, 10.0
TARGET_CPU = 0.30
SYN_TARGET_CPU, SYN_TARGET_RATIO = 0.05, 0.15  # tcp-syn at 10,000: share of a core, ÷ tcp
SYN_LARGE_BACKENDS = 50_000
SYN_SLOTS = 65_536  # the balancer's max_backends in a tcp-syn run: a slot per backend
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
LINGER_RST = struct.pack("ii", 1, 0)
HTTP_THREADS = 32
# Part 2a: the LB side and the backend side, each on a CPU of its own.
CHECKER_CPU, BACKEND_CPU = 0, 1
LB_SIDE, BACKEND_SIDE = "198.18.0.1", "198.18.0.2"  # the veth pair's ends, a /30
BACKEND_RANGE = "198.19.0.0/16"  # every address in it is the backend namespace's own
LAB_PREFIX = "xbh"


def addresses(n: int, net: int) -> list[str]:
    """n loopback addresses of 127.net.0.0/16, one per backend."""
    return [f"127.{net}.{(i + 1) >> 8}.{(i + 1) & 255}" for i in range(n)]


# --- the listeners: a separate process ------------------------------------------------------


def _http_loop(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            conn.sendall(HTTP_RESPONSE)
        except OSError:
            pass
        finally:
            conn.close()


def _hold_loop(listener: socket.socket) -> None:
    """TCP: accept each connection and hold it until the client resets (or closes) it, as
    a server waiting for a request does: the check's reset ends it, not a FIN of ours
    (which would add a packet each way to every check)."""
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # the reset
                data = b""
            if not data:
                sel.unregister(conn)
                conn.close()


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4096)
    return sock


async def _serve_grpc() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("0.0.0.0:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port  # the server stops once nothing refers to it


def serve_listeners() -> None:
    """The listener process: prints its ports as one JSON line, runs until stdin closes."""
    tcp, http = _listen(), _listen()
    threading.Thread(target=_hold_loop, args=(tcp,), daemon=True).start()
    # HTTP threads wait for each request: enough of them to keep up with the checker.
    for _ in range(HTTP_THREADS):
        threading.Thread(target=_http_loop, args=(http,), daemon=True).start()

    async def main() -> None:
        _server, grpc_port = await _serve_grpc()
        print(json.dumps({"tcp": tcp.getsockname()[1], "http": http.getsockname()[1],
                          "grpc": grpc_port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


class Listeners:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit("bench_health: the listener process did not start")
        self.ports: dict[str, int] = json.loads(line)

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- measuring ------------------------------------------------------------------------------


class Window:
    """CPU (this process, every thread) and wall time between start() and stop()."""

    def start(self) -> None:
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.user_s = usage.ru_utime - self.usage0.ru_utime
        self.sys_s = usage.ru_stime - self.usage0.ru_stime
        return time.process_time() - self.cpu0, time.monotonic() - self.wall0


def _schedstat_s(pid: int) -> float:
    """A thread's run time so far (ns-exact, whatever the tick)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def _process_cpu_s(pid: int) -> float:
    """A process's user + system time so far, every thread."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wakeups(pid: int) -> int:
    """Times a process has gone to sleep and been woken (voluntary context switches)."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith("voluntary_ctxt_switches"))


def _packets(ifname: str, way: str) -> int:
    """Packets received or sent so far by an interface of this namespace."""
    with open(f"/sys/class/net/{ifname}/statistics/{way}_packets") as f:
        return int(f.read())


def _cpu_times(cpu: int) -> tuple[float, float]:
    """(idle + iowait, irq + softirq) seconds so far of one CPU, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) / os.sysconf("SC_CLK_TCK") for x in line.split()[1:]]
                return v[3] + v[4], v[5] + v[6]
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


PF_KTHREAD = 0x00200000


def cpu_kthreads(cpu: int) -> list[int]:
    """Kernel threads bound to `cpu` alone (ksoftirqd, kworkers, ...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            flags = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[6])
            if flags & PF_KTHREAD and os.sched_getaffinity(int(entry.name)) == {cpu}:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


class HostWindow(Window):
    """A Window that also takes what else the LB host ran for the checker (part 2a): the
    LB-side NAPI thread, the kernel threads of the checker's CPU, that CPU's interrupt
    and softirq time, and (not counted) the backend side and the CPU's busy time."""

    def __init__(self, napi_lb: int, napi_backend: int, listener_pid: int, ifname: str) -> None:
        self.napi_lb, self.napi_backend, self.listener_pid = napi_lb, napi_backend, listener_pid
        self.ifname = ifname
        self.kthreads = [p for p in cpu_kthreads(CHECKER_CPU) if p != napi_lb]

    def _take(self) -> dict[str, float]:
        idle, irq = _cpu_times(CHECKER_CPU)
        kthreads = 0.0
        for pid in self.kthreads:
            with contextlib.suppress(OSError):  # a kworker may come and go
                kthreads += _schedstat_s(pid)
        return {"napi_lb": _schedstat_s(self.napi_lb), "kthreads": kthreads,
                "cpu_idle": idle, "cpu_irq": irq,
                "napi_backend": _schedstat_s(self.napi_backend),
                "wakeups": _wakeups(os.getpid()), "napi_wakeups": _wakeups(self.napi_lb),
                "rx": _packets(self.ifname, "rx"), "tx": _packets(self.ifname, "tx"),
                "listener": _process_cpu_s(self.listener_pid)}

    def start(self) -> None:
        self.taken0 = self._take()
        super().start()

    def stop(self) -> tuple[float, float]:
        cpu, wall = super().stop()
        taken = self._take()
        self.deltas = {k: taken[k] - self.taken0[k] for k in taken}
        return cpu, wall

    def lb_host(self, cpu: float, wall: float, count: int) -> dict[str, Any]:
        """The LB host's cost (see the module's docstring), in all and per operation."""
        d = self.deltas
        total = cpu + d["napi_lb"] + d["kthreads"] + d["cpu_irq"]
        busy = wall - d["cpu_idle"]

        def us(x: float) -> float:
            return round(1e6 * x / count, 2)

        return {"lb_cpu_s": round(total, 3), "lb_cpu_share": round(total / wall, 3),
                "lb_us": us(total), "user_us": us(self.user_s), "sys_us": us(self.sys_s),
                "napi_us": us(d["napi_lb"]), "kthreads_us": us(d["kthreads"]),
                "irq_us": us(d["cpu_irq"]), "cpu_busy_us": us(busy),
                "backend_side_us": us(d["napi_backend"] + d["listener"]),
                "wakeups_per_op": round(d["wakeups"] / count, 3),
                "napi_wakeups_per_op": round(d["napi_wakeups"] / count, 3),
                "rx_per_op": round(d["rx"] / count, 2), "tx_per_op": round(d["tx"] / count, 2)}


def lbd_observe() -> hc.Observe:
    """What lbd does with every check's latency: its Prometheus histogram."""
    return ControlPlaneMetrics(CollectorRegistry()).observe_check


def check_for(kind: str, ports: dict[str, int], interval_ms: int,
              timeout_ms: int = 1000) -> HealthCheck:
    # Built without validation: the fast interval is below lbd's 100 ms floor.
    port = ports["grpc" if kind == "grpc" else "http" if kind == "http" else "tcp"]
    return HealthCheck(kind=kind, port=port, path="/healthz", interval_ms=interval_ms,
                       timeout_ms=timeout_ms, rise=2, fall=3)


def desired(check: HealthCheck, backends: list[str], vips: int) -> DesiredState:
    """Backends spread over `vips` VIPs (loopback backends: built, not validated)."""
    per_vip = len(backends) // vips
    out = {}
    for v in range(vips):
        key = VipKey(f"10.200.{v // 250}.{v % 250 + 1}", 80, "tcp")
        chunk = backends[v * per_vip:(v + 1) * per_vip]
        out[key] = VipSpec(key, check=check, backends={a: BackendSpec(a) for a in chunk})
    return DesiredState(out)


async def run_checker(state: DesiredState, seeded: bool, warmup_s: float,
                      window_s: float, window: Window | None = None,
                      syn_table: object = None) -> dict[str, Any]:
    downs: list[str] = []
    applied: list[int] = []
    checker = hc.HealthChecker(lambda healthy: applied.append(len(healthy)),
                               lambda event: downs.append(event.message()) if not event.up
                               else None, observe=lbd_observe(), syn_table=syn_table)
    members = [(k, a) for k, v in state.vips.items() for a in v.backends]
    checker.update(state, dict.fromkeys(members, True) if seeded else {})
    batches = asyncio.create_task(checker.run_batches())
    await asyncio.sleep(warmup_s)
    window, checks0 = window or Window(), checker.checks_run
    window.start()
    await asyncio.sleep(window_s)
    cpu, wall = window.stop()
    checks = checker.checks_run - checks0
    failing = sum(1 for v in checker.verdicts.values() if v.last is not None and not v.last.ok)
    reasons = collections.Counter(v.last.reason for v in checker.verdicts.values()
                                  if v.last is not None)
    down = sum(1 for v in checker.verdicts.values() if not v.up)
    batches.cancel()
    await checker.close()
    return {"probes": len(checker.verdicts) or len(members), "checks": checks,
            "cpu_s": round(cpu, 3), "user_s": round(window.user_s, 3),
            "sys_s": round(window.sys_s, 3), "wall_s": round(wall, 3),
            "checks_per_s": round(checks / wall), "checks_per_cpu_s": round(checks / cpu),
            "cpu_share": round(cpu / wall, 3), "last_failed": failing, "down": down,
            "down_transitions": len(downs), "batches": len(applied),
            "last_results": dict(reasons.most_common(4)),
            **(window.lb_host(cpu, wall, checks) if isinstance(window, HostWindow) else {})}


async def run_baseline(kind: str, ports: dict[str, int], workers: int, warmup_s: float,
                       window_s: float) -> dict[str, Any]:
    """The same network work with nothing around it."""
    loop = asyncio.get_running_loop()
    done = [0]
    stop = asyncio.Event()
    targets = addresses(workers, 9)

    async def tcp(addr: str) -> None:
        while not stop.is_set():
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            await loop.sock_connect(sock, (addr, ports["tcp"]))
            sock.close()
            done[0] += 1

    async def http(addr: str) -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(addr, ports["http"])
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {addr}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await reader.read()
            writer.close()
            done[0] += 1

    async def grpc_check(addr: str) -> None:
        async with grpc.aio.insecure_channel(f"{addr}:{ports['grpc']}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                done[0] += 1

    worker = {"tcp": tcp, "http": http, "grpc": grpc_check}[kind]
    tasks = [asyncio.create_task(worker(a)) for a in targets]
    await asyncio.sleep(warmup_s)
    window, done0 = Window(), done[0]
    window.start()
    await asyncio.sleep(window_s)
    cpu, wall = window.stop()
    ops = done[0] - done0
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"ops": ops, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "ops_per_s": round(ops / wall), "ops_per_cpu_s": round(ops / cpu)}


def throughput(kind: str, listeners: Listeners, warmup_s: float, window_s: float) -> dict:
    ports = listeners.ports
    base = asyncio.run(run_baseline(kind, ports, PROBES, warmup_s, window_s))
    state = desired(check_for(kind, ports, FAST_INTERVAL_MS), addresses(PROBES, 8), 1)
    server0 = listeners.cpu_s()
    checker = asyncio.run(run_checker(state, False, warmup_s, window_s))
    server_cpu = listeners.cpu_s() - server0
    return {"kind": kind, **checker, "listener_cpu_share": round(
        server_cpu / (warmup_s + window_s), 3), "baseline": base,
        "ratio": round(checker["checks_per_cpu_s"] / base["ops_per_cpu_s"], 3)}


def connect_floor(port: int, targets: list[str], window: Window | None = None) -> dict:
    """CPU of bare blocking connects with a reset close, one after another: the kernel's
    share of a TCP check with almost no Python around it. On loopback both ends of the
    handshake run here; in part 2a only the LB side's, as for the checker."""
    count = len(targets)
    window = window or Window()
    window.start()
    for address_ in targets:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.connect((address_, port))
        sock.close()
    cpu, wall = window.stop()
    out = {"connects": count, "cpu_us": round(1e6 * cpu / count, 2),
           "user_us": round(1e6 * window.user_s / count, 2),
           "sys_us": round(1e6 * window.sys_s / count, 2), "per_s": round(count / wall)}
    if isinstance(window, HostWindow):
        out.update(window.lb_host(cpu, wall, count))
    return out


def scale(listeners: Listeners, backends: int, warmup_s: float, window_s: float) -> dict:
    """Part 2b: loopback, both ends of every handshake charged to the checker."""
    check = check_for("tcp", listeners.ports, SCALE_INTERVAL_MS, timeout_ms=500)
    state = desired(check, addresses(backends, 16), SCALE_VIPS)
    floor = connect_floor(listeners.ports["tcp"], addresses(20_000, 17))
    result = asyncio.run(run_checker(state, True, warmup_s, window_s))
    expected = backends / (SCALE_INTERVAL_MS / 1000 * (1 - hc.JITTER / 2))
    per_check_us = 1e6 * result["cpu_s"] / result["checks"]
    floor_share = floor["cpu_us"] * result["checks_per_s"] / 1e6
    return {"backends": backends, "vips": SCALE_VIPS, "interval_ms": SCALE_INTERVAL_MS,
            **result, "expected_checks_per_s": round(expected),
            "cpu_us_per_check": round(per_check_us, 2),
            "user_us_per_check": round(1e6 * result["user_s"] / result["checks"], 2),
            "sys_us_per_check": round(1e6 * result["sys_s"] / result["checks"], 2),
            "cpu_percent_of_one_core": round(100 * result["cpu_share"], 1),
            "floor": floor, "floor_percent_of_one_core": round(100 * floor_share, 1),
            "ratio_to_floor": round(per_check_us / floor["cpu_us"], 2),
            "target_percent": round(100 * TARGET_CPU), "met": result["cpu_share"] < TARGET_CPU}


# --- part 2a: the backends on "other hosts" -------------------------------------------------


def remote_addresses(n: int, offset: int = 0) -> list[str]:
    """n addresses of BACKEND_RANGE, one per backend."""
    return [f"198.19.{(i + 1) >> 8}.{(i + 1) & 255}" for i in range(offset, offset + n)]


def _threads_named(prefix: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().startswith(prefix):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class RemoteBackends:
    """Two namespaces joined by a veth pair: the LB side (the checker, CPU 0) and the
    backend side (the listeners, CPU 1), each veth end with its own NAPI thread pinned
    to its side's CPU. Removed by close(), and by xdplb_lab.lab at exit whatever happens."""

    def __init__(self) -> None:
        if (os.cpu_count() or 1) < 2:
            raise RuntimeError("needs two CPUs")
        self.lab = L.Lab(prefix=LAB_PREFIX)
        try:
            self._build()
        except BaseException:
            self.lab.close()
            raise

    def _build(self) -> None:
        lab = self.lab
        self.lb, self.backend = lab.add_host("lb"), lab.add_host("be")
        # NAPI threads are named napi/<device>-<id>, cut at 15 characters: device names of
        # 7 characters, unique to this run, find ours.
        token = secrets.token_hex(3)
        self.lb_if, self.backend_if = f"l{token}", f"b{token}"
        lb_end, backend_end = lab.connect(self.lb, self.backend, self.lb_if, self.backend_if)
        self.threads: dict[str, int] = {}
        for host, ifname, name, cpu in ((self.lb, self.lb_if, "napi_lb", CHECKER_CPU),
                                        (self.backend, self.backend_if, "napi_backend",
                                         BACKEND_CPU)):
            # A veth hands a frame to its peer's NAPI only when the peer has GRO on and the
            # sender has no TSO (else the frame goes to the sending CPU's backlog and the
            # backend side's receive would run on the checker's CPU).
            L.set_offloads(host, ifname, gro=True, tso=False)
            host.run(["sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"])
            pids = _threads_named(f"napi/{ifname}-")
            if len(pids) != 1:
                raise RuntimeError(f"expected one NAPI thread for {ifname}, found {pids}")
            os.sched_setaffinity(pids[0], {cpu})
            self.threads[name] = pids[0]
        # A pass-everything XDP program on the backend end: its receive path is then the
        # same for frames the LB side sends (skbs) and for those its XDP_TXes (the RSTs
        # of tcp-syn checks). Without it, with GRO alone, that end's queue was seen to
        # stop being served when both arrive at once: every later frame dropped.
        attach_pass(self.backend_if, netns=self.backend.name)
        self.lb.addr_add(self.lb_if, f"{LB_SIDE}/30")
        self.backend.addr_add(self.backend_if, f"{BACKEND_SIDE}/30")
        self.lb.neigh_add(self.lb_if, BACKEND_SIDE, backend_end.mac)
        self.backend.neigh_add(self.backend_if, LB_SIDE, lb_end.mac)
        self.lb.route_add(BACKEND_RANGE, BACKEND_SIDE, self.lb_if)
        # Every address of the range is local to the backend side (one route, no 10k addresses).
        self.backend.run(["ip", "route", "add", "local", BACKEND_RANGE, "dev", "lo"])
        self.listener = lab.popen(
            self.backend, ["taskset", "-c", str(BACKEND_CPU), sys.executable, __file__,
                           "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.listener.stdout.readline()
        if not line:
            raise RuntimeError("the backend-side listener did not start")
        self.ports: dict[str, int] = json.loads(line)

    def run_lb_side(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Runs `job` (see lb_side) in the LB namespace on CPU 0; its JSON answer."""
        job = {**job, "threads": self.threads, "listener_pid": self.listener.pid,
               "ifname": self.lb_if,
               "port": self.ports["tcp"]}
        proc = self.lab.popen(self.lb, ["taskset", "-c", str(CHECKER_CPU), sys.executable,
                                        __file__, "--lb-side", json.dumps(job)],
                              stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0 or not out:
            raise RuntimeError(f"the LB-side run failed (exit {proc.returncode})")
        return json.loads(out)

    def close(self) -> None:
        self.lab.close()


def lb_side(job: dict[str, Any]) -> None:
    """In the LB namespace, on CPU 0: the connect floor (if asked), then the checker of
    job["kind"]; prints JSON. A tcp-syn run first attaches the balancer to the LB side's
    veth (compiled and attached before the window): it catches the SYN-ACKs."""
    def window() -> HostWindow:
        return HostWindow(job["threads"]["napi_lb"], job["threads"]["napi_backend"],
                          job["listener_pid"], job["ifname"])

    floor = connect_floor(job["port"], remote_addresses(20_000, offset=job["backends"]),
                          window()) if job.get("floor") else None
    syn_table = None
    if job["kind"] == "tcp-syn":
        from xdplb.datapath import Balancer, MapSizes

        balancer = Balancer(MapSizes(max_vips=2, max_backends=SYN_SLOTS, ring_entries=101,
                                     conn_entries=16))
        balancer.attach(job["ifname"])
        syn_table = balancer.syn_probes
    check = HealthCheck(kind=job["kind"], port=job["port"], interval_ms=SCALE_INTERVAL_MS,
                        timeout_ms=500, rise=2, fall=3)
    state = desired(check, remote_addresses(job["backends"]), SCALE_VIPS)
    run = run_checker(state, True, job["warmup_s"], job["window_s"], window(), syn_table)
    if os.environ.get("BENCH_HEALTH_PROFILE"):  # where the checker's own time goes
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, run)
        profiler.dump_stats(os.environ["BENCH_HEALTH_PROFILE"])
    else:
        result = asyncio.run(run)
    print(json.dumps({"floor": floor, "checker": result}))


def scale_remote(warmup_s: float, window_s: float) -> dict:
    """Part 2a: what the LB host pays, the backends being other hosts: tcp at 10,000
    backends (with the connect floor), then tcp-syn at 10,000 and 50,000, in the same
    namespaces against the same listener."""
    L.remove_stale(LAB_PREFIX)  # namespaces of an earlier run killed outright, if any
    remote = RemoteBackends()
    runs: dict[str, dict] = {}
    try:
        for name, kind, backends in (("tcp", "tcp", SCALE_BACKENDS),
                                     ("tcp_syn", "tcp-syn", SCALE_BACKENDS),
                                     ("tcp_syn_50k", "tcp-syn", SYN_LARGE_BACKENDS)):
            out = remote.run_lb_side({"kind": kind, "backends": backends,
                                      "floor": name == "tcp", "warmup_s": warmup_s,
                                      "window_s": window_s},
                                     timeout_s=warmup_s + window_s + 180)
            runs[name] = {"kind": kind, "backends": backends, **out["checker"]}
            if out["floor"]:
                floor = out["floor"]
    finally:
        remote.close()
    report: dict[str, Any] = {"vips": SCALE_VIPS, "interval_ms": SCALE_INTERVAL_MS,
                              "floor": floor, "target_percent": round(100 * TARGET_CPU),
                              "syn_target_percent": round(100 * SYN_TARGET_CPU),
                              "syn_target_ratio": SYN_TARGET_RATIO}
    for name, run in runs.items():
        run["lb_percent_of_one_core"] = round(100 * run["lb_cpu_share"], 1)
        run["ratio_to_floor"] = round(run["lb_us"] / floor["lb_us"], 3)
        run["ratio_to_tcp"] = round(run["lb_us"] / runs["tcp"]["lb_us"], 3)
        run["floor_percent_of_one_core"] = round(
            100 * floor["lb_us"] * run["checks_per_s"] / 1e6, 1)
        report[name] = run
    report["met"] = runs["tcp"]["lb_cpu_share"] < TARGET_CPU
    report["syn_met"] = (runs["tcp_syn"]["lb_cpu_share"] <= SYN_TARGET_CPU
                         and runs["tcp_syn"]["ratio_to_tcp"] <= SYN_TARGET_RATIO)
    return report


class _InstantSyn:
    """A syn_probes table for scheduler_floor: nothing is read or written."""

    slots = SYN_SLOTS

    def backend_of_mark(self, mark: int) -> int:
        return 0


def scheduler_floor(warmup_s: float, window_s: float) -> dict[str, Any]:
    """The scheduler and verdict machinery alone: tcp-syn checks of 10,000 backends
    whose every check succeeds at once, without I/O (the half-open engine's flush
    replaced). In this process, CPU time only: what any check kind costs before it
    sends a packet."""
    from xdplb.health import syn_prober

    def instant_flush(self) -> None:
        batch, self._batch = self._batch, []
        for verdict, started, _ in batch:
            self._done(verdict, hc.Result(True, "ok", 0.0001), started)

    real_flush = syn_prober.SynProber.flush
    syn_prober.SynProber.flush = instant_flush
    try:
        check = HealthCheck(kind="tcp-syn", port=80, interval_ms=SCALE_INTERVAL_MS,
                            timeout_ms=500, rise=2, fall=3)
        state = desired(check, remote_addresses(SCALE_BACKENDS), SCALE_VIPS)
        result = asyncio.run(run_checker(state, True, warmup_s, window_s,
                                         syn_table=_InstantSyn()))
    finally:
        syn_prober.SynProber.flush = real_flush
    return {"checks_per_s": result["checks_per_s"],
            "us_per_check": round(1e6 * result["cpu_s"] / result["checks"], 2),
            "percent_of_one_core": round(100 * result["cpu_share"], 1)}


def _print_remote(s: dict) -> None:
    f = s["floor"]
    print(f"\nLB host CPU for health checks at a {s['interval_ms']} ms interval ({s['vips']} "
          "VIPs), backends behind a veth in another namespace, same run, same listener")
    print(f"{'kind':>8} {'backends':>9} {'checks/s':>9} {'LB %core':>9} {'us/check':>9} "
          f"{'user':>6} {'sys':>6} {'napi':>6} {'kthr':>6} {'irq':>6} {'÷tcp':>6} "
          f"{'÷floor':>7} {'down':>5}")
    for name in ("tcp", "tcp_syn", "tcp_syn_50k"):
        r = s[name]
        print(f"{r['kind']:>8} {r['backends']:>9} {r['checks_per_s']:>9} "
              f"{r['lb_percent_of_one_core']:>9} {r['lb_us']:>9} {r['user_us']:>6} "
              f"{r['sys_us']:>6} {r['napi_us']:>6} {r['kthreads_us']:>6} {r['irq_us']:>6} "
              f"{r['ratio_to_tcp']:>6} {r['ratio_to_floor']:>7} {r['down']:>5}")
    tcp, syn = s["tcp"], s["tcp_syn"]
    print(f"  tcp: target < {s['target_percent']}% of one core: "
          f"{'ok' if s['met'] else 'MISSED'}; tcp-syn: target <= {s['syn_target_percent']}% "
          f"and <= {s['syn_target_ratio']} of tcp: {'ok' if s['syn_met'] else 'MISSED'} "
          f"({syn['lb_percent_of_one_core']}%, {syn['ratio_to_tcp']})")
    print(f"  packets per check on the LB side: tcp {tcp['rx_per_op']} in, {tcp['tx_per_op']} "
          f"out; tcp-syn {syn['rx_per_op']} in, {syn['tx_per_op']} out (the RST leaves "
          "by XDP_TX)")
    print(f"  baseline: a bare blocking connect + reset, charged the same way, costs "
          f"{f['lb_us']} us ({f['user_us']} user, {f['sys_us']} system, NAPI "
          f"{f['napi_us']}, kernel threads {f['kthreads_us']}, irq {f['irq_us']})")
    print(f"  not counted: the backend side, us per check: tcp {tcp['backend_side_us']}, "
          f"tcp-syn {syn['backend_side_us']}")
    floor = s.get("scheduler_floor")
    if floor:
        print(f"  the scheduler and verdicts alone (checks that succeed at once, no I/O): "
              f"{floor['us_per_check']} us per check, {floor['percent_of_one_core']}% of one "
              f"core at {floor['checks_per_s']} checks/s")


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}   python {report['python']}")
    if report.get("throughput"):
        print(f"\nchecks per CPU-second (one core), {PROBES} checks due every "
              f"{FAST_INTERVAL_MS} ms against local listeners in another process; baseline = "
              "bare asyncio doing the same network work; ratio = checker / baseline")
        print(f"{'kind':>5} {'checks/s':>9} {'cpu':>6} {'checks/cpu-s':>13} "
              f"{'baseline/cpu-s':>15} {'ratio':>6} {'listener cpu':>13} {'failed':>7}")
        for r in report["throughput"]:
            print(f"{r['kind']:>5} {r['checks_per_s']:>9} {r['cpu_share']:>6.2f} "
                  f"{r['checks_per_cpu_s']:>13} {r['baseline']['ops_per_cpu_s']:>15} "
                  f"{r['ratio']:>6.2f} {r['listener_cpu_share']:>13.2f} {r['last_failed']:>7}")
    if report.get("scale_remote"):
        _print_remote(report["scale_remote"])
    if report.get("scale"):
        s = report["scale"]
        f = s["floor"]
        verdict = "ok" if s["met"] else "MISSED"
        print(f"\n{s['backends']} TCP-checked backends ({s['vips']} VIPs) at a "
              f"{s['interval_ms']} ms interval, listeners on loopback (both ends charged), "
              f"{s['wall_s']:.0f} s window: {s['checks_per_s']} checks/s (expected "
              f"{s['expected_checks_per_s']}); {s['down']} backends down, "
              f"{s['down_transitions']} down transitions")
        print(f"  checker CPU {s['cpu_percent_of_one_core']}% of one core (target < "
              f"{s['target_percent']}%: {verdict}): {s['cpu_us_per_check']} us per check "
              f"({s['user_us_per_check']} user, {s['sys_us_per_check']} system)")
        print(f"  baseline: a bare blocking connect + reset costs {f['cpu_us']} us "
              f"({f['user_us']} user, {f['sys_us']} system; both ends of the loopback "
              f"handshake are charged here), i.e. {s['floor_percent_of_one_core']}% of one core "
              f"at the same rate; ratio checker / baseline {s['ratio_to_floor']}")
    print(f"  max RSS {report['max_rss_mb']} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="shorter windows")
    parser.add_argument("--only", choices=("throughput", "lb-host", "loopback"),
                        help="one part alone: 1, 2a or 2b")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lb-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_listeners()
        return
    if args.lb_side:
        lb_side(json.loads(args.lb_side))
        return
    # A SIGTERM unwinds like Ctrl-C: the namespaces and veths are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    warmup, window = (0.5, 1.0) if args.quick else (WARMUP_S, WINDOW_S)
    scale_warmup, scale_window = (2.0, 4.0) if args.quick else (SCALE_WARMUP_S, SCALE_WINDOW_S)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "python": platform.python_version(),
        "probes": PROBES, "fast_interval_ms": FAST_INTERVAL_MS, "window_s": window,
    }
    if args.only in (None, "lb-host"):
        report["scale_remote"] = scale_remote(scale_warmup, scale_window)
        report["scale_remote"]["scheduler_floor"] = scheduler_floor(scale_warmup, scale_window)
    if args.only != "lb-host":
        listeners = Listeners()
        try:
            if args.only in (None, "throughput"):
                report["throughput"] = [throughput(kind, listeners, warmup, window)
                                        for kind in ("tcp", "http", "grpc")]
            if args.only in (None, "loopback"):
                report["scale"] = scale(listeners, SCALE_BACKENDS, scale_warmup, scale_window)
        finally:
            listeners.close()
    report["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print_report(report)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
