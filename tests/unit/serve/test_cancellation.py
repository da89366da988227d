"""Client disconnects and per-leg timeouts, over real sockets against fake engines.

Whatever moment a client leaves, what is in flight is cancelled (the backend sees its
connection close, which makes vLLM abort) and P's held KV is released at once, not at
lease expiry. Every wait is bounded by a documented setting.
"""

import json
import time

import httpx
import pytest

from bench.fake import FakeEngine
from tests.support.live_proxy import live_proxy, wait_for

COMPLETION = {"model": "fake", "prompt": "hello there", "max_tokens": 40, "temperature": 0}


@pytest.fixture
def engines():
    with (
        FakeEngine(prefill_ms=5, itl_ms=5, kv_lease_s=60).in_thread() as p,
        FakeEngine(itl_ms=5).in_thread() as d,
    ):
        yield p, d


def test_disconnect_while_waiting_for_prefill(engines):
    p, d = engines
    p.configure(prefill_ms=5000)
    with live_proxy([p.url], [d.url]) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=COMPLETION, timeout=0.5)
        assert wait_for(lambda: p.stats()["client_gone"] == 1), p.stats()
        assert d.stats()["generations"] == {}


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_between_prefill_and_decode_releases_the_kv(engines, stream):
    p, d = engines
    d.configure(fault="slow_first_byte", first_byte_ms=5000)
    with live_proxy([p.url], [d.url]) as url:
        body = dict(COMPLETION, stream=stream)
        if stream:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as response:
                lines = response.iter_lines()  # kept: dropping it closes the connection
                first = next(lines)  # P's token, stitched
                assert json.loads(first[6:])["choices"][0]["text"]
                assert wait_for(lambda: d.stats()["requests"] == 1), (
                    d.stats()
                )  # D has it, and is slow
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=body, timeout=0.5)
        # The proxy told P to let go (the fake D may already have "pulled": either way
        # nothing is left held, and nothing waited for the lease to expire).
        assert wait_for(lambda: p.stats()["paths"].get("/pd/release") == 1), p.stats()
        assert p.stats()["kv_held"] == 0 and p.stats()["kv_expired"] == 0
        assert wait_for(lambda: d.stats()["client_gone"] == 1), d.stats()


def test_disconnect_during_the_decode_stream(engines):
    p, d = engines
    d.configure(itl_ms=50)
    with live_proxy([p.url], [d.url]) as url:
        with httpx.stream(
            "POST", url + "/v1/completions", json=dict(COMPLETION, stream=True), timeout=10
        ) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            del lines
        assert wait_for(lambda: d.stats()["client_gone"] == 1), d.stats()
        assert d.stats()["completed"] == 0
        assert p.stats()["kv_pulled"] == 1 and p.stats()["kv_held"] == 0


def test_prefill_timeout_is_504_naming_the_leg(engines):
    p, d = engines
    p.configure(fault="hang")
    with live_proxy([p.url], [d.url], prefill_timeout=0.5, prefill_attempts=1) as url:
        started = time.monotonic()
        response = httpx.post(url + "/v1/completions", json=COMPLETION, timeout=10)
        assert response.status_code == 504 and time.monotonic() - started < 3
        assert "prefill" in response.json()["error"]["message"]
        assert response.headers["x-pdproxy-failed-leg"] == "prefill"


def test_first_byte_timeout_then_another_decode(engines):
    p, d = engines
    d.configure(fault="hang")
    with FakeEngine(itl_ms=5).in_thread() as d2:
        d2_url = d2.url
        with live_proxy(
            [p.url], [d.url, d2_url], first_byte_timeout=0.5, decode_policy="least_load"
        ) as url:
            answered = 0
            for _ in range(3):
                response = httpx.post(
                    url + "/v1/completions", json=dict(COMPLETION, stream=True), timeout=10
                )
                assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
                answered += "error" not in response.text
            assert answered == 3
            assert d2.stats()["completed"] == 3


def test_decode_going_silent_ends_the_stream_with_an_error(engines):
    p, d = engines
    d.configure(fault="close", close_after_chunks=2)
    with live_proxy([p.url], [d.url]) as url:
        response = httpx.post(
            url + "/v1/completions", json=dict(COMPLETION, stream=True), timeout=10
        )
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert "error" in json.loads(events[-2][6:])


def test_idle_timeout_mid_stream(engines):
    p, d = engines
    d.configure(itl_ms=2000)
    with live_proxy([p.url], [d.url], idle_timeout=0.3) as url:
        started = time.monotonic()
        response = httpx.post(
            url + "/v1/completions", json=dict(COMPLETION, stream=True), timeout=10
        )
        assert time.monotonic() - started < 5
        events = [e for e in response.text.split("\n\n") if e]
        assert "went silent" in json.loads(events[-2][6:])["error"]["message"]
