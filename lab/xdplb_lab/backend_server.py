"""A tiny HTTP (and optionally gRPC) backend for labs: answers with its own
name, so a client can see which backend served it. GET returns the name;
POST returns the name and the number of body bytes received (large POSTs
exercise path-MTU discovery through the balancer). Listens dual-stack.

Made to fail on demand, for health-check tests:

* stop the process: every check of it fails (refused);
* --grpc-port serves grpc.health.v1 there ("" and each --grpc-service are
  SERVING; any other service name is NOT_FOUND);
* --control FILE is read at every request: "fail" turns GETs into 503 and
  gRPC checks into NOT_SERVING; "flap" alternates, answer by answer, between
  healthy and failing (GET and gRPC each alternate on their own); anything
  else, or no file, is healthy. POSTs are never affected.

GET /_requests answers how many other GETs it served: a test can count checks.
The line "NAME listening on ..." is printed once every listener is bound.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COUNT_PATH = "/_requests"


class LabHTTPServer(ThreadingHTTPServer):
    """The lab's HTTP servers: dual-stack on an IPv6 address (:: by default), quiet
    about connections a check resets, no DNS lookup at start."""

    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs under a check plus a load test

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # HTTPServer.server_bind would also resolve "::" with getfqdn: a DNS wait at start.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = "localhost", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a TCP check resets its connection: not worth a traceback
        super().handle_error(request, client_address)


class Control:
    """What the control file asks for, read at each answer."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._flaps: dict[str, itertools.cycle[bool]] = {}

    def mode(self) -> str:
        if self.path is None:
            return "ok"
        try:
            return self.path.read_text().strip() or "ok"
        except OSError:
            return "ok"

    def healthy(self, channel: str) -> bool:
        """Whether this answer (on `channel`: "http" or "grpc") is a healthy one."""
        mode = self.mode()
        if mode == "fail":
            return False
        if mode == "flap":
            with self._lock:
                return next(self._flaps.setdefault(channel, itertools.cycle((False, True))))
        return True


def _handler(name: str, control: Control) -> type[BaseHTTPRequestHandler]:
    counter = itertools.count()
    served = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, body: str, status: int = 200) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == COUNT_PATH:
                self._reply(f"{served[0]}\n")
                return
            served[0] = next(counter) + 1
            if control.healthy("http"):
                self._reply(f"{name}\n")
            else:
                self._reply(f"{name} failing\n", 503)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            received = len(self.rfile.read(length))
            self._reply(f"{name} {received}\n")

        def log_message(self, *args: object) -> None:
            pass  # one line per request would drown a load test

    return Handler


def _grpc_server(port: int, services: list[str], control: Control) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    class ControlledHealth(health.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            if not control.healthy("grpc"):
                return health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.NOT_SERVING)
            return super().Check(request, context)

    servicer = ControlledHealth()
    for service in ["", *services]:
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if not server.add_insecure_port(f"[::]:{port}"):
        raise SystemExit(f"cannot listen on gRPC port {port}")
    server.start()
    return server


def serve(name: str, port: int, grpc_port: int = 0, grpc_services: list[str] | None = None,
          control_path: Path | None = None) -> None:
    control = Control(control_path)
    # gRPC first (its import takes a while), then HTTP, then the line at once: a
    # test timing a restart from that line sees no listener long before it.
    grpc_server = _grpc_server(grpc_port, grpc_services or [], control) if grpc_port else None
    with LabHTTPServer(("::", port), _handler(name, control)) as server:
        extra = f" and gRPC on [::]:{grpc_port}" if grpc_server else ""
        print(f"{name} listening on [::]:{port}{extra}", flush=True)
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--grpc-port", type=int, default=0,
                        help="also serve grpc.health.v1 on this port (0: no gRPC)")
    parser.add_argument("--grpc-service", action="append", default=[],
                        help="a service name reported SERVING (repeatable)")
    parser.add_argument("--control", type=Path, default=None,
                        help="file read at every answer: fail, flap, or ok")
    args = parser.parse_args()
    serve(args.name, args.port, args.grpc_port, args.grpc_service, args.control)


if __name__ == "__main__":
    main()
