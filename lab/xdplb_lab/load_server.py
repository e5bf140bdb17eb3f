"""A tiny Prometheus text endpoint for labs and tests: a backend's load as a
file says, so a test controls what lbd's capacity poller sees.

    python -m xdplb_lab.load_server --port P --file F [--host H] [--path /metrics]
                                [--metric xdplb_load] [--labels 'model="a"']

F is read at every request:

* a number (e.g. "3.5"): served as one gauge sample,
  ``# TYPE METRIC gauge`` / ``METRIC{LABELS} 3.5``;
* anything else: served verbatim (a whole exposition with several samples,
  or garbage, for malformed-page tests);
* no file: status 503 (the poller says "unreachable: status 503").

Stop the process (or the server) and the endpoint is dead: "refused".
GET /_requests answers how many scrapes it served. The line
"load server listening on HOST:PORT" is printed once bound (port 0 picks a
free port, and the line says which). Listens dual-stack on "::" by default.
"""

from __future__ import annotations

import argparse
import socket
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from xdplb_lab.backend_server import LabHTTPServer

COUNT_PATH = "/_requests"


def render(text: str | None, metric: str, labels: str) -> tuple[int, str]:
    """(status, body) for the load file's content (None: no file)."""
    if text is None:
        return 503, "no load file\n"
    try:
        value = float(text.strip())
    except ValueError:
        return 200, text
    selector = f"{metric}{{{labels}}}" if labels else metric
    return 200, f"# HELP {metric} load reported by xdplb_lab.load_server\n" \
                f"# TYPE {metric} gauge\n{selector} {value!r}\n"


class LoadServer(LabHTTPServer):
    def __init__(self, host: str, port: int, file: Path, path: str = "/metrics",
                 metric: str = "xdplb_load", labels: str = ""):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.file, self.path, self.metric, self.labels = file, path, metric, labels
        self.served = 0
        self._lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def content(self) -> tuple[int, str]:
        try:
            text: str | None = self.file.read_text()
        except OSError:
            text = None
        return render(text, self.metric, self.labels)

    def start(self) -> threading.Thread:
        """Serves in a daemon thread (in-process use); stop with shutdown() + server_close()."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoadServer

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_GET(self) -> None:
        if self.path == COUNT_PATH:
            self._reply(200, f"{self.server.served}\n")
            return
        if self.path.split("?", 1)[0] != self.server.path:
            self._reply(404, "not found\n")
            return
        with self.server._lock:
            self.server.served += 1
        self._reply(*self.server.content())

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="0: any free port")
    parser.add_argument("--file", type=Path, required=True,
                        help="read at every scrape: a number, or a page served verbatim")
    parser.add_argument("--host", default="::", help="listen address (default :: dual-stack)")
    parser.add_argument("--path", default="/metrics")
    parser.add_argument("--metric", default="xdplb_load")
    parser.add_argument("--labels", default="", help='e.g. model="llama",gpu="0"')
    args = parser.parse_args(argv)
    with LoadServer(args.host, args.port, args.file, args.path, args.metric,
                    args.labels) as server:
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"load server listening on {shown}:{port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
