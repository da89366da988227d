"""Running the legs: choose an instance, call it, try another one when that may help.

``Dispatcher`` knows the pools, the routers and the retry rules, one loop for both
legs (:meth:`Dispatcher.on_instances`):

- the prefill leg moves to another P when one fails before answering;
- the decode leg moves to another D when one fails before its first byte (P still holds
  the KV, so the new D can pull it); afterwards nothing is retried;
- a client's own mistake (a backend 4xx) is never retried and never held against the
  backend.

P's answer comes with the :class:`~proxy.serve.held_kv.HeldKV` that owns the blocks P
holds; the decode calls here tell it when D has taken them, or release them when no D
will.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import ProxyError
from ..fleet import connectors, health
from ..fleet.backends import DECODE, PREFILL, Instance, Occupied, Pool, Registry
from ..fleet.routing import RouteContext, make_router
from ..observe.metrics import KV_RELEASES, RETRIES, RequestRecord
from ..settings import PoolDownPolicy, Settings
from ..wire.kv_params import with_migration_key, without_pull
from .bodies import continuation_body, decode_body, prefill_body
from .held_kv import HeldKV
from .legs import EventStream, LegError, PoolUnreachable, call_json
from .plan import Plan
from .stitch import PrefillResult, parse_prefill
from .vocabulary import COMPLETIONS, ENDPOINTS, Mode

log = logging.getLogger("pdproxy")
T = TypeVar("T")

# One attempt on one instance: (pool, instance, headers for this attempt) -> result.
Attempt = Callable[[Pool, Instance, dict[str, str]], Awaitable[T]]


class Dispatcher:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.prefill_router = make_router(settings.prefill_policy.value)
        self.decode_router = make_router(settings.decode_policy.value)
        self._background: set[asyncio.Task[Any]] = set()

    # --- one loop for both legs -----------------------------------------------------

    async def on_instances(
        self,
        leg: str,
        record: RequestRecord,
        attempt: Attempt[T],
        headers: dict[str, str],
        tokens: int,
        ctx: RouteContext | None = None,
    ) -> T:
        """Run ``attempt`` on an instance of the leg's pool; on a failure that may be
        the instance's fault (and before anything reached the client), try another."""
        router, attempts = (
            (self.prefill_router, self.settings.prefill_attempts)
            if leg == PREFILL
            else (self.decode_router, self.settings.decode_attempts)
        )
        ctx = ctx or RouteContext(tokens=tokens)
        last_error: LegError | None = None
        unreachable: list[Instance] = []
        for number in range(attempts + 1):
            pool = self.registry.prefill if leg == PREFILL else self.decode_pool()
            if number == attempts and not (leg == DECODE and pool is self.registry.prefill):
                break  # the extra round is for a decode pool that just proved gone
            inst = router.pick(pool.instances, ctx)
            if inst is None:
                break
            if number:
                record.retries += 1
                RETRIES.labels(leg).inc()
            ctx.exclude.add(inst.url)
            record.leg_started(leg, inst.url)
            try:
                with Occupied(inst, leg, tokens):
                    result = await attempt(pool, inst, record.trace.leg_headers(leg, headers))
            except LegError as error:
                record.trace.end_leg(leg, error.message)
                if not error.retryable:
                    raise
                health.record_failure(inst, leg, self.settings)
                if error.unreachable:
                    unreachable.append(inst)
                    health.eject(inst, self.settings)  # nothing listens: out at once
                last_error = error
                continue
            health.record_success(inst)
            return result
        if last_error is not None and len(unreachable) == len(ctx.exclude):
            # Every instance tried is gone. A decode leg took the pool-down policy in
            # the extra round above (decode_pool); the caller applies it to a prefill.
            if leg == PREFILL:
                raise PoolUnreachable(last_error)
        raise last_error or ProxyError(503, f"no healthy {leg} instance", leg=leg)

    def decode_pool(self) -> Pool:
        """The decode pool, or the prefill pool when no decode instance is healthy.

        The pool-down policy is applied before P is called; this covers decode instances
        that die while a request is between its legs."""
        if (
            self.registry.decode.available()
            or self.settings.no_decode_policy == PoolDownPolicy.fail
        ):
            return self.registry.decode
        return self.registry.prefill

    def on_pool(self, pool: Pool, body: dict[str, Any]) -> dict[str, Any]:
        """A decode leg's body for an instance of ``pool``: on a prefill instance (the
        decode pool is gone) it pulls nothing and computes the prompt itself."""
        if pool is not self.registry.prefill or "kv_transfer_params" not in body:
            return body
        body = dict(body, kv_transfer_params=without_pull(body["kv_transfer_params"]))
        if body["kv_transfer_params"] is None:
            del body["kv_transfer_params"]
        return body

    def settle(self, held: HeldKV, inst: Instance) -> None:
        """After a decode leg opened: D took P's KV, or (a prefill instance standing in
        for the decode pool) nobody will, so it is freed now."""
        if inst in self.registry.prefill.instances:
            held.release()
        else:
            held.taken()

    # --- prefill ----------------------------------------------------------------------

    async def prefill(
        self, plan: Plan, record: RequestRecord, headers: dict[str, str]
    ) -> tuple[PrefillResult, Instance, HeldKV]:
        """P computes the prompt and one token, and holds the KV for D."""
        body = prefill_body(plan, consumers=plan.n)
        path = ENDPOINTS[plan.kind]

        async def attempt(
            pool: Pool, inst: Instance, leg_headers: dict[str, str]
        ) -> tuple[dict, Instance]:
            raw = await call_json(
                self.registry.http,
                inst,
                PREFILL,
                path,
                body,
                leg_headers,
                self.settings.prefill_timeout,
            )
            return raw, inst

        ctx = RouteContext(prefix_key=plan.prefix_key, tokens=plan.estimated_tokens)
        raw, inst = await self.on_instances(
            PREFILL, record, attempt, headers, plan.estimated_tokens, ctx
        )
        record.trace.end_leg(PREFILL)
        record.prefill_end = time.perf_counter()
        try:
            p = parse_prefill(plan.kind, raw, inst.url)
        except ProxyError:
            # An answer the proxy cannot use: whatever KV P holds for it is freed now.
            kv_params = raw.get("kv_transfer_params")
            HeldKV(kv_params if isinstance(kv_params, dict) else None, self.post_release).release()
            raise
        connectors.learn(inst, p.kv_params)  # where its KV holds are released and moved
        return p, inst, HeldKV(p.kv_params, self.post_release)

    # --- decode -----------------------------------------------------------------------

    def decode_request(
        self, plan: Plan, p: PrefillResult, mode: Mode, key: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """D's request on P's KV; ``key`` names it to D's connector, so that the stream
        can later move elsewhere with its KV."""
        kv_params = with_migration_key(p.kv_params, key) if key else p.kv_params
        if mode == Mode.STITCHED:
            model = p.raw.get("model") or plan.body.get("model") or ""
            return ENDPOINTS[COMPLETIONS], continuation_body(
                plan,
                model,
                p.prompt_token_ids,
                p.token_ids,
                kv_params,
                self.registry.context_length(model),
            )
        return ENDPOINTS[plan.kind], decode_body(plan, kv_params)

    async def decode_whole(
        self,
        plan: Plan,
        p: PrefillResult,
        held: HeldKV,
        mode: Mode,
        record: RequestRecord,
        headers: dict[str, str],
        deadline: float,
    ) -> dict[str, Any]:
        """D's whole answer (non-streaming clients)."""
        path, body = self.decode_request(plan, p, mode)

        async def attempt(
            pool: Pool, inst: Instance, leg_headers: dict[str, str]
        ) -> tuple[dict[str, Any], Instance]:
            answer = await call_json(
                self.registry.http,
                inst,
                DECODE,
                path,
                self.on_pool(pool, body),
                leg_headers,
                self.settings.request_timeout,
                deadline,
            )
            return answer, inst

        try:
            answer, inst = await self.on_instances(
                DECODE, record, attempt, headers, plan.estimated_tokens
            )
        except BaseException:
            held.release()  # no D took the KV (or the client left): free it now
            raise
        self.settle(held, inst)
        record.trace.end_leg(DECODE)
        record.decode_first_byte = record.first_token = time.perf_counter()
        return answer

    async def open_decode_stream(
        self,
        plan: Plan,
        p: PrefillResult,
        held: HeldKV,
        mode: Mode,
        record: RequestRecord,
        headers: dict[str, str],
        deadline: float,
        key: str | None = None,
    ) -> tuple[EventStream, Instance]:
        """D's stream, opened until its first event (D then has the KV), on whichever
        D answers first; P's KV is released if none does."""
        path, body = self.decode_request(plan, p, mode, key)
        try:
            opened = await self.open_stream(
                record, path, body, headers, deadline, plan.estimated_tokens
            )
        except BaseException:
            held.release()
            raise
        self.settle(held, opened[1])
        return opened

    async def open_stream(
        self,
        record: RequestRecord,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        deadline: float,
        tokens: int,
        ctx: RouteContext | None = None,
        first: bool = True,
    ) -> tuple[EventStream, Instance]:
        """A decode-side stream opened until its first event; ``first`` for the answer's
        first leg (it marks the hand-off's end)."""
        settings = self.settings

        async def attempt(
            pool: Pool, inst: Instance, leg_headers: dict[str, str]
        ) -> tuple[EventStream, Instance]:
            stream = await EventStream.open(
                self.registry.http, inst, DECODE, path, self.on_pool(pool, body), leg_headers,
                first_byte_timeout=settings.first_byte_timeout,
                idle_timeout=settings.idle_timeout,
                deadline=deadline,
            )  # fmt: skip
            return stream, inst

        result = await self.on_instances(DECODE, record, attempt, headers, tokens, ctx)
        if first:
            record.decode_first_byte = time.perf_counter()
        return result

    # --- releases of P's held KV --------------------------------------------------------

    def post_release(self, base_url: str, transfer_id: str) -> None:
        """Tell a connector to free a held transfer, in the background (best effort:
        the connector's lease frees the blocks anyway, later)."""
        self.background(self._post_release(base_url, transfer_id))

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
