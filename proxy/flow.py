"""The request path, top to bottom: read, plan, prefill, decide, decode, answer.

``Gateway.generate`` is the whole story of one /v1/completions or /v1/chat/completions
request; everything it calls is a small step with one job:

1. read and validate the body (``plan.plan_request``): a 400 before any backend;
2. pick P and run the prefill leg (max_tokens=1, hold the KV), retrying on another P;
3. choose the mode from P's answer: P's token ended it, stitched, or decode;
4. pick D and run the decode leg with P's ``kv_transfer_params``, retrying on another
   D while none has sent a byte (P still holds the KV);
5. stream or return the stitched answer.

The client disconnecting at any point cancels what is in flight, and P's held KV is
released at once rather than at lease expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from . import health
from .backends import DECODE, PREFILL, Instance, Pool, Registry
from .errors import ProxyError, stream_error_event
from .legs import EventStream, LegError, call_json
from .metrics import FALLBACKS, IN_FLIGHT, KV_RELEASES, RETRIES, ITL, RequestRecord
from .responses import EventStreamResponse
from .plan import CHAT, COMPLETIONS, Plan, decode_body, plan_request, prefill_body, stitched_body, straddles_stop
from .routing import RouteContext, make_router
from .settings import PoolDownPolicy, Settings
from .sse import DONE_EVENT
from .stitch import (
    PrefillResult,
    as_stream,
    load_event,
    fix_decode_answer,
    make_writer,
    merge_stitched,
    parse_prefill,
    prefill_only_answer,
)

log = logging.getLogger("pdproxy")
T = TypeVar("T")

PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}

# Serving modes, as the x-pdproxy-mode header and the metrics name them.
STITCHED, DECODE_ONLY, PREFILL_ONLY, COLOCATED = "stitched", "decode", "prefill", "colocated"


class ClientGone(Exception):
    """The client disconnected; nothing more is sent."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first, in which case cancel it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled work; its error no longer matters
        pass
    raise ClientGone()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ProxyError(413, f"request body larger than {limit} bytes")
    except ClientDisconnect as exc:
        raise ClientGone() from exc
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from exc


