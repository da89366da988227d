"""Hostile input from both sides: clients at the front door, broken backend streams."""

import asyncio
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 6, "temperature": 0}


# --- the front door -----------------------------------------------------------------


async def test_api_keys():
    async with harness(api_keys="k1,k2") as h:
        assert (await h.client.post("/v1/completions", json=COMPLETION)).status_code == 401
        bad = await h.client.post(
            "/v1/completions", json=COMPLETION, headers={"authorization": "Bearer nope"}
        )
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "AuthenticationError"
        ok = await h.client.post(
            "/v1/completions", json=COMPLETION, headers={"authorization": "Bearer k2"}
        )
        assert ok.status_code == 200
        assert (await h.client.get("/v1/models")).status_code == 401
        # Ops endpoints stay open unless configured otherwise...
        assert (await h.client.get("/health")).status_code == 200
        assert (await h.client.get("/metrics")).status_code == 200
        # ...and the client's key never reaches the backends.
        assert "authorization" not in h.backends["p1"].calls[0]["headers"]


async def test_ops_endpoints_can_be_protected():
    async with harness(api_keys="k", protect_ops_endpoints=True) as h:
        assert (await h.client.get("/metrics")).status_code == 401
        assert (
            await h.client.get("/metrics", headers={"authorization": "Bearer k"})
        ).status_code == 200


async def test_backend_key_is_sent_instead_of_the_clients():
    async with harness(api_keys="client", backend_api_key="backend") as h:
        await h.client.post(
            "/v1/completions", json=COMPLETION, headers={"authorization": "Bearer client"}
        )
        for name in ("p1", "d1"):
            assert h.backends[name].calls[0]["headers"]["authorization"] == "Bearer backend"


async def test_large_bodies_are_413_without_reading_them_whole():
    async with harness(max_body_bytes=2048) as h:
        big = dict(COMPLETION, prompt="x" * 5000)
        assert (await h.client.post("/v1/completions", json=big)).status_code == 413

        async def chunked():
            yield b'{"model": "m", "prompt": "'
            for _ in range(100):
                yield b"y" * 100
            yield b'"}'

        response = await h.client.post(
            "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert h.backends["p1"].calls == []


async def test_a_pass_through_path_no_url_can_hold_is_a_400():
    async with harness() as h:
        response = await h.client.get("/v1/models%00x")  # decoded: a NUL in the path
        assert response.status_code == 400
        assert "invalid request path" in response.json()["error"]["message"]


async def test_concurrency_limit_is_429_with_retry_after():
    async with harness(max_concurrent_requests=1) as h:
        gate = asyncio.Event()
        original = h.backends["p1"].generation

        async def slow(request):
            await gate.wait()
            return original(request)

        h.backends["p1"].override = slow
        first = asyncio.create_task(h.client.post("/v1/completions", json=COMPLETION))
        await asyncio.sleep(0.1)
        second = await h.client.post("/v1/completions", json=COMPLETION)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        gate.set()
        assert (await first).status_code == 200


# --- broken backend streams -----------------------------------------------------------

VALID = [
    {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "w1 ",
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
            }
        ],
    },
    {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "é",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
    },
    {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    },
]
PIECES = st.one_of(
    st.sampled_from([b"data: " + json.dumps(v).encode() + b"\n\n" for v in VALID]),
    st.just(b"data: [DONE]\n\n"),
    st.just(
        b'data: {"error": {"message": "engine died", "type": "InternalServerError", '
        b'"code": 500}}\n\n'
    ),
    st.just(b"data: {not json\n\n"),
    st.just(b"data: \xc3\n\n"),  # half a UTF-8 character
    st.just(b": keep-alive\n\n"),
    st.just(b"data: [1, 2, 3]\n\n"),
    st.binary(max_size=40),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(PIECES, max_size=8),
    st.data(),
    st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
)
def test_any_decode_stream_becomes_a_clean_client_stream(pieces, data, path):
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parts, last = [], 0
    for cut in cuts:
        parts.append(stream[last:cut])
        last = cut
    parts.append(stream[last:])
    asyncio.run(_check_stream(path, parts))


async def _check_stream(path, parts):
    async with harness() as h:
        h.backends["d1"].override = lambda request: httpx.Response(
            200, content=iter(parts), headers={"content-type": "text/event-stream"}
        )
        body = (
            {**COMPLETION, "stream": True}
            if "chat" not in path
            else {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 6,
                "stream": True,
            }
        )
        for extra in ({}, {"n": 2, "temperature": 0.5}):  # stitched and decode mode
            response = await asyncio.wait_for(h.client.post(path, json={**body, **extra}), 10)
            assert response.status_code == 200
            lines = [line for line in response.text.split("\n\n") if line]
            assert lines[-1] == "data: [DONE]", response.text
            errors = 0
            for line in lines[:-1]:
                assert line.startswith("data: "), line
                chunk = json.loads(line[6:])  # every event the client gets is valid JSON
                assert isinstance(chunk, dict)
                if "error" in chunk:
                    errors += 1
            assert errors <= 1
            if errors:
                assert "error" in json.loads(lines[-2][6:])  # the error is the last event
