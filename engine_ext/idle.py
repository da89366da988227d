"""Idle engine steps: block instead of spinning while blocks are held or pulls run.

vLLM keeps stepping an engine that holds blocks or waits for a load, even with nothing
to compute; on a CPU engine every such step keeps its worker busy-polling vLLM's
shared-memory queue, so a holding engine burns a core for as long as it holds. In a
step with nothing scheduled and nothing to tell the workers, :class:`IdleWaiter`
blocks the engine instead, until something happens: a transfer ends (the workers
announce it: :mod:`engine_ext.wake`), the proxy releases a transfer, the next lease
expires, or a request reaches the engine's input queue (found on the call stack that
builds us).

How long a wait may last is the scheduler side's decision
(:meth:`engine_ext.scheduler_side.PDScheduler.idle_timeout`): never while announced
news has not come back through a step, only a few milliseconds while a request of
this engine waits for its KV (so that no lost wake-up can cost a request more), and
up to :data:`IDLE_WAIT_MAX_SECONDS` only while the engine merely holds blocks for
others.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Any

# Longest wait of an engine that only holds blocks for others: a safety net (the
# events above end it). Past one second vLLM's busy-polling stops as well.
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