class Gateway:
    """Owns the pools and routers; serves generation requests."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.prefill_router = make_router(settings.prefill_policy.value)
        self.decode_router = make_router(settings.decode_policy.value)
        self._background: set[asyncio.Task[Any]] = set()

    # --- the request path ---------------------------------------------------------

    async def generate(self, request: Request, kind: str) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        record = RequestRecord(request_id, kind)
        headers = {"x-request-id": request_id}
        try:
            plan = plan_request(kind, await read_json(request, self.settings.max_body_bytes), self.settings.max_tokens_limit)
            deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
            backend_headers = self._backend_headers(request, request_id)

            if plan.colocated_reason is None and plan.estimated_tokens < self.settings.min_prefill_tokens:
                plan.colocated_reason = "short prompt"
            if plan.colocated_reason:
                return await self._colocated(request, plan, record, headers, backend_headers, plan.colocated_reason, deadline)
            if not self.registry.prefill.available():
                if self.settings.no_prefill_policy == PoolDownPolicy.fail:
                    raise ProxyError(503, "no healthy prefill instance", leg="prefill")
                return await self._colocated(request, plan, record, headers, backend_headers, "no prefill instance", deadline)
            if not self.registry.decode.available():
                if self.settings.no_decode_policy == PoolDownPolicy.fail:
                    raise ProxyError(503, "no healthy decode instance", leg="decode")
                return await self._colocated(request, plan, record, headers, backend_headers, "no decode instance", deadline)

            p, p_inst = await until_disconnect(request, self._prefill(plan, record, backend_headers))
            mode, reason = self._choose_mode(plan, p, p_inst)
            record.mode = mode
            headers["x-pdproxy-mode"] = mode
            if reason:
                record.fallback = reason
                FALLBACKS.labels(reason).inc()
                headers["x-pdproxy-fallback"] = reason

            if mode == PREFILL_ONLY:
                self._release_kv(p)  # nobody will pull it
                answer = prefill_only_answer(plan, p)
                record.first_token = time.perf_counter()
                return self._whole_answer(plan, answer, headers, record)

            if plan.stream:
                opened = None
                if mode == DECODE_ONLY:
                    # Nothing is sent before D's first event anyway, so wait for it here:
                    # a decode-side 4xx then reaches the client as a real HTTP status.
                    opened = await until_disconnect(
                        request, self._open_decode_stream_or_release(plan, p, mode, record, backend_headers, deadline)
                    )
                stream = self._stream_decode(plan, p, mode, record, backend_headers, deadline, opened)
                return EventStreamResponse(stream, media_type="text/event-stream", headers=headers)
            answer = await until_disconnect(request, self._decode_whole(plan, p, mode, record, backend_headers, deadline))
            return self._whole_answer(plan, answer, headers, record)
        except ProxyError as error:
            return self._error_response(error, record, headers)
        except ClientGone:
            record.outcome, record.status = "client_gone", 499
            record.finish()
            return Response(status_code=499)

    def _choose_mode(self, plan: Plan, p: PrefillResult, p_inst: Instance) -> tuple[str, str | None]:
        """After P: was its token the last one, and can D continue after it exactly?"""
        if p.finish_reason != "length" or plan.max_tokens == 1:
            return PREFILL_ONLY, None
        context = p_inst.max_model_len.get(p.raw.get("model") or "")
        if context and p.prompt_tokens + 1 >= context:
            return PREFILL_ONLY, None  # a single server would stop here too ("length")
        if not self.settings.stitch:
            return DECODE_ONLY, "stitching disabled"
        if plan.kind == CHAT and not self.settings.stitch_chat:
            return DECODE_ONLY, "chat stitching disabled"
        if plan.stitch_blockers:
            return DECODE_ONLY, plan.stitch_blockers[0]
        if plan.kind == CHAT and p.parsed_by_server:
            return DECODE_ONLY, "server-side output parser"
        if not p.text:
            return DECODE_ONLY, "seam inside a character"
        if straddles_stop(p.text, plan.stop):
            return DECODE_ONLY, "stop string across the seam"
        return STITCHED, None

    # --- prefill leg ----------------------------------------------------------------

    async def _prefill(self, plan: Plan, record: RequestRecord, headers: dict[str, str]) -> tuple[PrefillResult, Instance]:
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
            try:
                with self._occupy(inst, PREFILL, plan.estimated_tokens):
                    raw = await call_json(
                        pool.client, inst, PREFILL, PATHS[plan.kind], body, headers, self.settings.prefill_timeout
                    )
            except LegError as error:
                if not error.retryable:
                    raise
                health.record_failure(inst, PREFILL, self.settings)
                last_error = error
                continue
            health.record_success(inst)
            record.prefill_end = time.perf_counter()
            return parse_prefill(plan.kind, raw, inst.url), inst
        raise last_error or ProxyError(503, "no healthy prefill instance", leg=PREFILL)

    # --- decode leg -----------------------------------------------------------------

    def _decode_request(self, plan: Plan, p: PrefillResult, mode: str) -> tuple[str, dict[str, Any]]:
        if mode == STITCHED:
            model = p.raw.get("model") or plan.body.get("model") or ""
            return PATHS[COMPLETIONS], stitched_body(plan, model, p.prompt_token_ids, p.first_token, p.kv_params)
        return PATHS[plan.kind], decode_body(plan, p.kv_params)

    def _decode_pool(self) -> Pool:
        """The decode pool, or the prefill pool when no decode instance is healthy.

        The pool-down policy is applied before P is called; this covers decode
        instances that die while a request is between its legs."""
        if self.registry.decode.available() or self.settings.no_decode_policy == PoolDownPolicy.fail:
            return self.registry.decode
        return self.registry.prefill

    async def _decode_whole(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> dict[str, Any]:
        path, body = self._decode_request(plan, p, mode)
        released = False
        try:
            raw = await self._with_decode_retries(
                record,
                lambda pool, inst: call_json(
                    pool.client, inst, DECODE, path, body, headers, max(deadline - asyncio.get_running_loop().time(), 0.001)
                ),
                plan.estimated_tokens,
            )
            released = True  # D pulled (or failed to and recomputed): P's lease is settled
        finally:
            if not released:
                self._release_kv(p)
        record.decode_first_byte = time.perf_counter()
        record.first_token = record.decode_first_byte
        if mode == STITCHED:
            return merge_stitched(plan, p, raw)
        return fix_decode_answer(plan, p, raw)

    async def _with_decode_retries(self, record: RequestRecord, call: Any, tokens: int = 0) -> Any:
        ctx = RouteContext()
        last_error: LegError | None = None
        for attempt in range(self.settings.decode_attempts):
            pool = self._decode_pool()
            inst = self.decode_router.pick(pool.instances, ctx)
            if inst is None:
                break
            if attempt:
                record.retries += 1
                RETRIES.labels(DECODE).inc()
            ctx.exclude.add(inst.url)
            record.decode_url = inst.url
            record.decode_start = record.decode_start or time.perf_counter()
            try:
                with self._occupy(inst, DECODE, tokens):
                    result = await call(pool, inst)
            except LegError as error:
                if not error.retryable:
                    raise
                health.record_failure(inst, DECODE, self.settings)
                last_error = error
                continue
            health.record_success(inst)
            return result
        raise last_error or ProxyError(503, "no healthy decode instance", leg=DECODE)

    async def _open_decode_stream(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> tuple[EventStream, Instance]:
        path, body = self._decode_request(plan, p, mode)
        settings = self.settings

        async def open_on(pool: Pool, inst: Instance) -> tuple[EventStream, Instance]:
            stream = await EventStream.open(
                pool.client,
                inst,
                DECODE,
                path,
                body,
                headers,
                first_byte_timeout=settings.first_byte_timeout,
                idle_timeout=settings.idle_timeout,
                deadline=deadline,
            )
            return stream, inst

        result = await self._with_decode_retries(record, open_on, plan.estimated_tokens)
        record.decode_first_byte = time.perf_counter()
        return result

    async def _open_decode_stream_or_release(
        self, plan: Plan, p: PrefillResult, mode: str, record: RequestRecord, headers: dict[str, str], deadline: float
    ) -> tuple[EventStream, Instance]:
        try:
            return await self._open_decode_stream(plan, p, mode, record, headers, deadline)
        except BaseException:
            self._release_kv(p)
            raise

    async def _stream_decode(
        self,
        plan: Plan,
        p: PrefillResult,
        mode: str,
        record: RequestRecord,
        headers: dict[str, str],
        deadline: float,
        opened: tuple[EventStream, Instance] | None = None,
    ) -> AsyncIterator[bytes]:
        writer = make_writer(mode, plan, p)
        if opened is None:
            # Stitched: D starts now, while P's token goes to the client.
            opening: asyncio.Future[tuple[EventStream, Instance]] = asyncio.ensure_future(
                self._open_decode_stream(plan, p, mode, record, headers, deadline)
            )
        else:
            opening = asyncio.get_running_loop().create_future()
            opening.set_result(opened)
        stream: EventStream | None = None
        inst: Instance | None = None
        try:
            try:
                for chunk in writer.opening():
                    record.first_token = record.first_token or time.perf_counter()
                    yield chunk
                # Shielded: a client leaving cancels this generator over and over (anyio),
                # which must not reach into the opening request's own clean-up; the
                # finally below cancels it exactly once.
                stream, inst = await asyncio.shield(opening)
                record.decode_first_byte = record.decode_first_byte or time.perf_counter()
                IN_FLIGHT.labels(inst.url, DECODE).inc()
                inst.acquire(plan.estimated_tokens)
                last = time.perf_counter()
                async for data in stream.events():
                    out = writer.rewrite(data)
                    if out is None:
                        continue
                    now = time.perf_counter()
                    if record.first_token is None:
                        record.first_token = now
                    else:
                        ITL.labels(record.endpoint).observe(now - last)
                    last = now
                    yield out
                if not stream.done_seen:
                    raise LegError(502, f"decode backend {inst.url} ended the stream early", leg=DECODE)
                for chunk in writer.closing():
                    yield chunk
            except ProxyError as error:
                record.outcome, record.error = "error", error.message
                if inst is not None and error.status >= 500:
                    health.record_failure(inst, DECODE, self.settings)
                yield stream_error_event(error)
            yield DONE_EVENT
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome, record.status = "client_gone", 499
            raise
        finally:
            if stream is None:
                # D never started: cancel its opening, and free P's KV now, not at lease expiry.
                opening.cancel()
                opening.add_done_callback(_consume_result)
                self._release_kv(p)
            else:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()  # closing the connection makes vLLM abort D's request
            if inst is not None:
                inst.release(plan.estimated_tokens)
                IN_FLIGHT.labels(inst.url, DECODE).dec()
            record.completion_tokens = writer.completion_tokens_seen
            record.finish()

    # --- colocated: one instance does everything ----------------------------------

    async def _colocated(
        self,
        request: Request,
        plan: Plan,
        record: RequestRecord,
        headers: dict[str, str],
        backend_headers: dict[str, str],
        reason: str,
        deadline: float,
    ) -> Response:
        record.mode, record.fallback = COLOCATED, reason
        FALLBACKS.labels(reason).inc()
        headers = {**headers, "x-pdproxy-mode": COLOCATED, "x-pdproxy-fallback": reason}
        path = PATHS[plan.kind]
        if not plan.stream:
            answer = await until_disconnect(
                request,
                self._with_decode_retries(
                    record,
                    lambda pool, inst: call_json(pool.client, inst, DECODE, path, plan.body, backend_headers, max(deadline - asyncio.get_running_loop().time(), 0.001)),
                ),
            )
            record.first_token = time.perf_counter()
            return self._whole_answer(plan, answer, headers, record, already_final=True)

        async def open_on(pool: Pool, inst: Instance) -> tuple[EventStream, Instance]:
            stream = await EventStream.open(
                pool.client, inst, DECODE, path, plan.body, backend_headers,
                first_byte_timeout=self.settings.first_byte_timeout,
                idle_timeout=self.settings.idle_timeout,
                deadline=deadline,
            )
            return stream, inst

        stream, inst = await until_disconnect(request, self._with_decode_retries(record, open_on))
        record.decode_first_byte = time.perf_counter()
        return EventStreamResponse(
            self._relay(stream, inst, record, plan.estimated_tokens), media_type="text/event-stream", headers=headers
        )

    async def _relay(self, stream: EventStream, inst: Instance, record: RequestRecord, tokens: int) -> AsyncIterator[bytes]:
        """A backend's stream passed through as it is (each event checked to be sound)."""
        inst.acquire(tokens)
        try:
            try:
                async for data in stream.events():
                    load_event(data)  # a malformed event becomes a clean error event
                    record.first_token = record.first_token or time.perf_counter()
                    yield b"data: " + data + b"\n\n"
                if not stream.done_seen:
                    raise LegError(502, f"backend {inst.url} ended the stream early", leg=DECODE)
            except ProxyError as error:
                record.outcome, record.error = "error", error.message
                yield stream_error_event(error)
            yield DONE_EVENT
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome, record.status = "client_gone", 499
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            inst.release(tokens)
            record.finish()

    # --- small helpers --------------------------------------------------------------

    def _whole_answer(
        self, plan: Plan, answer: dict[str, Any], headers: dict[str, str], record: RequestRecord, already_final: bool = False
    ) -> Response:
        usage = answer.get("usage") or {}
        record.completion_tokens = usage.get("completion_tokens")
        record.finish()
        # Where the time went, for clients that want it (browsers' devtools show it too).
        phases = record.phases()
        headers = {
            **headers,
            "server-timing": ", ".join(f"{name};dur={phases[name] * 1000:.2f}" for name in ("prefill", "handoff", "decode", "proxy")),
        }
        if plan.stream and not already_final:
            events = as_stream(plan, answer) + [DONE_EVENT]
            return EventStreamResponse(iter(events), media_type="text/event-stream", headers=headers)
        return JSONResponse(answer, headers=headers)

    def _error_response(self, error: ProxyError, record: RequestRecord, headers: dict[str, str]) -> Response:
        record.outcome = "client_error" if error.status < 500 else "error"
        record.status, record.error = error.status, error.message
        record.finish()
        if error.leg:
            headers = {**headers, "x-pdproxy-failed-leg": error.leg}
        return error.to_response(headers)

    def _backend_headers(self, request: Request, request_id: str) -> dict[str, str]:
        headers = {"x-request-id": request_id}
        if self.settings.forward_client_auth and not self.settings.backend_api_key:
            auth = request.headers.get("authorization")
            if auth:
                headers["authorization"] = auth
        for name in ("traceparent", "tracestate"):
            value = request.headers.get(name)
            if value:
                headers[name] = value
        return headers

    def _occupy(self, inst: Instance, role: str, tokens: int) -> "_Occupied":
        return _Occupied(inst, role, tokens)

    def _release_kv(self, p: PrefillResult) -> None:
        """Tell P's connector to free the blocks it holds for this request (best effort)."""
        params = p.kv_params or {}
        host, port, transfer_id = params.get("remote_host"), params.get("control_port"), params.get("transfer_id")
        if not (host and port and transfer_id):
            return
        url = f"http://{_host_for_url(str(host))}:{int(port)}/pd/release"
        task = asyncio.ensure_future(self._post_release(url, transfer_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_release(self, url: str, transfer_id: str) -> None:
        try:
            response = await self.registry.prefill.client.post(
                url, json={"transfer_id": transfer_id}, timeout=self.settings.kv_release_timeout
            )
            released = response.status_code == 200 and bool(response.json().get("released"))
            KV_RELEASES.labels("released" if released else "not_held").inc()
        except Exception as exc:  # noqa: BLE001 - the lease frees the blocks anyway
            KV_RELEASES.labels("failed").inc()
            log.warning("could not release KV %s at %s: %s", transfer_id, url, exc)

    async def drain_background(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.settings.kv_release_timeout + 1)


class _Occupied:
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


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _consume_result(task: "asyncio.Future[tuple[EventStream, Instance]]") -> None:
    """Settle an abandoned decode opening: close its stream if it won the race."""
    if task.cancelled() or task.exception() is not None:
        return  # (retrieving the exception keeps asyncio from logging it)
    stream, _ = task.result()
    asyncio.ensure_future(stream.aclose())
