"""Run the proxy app in-process against respx-mocked backends (tests/unit/fakevllm.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx

from proxy.app import create_app
from proxy.settings import Settings

from .fakevllm import FakeVLLM


@dataclass
class Harness:
    client: httpx.AsyncClient
    app: Any
    backends: dict[str, FakeVLLM]
    ref: FakeVLLM
    mock: respx.MockRouter
    releases: list[dict[str, Any]] = field(default_factory=list)

    async def reference(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """What one colocated server answers to the client's own request."""
        request = httpx.Request("POST", "http://ref" + path, json=body, headers={"x-request-id": "ref"})
        return self.ref.handler(request)


@contextlib.asynccontextmanager
async def harness(prefill=("p1",), decode=("d1",), tracing=None, **overrides: Any) -> AsyncIterator[Harness]:
    settings = Settings(
        prefill_urls=[f"http://{name}" for name in prefill],
        decode_urls=[f"http://{name}" for name in decode],
        **overrides,
    )
    backends = {name: FakeVLLM(name) for name in {*prefill, *decode}}
    app = create_app(settings, monitor=False, tracing=tracing)
    with respx.mock(assert_all_called=False) as mock:
        for name, fake in backends.items():
            mock.post(url__startswith=f"http://{name}/v1/").mock(side_effect=fake.handler)
            mock.get(f"http://{name}/v1/models").respond(json={"object": "list", "data": [{"id": "m", "max_model_len": 4096}]})
        h = Harness(client=None, app=app, backends=backends, ref=FakeVLLM("ref"), mock=mock)  # type: ignore[arg-type]

        def release(request: httpx.Request) -> httpx.Response:
            import json

            h.releases.append(json.loads(request.content))
            return httpx.Response(200, json={"released": True})

        mock.post("http://p-host:5599/pd/release").mock(side_effect=release)
        mock.route(host="pdproxy").pass_through()
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pdproxy") as client:
                h.client = client
                yield h
