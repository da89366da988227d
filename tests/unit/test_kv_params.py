"""The proxy and the connector speak the same ``kv_transfer_params``.

Each side names its keys once (``proxy/wire/kv_params.py``, ``engine_ext/params.py``);
here the connector's real output goes through the proxy's readers, and the proxy's
real prefill request through the connector, so a renamed key on either side fails."""

from __future__ import annotations

from engine_ext import params as connector_params
from proxy.serve.bodies import prefill_body
from proxy.serve.held_kv import HeldKV
from proxy.serve.plan import plan_request
from proxy.serve.vocabulary import COMPLETIONS
from proxy.wire.kv_params import release_target
from tests.unit.connector.test_scheduler import make_scheduler, request


def held_answer(consumers: int = 1):
    """P's connector answering the proxy's real prefill request."""
    plan = plan_request(COMPLETIONS, {"model": "m", "prompt": "hello", "n": consumers})
    asked = prefill_body(plan, consumers=consumers)["kv_transfer_params"]
    sched = make_scheduler(control_port=0)  # its control plane on a free port
    try:
        hold, answer = sched.request_finished(request("p1", asked, prompt_len=10), [5, 6, 7])
    finally:
        sched.shutdown()
    return sched, hold, answer


def test_the_connector_holds_what_the_proxy_asks_for():
    sched, hold, answer = held_answer(consumers=2)
    assert hold
    meta = sched.build_connector_meta(type("Out", (), {"total_num_scheduled_tokens": 1})())
    assert [send.consumers for send in meta.sends] == [2]
    assert answer[connector_params.TRANSFER_ID] == meta.sends[0].transfer_id


def test_the_proxy_finds_where_to_release_the_connectors_transfer():
    sched, _, answer = held_answer()
    target = release_target(answer)
    assert sched.control_port > 0
    assert target == (
        f"http://{sched.host}:{sched.control_port}",
        answer[connector_params.TRANSFER_ID],
    )
    posted = []
    held = HeldKV(answer, lambda url, tid: posted.append((url, tid)))
    held.release()
    held.release()  # once
    assert posted == [target]
    taken = HeldKV(answer, lambda url, tid: posted.append((url, tid)))
    taken.taken()
    taken.release()  # D has it: nothing to free
    assert posted == [target]


def test_a_decode_request_with_ps_answer_is_a_remote_prefill():
    _, _, answer = held_answer()
    forwarded = dict(answer)  # the proxy copies P's params into D's request verbatim
    assert connector_params.is_remote_prefill(forwarded)
    assert connector_params.problem(forwarded, prompt_len=11, block_size=4) is None
