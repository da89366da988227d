"""The worker -> scheduler news channel: "this request's transfer ended".

Workers move KV on their own threads; the scheduler process learns that a transfer
ended only from a later step's output (``get_finished``). An idle engine that waits
for something to happen (:mod:`engine_ext.idle`) must therefore hear of such news
from the workers directly, and must know that news is *on its way* through vLLM:

* every worker announces each ended transfer (``recv <req_id>`` or ``send <req_id>``)
  the moment its result is queued, before any ``get_finished`` can report it;
* the scheduler process keeps the announced request ids as *pending* until a step's
  output reports them (:meth:`WakeListener.seen`), and never blocks while any is
  pending.

The second point is what makes waiting safe with a pipelined engine loop: under async
scheduling vLLM schedules step N+1 before it reads step N's output, so a wake-up
alone would end one wait while the news it announced still sits, unread, in step N's
output, and the next wait would block with nothing left to wake it.

The channel is a ZMQ PUSH per worker and one PULL in the scheduler process over
``ipc://`` (both ends derive the address from the engine id, which vLLM shares with
all of an engine's processes). Each worker says hello first; until every worker has,
an idle engine only takes short sleeps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

import zmq

logger = logging.getLogger("vllm.pd.wake")

RECV, SEND = "recv", "send"
# News not reported by any step this long after it was announced is dropped: a
# transfer a step will never report (its request left the engine some other way)
# must not keep the engine from waiting forever.
STALE_SECONDS = 5.0
# Announcements queued while the scheduler process is not listening yet.
SEND_HWM = 100_000


def wake_endpoint(engine_id: str) -> str:
    """Where an engine's workers reach its scheduler process."""
    digest = hashlib.sha1(engine_id.encode()).hexdigest()[:16]
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'pd-wake-{digest}')}"


class Announcer:
    """Worker process: announces ended transfers (any thread)."""

    def __init__(self, engine_id: str, rank: int):
        self._lock = threading.Lock()  # ZMQ sockets are not thread-safe
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.connect(wake_endpoint(engine_id))
        # Queued until the scheduler binds; proves the channel works for this worker.
        self._sock.send(f"hello {rank}".encode(), zmq.NOBLOCK)
        self._dropped = 0

    def port(self, rank: int, port: int) -> None:
        """Tell the scheduler process which ZMQ port this rank's server bound."""
        with self._lock:
            self._sock.send(f"port {rank} {port}".encode(), zmq.NOBLOCK)

    def __call__(self, kind: str, req_id: str) -> None:
        with self._lock:
            try:
                self._sock.send(f"{kind} {req_id}".encode(), zmq.NOBLOCK)
            except zmq.Again:
                # The scheduler stopped reading: it then notices the transfer at its
                # next bounded wait (short while a pull is in flight).
                self._dropped += 1
                if self._dropped in (1, 1000):
                    logger.warning("PD wake channel full: %d announcements dropped", self._dropped)
            except zmq.ZMQError:
                pass  # shutting down

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)
            self._ctx.term()


class WakeListener:
    """Scheduler process: collects announcements as pending news and wakes the engine.

    ``on_news`` is called (listener thread) after each batch of announcements has been
    recorded, so whoever it wakes sees the news as pending.
    """

    def __init__(
        self,
        engine_id: str,
        on_news: Callable[[], None],
        num_workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._on_news = on_news
        self._num_workers = num_workers
        self._clock = clock
        self._hellos: set[bytes] = set()
        self.ports: dict[int, int] = {}  # TP rank -> the ZMQ port its worker bound
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # "kind req_id" -> when first announced
        # Recently reported by a step. The listener thread can lag the engine thread,
        # and with tensor parallelism every worker announces the same transfer: a
        # late announcement of something already reported is old news.
        self._reported: dict[str, float] = {}
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = wake_endpoint(engine_id)
        try:
            self._sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise RuntimeError(f"cannot bind {self.endpoint}: {exc}") from exc
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pd-wake", daemon=True)
        self._thread.start()

    # --- listener thread

    def _run(self) -> None:
        while not self._stop:
            try:
                if self._sock.poll(500):
                    self._drain()
            except zmq.ContextTerminated:
                return
            except Exception:  # never let the listener die silently
                logger.exception("PD wake listener error")
                time.sleep(0.1)

    def _drain(self) -> None:
        news = []
        while True:
            try:
                message = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if message.startswith(b"hello"):
                self._hellos.add(message)
                continue
            if message.startswith(b"port "):
                _, rank, port = message.split()
                self.ports[int(rank)] = int(port)
                continue
            news.append(message.decode())
        if news:
            now = self._clock()
            fresh = False
            with self._lock:
                for key in news:
                    if key not in self._reported:
                        self._pending.setdefault(key, now)
                        fresh = True
            if fresh:
                self._on_news()

    # --- scheduler thread

    @property
    def ready(self) -> bool:
        """Every worker's channel is known to work."""
        return len(self._hellos) >= self._num_workers

    def seen(self, kind: str, req_ids: Iterable[str]) -> None:
        """A step's output reported these transfers: they are no longer pending."""
        now = self._clock()
        with self._lock:
            for req_id in req_ids:
                key = f"{kind} {req_id}"
                self._pending.pop(key, None)
                self._reported[key] = now
            if len(self._reported) > 256:
                cutoff = now - STALE_SECONDS
                self._reported = {k: t for k, t in self._reported.items() if t >= cutoff}

    def has_pending(self) -> bool:
        """Whether announced news has not reached the scheduler through a step yet."""
        with self._lock:
            if not self._pending:
                return False
            cutoff = self._clock() - STALE_SECONDS
            stale = [key for key, since in self._pending.items() if since < cutoff]
            for key in stale:
                del self._pending[key]
            if stale:
                logger.debug("PD wake: dropped %d stale announcements", len(stale))
            return bool(self._pending)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._ctx.destroy(linger=0)
        try:
            os.unlink(self.endpoint.removeprefix("ipc://"))
        except OSError:
            pass
