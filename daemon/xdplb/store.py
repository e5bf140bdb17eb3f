"""The state file: desired state persisted atomically before any change is
acknowledged, and never overwritten when it cannot be read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from xdplb.state import DesiredState, StateError

STATE_FILE_NAME = "state.json"


class StoreError(RuntimeError):
    """The state file cannot be read or written; the message names it and why."""


class StateStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE_NAME
        self.writes = 0

    def load(self) -> DesiredState:
        """The persisted state; an empty one when there is no file yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return DesiredState()
        except OSError as exc:
            raise StoreError(f"state file {self.path}: cannot read it: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"state file {self.path}: not valid JSON: {exc}; it is left "
                             "untouched: repair or move it away, then start lbd") from None
        try:
            return DesiredState.from_dict(data)
        except StateError as exc:
            raise StoreError(f"state file {self.path}: {exc}; it is left untouched: repair "
                             "or move it away, then start lbd") from None

    def save(self, state: DesiredState) -> None:
        """Temp file, fsync, rename over the old file, fsync the directory:
        after a crash the file holds either the old state or the new one."""
        text = json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"state file {self.path}: cannot write it: {exc}") from exc
        self.writes += 1
