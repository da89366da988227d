"""Knowing which instances can take work: passive ejection, active checks, readiness.

- Passive: a leg that fails with a connection error, a timeout or a 5xx counts against
  its instance; enough consecutive failures eject it for a while. A client's 4xx never
  counts (circuit breakers elsewhere that counted 4xx took healthy servers out).
- Active: a background task polls every instance's ``/health``, refreshes its load from
  its Prometheus ``/metrics`` (running and waiting requests, KV-cache usage) and its
  models' context lengths from ``/v1/models``. A recovered instance is re-admitted.
  The checks share the event loop with every stream, so they are made cheap for it:
  on the legs' HTTP client (httpx costs ~1-4 ms of CPU a request, a burst of them was
  the proxy's TTFT p99 tail), and spread over the interval instead of all at once.
- Readiness: ``/ready`` is true only after a real P/D canary generation went through the
  proxy's own request path and was served disaggregated; later, while a whole pool is
  down and its policy serves colocated, it stays true and says it is degraded (the
  service answers: taking the proxies out would take it down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable

import httpx

from .. import background
from ..observe.metrics import BACKEND_ERRORS, EJECTIONS, HEALTHY
from ..settings import Settings
from ..wire.http import HTTPError, HTTPPool
from . import connectors
from .backends import DECODE, PREFILL, Instance, Registry

log = logging.getLogger("pdproxy.health")

_METRIC_LINE = re.compile(
    rb"^(vllm:num_requests_running|vllm:num_requests_waiting|vllm:kv_cache_usage_perc)"
    rb"\{[^}]*\} ([0-9.eE+-]+)$",
    re.M,
)


def record_failure(inst: Instance, leg: str, settings: Settings) -> None:
    BACKEND_ERRORS.labels(inst.url, leg).inc()
    inst.consecutive_failures += 1
    now = time.monotonic()
    if inst.consecutive_failures >= settings.eject_after_failures and inst.ejected_until <= now:
        inst.ejected_until = now + settings.eject_seconds
        EJECTIONS.labels(inst.url).inc()
        log.warning(
            "ejected %s for %.0fs after %d failures",
            inst.url,
            settings.eject_seconds,
            inst.consecutive_failures,
        )


def eject(inst: Instance, settings: Settings) -> None:
    """Take an instance out of rotation now (nothing listens there); health checks
    re-admit it once it answers again."""
    now = time.monotonic()
    if inst.ejected_until <= now:
        EJECTIONS.labels(inst.url).inc()
        log.warning("ejected %s for %.0fs: unreachable", inst.url, settings.eject_seconds)
    inst.ejected_until = now + settings.eject_seconds


def record_success(inst: Instance) -> None:
    inst.consecutive_failures = 0


def parse_load(text: bytes) -> tuple[float, float, float]:
    """Sum running, waiting and KV usage over the server's engines (label sets)."""
    running = waiting = usage = 0.0
    for name, value in _METRIC_LINE.findall(text):
        number = float(value)
        if name.endswith(b"running"):
            running += number
        elif name.endswith(b"waiting"):
            waiting += number
        else:
            usage = max(usage, number)
    return running, waiting, usage


class HealthMonitor:
    """Background checks of every instance, and the readiness canary."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        canary: Callable[[], Awaitable[bool]],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.canary = canary
        self.ready = False  # the last canary passed
        self.passed = False  # a canary has passed since the start (P/D proven once)
        self.last_canary: float = 0.0
        self.canary_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._headers: dict[str, str] = {}
        if settings.backend_api_key:
            self._headers["authorization"] = f"Bearer {settings.backend_api_key}"
        self._http = HTTPPool(
            connect_timeout=settings.health_timeout,
            max_per_origin=2,
            max_idle_per_origin=2,
            default_headers={"user-agent": "pdproxy/health", **self._headers},
        )
        # The rare connector probe (once per decode instance) posts JSON: httpx is fine.
        self._client = httpx.AsyncClient(timeout=settings.health_timeout, trust_env=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pdproxy-health")

    async def stop(self) -> None:
        await background.cancel(self._task)
        self._http.close()
        await self._client.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.check_all(spread=self.settings.health_interval)
                if (
                    time.monotonic() - self.last_canary >= self.settings.canary_interval
                    or not self.ready
                ):
                    await self.run_canary()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failure
                log.exception("health check round failed")
            await asyncio.sleep(max(self.settings.health_interval - (loop.time() - started), 0))

    async def check_all(self, spread: float = 0.0) -> None:
        """Check every instance once; with ``spread``, their starts are spread evenly
        over that many seconds (each instance is still checked once per round)."""
        instances = self.registry.all_instances()
        step = spread / len(instances) if instances else 0.0
        results = await asyncio.gather(
            *(self.check(inst, i * step) for i, inst in enumerate(instances)),
            return_exceptions=True,
        )
        for inst, result in zip(instances, results):
            if isinstance(result, Exception):  # one instance's failure stops no other check
                log.error("health check of %s failed: %r", inst.url, result)

    async def check(self, inst: Instance, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        status, _ = await self._get(inst, "/health")
        healthy = status == 200
        if healthy and not inst.max_model_len:
            await self._refresh_models(inst)
        if healthy:
            await self._refresh_load(inst)
            if inst.connector is None and inst in self.registry.decode.instances:
                # Streams leave a decode instance with their KV through its connector.
                await connectors.probe(self._client, inst, self._headers)
        if healthy != inst.healthy:
            log.warning("%s is now %s", inst.url, "healthy" if healthy else "unhealthy")
            if healthy:
                inst.consecutive_failures = 0
                inst.ejected_until = 0.0  # re-admitted: the active check is fresher news
        inst.healthy = healthy
        for role, pool in ((PREFILL, self.registry.prefill), (DECODE, self.registry.decode)):
            if inst in pool.instances:
                HEALTHY.labels(inst.url, role).set(1 if healthy else 0)

    async def _get(self, inst: Instance, path: str) -> tuple[int, bytes]:
        """GET ``path``: its status and body; status 0 when the instance did not answer."""
        response = None
        try:
            async with asyncio.timeout(self.settings.health_timeout):
                response = await self._http.request(inst.url, "GET", path)
                return response.status, await response.body()
        except (HTTPError, TimeoutError):
            return 0, b""
        finally:
            if response is not None:
                response.close()

    async def _refresh_models(self, inst: Instance) -> None:
        status, body = await self._get(inst, "/v1/models")
        if status != 200:
            return
        try:
            for card in json.loads(body).get("data", []):
                if isinstance(card.get("max_model_len"), int):
                    inst.max_model_len[card["id"]] = card["max_model_len"]
        except (ValueError, AttributeError, TypeError):
            pass

    async def _refresh_load(self, inst: Instance) -> None:
        status, body = await self._get(inst, "/metrics")
        if status == 200:
            running, waiting, usage = parse_load(body)
            inst.load.running, inst.load.waiting, inst.load.kv_usage = running, waiting, usage
            inst.load.updated_at = time.monotonic()

    async def run_canary(self) -> bool:
        self.last_canary = time.monotonic()
        try:
            ok = await asyncio.wait_for(self.canary(), self.settings.canary_timeout)
            self.canary_error = None if ok else "canary was not served disaggregated"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            ok = False
            self.canary_error = f"{type(exc).__name__}: {exc}"
        if ok != self.ready:
            log.warning(
                "readiness is now %s%s", ok, f" ({self.canary_error})" if self.canary_error else ""
            )
        self.ready = ok
        self.passed = self.passed or ok
        return ok
