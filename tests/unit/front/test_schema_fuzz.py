"""Fuzz the proxy's own OpenAPI schema (schemathesis): no input gets a 5xx from the proxy.

The backends are fakes that always answer well, so any 5xx, hang or crash is the
proxy's own. Cases come from the published request schemas, plus schemathesis' negative
cases (wrong types, missing fields), which must be 4xx.
"""

import asyncio

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.front.app import create_app
from proxy.settings import Settings
from tests.support.fakeserver import FakeServer

SCHEMA = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(Settings(prefill_urls=["http://p"], decode_urls=["http://d"]), monitor=False),
)

P_ANSWER = {
    "id": "cmpl-x",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "text": " a",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": [5],
            "prompt_token_ids": [1, 2],
            "message": {"role": "assistant", "content": " a"},
        }
    ],
    "usage": {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1},
    "prompt_token_ids": [1, 2],
    "kv_transfer_params": {"do_remote_prefill": True, "transfer_id": "t"},
}
D_STREAM = (
    b'data: {"id":"cmpl-x","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":" b","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null}]}\n\n'
    b'data: {"id":"cmpl-x","object":"text_completion","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}}\n\n'
    b"data: [DONE]\n\n"
)
D_ANSWER = {**P_ANSWER, "kv_transfer_params": None}


def backend(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/pd/release":
        return httpx.Response(200, json={"released": True})
    body = orjson.loads(request.content)
    if body.get("stream"):
        return httpx.Response(200, content=D_STREAM, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json=P_ANSWER if request.url.host == "p" else D_ANSWER)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_input_gets_a_5xx(path):
    operation = SCHEMA[path]["POST"]

    async def send(case) -> httpx.Response:
        kwargs = case.as_transport_kwargs()
        p, d = await FakeServer("p", backend).start(), await FakeServer("d", backend).start()
        app = create_app(Settings(prefill_urls=[p.url], decode_urls=[d.url]), monitor=False)
        try:
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://pdproxy"
                ) as client:
                    content = None if "json" in kwargs else kwargs.get("content")
                    request = client.request(
                        kwargs["method"],
                        path,
                        headers=kwargs.get("headers"),
                        json=kwargs.get("json"),
                        content=content,
                    )
                    return await asyncio.wait_for(request, 10)
        finally:
            await p.stop()
            await d.stop()

    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes)))
    def run(case):
        response = asyncio.run(send(case))
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert response.json()["error"]["message"]

    run()
