"""Regenerates xdplb.etcdv3 (etcd's v3 gRPC API) from Debian's etcd protos.

The protos (package golang-etcd-server-dev) carry gogoproto and google.api
options that only the Go build needs: they are stripped, the imports are
pointed at the private package, and the pinned grpcio-tools generates the
modules. The proto packages (etcdserverpb, mvccpb, authpb) stay as etcd
names them: they are part of the method paths a server answers.
`make etcd-proto` runs this; tests/test_etcd_proto.py checks the committed
modules are what it generates.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

DEBIAN = Path("/usr/share/gocode/src/go.etcd.io/etcd")
SOURCES = {"rpc": "etcdserver/etcdserverpb/rpc.proto", "kv": "mvcc/mvccpb/kv.proto",
           "auth": "auth/authpb/auth.proto"}
PACKAGE = "xdplb/etcdv3"
GENERATED = ("rpc_pb2.py", "rpc_pb2_grpc.py", "kv_pb2.py", "auth_pb2.py")


def strip(text: str) -> str:
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text,
                  flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[a-z_]+\) = [a-z]+;\n", "", text, flags=re.M)
    text = drop_http_options(text)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    for name, source in SOURCES.items():
        text = text.replace(f'import "etcd/{source}";', f'import "{PACKAGE}/{name}.proto";')
    return text


def drop_http_options(text: str) -> str:
    """Removes each `option (google.api.http) = {...};`, whose braces nest."""
    marker = "option (google.api.http) = {"
    while (start := text.find(marker)) >= 0:
        depth, position = 0, start + len(marker) - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                break
            position += 1
        text = text[:start] + text[text.index(";", position) + 1:]
    return text


def generate(out: Path) -> None:
    """Writes the stripped protos and the generated modules under out/xdplb/etcdv3."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / PACKAGE
        src.mkdir(parents=True)
        for name, source in SOURCES.items():
            (src / f"{name}.proto").write_text(strip((DEBIAN / source).read_text()))
        target = out / PACKAGE
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}",
                        f"--python_out={out}", f"--grpc_python_out={out}",
                        *(f"{PACKAGE}/{name}.proto" for name in SOURCES)], check=True)
        for name in ("kv_pb2_grpc.py", "auth_pb2_grpc.py"):  # no services in these
            (target / name).unlink(missing_ok=True)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("daemon"))
