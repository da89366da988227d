"""Scheduler side and control plane, with fake vLLM requests (no engine)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import torch
from vllm.v1.request import RequestStatus

from devkit.servers import free_port
from engine_ext.config import PDSettings
from engine_ext.idle import IdleWaiter
from engine_ext.scheduler_side import PDScheduler
from engine_ext.stats import PDKVConnectorStats
from engine_ext.wake import SEND, Announcer

BS = 4  # block size


def make_scheduler(hooks=None, engine_id="engine-p", **settings) -> PDScheduler:
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(served_model_name=["tiny"]),
        cache_config=SimpleNamespace(block_size=BS),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        device_config=SimpleNamespace(device_type="cpu"),
    )
    spec = SimpleNamespace(dtype=torch.float32, block_size=BS, num_kv_heads=2, head_size=8)
    kv_cache_config = SimpleNamespace(
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=["l0", "l1"])],
        num_blocks=64,
    )
    settings.setdefault("control_port", -1)  # no control server
    return PDScheduler(
        vllm_config,
        kv_cache_config,
        PDSettings(host="10.0.0.7", zmq_port=7000, **settings),
        engine_id,
        hooks=hooks,
    )


def request(
    rid="r1", params=None, prompt_len=10, status=RequestStatus.FINISHED_LENGTH_CAPPED, computed=None
):
    return SimpleNamespace(
        request_id=rid,
        kv_transfer_params=params,
        prompt_token_ids=list(range(prompt_len)),
        num_prompt_tokens=prompt_len,
        status=status,
        num_computed_tokens=prompt_len if computed is None else computed,
    )


def blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(sched, tokens=1):
    return sched.build_connector_meta(SimpleNamespace(total_num_scheduled_tokens=tokens))


def prefill(sched, rid="p1", prompt_len=10, **params):
    hold, out = sched.request_finished(
        request(rid, {"do_remote_decode": True, **params}, prompt_len), [5, 6, 7, 8]
    )
    assert hold
    return out


# ------------------------------------------------------------------ P side


def test_prefill_holds_prompt_blocks_and_returns_params():
    sched = make_scheduler(control_port=5599)
    try:
        params = prefill(sched, prompt_len=10, consumers=2)
    finally:
        sched.shutdown()
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "10.0.0.7" and params["remote_port"] == 7000
    assert params["control_port"] == 5599 and params["remote_engine_id"] == "engine-p"
    assert params["remote_block_ids"] == [5, 6, 7]  # 10 tokens: 3 blocks of 4
    assert params["remote_num_tokens"] == 10
    assert params["layout"]["block_size"] == BS and params["layout"]["model"] == "tiny"
    assert len(params["transfer_id"]) == 32
    meta = step(sched)
    (send,) = meta.sends
    assert send.transfer_id == params["transfer_id"] and send.consumers == 2
    assert send.block_ids == (5, 6, 7) and send.req_id == "p1"
    assert sched.stats_json()["transfers_held"] == 1


@pytest.mark.parametrize("status", [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_IGNORED])
def test_aborted_prefill_is_not_held(status):
    sched = make_scheduler()
    assert sched.request_finished(
        request("p1", {"do_remote_decode": True}, status=status), [1, 2]
    ) == (False, None)
    assert step(sched).is_empty()


def test_partial_prefill_and_plain_requests_are_not_held():
    sched = make_scheduler()
    partial = request("p1", {"do_remote_decode": True}, prompt_len=10, computed=8)
    assert sched.request_finished(partial, [1, 2, 3]) == (False, None)
    assert sched.request_finished(request("p2", None), [1]) == (False, None)
    assert sched.request_finished(request("p3", {}), [1]) == (False, None)


def test_bad_client_params_fall_back_to_defaults():
    sched = make_scheduler()
    prefill(sched, "p1", consumers="many", lease_seconds="inf")
    prefill(sched, "p2", consumers=-3, lease_seconds=None)
    assert [s.consumers for s in step(sched).sends] == [1, 1]


def test_lease_expiry_and_release_reach_the_workers():
    sched = make_scheduler(lease_seconds=30)
    short = prefill(sched, "p1", lease_seconds=0.05)  # a request may shorten its lease
    long = prefill(sched, "p2")
    step(sched)
    assert sched.release(long["transfer_id"]) is True
    assert sched.release(long["transfer_id"]) is False
    time.sleep(0.06)
    meta = step(sched)
    assert sorted(meta.releases) == sorted([short["transfer_id"], long["transfer_id"]])
    stats = sched.stats_json()
    assert stats["lease_expiries"] == 1 and stats["releases"] == 1 and stats["transfers_held"] == 2
    # Workers report the blocks free: the leases end.
    sched.update_connector_output(
        SimpleNamespace(
            finished_sending={"p1", "p2"},
            finished_recving=None,
            kv_connector_stats=PDKVConnectorStats(data={"bytes_sent": 10, "pulls_refused": 1}),
        )
    )
    stats = sched.stats_json()
    assert stats["transfers_held"] == 0 and stats["transfers_completed"] == 0
    assert stats["bytes_sent"] == 10 and stats["pulls_refused"] == 1


def test_pulled_transfer_counts_as_completed():
    sched = make_scheduler()
    prefill(sched, "p1")
    step(sched)
    sched.update_connector_output(
        SimpleNamespace(finished_sending={"p1"}, finished_recving=None, kv_connector_stats=None)
    )
    assert sched.stats_json()["transfers_completed"] == 1


def test_idle_steps_sleep_only_while_holding_and_idle():
    sched = make_scheduler(idle_step_sleep_ms=20)
    start = time.monotonic()
    for _ in range(5):
        step(sched, tokens=0)  # nothing held: no sleep
    assert time.monotonic() - start < 0.05
    prefill(sched, "p1")
    step(sched, tokens=0)  # carries the new send: no sleep
    start = time.monotonic()
    step(sched, tokens=0)
    assert time.monotonic() - start >= 0.019
    start = time.monotonic()
    step(sched, tokens=8)  # real work scheduled: no sleep
    assert time.monotonic() - start < 0.015


def test_idle_waiter_ends_on_a_request_a_wake_up_or_its_timeout():
    q: queue.Queue = queue.Queue()
    waiter = IdleWaiter(q)
    # The clock starts before the timer: on a starved machine this thread may not run
    # again for a while after starting it, and the request must not look early.
    start = time.monotonic()
    threading.Timer(0.1, q.put_nowait, args=("request",)).start()
    waiter.wait(5)
    assert 0.09 <= time.monotonic() - start < 1
    q.get_nowait()
    waiter.wake()  # while no one waits: the next wait ends at once
    start = time.monotonic()
    waiter.wait(5)
    assert time.monotonic() - start < 0.05
    start = time.monotonic()
    waiter.wait(0.1)
    assert 0.09 <= time.monotonic() - start < 1


class Engine:
    """Stands in for vLLM's engine core: an input queue and a request count."""

    def __init__(self, unfinished=0, **settings):
        self.input_queue: queue.Queue = queue.Queue()
        self.unfinished = unfinished
        self.engine_id = f"engine-{uuid.uuid4().hex[:8]}"
        fake_vllm = SimpleNamespace(get_num_unfinished_requests=lambda: self.unfinished)
        self.sched = make_scheduler(
            hooks=(self.input_queue, fake_vllm), engine_id=self.engine_id, **settings
        )
        self.worker = Announcer(self.engine_id, 0)  # says hello, as a worker does
        deadline = time.monotonic() + 5
        while not self.sched.wake_listener.ready:
            assert time.monotonic() < deadline, "no hello from the worker"
            time.sleep(0.01)

    def idle_step(self) -> float:
        start = time.monotonic()
        step(self.sched, tokens=0)
        return time.monotonic() - start

    def close(self):
        self.worker.close()
        self.sched.shutdown()


