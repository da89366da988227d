"""Transfer metrics: worker deltas -> vLLM's connector-stats path -> cumulative registry.

Workers count what they move in :class:`WorkerCounters`; every engine step vLLM asks
each worker for ``get_kv_connector_stats`` and carries the deltas, summed over TP ranks
(:meth:`PDKVConnectorStats.aggregate`), to the scheduler-side connector's
``update_connector_output``. There :class:`StatsRegistry` adds them to running totals
next to the scheduler's own counters (leases, releases) and serves them as JSON
(``/pd/stats``) and Prometheus text (``/metrics``) from the control server. The same
deltas also reach vLLM's frontend, which logs their :meth:`reduce` summary.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

# Counter name -> help text. Worker counters are deltas summed across steps and ranks.
WORKER_COUNTERS: dict[str, str] = {
    "bytes_sent": "KV bytes sent to decode instances (P side).",
    "blocks_sent": "KV blocks sent, summed over TP ranks (P side).",
    "chunks_sent": "Data messages sent (P side).",
    "pulls_served": "Pulls of held transfers completed by decode instances (P side).",
    "pulls_refused": "Pull requests refused: unknown transfer, layout mismatch, busy (P side).",
    "pins_lapsed": "Blocks pinned for a decode instance's device-to-device copy that it never "
    "finished; unpinned after pull_timeout_seconds (P side).",
    "bytes_received": "KV bytes received and written into KV blocks (D side).",
    "blocks_received": "KV blocks received, summed over TP ranks (D side).",
    "transfers_ok": "Pulls that completed and were used (D side).",
    "transfers_ipc": "Completed pulls copied device to device over CUDA IPC (D side).",
    "transfers_nccl": "Completed pulls received over NCCL (D side).",
    "transfers_host": "Completed pulls received through host memory over ZMQ (D side).",
    "transfers_failed": "Pulls that failed or timed out; D recomputed (D side).",
    "transfers_cancelled": "Pulls cancelled because the decode request was aborted (D side).",
    "transfer_seconds_total": "Wall time of completed pulls, summed (D side).",
    "move_seconds_total": "Wall time D spent putting pulled bytes into its blocks (host "
    "scatter, NCCL receive or device-to-device copy), summed; the rest of a pull is "
    "protocol and waiting (D side).",
}
SCHEDULER_COUNTERS: dict[str, str] = {
    "transfers_held_total": "Prefills whose blocks were held for pulls (P side).",
    "lease_expiries": "Held transfers released because their lease expired (P side).",
    "releases": "Held transfers released through POST /pd/release (P side).",
    "transfers_completed": "Held transfers released because all consumers pulled (P side).",
    "pulls_started": "Decode requests that started a pull (D side).",
    "migrations_held": "Running requests moved away whose KV was held for the engine "
    "that continues them (live migration's source side).",
    "pulls_skipped": "Decode requests with remote KV that did not pull (local hit, mismatch).",
    "kv_wait_seconds_total": "Wall time decode requests waited for their KV, from the step "
    "that started the pull to the step that saw it end, summed (D side).",
}
GAUGES: dict[str, str] = {
    "transfers_held": "Transfers whose blocks are held right now (P side).",
    "pulls_inflight": "Pulls in progress right now (D side).",
}


@dataclass
class PDKVConnectorStats(KVConnectorStats):
    """Worker counter deltas; ``data`` maps counter name to a number (picklable)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> PDKVConnectorStats:
        merged = dict(self.data)
        for key, value in (other.data or {}).items():
            merged[key] = merged.get(key, 0) + value
        return PDKVConnectorStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        return {key: round(value, 4) for key, value in sorted(self.data.items()) if value}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class WorkerCounters:
    """Thread-safe deltas since the last :meth:`take` (transport threads add)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, float] = {}

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                if key not in WORKER_COUNTERS:
                    raise KeyError(key)
                self._data[key] = self._data.get(key, 0) + value

    def take(self) -> PDKVConnectorStats | None:
        with self._lock:
            data, self._data = self._data, {}
        return PDKVConnectorStats(data=data) if any(data.values()) else None


class StatsRegistry:
    """Cumulative totals in the scheduler process, read by the control server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, float] = {k: 0 for k in (*WORKER_COUNTERS, *SCHEDULER_COUNTERS)}
        self._gauges: dict[str, float] = {k: 0 for k in GAUGES}

    def add(self, data: dict[str, Any] | None) -> None:
        if not data:
            return
        with self._lock:
            for key, value in data.items():
                if key in self._totals:
                    self._totals[key] += value

    def inc(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._totals[key] += value

    def set_gauge(self, key: str, value: float) -> None:
        with self._lock:
            self._gauges[key] = value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {**self._totals, **self._gauges}

    def prometheus(self, prefix: str = "pd_connector_") -> str:
        snap = self.snapshot()
        lines: list[str] = []
        for table, kind in (
            (WORKER_COUNTERS, "counter"),
            (SCHEDULER_COUNTERS, "counter"),
            (GAUGES, "gauge"),
        ):
            for key, help_text in table.items():
                name = prefix + key
                if kind == "counter" and not name.endswith("_total"):
                    name += "_total"
                lines += [
                    f"# HELP {name} {help_text}",
                    f"# TYPE {name} {kind}",
                    f"{name} {snap[key]:g}",
                ]
        return "\n".join(lines) + "\n"
