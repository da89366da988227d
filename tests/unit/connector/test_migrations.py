"""Live migration's source side: an armed running request's KV is held when it ends."""

from __future__ import annotations

import threading
import time

import httpx
from vllm.v1.request import RequestStatus

from engine_ext.migrations import MigrationTable

from .test_scheduler import blocks, make_scheduler, prefill, request, step


def running(sched, rid="d1", key="k1", prompt_len=10):
    """A decode request (no remote KV) the proxy may move: vLLM schedules it."""
    req = request(rid, {"migration_key": key}, prompt_len=prompt_len, computed=0)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    return req


def test_an_armed_request_that_is_aborted_holds_its_kv_for_the_next_engine():
    sched = make_scheduler()
    req = running(sched)
    assert sched.arm_migration("k1", lease_seconds=5)
    req.status, req.num_computed_tokens = RequestStatus.FINISHED_ABORTED, 13  # 10 + 3 output
    hold, params = sched.request_finished(req, [5, 6, 7, 8, 9])
    assert hold and params["remote_num_tokens"] == 13
    assert params["remote_block_ids"] == [5, 6, 7, 8]  # ceil(13 / 4) blocks hold 13 tokens
    outcome = sched.collect_migration("k1", 0)
    assert outcome == {"outcome": "held", "kv_transfer_params": params}
    meta = sched.build_connector_meta(type("Out", (), {"total_num_scheduled_tokens": 1})())
    assert [(s.transfer_id, s.consumers) for s in meta.sends] == [(params["transfer_id"], 1)]
    assert sched.leases.next_deadline() - time.monotonic() <= 5


def test_a_request_that_ends_normally_first_is_not_held():
    sched = make_scheduler()
    req = running(sched)
    assert sched.arm_migration("k1", None)
    req.status = RequestStatus.FINISHED_STOPPED
    assert sched.request_finished(req, [5, 6, 7]) == (False, None)
    assert sched.collect_migration("k1", 0)["outcome"] == "finished"
    assert len(sched.leases) == 0


def test_unarmed_and_unknown_keys():
    sched = make_scheduler()
    req = running(sched)
    assert not sched.arm_migration("other", None)  # not running here
    req.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(req, [5, 6]) == (False, None)  # not armed: freed
    assert sched.collect_migration("k1", 0) == {"outcome": "unknown"}  # nothing to wait for
    assert not sched.arm_migration("k1", None)  # ended: too late


def test_collect_waits_for_the_request_to_end():
    table = MigrationTable()
    table.started("k", "r")
    assert table.arm("k", None)
    start = time.monotonic()  # before the timer: this thread may not run again at once
    threading.Timer(0.2, lambda: (table.ended("k"), table.record("k", {"outcome": "x"}))).start()
    assert table.collect("k", 5) == {"outcome": "x"}
    assert 0.15 < time.monotonic() - start < 2
    assert table.collect("k", 0.1) == {"outcome": "unknown"}  # collected once


def test_collect_answers_at_once_when_there_is_nothing_to_wait_for():
    table = MigrationTable()
    start = time.monotonic()
    assert table.collect("never-armed", 5) == {"outcome": "unknown"}
    table.started("k", "r")
    assert table.collect("k", 5) == {"outcome": "unknown"}  # running, but not armed
    assert time.monotonic() - start < 1
    assert table.arm("k", None)
    assert table.collect("k", 0.05) is None  # armed, still running: ask again


def test_control_plane_arms_and_collects():
    sched = make_scheduler(control_port=0)
    try:
        base = f"http://127.0.0.1:{sched.control_port}"
        req = running(sched)
        assert httpx.post(base + "/pd/hold", json={"key": "nope"}).json() == {"armed": False}
        assert httpx.post(base + "/pd/hold", json={"key": "k1", "lease_seconds": 3}).json() == {
            "armed": True
        }
        bad = httpx.post(base + "/pd/hold", json={"key": 5})
        assert bad.status_code == 400
        pending = httpx.post(base + "/pd/held", json={"key": "k1", "wait_seconds": 0.05})
        assert pending.json() == {"outcome": "pending"}
        req.status, req.num_computed_tokens = RequestStatus.FINISHED_ABORTED, 11
        sched.request_finished(req, [5, 6, 7])
        held = httpx.post(base + "/pd/held", json={"key": "k1", "wait_seconds": 1}).json()
        assert held["outcome"] == "held" and held["kv_transfer_params"]["remote_num_tokens"] == 11
    finally:
        sched.shutdown()


def test_a_request_aborted_while_its_own_kv_still_loads_is_not_held():
    # Its blocks are the pull's until the pull reports (then vLLM frees them): holding
    # them as well would report the request finished twice, which vLLM asserts against.
    p = make_scheduler(engine_id="P")
    params = prefill(p, "p1", prompt_len=10)
    d = make_scheduler(engine_id="D")
    req = request(
        "d1", {**params, "migration_key": "k1"}, 10, status=RequestStatus.WAITING, computed=0
    )
    matched, _ = d.get_num_new_matched_tokens(req, 0)
    d.update_state_after_alloc(req, blocks([40, 41, 42]), matched)
    assert [pull.req_id for pull in step(d).pulls] == ["d1"]
    req.status, req.num_computed_tokens = RequestStatus.WAITING_FOR_REMOTE_KVS, 10
    assert d.arm_migration("k1", 30)
    req.status = RequestStatus.FINISHED_ABORTED  # the proxy closed the stream
    hold, _ = d.request_finished(req, [40, 41, 42])
    assert not hold and step(d, tokens=0).sends == []
    assert d.collect_migration("k1", 0) == {"outcome": "not_held", "reason": "KV still loading"}
