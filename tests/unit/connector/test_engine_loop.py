"""The idle waiter inside vLLM's own engine loops: no missed news, no lost wake-ups.

vLLM's ``EngineCore.step`` (synchronous scheduling, what vLLM CPU runs) and
``EngineCore.step_with_batch_queue`` (async scheduling, the default on CUDA) are run
as they are, bound to a stand-in engine whose scheduler drives the real
:class:`~engine_ext.scheduler_side.PDScheduler` and whose executor runs a worker
that finishes its transfers on another thread and announces them as the real one
does (:class:`~engine_ext.wake.Announcer`). Under async scheduling vLLM plans step
N+1 before it reads step N's output; a connector that blocked in step N+1 with the
news sitting in step N's output stalled every hand-off for its idle safety net (10 s
on vLLM 0.26 CUDA). These tests time how long after a transfer ends the engine acts
on it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from vllm.v1.engine.core import EngineCore

from engine_ext import idle
from engine_ext.metadata import PDConnectorMetadata
from engine_ext.wake import RECV, SEND, Announcer
from tests.unit.connector.test_scheduler import blocks, make_scheduler, prefill, request

PULL_SECONDS = 0.05
# How soon after a transfer ends the engine must act on it. Idle steps here last 2 ms and
# a hand-off lags 2-6 ms, even with both cores of a 2-core runner busy; a missed wake-up
# costs the safety net (2 s here: ``short_safety_net``). The bound sits far from both,
# so a runner that deschedules the test for tens of milliseconds does not fail it.
PROMPTLY = 0.25


class Worker:
    """Stands in for PDWorker: transfers end on timer threads, are announced, and are
    reported by the next ``get_finished`` (as the real worker's results are)."""

    def __init__(self, engine_id: str, announce: bool = True, pull_seconds: float = PULL_SECONDS):
        self.announcer = Announcer(engine_id, 0)
        self.announce = announce
        self.pull_seconds = pull_seconds
        self._lock = threading.Lock()
        self._recved: set[str] = set()
        self._sent: set[str] = set()
        self.ended_at: dict[str, float] = {}

    def _end(self, kind: str, req_id: str) -> None:
        with self._lock:
            (self._recved if kind == RECV else self._sent).add(req_id)
            self.ended_at[req_id] = time.monotonic()
        if self.announce:
            self.announcer(kind, req_id)

    def execute(self, meta: PDConnectorMetadata) -> SimpleNamespace:
        for pull in meta.pulls:
            threading.Timer(self.pull_seconds, self._end, args=(RECV, pull.req_id)).start()
        for send in meta.sends:  # D pulls it shortly after the prefill
            threading.Timer(PULL_SECONDS, self._end, args=(SEND, send.req_id)).start()
        with self._lock:
            recved, self._recved = self._recved, set()
            sent, self._sent = self._sent, set()
        return SimpleNamespace(
            finished_recving=recved or None,
            finished_sending=sent or None,
            kv_connector_stats=None,
        )

    def close(self) -> None:
        self.announcer.close()


class Scheduler:
    """The slice of vLLM's scheduler the engine loops use, around the real connector.

    D requests wait for their KV (WAITING_FOR_REMOTE_KVS) until a step's output
    reports the pull, then run one step and finish; held prefills stay until a step's
    output reports them sent.
    """

    def __init__(self, connector, input_queue: queue.Queue):
        self.connector = connector
        self.input_queue = input_queue
        self.waiting: dict[str, dict] = {}  # req id -> kv params, waiting for the KV
        self.new: list[str] = []
        self.ready: list[str] = []
        self.held: set[str] = set()
        self.resumed_at: dict[str, float] = {}
        self.freed_at: dict[str, float] = {}

    def add_decode(self, rid: str, params: dict) -> None:
        self.waiting[rid] = params
        self.new.append(rid)

    def hold(self, rid: str) -> None:
        self.held.add(rid)

    def finish_prefill(self, rid: str) -> None:
        """A prefill request ends: the connector holds its blocks for a pull."""
        hold, _ = self.connector.request_finished(
            request(rid, {"do_remote_decode": True}, prompt_len=10), [5, 6, 7]
        )
        assert hold
        self.held.add(rid)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.ready or self.held or self.new)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.ready)

    def schedule(self, *_args):
        for rid in self.new:
            req = request(rid, self.waiting[rid], prompt_len=10, computed=0)
            count, load_async = self.connector.get_num_new_matched_tokens(req, 0)
            assert load_async and count == 10
            self.connector.update_state_after_alloc(req, blocks([1, 2, 3]), count)
        self.new = []
        ready, self.ready = self.ready, []
        for rid in ready:
            self.resumed_at[rid] = time.monotonic()
        out = SimpleNamespace(
            total_num_scheduled_tokens=len(ready),
            scheduled=ready,
            finished_req_ids=set(),
            pending_structured_output_tokens=False,
        )
        out.kv_connector_metadata = self.connector.build_connector_meta(out)
        return out

    def get_grammar_bitmask(self, _output):
        return None

    def update_from_output(self, output, model_output):
        kv = model_output.kv_connector_output
        self.connector.update_connector_output(kv)
        for rid in kv.finished_recving or ():
            del self.waiting[rid]
            self.ready.append(rid)
        for rid in kv.finished_sending or ():
            self.held.discard(rid)
            self.freed_at[rid] = time.monotonic()
        return {}


