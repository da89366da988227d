"""Where a slow request's time went when no backend was slow: the event loop stalled.

One proxy process serves every stream on one event loop, so anything that holds the
loop (a garbage collection, a burst of background work, a large log line) delays every
request whose next step was due. A p99 that is worse than the backends' is made of
such stalls, and they do not show in any request's own timestamps. Two cheap probes:

- ``pdproxy_event_loop_lag_seconds``: a task that asks to wake every ``LAG_PERIOD`` and
  records how late it woke (ten wake-ups a second: nothing measurable on its own).
- ``pdproxy_gc_pause_seconds{generation}``: each collection's duration, from CPython's
  ``gc.callbacks`` (two clock reads per collection).

``python -m bench`` reads both from the proxy around each measurement window, which is how
a tail is told apart from the backends' own.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import time

from prometheus_client import Histogram

from .. import background

log = logging.getLogger("pdproxy.stalls")

STALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LAG_PERIOD = 0.1
SLOW_STALL = 0.05  # a stall this long is logged too: it is in some client's latency
WARN_EVERY = 10.0  # seconds between two warning lines of one kind (the rest are counted)

LOOP_LAG = Histogram(
    "pdproxy_event_loop_lag_seconds",
    "How late a periodic probe woke up: how long the event loop was busy elsewhere.",
    buckets=STALL_BUCKETS,
)
GC_PAUSE = Histogram(
    "pdproxy_gc_pause_seconds",
    "Garbage-collection pauses of the proxy process, by generation.",
    ["generation"],
    buckets=STALL_BUCKETS,
)


class StallLog:
    """Warnings for one kind of stall, at most one line per ``WARN_EVERY`` seconds.

    A starved machine stalls every few hundred milliseconds; a line for each would bury
    the log. The first stall after a quiet spell is logged at once; the next line says
    how many were left out meanwhile and the worst of them (the histograms have all).
    """

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._last = float("-inf")
        self._left_out = 0
        self._worst_ms = 0.0

    def __call__(self, ms: float, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._last < WARN_EVERY:
            self._left_out += 1
            self._worst_ms = max(self._worst_ms, ms)
            return
        if self._left_out:
            message += " (and %d more since the last such line, the worst %.1f ms)"
            args += (self._left_out, self._worst_ms)
        log.warning(message, *args)
        self._last, self._left_out, self._worst_ms = now, 0, 0.0


class _GCTimer:
    """``gc.callbacks`` hook: times each collection; :meth:`record` writes the pauses.

    The hook itself only queues: a collection can start inside any allocation, also one
    made while prometheus-client holds its lock (with several workers, one lock for every
    value, not reentrant), and an observation from in there would wait on it for ever.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.children = [GC_PAUSE.labels(str(generation)) for generation in range(3)]
        self.warn = StallLog()
        self.pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=10_000)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        self.pauses.append((info["generation"], time.perf_counter() - self.started))

    def record(self) -> None:
        """The pauses queued since the last call, into the histogram (and the log)."""
        while self.pauses:
            generation, pause = self.pauses.popleft()
            self.children[generation].observe(pause)
            if pause >= SLOW_STALL:
                self.warn(pause * 1000, "garbage collection of generation %d took %.1f ms",
                          generation, pause * 1000)  # fmt: skip


def freeze_startup_heap() -> None:
    """Move every object alive after start-up out of the collector's sight.

    A full (generation 2) collection walks every tracked object: the imported modules,
    FastAPI's and pydantic's structures and the settings are most of them and live as
    long as the process, yet each full collection rescans them while every stream waits.
    ``gc.freeze`` puts them in a permanent generation, so a full collection costs what
    the requests in flight allocate. (CPython's documented use, as after a pre-fork.)
    """
    gc.collect()
    gc.freeze()


class StallProbes:
    """The loop-lag task and the GC hook of one process, started and stopped together."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._gc = _GCTimer()

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self._task = asyncio.create_task(self._watch(), name="pdproxy-loop-lag")

    async def stop(self) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        await background.cancel(self._task)
        self._gc.record()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        warn = StallLog()
        while True:
            due = loop.time() + LAG_PERIOD
            await asyncio.sleep(LAG_PERIOD)
            lag = max(loop.time() - due, 0.0)
            LOOP_LAG.observe(lag)
            self._gc.record()
            if lag >= SLOW_STALL:
                # The probe cannot tell a busy loop from a process the OS did not run
                # (a proxy sharing its cores with busy engines): both delay every stream.
                warn(
                    lag * 1000,
                    "event loop woke %.1f ms late (busy, or the process was not scheduled)",
                    lag * 1000,
                )
