"""A tiny HTTP backend for labs: answers with its own name, so a client can
see which backend served it. GET returns the name; POST returns the name and
the number of body bytes received (large POSTs exercise path-MTU discovery
through the balancer). Listens dual-stack on one port."""

from __future__ import annotations

import argparse
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _handler(name: str) -> type[BaseHTTPRequestHandler]:
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
            self._reply(f"{name}\n")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            received = len(self.rfile.read(length))
            self._reply(f"{name} {received}\n")

        def log_message(self, *args: object) -> None:
            pass  # one line per request would drown a load test

    return Handler


def serve(name: str, port: int) -> None:
    with _DualStackServer(("::", port), _handler(name)) as server:
        print(f"{name} listening on [::]:{port}", flush=True)
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args()
    serve(args.name, args.port)


if __name__ == "__main__":
    main()
