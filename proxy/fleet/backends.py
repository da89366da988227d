"""The vLLM instances behind the proxy, their health and load, and the HTTP clients.

An *instance* is one vLLM server. A *pool* is the set of instances that may serve one
role (prefill or decode). The same instance can sit in both pools: roles are a routing
decision, not a property of the server. Load and health are per instance, so a server
that serves both roles is seen as one machine.

Each pool owns one shared ``httpx.AsyncClient`` with keep-alive: creating a client per
request costs throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from ..observe.metrics import IN_FLIGHT, forget_backend
from ..settings import Settings
from ..wire.http import HTTPPool

PREFILL = "prefill"
DECODE = "decode"


@dataclass
class ServerLoad:
    """What the server itself reports on its Prometheus endpoint."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # fraction 0..1
    updated_at: float = 0.0


@dataclass(eq=False)
class Instance:
    url: str
    in_flight: int = 0  # requests the proxy has open on it (either role)
    in_flight_tokens: int = 0  # prompt tokens (estimated) of those requests
    healthy: bool = True
    draining: bool = False
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    load: ServerLoad = field(default_factory=ServerLoad)
    max_model_len: dict[str, int] = field(default_factory=dict)
    # Its KV connector's control plane (holds and releases), learnt from a prefill
    # answer's kv_transfer_params or a probe; None while unknown, "" if it has none.
    connector: str | None = None

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.healthy and not self.draining and now >= self.ejected_until

    def acquire(self, tokens: int) -> None:
        self.in_flight += 1
        self.in_flight_tokens += tokens

    def release(self, tokens: int) -> None:
        self.in_flight -= 1
        self.in_flight_tokens -= tokens


class Pool:
    """The instances that may serve one role, and the client used to reach them."""

    def __init__(self, role: str, instances: list[Instance], client: httpx.AsyncClient) -> None:
        self.role = role
        self.instances = instances
        self.client = client

    def available(self) -> list[Instance]:
        now = time.monotonic()
        return [inst for inst in self.instances if inst.available(now)]

    def set_members(self, instances: list[Instance]) -> None:
        self.instances = instances


def make_client(settings: Settings, role: str) -> httpx.AsyncClient:
    # Reads have no client-wide deadline: each leg bounds its own waits (prefill as a
    # whole, D's first byte, the gap between chunks, the whole request) in legs.py.
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=None,
        write=settings.idle_timeout,
        pool=settings.connect_timeout,
    )
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_keepalive,
        keepalive_expiry=30.0,
    )
    headers = {"user-agent": f"pdproxy/{role}"}
    if settings.backend_api_key:
        headers["authorization"] = f"Bearer {settings.backend_api_key}"
    return httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False)


class Registry:
    """All instances by URL, the two pools that reference them, and the HTTP clients:
    ``http`` carries the legs (the hot path); each pool's httpx client carries the rest
    (health checks, pass-through routes, KV releases)."""

    def __init__(self, settings: Settings) -> None:
        self._by_url: dict[str, Instance] = {}
        default_headers = {"user-agent": "pdproxy"}
        if settings.backend_api_key:
            default_headers["authorization"] = f"Bearer {settings.backend_api_key}"
        self.http = HTTPPool(
            connect_timeout=settings.connect_timeout,
            max_per_origin=settings.max_connections,
            max_idle_per_origin=settings.max_keepalive,
            default_headers=default_headers,
        )
        self.prefill = Pool(PREFILL, [], make_client(settings, PREFILL))
        self.decode = Pool(DECODE, [], make_client(settings, DECODE))
        self.set_pool_urls(PREFILL, settings.prefill_urls)
        self.set_pool_urls(DECODE, settings.decode_urls)

    def instance(self, url: str) -> Instance:
        inst = self._by_url.get(url)
        if inst is None:
            inst = self._by_url[url] = Instance(url)
        return inst

    def pool(self, role: str) -> Pool:
        return self.prefill if role == PREFILL else self.decode

    def set_pool_urls(self, role: str, urls: list[str]) -> None:
        pool = self.pool(role)
        gone = {inst.url for inst in pool.instances} - set(urls)
        pool.set_members([self.instance(url) for url in urls])
        for url in gone:
            forget_backend(url, role)
        self._forget_unused()

    def _forget_unused(self) -> None:
        used = {inst.url for pool in (self.prefill, self.decode) for inst in pool.instances}
        for url in list(self._by_url):
            if url not in used and self._by_url[url].in_flight == 0:
                del self._by_url[url]

    def all_instances(self) -> list[Instance]:
        return list(self._by_url.values())

    def context_length(self, model: str) -> int | None:
        """The model's ``max_model_len``, from any instance's model list (every instance
        serves the same model); None until a health check has read one."""
        for inst in self._by_url.values():
            if (length := inst.max_model_len.get(model)) is not None:
                return length
        return None

    async def aclose(self) -> None:
        self.http.close()
        await self.prefill.client.aclose()
        await self.decode.client.aclose()


class Occupied:
    """Counts a request as in flight on an instance while a block (or a ``with`` in a
    stream's body) runs: the instance's load for routing and the in-flight gauge, the
    one way every leg is counted."""

    __slots__ = ("inst", "tokens", "gauge")

    def __init__(self, inst: Instance, role: str, tokens: int) -> None:
        self.inst, self.tokens = inst, tokens
        self.gauge = IN_FLIGHT.labels(inst.url, role)

    def __enter__(self) -> Occupied:
        self.inst.acquire(self.tokens)
        self.gauge.inc()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inst.release(self.tokens)
        # The series taken on entry: if the instance left its pool meanwhile, its series
        # was dropped (forget_backend) and this must not bring it back at -1.
        self.gauge.dec()
