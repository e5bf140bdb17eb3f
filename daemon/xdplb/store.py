"""The state file: desired state persisted atomically before any change is
acknowledged, and never overwritten when it cannot be read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from xdplb.state import DesiredState, Limits, StateError

STATE_FILE_NAME = "state.json"
HOST_FILE_NAME = "host.json"  # host maintenance (drained), apart from the VIPs apply manages
FLEET_FILE_NAME = "fleet.json"  # fleet mode: the revision of the prefix state.json copies


class StoreError(RuntimeError):
    """The state file cannot be read or written; the message names it and why."""


class StateStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE_NAME
        self.host_path = self.directory / HOST_FILE_NAME
        self.fleet_path = self.directory / FLEET_FILE_NAME
        self.writes = 0

    def load(self) -> DesiredState:
        """The persisted state; an empty one when there is no file yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return DesiredState()
        except OSError as exc:
            raise StoreError(f"state file {self.path}: cannot read it: {exc}") from exc
        try:
            return DesiredState.from_dict(decode_state_json(raw))
        except StateError as exc:
            raise StoreError(f"state file {self.path}: {exc}; it is left untouched: repair "
                             "or move it away, then start lbd") from None

    def save(self, state: DesiredState) -> None:
        self._write(self.path, json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")

    def load_host_drained(self) -> bool:
        try:
            data = json.loads(self.host_path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"host file {self.host_path}: {exc}; it is left untouched") from None
        if not isinstance(data, dict) or not isinstance(data.get("drained", False), bool):
            raise StoreError(f"host file {self.host_path}: expected {{\"drained\": bool}}")
        return data.get("drained", False)

    def save_host_drained(self, drained: bool) -> None:
        self._write(self.host_path, json.dumps({"drained": drained}) + "\n")

    def load_fleet_revision(self, prefix: str) -> int:
        """The revision of the fleet's state that state.json is a copy of (0: none, or
        a copy of another prefix's). Unreadable: 0, as the fleet's state replaces it."""
        try:
            data = json.loads(self.fleet_path.read_text())
        except (OSError, json.JSONDecodeError):
            return 0
        if not isinstance(data, dict) or data.get("prefix") != prefix:
            return 0
        revision = data.get("revision", 0)
        return revision if isinstance(revision, int) and revision > 0 else 0

    def save_fleet_revision(self, prefix: str, revision: int) -> None:
        """After state.json: a crash between the two leaves an older revision, which
        only makes lbd read the fleet's state again."""
        self._write(self.fleet_path, json.dumps({"prefix": prefix, "revision": revision}) + "\n")

    def _write(self, path: Path, text: str) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, text)
        except OSError as exc:
            raise StoreError(f"{path}: cannot write it: {exc}") from exc
        self.writes += 1


def decode_state_json(raw: bytes) -> object:
    """The JSON document of a state file's bytes; StateError says why not."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise StateError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"not valid JSON: {exc}") from None


def check_state_file(path: Path, limits: Limits) -> list[str]:
    """Every problem of a state file (at most one per VIP, then the limits), without
    loading it into anything: `lbd --check-config --state`."""
    try:
        data = decode_state_json(path.read_bytes())
    except OSError as exc:
        return [f"cannot read it: {exc}"]
    except StateError as exc:
        return [str(exc)]
    problems: list[str] = []
    try:
        state = DesiredState.from_dict(data, problems=problems)
        if not problems:
            state.validate(limits)
    except StateError as exc:
        problems.append(str(exc))
    return problems


def write_atomically(path: Path, text: str) -> None:
    """Temp file, fsync, rename over the old file, fsync the directory: after a
    crash the file holds either the old content or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
