"""The last minute of finished requests and the last errors, for the status page.

Prometheus has the long view; this is what the proxy saw just now, kept in the process
so ``/status`` needs nothing else. Recording is O(1) on the hot path: a request lands in
the bucket of the second it finished in (a ring of one-second buckets, a stale bucket is
reset when its slot comes round again). All the arithmetic (rates, means, medians) waits
for a reader, who polls once a second or two.

Phase times are summed exactly; medians come from at most ``SAMPLES_PER_SECOND`` requests
of each second, so memory stays bounded however busy the proxy is.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import RequestRecord

PHASES = ("prefill", "handoff", "decode", "proxy")
ERROR_OUTCOMES = ("error", "client_error")  # a client leaving (client_gone) is not an error
SAMPLES_PER_SECOND = 200


class _Second:
    """The requests that finished within one second."""

    __slots__ = ("second", "requests", "by_mode", "by_outcome", "ok", "sums", "samples")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.by_mode: dict[str, int] = {}
        self.by_outcome: dict[str, int] = {}
        self.ok = 0  # requests whose phases are counted (as in pdproxy_phase_seconds)
        self.sums = [0.0] * len(PHASES)
        self.samples: list[tuple[float, ...]] = []


class Recent:
    """A rolling window of ``window`` seconds of requests, and a ring of the last errors.

    ``clock`` must be the one ``RequestRecord.finished`` is read from (perf_counter)."""

    def __init__(self, window: int = 60, errors: int = 20, clock=time.perf_counter) -> None:
        self.window = window
        self.clock = clock
        self._seconds: list[_Second | None] = [None] * window
        self.errors: deque[dict[str, Any]] = deque(maxlen=errors)

    def add(self, record: RequestRecord, phases: dict[str, float]) -> None:
        second = int(record.finished or self.clock())
        slot = second % self.window
        bucket = self._seconds[slot]
        if bucket is None or bucket.second != second:
            bucket = self._seconds[slot] = _Second(second)
        bucket.requests += 1
        bucket.by_mode[record.mode] = bucket.by_mode.get(record.mode, 0) + 1
        bucket.by_outcome[record.outcome] = bucket.by_outcome.get(record.outcome, 0) + 1
        if record.outcome == "ok":
            values = (phases["prefill"], phases["handoff"], phases["decode"], phases["proxy"])
            bucket.ok += 1
            sums = bucket.sums
            for i, value in enumerate(values):
                sums[i] += value
            if len(bucket.samples) < SAMPLES_PER_SECOND:
                bucket.samples.append(values)
        elif record.outcome in ERROR_OUTCOMES:
            self.errors.append(
                {
                    "time": time.time(),
                    "status": record.status,
                    "message": record.error or "",
                    "request_id": record.request_id,
                    "endpoint": record.endpoint,
                    "mode": record.mode,
                }
            )

    def snapshot(self) -> dict[str, Any]:
        """The window as plain JSON types: per-second counts oldest first (the current,
        partial second last), totals by mode and outcome, and each phase's mean and median
        in milliseconds over the requests served without error."""
        now = int(self.clock())
        live = [b for b in self._seconds if b is not None and now - self.window < b.second <= now]
        per_second = [0] * self.window
        by_mode: dict[str, int] = {}
        by_outcome: dict[str, int] = {}
        ok, sums, samples = 0, [0.0] * len(PHASES), []
        for b in live:
            per_second[self.window - 1 - (now - b.second)] = b.requests
            for mode, n in b.by_mode.items():
                by_mode[mode] = by_mode.get(mode, 0) + n
            for outcome, n in b.by_outcome.items():
                by_outcome[outcome] = by_outcome.get(outcome, 0) + n
            ok += b.ok
            sums = [a + c for a, c in zip(sums, b.sums, strict=True)]
            samples += b.samples
        phases = {
            name: {
                "mean_ms": round(sums[i] / ok * 1000, 3) if ok else None,
                "p50_ms": round(statistics.median(s[i] for s in samples) * 1000, 3)
                if samples
                else None,
            }
            for i, name in enumerate(PHASES)
        }
        total = sum(per_second)
        return {
            "window_s": self.window,
            "requests": total,
            "requests_per_s": round(total / self.window, 3),
            "per_second": per_second,
            "by_mode": by_mode,
            "by_outcome": by_outcome,
            "phases": phases,
            "errors": list(reversed(self.errors)),  # newest first
        }
