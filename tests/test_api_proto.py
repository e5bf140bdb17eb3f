"""The committed API modules are what lb.proto generates (`make proto`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
GENERATED = ("lb_pb2.py", "lb_pb2.pyi", "lb_pb2_grpc.py")


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    source = tmp_path / "xdplb" / "v1"
    source.mkdir(parents=True)
    shutil.copy(DAEMON / "xdplb" / "v1" / "lb.proto", source / "lb.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "xdplb/v1/lb.proto"],
                   check=True, capture_output=True, text=True)
    for name in GENERATED:
        committed = (DAEMON / "xdplb" / "v1" / name).read_text()
        assert (source / name).read_text() == committed, f"{name} is stale: run make proto"
