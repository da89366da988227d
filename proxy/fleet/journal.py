"""The admin API's changes, shared by the worker processes of one proxy.

With ``PDPROXY_WORKERS=N`` every worker is a whole proxy with its own instance list, and
an admin call reaches whichever worker accepted its connection. So the admin state
(instances added, removed, draining) lives in one JSON file in the directory the
launcher creates for its workers: a change is made under an exclusive ``flock`` on the
current file, written whole to a temporary file and renamed into place with a version
one higher, and every worker reads it a few times a second (a few hundred bytes) and
adopts a new version. With one worker there is no file and the state stays in memory.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

State = dict[str, Any]
POLL_SECONDS = 0.25  # how soon the other workers follow an admin call


def empty_state() -> State:
    return {"version": 0, "added": {}, "removed": {}, "draining": []}


def shared_dir() -> Path | None:
    """The directory the workers of this proxy share (the launcher sets it for
    prometheus-client's multiprocess files); None with one worker."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


class AdminJournal:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "pdproxy-admin.json"
        self._lock_path = directory / "pdproxy-admin.lock"
        self._seen = 0  # the version last adopted

    def update(self, change: Callable[[State], None]) -> State:
        """Apply ``change`` to the current state, for every worker; the new state."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()
                change(state)
                state["version"] += 1
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state))
                os.replace(tmp, self.path)
                self._seen = state["version"]
                return state
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def changed(self) -> State | None:
        """The state if another worker changed it since the last look, else None."""
        state = self._read()
        if state["version"] == self._seen:
            return None
        self._seen = state["version"]
        return state

    def _read(self) -> State:
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty_state()
        return {**empty_state(), **state}
