"""The FastAPI application: routes, and the objects that live as long as the process.

Generation endpoints go through ``Gateway`` (the P/D request path). Everything else a
vLLM server answers (``/v1/models``, ``/tokenize``, other ``/v1/*``) is passed through
to a decode instance unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ProxyError, error_body
from ..fleet.backends import Registry
from ..fleet.health import HealthMonitor
from ..fleet.journal import AdminJournal, shared_dir
from ..fleet.live import LiveStreams
from ..fleet.membership import Membership
from ..fleet.rebalance import Rebalancer
from ..fleet.routing import RouteContext
from ..observe.metrics import render
from ..observe.stalls import StallProbes, freeze_startup_heap
from ..observe.tracing import Tracing
from ..serve.flow import Gateway, read_body
from ..serve.vocabulary import CANARY_SCOPE, CHAT, COMPLETIONS, ENDPOINTS, KIND_OF_PATH, Mode
from ..settings import PoolDownPolicy, Settings
from . import admin, status
from .guard import Guard
from .openapi import CHAT_REQUEST, COMPLETION_REQUEST, request_body

log = logging.getLogger("pdproxy")

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus ones httpx sets.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
}

PASSTHROUGH_PATHS = (
    "tokenize",
    "detokenize",
    "version",
    "pooling",
    "classify",
    "score",
    "rerank",
    "invocations",
)


class ProxyApp:
    """The ASGI application: the front door (``Guard``), then a direct path for the two
    generation endpoints, then FastAPI for everything else.

    The generation endpoints carry one ASGI message per streamed token, so they skip
    FastAPI's routing and Starlette's per-message middleware wrappers; FastAPI still
    declares them (the OpenAPI schema) and serves the rest.
    """

    def __init__(self, api: FastAPI, settings: Settings) -> None:
        self.api = api
        self._guarded = Guard(self._route, settings)

    @property
    def state(self):
        return self.api.state

    @property
    def router(self):
        return self.api.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._guarded(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = (
            KIND_OF_PATH.get(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if kind is None:
            await self.api(scope, receive, send)
            return
        try:
            response = await self.api.state.gateway.generate(Request(scope, receive), kind)
        except Exception:  # noqa: BLE001 - a bug must still answer in OpenAI's shape
            log.exception("unexpected error serving %s", scope["path"])
            response = ProxyError(500, "internal error in the proxy").to_response()
        await response(scope, receive, send)


def create_app(
    settings: Settings, *, monitor: bool = True, tracing: Tracing | None = None
) -> ProxyApp:
    """The proxy app. ``monitor=False`` (tests) skips the background health checks;
    ``tracing`` replaces the one built from the settings (tests pass an in-memory one)."""
    tracing = tracing or Tracing(settings.otel_endpoint)
    proxy_app: ProxyApp

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings)
        live = LiveStreams()
        gateway = Gateway(settings, registry, tracing, live)
        rebalancer = Rebalancer(settings, registry, live)

        async def canary_app(scope: Scope, receive: Receive, send: Send) -> None:
            # Past the guard (no client key, no concurrency slot), marked as the canary.
            scope[CANARY_SCOPE] = True
            await proxy_app._route(scope, receive, send)

        canary_client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=canary_app), base_url="http://pdproxy"
        )
        health = HealthMonitor(settings, registry, lambda: _canary(canary_client, registry))
        directory = shared_dir()
        membership = Membership(
            settings, registry, journal=AdminJournal(directory) if directory else None
        )
        if settings.migrate_on_drain:
            membership.on_drain = lambda url: live.move_all(url, "drain")
        app.state.registry, app.state.gateway, app.state.monitor = registry, gateway, health
        app.state.membership, app.state.live = membership, live
        if settings.discovery_interval:
            await membership.refresh()
        membership.start()
        probes = StallProbes()
        probes.start()
        freeze_startup_heap()
        if monitor:
            health.start()
        if settings.rebalance:
            rebalancer.start()
        try:
            yield
        finally:
            await probes.stop()
            await rebalancer.stop()
            await membership.stop()
            await health.stop()
            await gateway.dispatch.drain()
            tracing.shutdown()
            await canary_client.aclose()
            await registry.aclose()

    app = FastAPI(
        title="pdproxy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.include_router(admin.router)
    app.include_router(status.router)

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, error: ProxyError) -> Response:
        return error.to_response()

    # Served by ProxyApp before FastAPI is reached; declared here for the OpenAPI schema.
    @app.post(ENDPOINTS[COMPLETIONS], openapi_extra=request_body(COMPLETION_REQUEST))
    async def completions(request: Request) -> Response:
        return await request.app.state.gateway.generate(request, COMPLETIONS)

    @app.post(ENDPOINTS[CHAT], openapi_extra=request_body(CHAT_REQUEST))
    async def chat_completions(request: Request) -> Response:
        return await request.app.state.gateway.generate(request, CHAT)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        monitor: HealthMonitor = request.app.state.monitor
        registry: Registry = request.app.state.registry
        prefill, decode = bool(registry.prefill.available()), bool(registry.decode.available())
        problems = []
        if not prefill:
            problems.append("no healthy prefill instance")
        if not decode:
            problems.append("no healthy decode instance")
        if not monitor.ready:
            problems.append(monitor.canary_error or "no P/D canary has passed yet")
        if not problems:
            return JSONResponse({"ready": True})
        colocated = PoolDownPolicy.colocated
        # A pool down whose policy serves colocated: every request is still answered.
        fallback = (prefill or decode) and (
            (prefill or settings.no_prefill_policy == colocated)
            and (decode or settings.no_decode_policy == colocated)
        )
        if monitor.passed and not (prefill and decode) and fallback:
            return JSONResponse({"ready": True, "degraded": problems})
        return JSONResponse({"ready": False, "problems": problems}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _passthrough(request, "/v1/models")

    @app.api_route(
        "/v1/{rest:path}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def other_v1(request: Request, rest: str) -> Response:
        return await _passthrough(request, "/v1/" + rest)

    for name in PASSTHROUGH_PATHS:
        app.add_api_route(
            f"/{name}",
            _make_passthrough(f"/{name}"),
            methods=["GET", "POST"],
            include_in_schema=False,
        )

    proxy_app = ProxyApp(app, settings)
    return proxy_app


def _make_passthrough(path: str):
    async def handler(request: Request) -> Response:
        return await _passthrough(request, path)

    return handler


async def _passthrough(request: Request, path: str) -> Response:
    """Send the request to a decode instance (a prefill one if none) and stream back its answer."""
    registry: Registry = request.app.state.registry
    gateway: Gateway = request.app.state.gateway
    settings = gateway.settings
    pool = registry.decode if registry.decode.available() else registry.prefill
    inst = gateway.dispatch.decode_router.pick(pool.instances, RouteContext())
    if inst is None:
        raise ProxyError(503, "no healthy backend instance")
    body = await read_body(request, settings.max_body_bytes)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    if (
        settings.forward_client_auth
        and not settings.backend_api_key
        and "authorization" in request.headers
    ):
        headers["authorization"] = request.headers["authorization"]
    url = inst.url + path + (f"?{request.url.query}" if request.url.query else "")
    timeout = httpx.Timeout(settings.connect_timeout, read=settings.idle_timeout)
    try:
        upstream = pool.client.build_request(
            request.method, url, content=body, headers=headers, timeout=timeout
        )
    except httpx.InvalidURL as exc:  # e.g. a control character the client percent-encoded
        raise ProxyError(400, f"invalid request path: {exc}") from exc
    try:
        response = await pool.client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        return JSONResponse(error_body(502, f"backend {inst.url} failed: {exc}"), status_code=502)
    out_headers = {
        k: v
        for k, v in response.headers.items()
        if k.lower() not in _HOP_HEADERS and k.lower() != "content-encoding"
    }
    return StreamingResponse(
        response.aiter_raw(),
        status_code=response.status_code,
        headers=out_headers,
        background=BackgroundTask(response.aclose),
    )


async def _canary(client: httpx.AsyncClient, registry: Registry) -> bool:
    """A two-token greedy generation through the proxy itself, served P/D."""
    model = None
    for inst in registry.prefill.available():
        if inst.max_model_len:
            model = next(iter(inst.max_model_len))
            break
    body = {
        "prompt": "pdproxy readiness canary",
        "max_tokens": 2,
        "temperature": 0,
        "ignore_eos": True,
    }
    if model:
        body["model"] = model
    response = await client.post(
        ENDPOINTS[COMPLETIONS], json=body, headers={"x-request-id": "pdproxy-canary"}
    )
    return response.status_code == 200 and response.headers.get("x-pdproxy-mode") in (
        Mode.STITCHED,
        Mode.DECODE,
    )