@pytest.fixture
def engine():
    made = []

    def make(**kwargs):
        made.append(Engine(**kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


def reported(sched, sent=(), received=()):
    """A step's output reports transfers as finished (vLLM's KVConnectorOutput)."""
    sched.update_connector_output(
        SimpleNamespace(
            finished_sending=set(sent), finished_recving=set(received), kv_connector_stats=None
        )
    )


def blocked_until(delay: float, happen, *args, step) -> float:
    """How long ``step()`` blocked when ``happen(*args)`` comes ``delay`` seconds from
    now. The clock starts before the timer: on a starved machine this thread may not run
    for a while after starting it, and the event must not look early."""
    start = time.monotonic()
    threading.Timer(delay, happen, args=args).start()
    step()
    return time.monotonic() - start


def test_idle_engine_holding_blocks_waits_until_something_happens(engine):
    e = engine(idle_step_sleep_ms=2)
    prefill(e.sched, "p0")
    prefill(e.sched, "p1")
    assert e.idle_step() < 0.05  # carries the new sends to the workers: no wait
    # Nothing to do but hold: the step blocks (no spinning) until a worker says a
    # transfer ended...
    assert 0.29 <= blocked_until(0.3, e.worker, SEND, "p1", step=e.idle_step) < 1.0
    # ... and until a step has reported that news, idle steps do not block at all
    # (the news may sit in a step the engine has not read yet) ...
    assert e.idle_step() < 0.05
    reported(e.sched, sent={"p1"})
    # ... or a request reaches the engine ...
    assert 0.29 <= blocked_until(0.3, e.input_queue.put_nowait, "request", step=e.idle_step) < 1.0
    e.input_queue.get_nowait()
    # ... or the proxy releases a transfer.
    held = prefill(e.sched, "p2")["transfer_id"]
    e.idle_step()
    assert 0.29 <= blocked_until(0.3, e.sched.release, held, step=e.idle_step) < 1.0
    assert step(e.sched, tokens=0).releases == [held]


def test_idle_step_does_not_wait_when_workers_have_news(engine):
    # An aborted decode request: the workers must hear of it now (to cancel its pull).
    e = engine()
    prefill(e.sched, "p1")
    e.idle_step()
    start = time.monotonic()
    e.sched.build_connector_meta(
        SimpleNamespace(total_num_scheduled_tokens=0, finished_req_ids={"d-aborted"})
    )
    assert time.monotonic() - start < 0.05


def test_idle_wait_ends_at_the_next_lease_expiry(engine):
    e = engine(lease_seconds=0.4)
    prefill(e.sched, "p1")
    e.idle_step()
    assert e.idle_step() < 0.6  # not the 10 s safety net
    meta = step(e.sched, tokens=0)
    assert meta.releases  # expired: the workers are told to let go


def test_idle_wait_is_short_while_other_requests_wait(engine):
    # e.g. a request waiting for its grammar: nothing would wake the engine for it.
    e = engine(unfinished=1, idle_step_sleep_ms=20)
    prefill(e.sched, "p1")
    e.idle_step()
    assert 0.015 <= e.idle_step() < 0.2


# ------------------------------------------------------------------ D side


def remote_params(sched_p, prompt_len=10):
    return prefill(sched_p, f"p-{prompt_len}", prompt_len=prompt_len)


@pytest.mark.parametrize(
    "d_prompt_len,local_hit,expected",
    [
        (10, 0, 10),  # decode mode: the same prompt
        (11, 0, 10),  # stitched mode: prompt + P's token, P has KV for 10
        (10, 4, 6),  # one block cached locally on D: only the rest
        (10, 12, 0),  # more cached locally than P has: nothing to pull
    ],
)
def test_matched_tokens(d_prompt_len, local_hit, expected):
    params = remote_params(make_scheduler())
    d = make_scheduler()
    got = d.get_num_new_matched_tokens(
        request("d1", params, d_prompt_len, status=RequestStatus.WAITING), local_hit
    )
    assert got == ((expected, True) if expected else (0, False))


def test_pull_maps_blocks_by_position_beyond_local_hit():
    params = remote_params(make_scheduler(), prompt_len=10)  # P blocks [5, 6, 7]
    d = make_scheduler()
    req = request("d1", params, 11, status=RequestStatus.WAITING)
    n, _ = d.get_num_new_matched_tokens(req, 4)
    d.update_state_after_alloc(req, blocks([40, 41, 42]), n)
    d.update_state_after_alloc(req, blocks([40, 41, 42, 43]), 0)  # called again after the load
    (pull,) = step(d).pulls
    assert pull.remote_block_ids == (6, 7) and pull.local_block_ids == (41, 42)
    assert (
        pull.transfer_id == params["transfer_id"] and pull.port == 7000 and pull.host == "10.0.0.7"
    )
    assert pull.consumer_key.endswith("/d1")
    assert d.stats_json()["pulls_inflight"] == 1
    d.update_connector_output(
        SimpleNamespace(finished_sending=None, finished_recving={"d1"}, kv_connector_stats=None)
    )
    assert d.stats_json()["pulls_inflight"] == 0
    assert d.request_finished(req, [40, 41, 42, 43]) == (False, None)
    assert step(d).is_empty()  # no notice: it pulled


def test_decode_requests_that_do_not_pull_notify_p():
    params = remote_params(make_scheduler())
    d = make_scheduler()
    hit = request("d1", params, 10, status=RequestStatus.WAITING)
    d.update_state_after_alloc(hit, blocks([1, 2, 3]), 0)  # everything cached locally
    aborted = request("d2", params, 10, status=RequestStatus.FINISHED_ABORTED)
    assert d.request_finished(aborted, []) == (False, None)  # aborted before scheduling
    notices = step(d).notices
    assert [n.consumer_key.rsplit("/", 1)[1] for n in notices] == ["d1", "d2"]
    assert all(n.transfer_id == params["transfer_id"] for n in notices)
    assert d.stats_json()["pulls_skipped"] == 2


def test_layout_mismatch_is_refused_before_pulling():
    params = remote_params(make_scheduler())
    params = dict(params, layout=dict(params["layout"], block_size=16))
    d = make_scheduler()
    assert d.get_num_new_matched_tokens(
        request("d1", params, 10, status=RequestStatus.WAITING), 0
    ) == (0, False)


def test_incomplete_params_are_ignored():
    d = make_scheduler()
    req = request(
        "d1", {"do_remote_prefill": True, "transfer_id": "t"}, 10, status=RequestStatus.WAITING
    )
    assert d.get_num_new_matched_tokens(req, 0) == (0, False)
    assert d.request_finished(req, []) == (False, None)
    assert step(d).is_empty()


@pytest.mark.parametrize(
    "change",
    [
        {"remote_port": "7000"},
        {"remote_port": 0},
        {"remote_num_tokens": "10"},
        {"remote_block_ids": [5, "6"]},
        {"remote_block_ids": [5]},  # too few blocks for 10 tokens
        {"layout": None},
        {"transfer_id": 7},
    ],
)
def test_malformed_params_cost_a_recompute_not_an_exception(change):
    params = dict(remote_params(make_scheduler()), **change)
    d = make_scheduler()
    req = request("d1", params, 10, status=RequestStatus.WAITING)
    assert d.get_num_new_matched_tokens(req, 0) == (0, False)
    d.update_state_after_alloc(req, blocks([1, 2, 3]), 0)
    assert d.request_finished(req, []) == (False, None)
    assert not step(d).pulls


# ------------------------------------------------------------------ control plane


def test_control_plane_release_stats_metrics():
    port = free_port()
    sched = make_scheduler(control_port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        tid = prefill(sched, "p1")["transfer_id"]
        step(sched)
        assert httpx.post(url + "/pd/release", json={"transfer_id": tid}).json() == {
            "released": True
        }
        assert httpx.post(url + "/pd/release", json={"transfer_id": tid}).json() == {
            "released": False
        }
        assert httpx.post(url + "/pd/release", json={"transfer_id": "unknown"}).json() == {
            "released": False
        }
        assert httpx.post(url + "/pd/release", content=b"not json").status_code == 400
        assert httpx.post(url + "/pd/release", json={"id": 1}).status_code == 400
        assert httpx.post(url + "/pd/nothing", json={}).status_code == 404
        stats = httpx.get(url + "/pd/stats").json()
        assert (
            stats["releases"] == 1
            and stats["transfers_held"] == 1
            and stats["engine_id"] == "engine-p"
        )
        assert step(sched).releases == [tid]
        text = httpx.get(url + "/metrics").text
        assert "# TYPE pd_connector_releases_total counter" in text
        assert "pd_connector_releases_total 1" in text and "pd_connector_transfers_held 1" in text
        assert httpx.get(url + "/pd/health").json() == {"ok": True}
    finally:
        sched.shutdown()


def test_settings_reject_unknown_keys_and_bad_values():
    assert PDSettings.from_extra({"zmq_port": "6000", "lease_seconds": 3}).zmq_port == 6000
    with pytest.raises(ValueError, match="lease_secs"):
        PDSettings.from_extra({"lease_secs": 3})
    with pytest.raises(ValueError, match="transport"):
        PDSettings.from_extra({"transport": "rdma"})
    with pytest.raises(ValueError, match="zmq_port"):
        PDSettings.from_extra({"zmq_port": 1.5})
    with pytest.raises(ValueError, match="lease_seconds"):
        PDSettings.from_extra({"lease_seconds": 0})
    with pytest.raises(ValueError):
        PDSettings.from_extra({"chunk_bytes": 1 << 30, "max_inflight_bytes": 1 << 20})
    assert PDSettings().advertised_host  # some address, never empty


def test_free_zmq_ports_are_advertised_once_the_workers_report_them(engine):
    e = engine()
    e.sched.settings = dataclasses.replace(e.sched.settings, zmq_port=0)  # free ports
    hold, _ = e.sched.request_finished(request("p0", {"do_remote_decode": True}), [5, 6, 7])
    assert not hold  # no port to advertise yet: D would have nowhere to pull from
    e.worker.port(0, 41234)  # what a worker says once its server bound a port
    deadline = time.monotonic() + 5
    while e.sched.zmq_ports() != [41234]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    hold, params = e.sched.request_finished(request("p1", {"do_remote_decode": True}), [5, 6, 7])
    assert hold and params["remote_port"] == 41234 and params["remote_ports"] == [41234]
