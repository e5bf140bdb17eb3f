"""Benchmark xdplb.health: checks one core sustains, and the checker's CPU at 10,000 backends.

Usage: python benchmarks/bench_health.py [--json PATH] [--quick]

The real HealthChecker runs in this process, driven through update() with a
desired state and a fake apply callback (lbd's controller is the only thing
left out). Its listeners run in a separate process, so their CPU is not
counted: on 127.0.0.1 (every 127/8 address is local, so each backend has an
address of its own) a TCP accept-and-close loop, an HTTP server answering
200 and closing, and a gRPC server answering grpc.health.v1 Check SERVING.
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
   checks spread over the interval as after a restart (verdicts seeded):
   CPU of the checker as a share of one core, split into user and system
   time. Target: under 30%. Baseline: bare blocking connects with a reset
   close, one after another, at the same rate: the kernel's share, which on
   loopback includes the listener's half of every handshake (with a real
   backend that half runs on the backend's host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
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

from xdplb import health as hc
from xdplb.state import BackendSpec, DesiredState, HealthCheck, VipKey, VipSpec

PROBES = 256
FAST_INTERVAL_MS = 10
WARMUP_S, WINDOW_S = 1.0, 3.0
SCALE_BACKENDS, SCALE_VIPS, SCALE_INTERVAL_MS = 10_000, 10, 1000
SCALE_WARMUP_S, SCALE_WINDOW_S = 2.0, 10.0
TARGET_CPU = 0.30
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
LINGER_RST = struct.pack("ii", 1, 0)
HTTP_THREADS = 32


def addresses(n: int, net: int) -> list[str]:
    """n loopback addresses of 127.net.0.0/16, one per backend."""
    return [f"127.{net}.{(i + 1) >> 8}.{(i + 1) & 255}" for i in range(n)]


# --- the listeners: a separate process ------------------------------------------------------


def _accept_loop(listener: socket.socket, http: bool) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        try:
            if http:
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
    # HTTP threads wait for each request: enough of them to keep up with the checker.
    for sock, is_http in [(tcp, False)] + [(http, True)] * HTTP_THREADS:
        threading.Thread(target=_accept_loop, args=(sock, is_http), daemon=True).start()

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
                      window_s: float) -> dict[str, Any]:
    downs: list[str] = []
    applied: list[int] = []
    checker = hc.HealthChecker(lambda healthy: applied.append(len(healthy)),
                               lambda line, backend: downs.append(line) if " is down:" in
                               line else None)
    members = [(k, a) for k, v in state.vips.items() for a in v.backends]
    checker.update(state, dict.fromkeys(members, True) if seeded else {})
    batches = asyncio.create_task(checker.run_batches())
    await asyncio.sleep(warmup_s)
    window, checks0 = Window(), checker.checks_run
    window.start()
    await asyncio.sleep(window_s)
    cpu, wall = window.stop()
    checks = checker.checks_run - checks0
    failing = sum(1 for v in checker.verdicts.values() if v.last is not None and not v.last.ok)
    down = sum(1 for v in checker.verdicts.values() if not v.up)
    batches.cancel()
    await checker.close()
    return {"probes": len(checker.verdicts) or len(members), "checks": checks,
            "cpu_s": round(cpu, 3), "user_s": round(window.user_s, 3),
            "sys_s": round(window.sys_s, 3), "wall_s": round(wall, 3),
            "checks_per_s": round(checks / wall), "checks_per_cpu_s": round(checks / cpu),
            "cpu_share": round(cpu / wall, 3), "last_failed": failing, "down": down,
            "down_transitions": len(downs), "batches": len(applied)}


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


def connect_floor(port: int, count: int = 20_000) -> dict[str, float]:
    """CPU of bare blocking connects with a reset close, one after another: what the
    kernel charges this process for each TCP check on loopback (both ends of the
    handshake run here), with almost no Python around it."""
    targets = addresses(count, 17)
    window = Window()
    window.start()
    for address_ in targets:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.connect((address_, port))
        sock.close()
    cpu, wall = window.stop()
    return {"connects": count, "cpu_us": round(1e6 * cpu / count, 2),
            "user_us": round(1e6 * window.user_s / count, 2),
            "sys_us": round(1e6 * window.sys_s / count, 2), "per_s": round(count / wall)}


def scale(listeners: Listeners, backends: int, warmup_s: float, window_s: float) -> dict:
    check = check_for("tcp", listeners.ports, SCALE_INTERVAL_MS, timeout_ms=500)
    state = desired(check, addresses(backends, 16), SCALE_VIPS)
    floor = connect_floor(listeners.ports["tcp"])
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


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']}   python {report['python']}")
    print(f"\nchecks per CPU-second (one core), {PROBES} checks due every "
          f"{FAST_INTERVAL_MS} ms against local listeners in another process; baseline = bare "
          "asyncio doing the same network work; ratio = checker / baseline")
    print(f"{'kind':>5} {'checks/s':>9} {'cpu':>6} {'checks/cpu-s':>13} {'baseline/cpu-s':>15} "
          f"{'ratio':>6} {'listener cpu':>13} {'failed':>7}")
    for r in report["throughput"]:
        print(f"{r['kind']:>5} {r['checks_per_s']:>9} {r['cpu_share']:>6.2f} "
              f"{r['checks_per_cpu_s']:>13} {r['baseline']['ops_per_cpu_s']:>15} "
              f"{r['ratio']:>6.2f} {r['listener_cpu_share']:>13.2f} {r['last_failed']:>7}")
    s = report["scale"]
    f = s["floor"]
    verdict = "ok" if s["met"] else "MISSED"
    print(f"\n{s['backends']} TCP-checked backends ({s['vips']} VIPs) at a "
          f"{s['interval_ms']} ms interval, {s['wall_s']:.0f} s window: "
          f"{s['checks_per_s']} checks/s (expected {s['expected_checks_per_s']}); "
          f"{s['down']} backends down, {s['down_transitions']} down transitions")
    print(f"  checker CPU {s['cpu_percent_of_one_core']}% of one core (target < "
          f"{s['target_percent']}%: {verdict}): {s['cpu_us_per_check']} us per check "
          f"({s['user_us_per_check']} user, {s['sys_us_per_check']} system)")
    print(f"  baseline: a bare blocking connect + reset costs {f['cpu_us']} us "
          f"({f['user_us']} user, {f['sys_us']} system; both ends of the loopback handshake "
          f"are charged here), i.e. {s['floor_percent_of_one_core']}% of one core at the "
          f"same rate; ratio checker / baseline {s['ratio_to_floor']}")
    print(f"  max RSS {report['max_rss_mb']} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="shorter windows")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_listeners()
        return
    warmup, window = (0.5, 1.0) if args.quick else (WARMUP_S, WINDOW_S)
    scale_warmup, scale_window = (2.0, 4.0) if args.quick else (SCALE_WARMUP_S, SCALE_WINDOW_S)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    listeners = Listeners()
    try:
        rows = [throughput(kind, listeners, warmup, window) for kind in ("tcp", "http", "grpc")]
        at_scale = scale(listeners, SCALE_BACKENDS, scale_warmup, scale_window)
    finally:
        listeners.close()
    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "python": platform.python_version(),
        "probes": PROBES, "fast_interval_ms": FAST_INTERVAL_MS, "window_s": window,
        "throughput": rows, "scale": at_scale,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