class Executor:
    """vLLM's uni-process executor: the worker runs the step at once, in this thread."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._pending: SimpleNamespace | None = None

    def execute_model(self, output, non_block=False):
        kv = self.worker.execute(output.kv_connector_metadata)
        result = SimpleNamespace(kv_connector_output=kv)
        future: Future = Future()
        if output.total_num_scheduled_tokens:  # sampled by sample_tokens, as in vLLM
            self._pending = result
            future.set_result(None)
        else:
            future.set_result(result)
        return future

    def sample_tokens(self, _grammar, non_block=False):
        result, self._pending = self._pending, None
        if not non_block:
            return result
        future: Future = Future()
        future.set_result(result)
        return future


class Engine:
    """Runs vLLM's own step functions on the stand-ins, on a thread, like its busy loop."""

    step = EngineCore.step
    step_with_batch_queue = EngineCore.step_with_batch_queue

    def __init__(
        self, batch_queue: bool, announce: bool = True, pull_seconds=PULL_SECONDS, **settings
    ):
        self.engine_id = f"engine-{uuid.uuid4().hex[:8]}"
        self.input_queue: queue.Queue = queue.Queue()
        vllm_scheduler = SimpleNamespace(get_num_unfinished_requests=lambda: 0)
        self.connector = make_scheduler(
            hooks=(self.input_queue, vllm_scheduler), engine_id=self.engine_id, **settings
        )
        self.scheduler = Scheduler(self.connector, self.input_queue)
        vllm_scheduler.get_num_unfinished_requests = self.scheduler.get_num_unfinished_requests
        self.worker = Worker(self.engine_id, announce, pull_seconds)
        self.model_executor = Executor(self.worker)
        self.batch_queue_size = 2 if batch_queue else 1
        self.batch_queue = deque(maxlen=2) if batch_queue else None
        self.step_fn = self.step_with_batch_queue if batch_queue else self.step
        self.is_pooling_model = False
        self.is_mm_encoder_only = False
        self.is_ec_consumer = True
        self.check_for_draft_tokens = False
        deadline = time.monotonic() + 5
        while not self.connector.wake_listener.ready:
            assert time.monotonic() < deadline, "no hello from the worker"
            time.sleep(0.005)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # what the step functions call besides the scheduler and the executor
    def _should_throttle_prefills(self) -> bool:
        return False

    def log_error_detail(self, _output):
        return contextlib.nullcontext()

    def capture_iteration_details(self, _output):
        return contextlib.nullcontext()

    def _process_aborts_queue(self) -> None:
        pass

    def _attach_iteration_details(self, *_args) -> None:
        pass

    def _attach_weight_version(self, *_args) -> None:
        pass

    def _run(self) -> None:
        # vLLM's busy loop: take requests, step while there is work (it sleeps 1 ms
        # after a step that ran no model), block on the input queue otherwise.
        while not self._stop:
            try:
                kind, arg = self.input_queue.get(timeout=0.01)
            except queue.Empty:
                pass
            else:
                getattr(self.scheduler, kind)(*arg)
            while not self._stop and self.scheduler.has_requests():
                while not self.input_queue.empty():
                    kind, arg = self.input_queue.get_nowait()
                    getattr(self.scheduler, kind)(*arg)
                _, executed = self.step_fn()
                if not executed:
                    time.sleep(0.001)

    def submit(self, kind: str, *args) -> None:
        self.input_queue.put((kind, args))

    def close(self) -> None:
        self._stop = True
        self.input_queue.put(("has_requests", ()))
        self._thread.join(timeout=15)
        self.worker.close()
        self.connector.shutdown()


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(**kwargs) -> Engine:
        made.append(Engine(**kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


@pytest.fixture(autouse=True)
def short_safety_net(monkeypatch):
    # The connector's longest idle wait (10 s in production): short here, so that a
    # stall shows as this much, and the assertions below sit far below it.
    monkeypatch.setattr("engine_ext.scheduler_side.IDLE_WAIT_MAX_SECONDS", 2.0)
    assert idle.IDLE_WAIT_MAX_SECONDS == 10.0


def wait_for(mapping: dict, key: str, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    while key not in mapping:
        assert time.monotonic() < deadline, f"{key} never happened"
        time.sleep(0.002)
    return mapping[key]


def hand_offs(engine: Engine, count: int) -> list[float]:
    """Seconds from each pull's end to the step that runs its request."""
    p = make_scheduler()  # a prefill instance, for well-formed params
    lags = []
    for i in range(count):
        rid = f"d{i}"
        params = prefill(p, f"p{i}")
        engine.submit("add_decode", rid, params)
        resumed = wait_for(engine.scheduler.resumed_at, rid)
        lags.append(resumed - engine.worker.ended_at[rid])
        time.sleep(0.05)
    return lags


def holding(engine: Engine) -> None:
    """The engine holds a transfer of its own while the pulls run (a P that is also
    a D, or leases of earlier prefills): it must wait for news, not spin."""
    engine.connector.leases.add("t-held", "held-req", 30)
    engine.submit("hold", "held-req")


@pytest.mark.parametrize("batch_queue", [False, True], ids=["sync", "async-scheduling"])
def test_decode_runs_as_soon_as_its_pull_ends(engines, batch_queue):
    engine = engines(batch_queue=batch_queue, idle_step_sleep_ms=2)
    holding(engine)
    lags = hand_offs(engine, 4)
    assert max(lags) < PROMPTLY, lags


@pytest.mark.parametrize("batch_queue", [False, True], ids=["sync", "async-scheduling"])
def test_held_blocks_are_freed_as_soon_as_they_are_pulled(engines, batch_queue):
    engine = engines(batch_queue=batch_queue, idle_step_sleep_ms=2)
    holding(engine)
    for i in range(3):
        rid = f"p{i}"
        engine.submit("finish_prefill", rid)
        freed = wait_for(engine.scheduler.freed_at, rid)
        assert freed - engine.worker.ended_at[rid] < PROMPTLY


@pytest.mark.parametrize("batch_queue", [False, True], ids=["sync", "async-scheduling"])
def test_a_lost_wake_up_costs_a_waiting_request_milliseconds(engines, batch_queue):
    # Announcements never arrive (a broken channel, a vLLM that reorders things): a
    # request waiting for its KV still runs within a few idle steps of its pull.
    engine = engines(batch_queue=batch_queue, announce=False, idle_step_sleep_ms=2)
    holding(engine)
    lags = hand_offs(engine, 4)
    assert max(lags) < PROMPTLY, lags


@pytest.mark.parametrize("batch_queue", [False, True], ids=["sync", "async-scheduling"])
def test_a_long_pull_is_acted_on_as_soon_as_it_ends(engines, batch_queue):
    # Half a second of pull (a large KV over the host path): the engine steps
    # meanwhile and must not be caught in a long wait when it ends.
    engine = engines(batch_queue=batch_queue, pull_seconds=0.5, idle_step_sleep_ms=2)
    holding(engine)
    lags = hand_offs(engine, 2)
    assert max(lags) < PROMPTLY, lags
