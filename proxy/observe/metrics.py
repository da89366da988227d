"""Prometheus metrics, and the per-request record they (and the access log) are made from.

Conventional names: ``pdproxy_`` prefix, base units (seconds), ``_total`` counters.
The split of each request's time into proxy overhead, prefill, hand-off wait and decode
is what no other P/D proxy exposes; it is computed from one ``RequestRecord``.

With several worker processes, prometheus-client's multiprocess mode aggregates them
(``PROMETHEUS_MULTIPROC_DIR`` is set by the launcher before this module is imported).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .recent import Recent
from .tracing import DISABLED, RequestTrace

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

REQUESTS = Counter(
    "pdproxy_requests",
    "Requests answered, by endpoint, serving mode and outcome.",
    ["endpoint", "mode", "outcome"],
)
E2E = Histogram(
    "pdproxy_request_duration_seconds",
    "Whole request, as the client saw it.",
    ["endpoint", "mode"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "pdproxy_time_to_first_token_seconds",
    "Client time to the first generated text.",
    ["endpoint", "mode"],
    buckets=LATENCY_BUCKETS,
)
ITL = Histogram(
    "pdproxy_inter_token_seconds",
    "Gap between streamed chunks sent to clients.",
    ["endpoint"],
    buckets=TOKEN_GAP_BUCKETS,
)
PHASE = Histogram(
    "pdproxy_phase_seconds",
    "Each request's time split: proxy (its own work), prefill (P leg), handoff (P's answer "
    "to D's first byte: KV pull and D's first step), decode (D's first byte to the end).",
    ["phase"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "pdproxy_backend_in_flight",
    "Requests open on a backend.",
    ["backend", "role"],
    multiprocess_mode="livesum",
)
BACKEND_ERRORS = Counter(
    "pdproxy_backend_errors", "Backend failures (never a client's 4xx).", ["backend", "leg"]
)
EJECTIONS = Counter(
    "pdproxy_backend_ejections", "Times a backend was taken out of rotation.", ["backend"]
)
RETRIES = Counter("pdproxy_retries", "Legs moved to another backend after a failure.", ["leg"])
FALLBACKS = Counter("pdproxy_fallbacks", "Requests not served stitched, by reason.", ["reason"])
STREAM_MOVES = Counter(
    "pdproxy_stream_moves",
    "Streamed answers continued on another decode instance, by reason (failure, drain, "
    "rebalance) and how (kv: the KV moved with it; recompute: the instance recomputed it; "
    "failed: the stream ended with an error event).",
    ["reason", "kind"],
)
STREAM_MOVE_PAUSE = Histogram(
    "pdproxy_stream_move_pause_seconds",
    "Gap the client saw at a move: from the last token of the old decode instance to the "
    "first of the new one.",
    ["kind"],
    buckets=TOKEN_GAP_BUCKETS,
)
STREAM_MOVE_KV_TOKENS = Counter(
    "pdproxy_stream_move_kv_tokens",
    "Tokens whose KV moved with a stream (the new instance pulled them instead of recomputing).",
)
KV_RELEASES = Counter(
    "pdproxy_kv_releases", "Explicit releases of P's held KV, by outcome.", ["outcome"]
)
HEALTHY = Gauge(
    "pdproxy_backend_healthy",
    "1 when the backend passes health checks.",
    ["backend", "role"],
    multiprocess_mode="max",
)

access_log = logging.getLogger("pdproxy.access")

# The gauges with one series per (backend, role): a backend that leaves a pool must take
# its series with it, or its last value (healthy, N in flight) is reported forever.
PER_BACKEND_GAUGES = (HEALTHY, IN_FLIGHT)


def forget_backend(url: str, role: str) -> None:
    """Drop ``url``'s per-backend gauge series for ``role`` (it left that pool).

    In multiprocess mode prometheus-client keeps the values in per-process files and
    cannot remove a series there (it only warns): the backend is marked unhealthy
    instead, or its last 1 would count as a healthy instance for ever."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        HEALTHY.labels(url, role).set(0)
        return
    for gauge in PER_BACKEND_GAUGES:
        gauge.remove(url, role)


