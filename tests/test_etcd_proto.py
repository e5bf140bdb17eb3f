"""The committed etcd client modules are what Debian's etcd protos generate
(`make etcd-proto`, scripts/etcd_proto.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "etcd_proto.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("etcd_proto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_etcd_modules_match_debians_protos(tmp_path: Path) -> None:
    generator = load_generator()
    generator.generate(tmp_path)
    for name in generator.GENERATED:
        committed = (REPO / "daemon" / generator.PACKAGE / name).read_text()
        fresh = (tmp_path / generator.PACKAGE / name).read_text()
        assert fresh == committed, f"{name} is stale: run make etcd-proto"


def test_stripping_keeps_every_rpc_and_drops_only_go_options() -> None:
    generator = load_generator()
    source = (generator.DEBIAN / generator.SOURCES["rpc"]).read_text()
    stripped = generator.strip(source)
    assert "gogoproto" not in stripped and "google.api" not in stripped
    assert stripped.count("  rpc ") == source.count("  rpc ") == 39
    assert 'import "xdplb/etcdv3/kv.proto";' in stripped
