"""Idle engine steps: block instead of spinning while blocks are held or pulls run.

vLLM keeps stepping an engine that holds blocks or waits for a load, even
with nothing to compute, and every step keeps its worker busy-polling vLLM's
shared-memory queue (``sched_yield`` for a second after each message): such an engine
burns a core for as long as it holds. So in a step with nothing scheduled and nothing
to tell the workers, :class:`IdleWaiter` blocks the engine until something happens: a
transfer ends (workers say so over :func:`~engine_ext.metadata.wake_endpoint`), the
proxy releases a transfer, the next lease expires, or a request reaches the engine's
input queue (found on the call stack that builds us). Past a second of that, vLLM's own
pollers go to sleep too. Where the input queue cannot be found (another vLLM layout,
data parallel, other requests waiting for something else) the wait is the short,
uninterruptible ``idle_step_sleep_ms`` instead.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import zmq

from engine_ext.metadata import wake_endpoint

logger = logging.getLogger("vllm.pd.scheduler")

# Longest an idle engine blocks when anything that needs it can wake it: a safety net
# only (wake-ups end the wait). Past one second vLLM's busy-polling stops as well.
IDLE_WAIT_MAX_SECONDS = 10.0


def workers_have_news(scheduler_output: Any) -> bool:
    """Whether this step tells the workers anything (then it must not wait): tokens to
    compute, finished or preempted requests to drop (an aborted decode's pull is
    cancelled that way), blocks to zero or copy, encoder cache to free."""
    return bool(
        getattr(scheduler_output, "total_num_scheduled_tokens", 0)
        or getattr(scheduler_output, "finished_req_ids", None)
        or getattr(scheduler_output, "preempted_req_ids", None)
        or getattr(scheduler_output, "free_encoder_mm_hashes", None)
        or getattr(scheduler_output, "new_block_ids_to_zero", None)
        or getattr(scheduler_output, "kv_cache_block_copies", None)
    )


def engine_hooks() -> tuple[queue.Queue | None, Any]:
    """The engine core's input queue and the vLLM scheduler that is constructing us.

    Both are found on the call stack (``EngineCoreProc.__init__`` creates the queue
    before it builds the scheduler, which builds the connector); either may be None
    (an in-process engine, another vLLM version, tests).
    """
    try:
        from vllm.v1.core.sched.interface import SchedulerInterface
    except ImportError:  # pragma: no cover - depends on the vLLM version
        return None, None
    input_queue = scheduler = None
    frame = sys._getframe(1)
    while frame is not None and (input_queue is None or scheduler is None):
        owner = frame.f_locals.get("self")
        if owner is not None:
            if scheduler is None and isinstance(owner, SchedulerInterface):
                scheduler = owner
            candidate = getattr(owner, "input_queue", None)
            if input_queue is None and isinstance(candidate, queue.Queue):
                input_queue = candidate
        frame = frame.f_back
    return input_queue, scheduler


class IdleWaiter:
    """Blocks an idle engine step until woken, a request arrives, or a timeout.

    It waits on the input queue's own condition (``Queue.put`` notifies it), so a new
    request ends the wait at once; :meth:`wake` (any thread) notifies the same
    condition. A wake-up that comes while no one waits ends the next wait at once.
    """

    def __init__(self, input_queue: queue.Queue | None):
        self._queue = input_queue
        self._cond = input_queue.not_empty if input_queue is not None else threading.Condition()
        self._woken = False

    @property
    def sees_requests(self) -> bool:
        return self._queue is not None

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            # ``queue`` is the Queue's own deque; its mutex is the one we hold.
            while not self._woken and not (self._queue is not None and len(self._queue.queue)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._woken = False


class WakeListener:
    """Scheduler process: receives the workers' "a transfer ended" and wakes the waiter.

    Each worker first says hello with its rank; :attr:`ready` once all have, i.e. once
    the channel is known to work for every worker of the engine.
    """

    def __init__(self, engine_id: str, waiter: IdleWaiter, num_workers: int = 1):
        self._waiter = waiter
        self._num_workers = num_workers
        self._hellos: set[bytes] = set()
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

    def _run(self) -> None:
        while not self._stop:
            try:
                if self._sock.poll(500):
                    wake = False
                    while True:
                        try:
                            message = self._sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if message.startswith(b"hello"):
                            self._hellos.add(message)
                        else:
                            wake = True
                    if wake:
                        self._waiter.wake()
            except zmq.ContextTerminated:
                return
            except Exception:  # never let the listener die silently
                logger.exception("PD wake listener error")
                time.sleep(0.1)

    @property
    def ready(self) -> bool:
        return len(self._hellos) >= self._num_workers

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._ctx.destroy(linger=0)
        try:
            os.unlink(self.endpoint.removeprefix("ipc://"))
        except OSError:
            pass
