"""Run the proxy app in-process against fake vLLM servers on real sockets.

Each backend is a ``FakeVLLM`` (tests/support/fakevllm.py) served by ``FakeServer``, so the
proxy's own HTTP client carries every leg, as in production. ``h.url(name)`` is a
backend's URL; ``h.backends[name]`` records what it was sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.front.app import create_app
from proxy.settings import Settings

from .fakeserver import FakeServer
from .fakevllm import FakeVLLM


@dataclass
class Harness:
    client: httpx.AsyncClient
    app: Any
    backends: dict[str, FakeVLLM]
    servers: dict[str, FakeServer]
    ref: FakeVLLM

    def url(self, name: str) -> str:
        return self.servers[name].url

    def instance(self, name: str):
        return self.app.state.registry.instance(self.url(name))

    async def reference(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """What one colocated server answers to the client's own request."""
        request = httpx.Request(
            "POST", "http://ref" + path, json=body, headers={"x-request-id": "ref"}
        )
        return self.ref.handler(request)

    @property
    def releases(self) -> list[str]:
        return [t for fake in self.backends.values() for t in fake.releases]


@contextlib.asynccontextmanager
async def harness(
    prefill=("p1",), decode=("d1",), tracing=None, **overrides: Any
) -> AsyncIterator[Harness]:
    names = list(dict.fromkeys([*prefill, *decode]))
    backends = {name: FakeVLLM(name) for name in names}
    servers = {name: await FakeServer(name, backends[name].handler).start() for name in names}
    for name in names:
        backends[name].port = servers[name].port
    settings = Settings(
        prefill_urls=[servers[name].url for name in prefill],
        decode_urls=[servers[name].url for name in decode],
        **overrides,
    )
    app = create_app(settings, monitor=False, tracing=tracing)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://pdproxy"
            ) as client:
                yield Harness(
                    client=client, app=app, backends=backends, servers=servers, ref=FakeVLLM("ref")
                )
    finally:
        for server in servers.values():
            await server.stop()
