"""Streams that outlive their decode server, over real sockets against fake engines.

The fake engines' tokens are a function of the sequence so far, like a greedy vLLM's,
so an answer continued elsewhere from the prompt plus the tokens sent must equal the
answer one engine gives: the same text, each token once, one usage.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from bench.fake import FakeEngine, chat_prompt_ids, generate, token_text
from tests.support.live_proxy import live_proxy, wait_for

PROMPT = "the old mill by the river"
MESSAGES = [{"role": "user", "content": PROMPT}]
TOKENS = 30
ADMIN = {"authorization": "Bearer admin-key"}


def expected(chat: bool) -> str:
    ids = chat_prompt_ids(MESSAGES) if chat else list(PROMPT.encode())
    return "".join(token_text(t) for t in generate(ids, TOKENS))


def body(chat: bool) -> dict:
    prompt = {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    return {
        "model": "fake",
        **prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def read(url: str, chat: bool, on_chunk=None) -> dict:
    """Stream one answer through the proxy; what the client saw."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    texts, ids, usage, errors, finish = [], set(), [], [], []
    with httpx.stream("POST", url + path, json=body(chat), timeout=30) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"]["message"])
                continue
            ids.add(chunk["id"])
            if chunk.get("usage") and not chunk["choices"]:
                usage.append(chunk["usage"])
            for choice in chunk["choices"]:
                texts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                if choice.get("finish_reason"):
                    finish.append(choice["finish_reason"])
                assert choice.get("token_ids") is None  # the proxy's, not the client's
            if on_chunk is not None:
                on_chunk(len(texts))
    return {"text": "".join(texts), "ids": ids, "usage": usage, "errors": errors, "finish": finish}


def assert_whole(got: dict, chat: bool) -> None:
    assert not got["errors"], got["errors"]
    assert got["text"] == expected(chat)
    assert len(got["ids"]) == 1  # one stream, one id
    assert len(got["usage"]) == 1 and got["usage"][0]["completion_tokens"] == TOKENS
    assert got["finish"] == ["length"]


