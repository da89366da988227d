"""Running the legs: choose an instance, call it, try another one when that may help.

``Dispatcher`` knows the pools, the routers and the retry rules:

- the prefill leg moves to another P when one fails before answering;
- the decode leg moves to another D when one fails before its first byte (P still holds
  the KV, so the new D can pull it); afterwards nothing is retried;
- a client's own mistake (a backend 4xx) is never retried and never held against the
  backend;
- P's held KV is released at once when no D will pull it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..fleet import health
from ..fleet.backends import DECODE, PREFILL, Instance, Pool, Registry
from ..errors import ProxyError
from .legs import EventStream, LegError, call_json
from ..observe.metrics import IN_FLIGHT, KV_RELEASES, RETRIES, RequestRecord
from .plan import CHAT, COMPLETIONS, Plan, decode_body, prefill_body, stitched_body
from ..fleet.routing import RouteContext, make_router
from ..settings import PoolDownPolicy, Settings
from .stitch import PrefillResult, parse_prefill

log = logging.getLogger("pdproxy")
T = TypeVar("T")

PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
STITCHED = "stitched"

# One attempt on one instance: (pool, instance, headers for this attempt) -> result.
Attempt = Callable[[Pool, Instance, dict[str, str]], Awaitable[T]]


class Dispatcher:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.prefill_router = make_router(settings.prefill_policy.value)
        self.decode_router = make_router(settings.decode_policy.value)
        self._background: set[asyncio.Task[Any]] = set()

    # --- prefill ----------------------------------------------------------------------

    async def prefill(self, plan: Plan, record: RequestRecord, headers: dict[str, str]) -> tuple[PrefillResult, Instance]:
        """P computes the prompt and one token, and holds the KV for D."""
        pool = self.registry.prefill
        body = prefill_body(plan, consumers=plan.n)
        ctx = RouteContext(prefix_key=plan.prefix_key, tokens=plan.estimated_tokens)
        last_error: LegError | None = None
        for attempt in range(self.settings.prefill_attempts):
            inst = self.prefill_router.pick(pool.instances, ctx)
            if inst is None:
                break
            if attempt:
                record.retries += 1
                RETRIES.labels(PREFILL).inc()
            ctx.exclude.add(inst.url)
            record.prefill_url = inst.url
            record.prefill_start = time.perf_counter()
            leg_headers = record.trace.leg_headers(PREFILL, headers)
            try:
                with Occupied(inst, PREFILL, plan.estimated_tokens):
                    raw = await call_json(
                        self.registry.http, inst, PREFILL, PATHS[plan.kind], body, leg_headers, self.settings.prefill_timeout
                    )
            except LegError as error:
                record.trace.end_leg(PREFILL, error.message)
                if not error.retryable:
                    raise
                health.record_failure(inst, PREFILL, self.settings)
                last_error = error
                continue
            record.trace.end_leg(PREFILL)
            health.record_success(inst)
            record.prefill_end = time.perf_counter()
            return parse_prefill(plan.kind, raw, inst.url), inst
        raise last_error or ProxyError(503, "no healthy prefill instance", leg=PREFILL)

    # --- decode -----------------------------------------------------------------------

    def decode_pool(self) -> Pool:
        """The decode pool, or the prefill pool when no decode instance is healthy.

        The pool-down policy is applied before P is called; this covers decode instances
        that die while a request is between its legs."""
        if self.registry.decode.available() or self.settings.no_decode_policy == PoolDownPolicy.fail:
            return self.registry.decode
        return self.registry.prefill

    async def on_decode_instances(self, record: RequestRecord, attempt: Attempt[T], headers: dict[str, str], tokens: int) -> T:
        """Run ``attempt`` on a decode instance; on a failure that may be the instance's
        fault (and before anything reached the client), try another one."""
        ctx = RouteContext()
        last_error: LegError | None = None
        for number in range(self.settings.decode_attempts):
            pool = self.decode_pool()
            inst = self.decode_router.pick(pool.instances, ctx)
            if inst is None:
                break
            if number:
                record.retries += 1
                RETRIES.labels(DECODE).inc()
            ctx.exclude.add(inst.url)
            record.decode_url = inst.url
            record.decode_start = record.decode_start or time.perf_counter()
            try:
                with Occupied(inst, DECODE, tokens):
                    result = await attempt(pool, inst, record.trace.leg_headers(DECODE, headers))
            except LegError as error:
                record.trace.end_leg(DECODE, error.message)
                if not error.retryable:
                    raise
                health.record_failure(inst, DECODE, self.settings)
                last_error = error
                continue
            health.record_success(inst)
            return result
        raise last_error or ProxyError(503, "no healthy decode instance", leg=DECODE)

    def decode_request(self, plan: Plan, p: PrefillResult, mode: str) -> tuple[str, dict[str, Any]]:
        if mode == STITCHED:
            model = p.raw.get("model") or plan.body.get("model") or ""
            return PATHS[COMPLETIONS], stitched_body(plan, model, p.prompt_token_ids, p.first_token, p.kv_params)
        return PATHS[plan.kind], decode_body(plan, p.kv_params)

    async def decode_whole(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> dict[str, Any]:
        """D's whole answer (non-streaming clients)."""
        path, body = self.decode_request(plan, p, mode)
        loop = asyncio.get_running_loop()
        try:
            answer = await self.on_decode_instances(
                record,
                lambda pool, inst, h: call_json(self.registry.http, inst, DECODE, path, body, h, max(deadline - loop.time(), 0.001)),
                headers,
                plan.estimated_tokens,
            )
        except BaseException:
            self.release_kv(p)  # no D took the KV (or the client left): free it now
            raise
        record.trace.end_leg(DECODE)
        record.decode_first_byte = record.first_token = time.perf_counter()
        return answer

    async def open_decode_stream(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> tuple[EventStream, Instance]:
        """D's stream, opened until its first event, on whichever D answers first."""
        path, body = self.decode_request(plan, p, mode)
        return await self.open_stream(record, path, body, headers, deadline, plan.estimated_tokens)

    async def open_stream(
        self, record: RequestRecord, path: str, body: dict[str, Any], headers: dict[str, str], deadline: float, tokens: int
    ) -> tuple[EventStream, Instance]:
        settings = self.settings

        async def attempt(pool: Pool, inst: Instance, leg_headers: dict[str, str]) -> tuple[EventStream, Instance]:
            stream = await EventStream.open(
                self.registry.http, inst, DECODE, path, body, leg_headers,
                first_byte_timeout=settings.first_byte_timeout,
                idle_timeout=settings.idle_timeout,
                deadline=deadline,
            )  # fmt: skip
            return stream, inst

        result = await self.on_decode_instances(record, attempt, headers, tokens)
        record.decode_first_byte = time.perf_counter()
        return result

    async def open_decode_stream_or_release(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> tuple[EventStream, Instance]:
        try:
            return await self.open_decode_stream(plan, p, mode, record, headers, deadline)
        except BaseException:
            self.release_kv(p)
            raise

    # --- P's held KV ------------------------------------------------------------------

    def release_kv(self, p: PrefillResult) -> None:
        """Tell P's connector to free the blocks it holds for this request (best effort:
        the connector's lease frees them anyway, later)."""
        params = p.kv_params or {}
        host, port, transfer_id = params.get("remote_host"), params.get("control_port"), params.get("transfer_id")
        if not (host and port and transfer_id):
            return
        host = f"[{host}]" if ":" in str(host) and not str(host).startswith("[") else str(host)
        self.background(self._post_release(f"http://{host}:{int(port)}", str(transfer_id)))

    async def _post_release(self, base_url: str, transfer_id: str) -> None:
        try:
            answer = await call_json(
                self.registry.http, Instance(base_url), "release", "/pd/release",
                {"transfer_id": transfer_id}, {}, self.settings.kv_release_timeout,
            )  # fmt: skip
            KV_RELEASES.labels("released" if answer.get("released") else "not_held").inc()
        except ProxyError as exc:  # the lease frees the blocks anyway
            KV_RELEASES.labels("failed").inc()
            log.warning("could not release KV %s at %s: %s", transfer_id, base_url, exc.message)

    def background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.settings.kv_release_timeout + 1)


class Occupied:
    """Counts a request as in flight on an instance for as long as the block runs."""

    __slots__ = ("inst", "role", "tokens")

    def __init__(self, inst: Instance, role: str, tokens: int) -> None:
        self.inst, self.role, self.tokens = inst, role, tokens

    def __enter__(self) -> None:
        self.inst.acquire(self.tokens)
        IN_FLIGHT.labels(self.inst.url, self.role).inc()

    def __exit__(self, *exc: object) -> None:
        self.inst.release(self.tokens)
        IN_FLIGHT.labels(self.inst.url, self.role).dec()
