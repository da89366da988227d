"""Running requests that may leave this engine with their KV (live migration).

A decode request the proxy may move to another engine carries a ``migration_key`` in
its ``kv_transfer_params``. To move it, the proxy *arms* the key on this engine's
control plane (``POST /pd/hold``), then closes the request's stream at a token it
chose. vLLM aborts the request and calls ``request_finished`` for it, as for every
request that ends; for an armed key the connector then holds the request's blocks
exactly as it holds a finished prefill's (a lease, released after the pull, a release
or the lease's expiry) and records the ``kv_transfer_params`` that name them. The proxy
collects them (``POST /pd/held``, waiting a bounded time) and starts the continuation on
the other engine, which pulls them with the ordinary transports.

:class:`MigrationTable` is that bookkeeping, shared by the engine thread (which sees
requests start and end) and the control plane's threads (arm, collect). Every entry
leaves it on a bounded path: when its request ends, or when an outcome nobody collected
grows old.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OUTCOME_TTL_SECONDS = 60.0  # an outcome nobody collected is forgotten after this


@dataclass
class Armed:
    """A migration the proxy asked for: hold the request's KV when it ends."""

    lease_seconds: float | None


class MigrationTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._running: dict[str, str] = {}  # migration key -> request id (running here)
        self._armed: dict[str, Armed] = {}
        self._outcomes: dict[str, tuple[float, dict[str, Any]]] = {}

    # --- engine thread

    def started(self, key: str, req_id: str) -> None:
        """A request with this key is running here."""
        with self._cond:
            self._running[key] = req_id

    def ended(self, key: str) -> Armed | None:
        """The request with this key ended; its arming, if the proxy armed it (then
        ``record`` must follow: until it does, a ``collect`` keeps waiting)."""
        with self._cond:
            self._running.pop(key, None)
            return self._armed.get(key)

    def record(self, key: str, outcome: dict[str, Any]) -> None:
        """What became of an armed request (held, or finished before it could be)."""
        with self._cond:
            self._armed.pop(key, None)
            now = self._clock()
            self._outcomes[key] = (now, outcome)
            self._outcomes = {
                k: v for k, v in self._outcomes.items() if now - v[0] < OUTCOME_TTL_SECONDS
            }
            self._cond.notify_all()

    # --- control plane threads

    def arm(self, key: str, lease_seconds: float | None) -> bool:
        """Hold this request's KV when it ends; False if no such request runs here."""
        with self._cond:
            if key not in self._running:
                return False
            self._armed[key] = Armed(lease_seconds)
            return True

    def collect(self, key: str, wait_seconds: float) -> dict[str, Any] | None:
        """The outcome of an armed request, waiting up to ``wait_seconds`` for it to end:
        None if it has not ended yet (ask again), ``{"outcome": "unknown"}`` if there is
        nothing to wait for (never armed here, or its outcome already collected)."""
        deadline = self._clock() + max(0.0, wait_seconds)
        with self._cond:
            while key not in self._outcomes:
                if key not in self._armed:  # armed until its outcome is recorded
                    return {"outcome": "unknown"}
                left = deadline - self._clock()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._outcomes.pop(key)[1]

    def __len__(self) -> int:
        with self._cond:
            return len(self._running)