def metric(url: str, name: str, **labels: str) -> float:
    """A counter's value (the registry is the process's: tests compare before/after)."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def connectors_known(url: str, count: int = 2) -> bool:
    """Whether ``count`` decode instances are healthy and the proxy knows their KV
    connectors (from the health monitor's probes): until then a stream leaves an
    instance by recomputing."""

    def known() -> bool:
        listed = httpx.get(url + "/admin/instances", headers=ADMIN).json()["decode"]
        return sum(1 for inst in listed if inst["healthy"] and inst["kv_connector"]) >= count

    return wait_for(known)


@pytest.fixture
def engines():
    with (
        FakeEngine(prefill_ms=5, itl_ms=5, kv_lease_s=60).in_thread() as p,
        FakeEngine(itl_ms=5, kv_lease_s=60).in_thread() as d1,
        FakeEngine(itl_ms=5, kv_lease_s=60).in_thread() as d2,
    ):
        yield p, d1, d2


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_stream_survives_its_decode_server_dying(engines, chat):
    p, d1, d2 = engines
    # Whichever D gets the stream drops it after 6 tokens; the continuation (a plain
    # leg: no KV to pull) then runs on the other.
    for d in (d1, d2):
        d.configure(fault="close", fault_legs="decode", close_after_chunks=6)
    with live_proxy([p.url], [d1.url, d2.url]) as url:
        labels = {"reason": "failure", "kind": "recompute"}
        before = metric(url, "pdproxy_stream_moves_total", **labels)
        got = read(url, chat)
        assert_whole(got, chat)
        assert metric(url, "pdproxy_stream_moves_total", **labels) - before == 1
    failed = d1 if d1.stats()["faults"] else d2
    other = d2 if failed is d1 else d1
    assert failed.stats()["faults"] == {"close": 1}
    assert other.stats()["generations"] == {"plain": 1}  # recomputed the prompt + 7 tokens
    assert p.stats()["kv_held"] == 0


def test_resumes_are_bounded(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(fault="close", fault_legs="decode", close_after_chunks=6)
    with live_proxy([p.url], [d1.url, d2.url], max_resumes=0) as url:
        got = read(url, chat=False)
    assert got["errors"] and "closed by the backend" in got["errors"][0]


def test_an_answer_that_cannot_continue_exactly_ends_with_an_error(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(fault="close", close_after_chunks=6)
    with live_proxy([p.url], [d1.url, d2.url]) as url:
        request = dict(body(False), response_format={"type": "json_object"})  # a grammar
        with httpx.stream("POST", url + "/v1/completions", json=request, timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert "error" in json.loads(events[-1][6:])


def drain_while_streaming(
    url: str, engines, chat: bool, after_chunks: int = 8, before_drain=None
) -> dict:
    """Stream an answer and drain its decode instance once some tokens arrived."""
    _, d1, d2 = engines
    drained = {}

    def on_chunk(count: int) -> None:
        if count == after_chunks and not drained:
            if before_drain is not None:
                before_drain()
            serving = d1 if d1.stats()["in_flight"] else d2
            answer = httpx.post(
                url + "/admin/instances/drain",
                json={"role": "decode", "url": serving.url},
                headers=ADMIN,
            )
            drained.update(answer.json(), engine=serving)

    got = read(url, chat, on_chunk)
    got["drained"] = drained
    return got


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_drain_moves_a_live_stream_with_its_kv(engines, chat):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {"admin_key": "admin-key", "health_interval": 0.2}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert connectors_known(url)
        moves = metric(url, "pdproxy_stream_moves_total", reason="drain", kind="kv")
        kv_tokens = metric(url, "pdproxy_stream_move_kv_tokens_total")
        got = drain_while_streaming(url, engines, chat)
        assert_whole(got, chat)
        assert got["drained"]["moving_streams"] == 1
        assert metric(url, "pdproxy_stream_moves_total", reason="drain", kind="kv") - moves == 1
        assert metric(url, "pdproxy_stream_move_kv_tokens_total") - kv_tokens > len(PROMPT)
    source = got["drained"]["engine"]
    target = d2 if source is d1 else d1
    assert source.stats()["kv_migrations_held"] == 1
    assert source.stats()["kv_pulled"] == 1  # the continuation pulled the source's KV
    pulled = [r["body"]["kv_transfer_params"] for r in target.stats()["recent"]]
    assert any(kv.get("remote_port") == source.port for kv in pulled if kv)
    assert source.stats()["kv_held"] == 0  # pulled: nothing stranded


def test_a_busy_server_is_probed_again_for_its_connector(engines):
    p, d1, d2 = engines
    # The first probes find d1 overloaded: that says nothing about its connector.
    d1.configure(fault="error", fault_legs="prefill", fault_times=3, fault_status=503)
    settings = {"admin_key": "admin-key", "health_interval": 0.2}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert connectors_known(url)
        listed = httpx.get(url + "/admin/instances", headers=ADMIN).json()["decode"]
    assert {inst["url"]: inst["kv_connector"] for inst in listed}[d1.url].startswith("http")
    assert d1.stats()["paths"]["/v1/completions"] >= 4  # three refused, then answered


def test_target_failing_frees_the_sources_kv(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {"admin_key": "admin-key", "health_interval": 0.2, "decode_attempts": 1}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert wait_for(lambda: d2.stats()["paths"].get("/v1/completions", 0) >= 1)

        def break_the_targets() -> None:
            # The continuation (a decode leg: it would pull the KV) fails on arrival.
            for d in (d1, d2):
                d.configure(fault="error", fault_legs="decode", fault_times=0)

        got = drain_while_streaming(url, engines, chat=False, before_drain=break_the_targets)
        source = got["drained"]["engine"]
    assert got["errors"]  # nowhere to continue: the stream ends with an error event
    assert wait_for(lambda: source.stats()["kv_held"] == 0)  # released, not left to expire
    assert source.stats()["kv_migrations_held"] == 1 and source.stats()["kv_expired"] == 0


def test_the_source_dying_during_a_move_falls_back_to_recomputing(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {"admin_key": "admin-key", "health_interval": 0.2}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert wait_for(lambda: d2.stats()["paths"].get("/v1/completions", 0) >= 1)
        killed = {}

        def on_chunk(count: int) -> None:
            if count == 8 and not killed:
                serving = d1 if d1.stats()["in_flight"] else d2
                httpx.post(
                    url + "/admin/instances/drain",
                    json={"role": "decode", "url": serving.url},
                    headers=ADMIN,
                )
                threading.Thread(target=serving.close).start()  # dies as the move starts
                killed["engine"] = serving

        got = read(url, False, on_chunk)
    assert_whole(got, chat=False)
    survivor = d2 if killed["engine"] is d1 else d1
    assert survivor.stats()["kv_held"] == 0


def test_the_client_leaving_mid_move_strands_nothing(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {"admin_key": "admin-key", "health_interval": 0.2}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert wait_for(lambda: d2.stats()["paths"].get("/v1/completions", 0) >= 1)
        # The destination is slow to start: the client leaves while the move waits on it.
        for d in (d1, d2):
            d.configure(fault="slow_first_byte", fault_legs="decode", first_byte_ms=3000)
        source = {}
        with httpx.stream("POST", url + "/v1/completions", json=body(False), timeout=30) as r:
            for count, _ in enumerate(line for line in r.iter_lines() if line.startswith("data")):
                if count == 8:
                    serving = d1 if d1.stats()["in_flight"] else d2
                    source["engine"] = serving
                    httpx.post(
                        url + "/admin/instances/drain",
                        json={"role": "decode", "url": serving.url},
                        headers=ADMIN,
                    )
                    time.sleep(0.5)
                    break  # the client leaves
        engine = source["engine"]
        assert wait_for(lambda: engine.stats()["kv_migrations_held"] == 1)
        assert wait_for(lambda: engine.stats()["kv_held"] == 0, timeout=10), engine.stats()
        assert engine.stats()["kv_expired"] == 0


def test_two_moves_at_once_make_one(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {"admin_key": "admin-key", "health_interval": 0.2}
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert wait_for(lambda: d2.stats()["paths"].get("/v1/completions", 0) >= 1)
        before = metric(url, "pdproxy_stream_moves_total", reason="drain")
        answers = []

        def on_chunk(count: int) -> None:
            if count == 8:
                serving = d1 if d1.stats()["in_flight"] else d2
                for _ in range(2):
                    answers.append(
                        httpx.post(
                            url + "/admin/instances/drain",
                            json={"role": "decode", "url": serving.url},
                            headers=ADMIN,
                        ).json()["moving_streams"]
                    )

        got = read(url, False, on_chunk)
        assert_whole(got, chat=False)
        assert answers == [1, 0]
        assert metric(url, "pdproxy_stream_moves_total", reason="drain") - before == 1


def test_the_rebalancer_evens_out_live_streams(engines):
    p, d1, d2 = engines
    for d in (d1, d2):
        d.configure(itl_ms=40)
    settings = {
        "admin_key": "admin-key",
        "health_interval": 0.2,
        "rebalance": True,
        "rebalance_interval": 0.1,
        "rebalance_threshold": 1,
    }
    with live_proxy([p.url], [d1.url, d2.url], monitor=True, **settings) as url:
        assert connectors_known(url)
        drained = {"role": "decode", "url": d2.url}
        httpx.post(url + "/admin/instances/drain", json=drained, headers=ADMIN)
        results: list[dict] = []
        threads = [
            threading.Thread(target=lambda: results.append(read(url, chat=False))) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: d1.stats()["in_flight"] == 4)
        httpx.post(
            url + "/admin/instances/drain", json={**drained, "draining": False}, headers=ADMIN
        )
        assert wait_for(lambda: d2.stats()["in_flight"] == 2)  # half of the gap, no more
        time.sleep(0.3)
        assert (d1.stats()["in_flight"], d2.stats()["in_flight"]) == (2, 2)
        for thread in threads:
            thread.join(30)
        moved = metric(url, "pdproxy_stream_moves_total", reason="rebalance", kind="kv")
    assert len(results) == 4
    for got in results:
        assert_whole(got, chat=False)
    assert moved == 2