def render() -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


PHASES = [(phase, PHASE.labels(phase)) for phase in ("proxy", "prefill", "handoff", "decode")]
_CHILDREN: dict[tuple[str, str, str], tuple[Counter, Histogram, Histogram]] = {}


def _children(endpoint: str, mode: str, outcome: str) -> tuple[Counter, Histogram, Histogram]:
    """The series a finished request updates. ``labels()`` takes a lock and builds its key
    on every call (~2 µs); these few label sets never change, so each is looked up once."""
    key = (endpoint, mode, outcome)
    children = _CHILDREN.get(key)
    if children is None:
        children = _CHILDREN[key] = (
            REQUESTS.labels(endpoint, mode, outcome),
            E2E.labels(endpoint, mode),
            TTFT.labels(endpoint, mode),
        )
    return children


@dataclass
class RequestRecord:
    """Timestamps (time.perf_counter) and choices of one request."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    mode: str = "none"
    outcome: str = "ok"
    status: int = 200
    prefill_url: str | None = None
    decode_url: str | None = None
    prefill_start: float | None = None
    prefill_end: float | None = None
    decode_start: float | None = None
    decode_first_byte: float | None = None
    first_token: float | None = None
    finished: float | None = None
    retries: int = 0
    fallback: str | None = None
    error: str | None = None
    completion_tokens: int | None = None
    trace: RequestTrace = DISABLED
    recent: Recent | None = None  # the status page's last minute, when it is kept

    def leg_started(self, leg: str, url: str) -> None:
        """A leg goes to ``url`` (again, on a retry: the prefill timer restarts, the
        decode one keeps counting from the first try)."""
        now = time.perf_counter()
        if leg == "prefill":
            self.prefill_url, self.prefill_start = url, now
        else:
            self.decode_url = url
            self.decode_start = self.decode_start or now

    def phases(self) -> dict[str, float]:
        end = self.finished or time.perf_counter()
        total = end - self.started
        prefill = (
            (self.prefill_end - self.prefill_start)
            if self.prefill_start and self.prefill_end
            else 0.0
        )
        handoff = (
            (self.decode_first_byte - self.prefill_end)
            if self.prefill_end and self.decode_first_byte
            else 0.0
        )
        decode = (end - self.decode_first_byte) if self.decode_first_byte else 0.0
        if not self.prefill_start and self.decode_start and self.decode_first_byte:
            handoff = self.decode_first_byte - self.decode_start  # colocated: queue + prefill
        return {
            "proxy": max(total - prefill - handoff - decode, 0.0),
            "prefill": prefill,
            "handoff": handoff,
            "decode": decode,
            "total": total,
        }

    def finish(self) -> None:
        self.finished = time.perf_counter()
        self.trace.finish(self.status, self.mode)
        phases = self.phases()
        requests, e2e, ttft = _children(self.endpoint, self.mode, self.outcome)
        requests.inc()
        e2e.observe(phases["total"])
        if self.first_token is not None:
            ttft.observe(self.first_token - self.started)
        if self.outcome == "ok":
            for phase, histogram in PHASES:
                histogram.observe(phases[phase])
        if self.recent is not None:
            self.recent.add(self, phases)
        if access_log.isEnabledFor(logging.INFO):
            # orjson: one line per request, at a tenth of the stdlib's cost.
            access_log.info(orjson.dumps(self.log_fields(phases)).decode())

    def log_fields(self, phases: dict[str, float]) -> dict[str, object]:
        fields: dict[str, object] = {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "mode": self.mode,
            "status": self.status,
            "outcome": self.outcome,
            "prefill": self.prefill_url,
            "decode": self.decode_url,
            "ms": {k: round(v * 1000, 2) for k, v in phases.items()},
        }
        if self.first_token is not None:
            fields["ttft_ms"] = round((self.first_token - self.started) * 1000, 2)
        if self.retries:
            fields["retries"] = self.retries
        if self.fallback:
            fields["fallback"] = self.fallback
        if self.completion_tokens is not None:
            fields["completion_tokens"] = self.completion_tokens
        if self.error:
            fields["error"] = self.error
        return fields
