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

from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import ProxyError
from ..fleet.backends import DECODE, PREFILL, Instance, Registry
from ..fleet.live import LiveStreams
from ..observe.metrics import FALLBACKS, RequestRecord
from ..observe.recent import Recent
from ..observe.tracing import Tracing
from ..settings import PoolDownPolicy, Settings
from ..wire.sse import DONE_EVENT
from .bodies import colocated_body
from .disconnect import DisconnectWatch
from .dispatch import Dispatcher
from .legs import PoolUnreachable, call_json
from .plan import Plan, check_output_room, plan_request, straddles_stop
from .responses import EventStreamResponse
from .session import DecodeSession
from .stitch import PrefillResult, as_stream, fix_decode_answer, merge_stitched, prefill_only_answer
from .vocabulary import CANARY_SCOPE, CHAT, ENDPOINTS, Mode

log = logging.getLogger("pdproxy")
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected; nothing more is sent."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first, in which case cancel it."""
    watch = DisconnectWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        watch.absorb()
        raise ClientGone() from None
    finally:
        watch.close()


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
    # vLLM refuses any other media type before reading the body, in these words.
    media_type = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
    if media_type != "application/json":
        raise ProxyError(
            400,
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            err_type="Bad Request",
        )
    body = await read_body(request, limit)
    try:
        # The stdlib, not orjson: a client's integers must pass on exactly, and orjson
        # turns integers beyond 64 bits into floats.
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # vLLM's server (FastAPI) answers such a body with 400
        raise ProxyError(400, "request body is not valid JSON: nested too deeply") from exc


class Gateway:
    """Serves generation requests: the P/D request path."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        tracing: Tracing | None = None,
        live: LiveStreams | None = None,
        recent: Recent | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.tracing = tracing or Tracing(None)
        self.dispatch = Dispatcher(settings, registry)
        self.live = live or LiveStreams()
        self.recent = recent or Recent()

    async def generate(self, request: Request, kind: str) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        record = RequestRecord(
            request_id,
            kind,
            trace=self.tracing.start(request.headers, f"pdproxy.{kind}"),
            recent=self.recent,
        )
        headers = {"x-request-id": request_id}
        canary = request.scope.get(CANARY_SCOPE, False)  # checks P/D, not client policy
        try:
            # 1. Read and validate: a 400 before any backend is called.
            plan = plan_request(
                kind,
                await read_json(request, self.settings.max_body_bytes),
                0 if canary else self.settings.max_tokens_limit,
            )
            check_output_room(plan, self.registry.context_length(plan.body.get("model") or ""))
            deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
            backend_headers = self._backend_headers(request, request_id)
            colocated = self._colocated_reason(plan, canary)
            if colocated:
                return await self._colocated(
                    request, plan, record, headers, backend_headers, colocated, deadline
                )

            # 2. Prefill: P computes the prompt and one token, and holds the KV.
            try:
                p, _, held = await until_disconnect(
                    request, self.dispatch.prefill(plan, record, backend_headers)
                )
            except PoolUnreachable as gone:
                # The prefill pool died since the last health check: its policy applies
                # to this request already, not from the next check on.
                if self.settings.no_prefill_policy == PoolDownPolicy.fail:
                    raise gone.error from None
                if not self.registry.decode.available():
                    raise gone.error from None
                return await self._colocated(
                    request, plan, record, headers, backend_headers, "no prefill instance", deadline
                )

            # 3. Mode: was P's token the last one; can D continue exactly after it?
            mode, reason = self._choose_mode(plan, p)
            record.mode = headers["x-pdproxy-mode"] = mode
            if reason:
                record.fallback = headers["x-pdproxy-fallback"] = reason
                FALLBACKS.labels(reason).inc()
            if mode == Mode.PREFILL:
                held.release()  # nobody will pull it
                record.first_token = time.perf_counter()
                return self._whole_answer(plan, prefill_only_answer(plan, p), headers, record)

            # 4 and 5. Decode on P's KV, and answer.
            if plan.stream:
                session = DecodeSession(
                    self.dispatch, self.live, plan, p, held, mode, record, backend_headers, deadline
                )
                if mode == Mode.DECODE:
                    # Nothing is sent before D's first event anyway, so wait for it here:
                    # a decode-side 4xx then reaches the client as a real HTTP status.
                    session.opened = await until_disconnect(
                        request,
                        self.dispatch.open_decode_stream(
                            plan,
                            p,
                            held,
                            mode,
                            record,
                            backend_headers,
                            deadline,
                            session.leg_key(),
                        ),
                    )
                return EventStreamResponse(
                    session.body(), headers=headers, background=BackgroundTask(session.cleanup)
                )
            d = await until_disconnect(
                request,
                self.dispatch.decode_whole(plan, p, held, mode, record, backend_headers, deadline),
            )
            answer = (
                merge_stitched(plan, p, d)
                if mode == Mode.STITCHED
                else fix_decode_answer(plan, p, d)
            )
            return self._whole_answer(plan, answer, headers, record)
        except ProxyError as error:
            return self._error_response(error, record, headers)
        except ClientGone:
            record.outcome, record.status = "client_gone", 499
            record.finish()
            return Response(status_code=499)

    def _colocated_reason(self, plan: Plan, canary: bool = False) -> str | None:
        """Why the request should not be split at all, if it should not (or 503s)."""
        if plan.colocated_reason:
            return plan.colocated_reason
        if plan.estimated_tokens < self.settings.min_prefill_tokens and not canary:
            return "short prompt"
        if not self.registry.prefill.available():
            if self.settings.no_prefill_policy == PoolDownPolicy.fail:
                raise ProxyError(503, "no healthy prefill instance", leg=PREFILL)
            return "no prefill instance"
        if not self.registry.decode.available():
            if self.settings.no_decode_policy == PoolDownPolicy.fail:
                raise ProxyError(503, "no healthy decode instance", leg=DECODE)
            return "no decode instance"
        return None

    def _choose_mode(self, plan: Plan, p: PrefillResult) -> tuple[Mode, str | None]:
        """After P: was its token the last one, and can D continue after it exactly?"""
        context = self.registry.context_length(p.raw.get("model") or "")
        if plan.n == 1:  # P sampled one choice; n > 1 leaves the others to D (decode mode)
            if p.finish_reason != "length" or plan.max_tokens == 1:
                return Mode.PREFILL, None
            if context and p.prompt_tokens + 1 >= context:
                return Mode.PREFILL, None  # a single server would stop here too ("length")
        if not self.settings.stitch:
            return Mode.DECODE, "stitching disabled"
        if plan.kind == CHAT and not self.settings.stitch_chat:
            return Mode.DECODE, "chat stitching disabled"
        if plan.stitch_blockers:
            return Mode.DECODE, plan.stitch_blockers[0]
        if plan.kind == CHAT and p.parsed_by_server:
            return Mode.DECODE, "server-side output parser"
        if plan.max_tokens is None and context is None:
            return Mode.DECODE, "context length unknown"  # a continuation needs its limit
        if not p.text:
            return Mode.DECODE, "seam inside a character"
        if straddles_stop(p.text, plan.stop):
            return Mode.DECODE, "stop string across the seam"
        return Mode.STITCHED, None

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
        """One instance does everything (a decode one; a prefill one if none is up)."""
        record.mode, record.fallback = Mode.COLOCATED, reason
        FALLBACKS.labels(reason).inc()
        headers = {**headers, "x-pdproxy-mode": Mode.COLOCATED, "x-pdproxy-fallback": reason}
        path = ENDPOINTS[plan.kind]
        if plan.stream:
            session = DecodeSession(
                self.dispatch, self.live, plan, None, None, Mode.COLOCATED, record,
                backend_headers, deadline,
            )  # fmt: skip
            session.opened = await until_disconnect(
                request,
                self.dispatch.open_stream(
                    record,
                    path,
                    colocated_body(plan, session.leg_key()),
                    backend_headers,
                    deadline,
                    plan.estimated_tokens,
                ),
            )
            return EventStreamResponse(
                session.body(), headers=headers, background=BackgroundTask(session.cleanup)
            )

        async def attempt(pool, inst: Instance, leg_headers: dict[str, str]) -> dict[str, Any]:
            return await call_json(
                self.registry.http, inst, DECODE, path, plan.body, leg_headers,
                self.settings.request_timeout, deadline,
            )  # fmt: skip

        answer = await until_disconnect(
            request,
            self.dispatch.on_instances(
                DECODE, record, attempt, backend_headers, plan.estimated_tokens
            ),
        )
        record.first_token = time.perf_counter()
        return self._whole_answer(plan, answer, headers, record, already_final=True)

    # --- small helpers --------------------------------------------------------------

    def _whole_answer(
        self,
        plan: Plan,
        answer: dict[str, Any],
        headers: dict[str, str],
        record: RequestRecord,
        already_final: bool = False,
    ) -> Response:
        usage = answer.get("usage") or {}
        record.completion_tokens = usage.get("completion_tokens")
        record.finish()
        # Where the time went, for clients that want it (browsers' devtools show it too).
        phases = record.phases()
        headers = {
            **headers,
            "server-timing": ", ".join(
                f"{name};dur={phases[name] * 1000:.2f}"
                for name in ("prefill", "handoff", "decode", "proxy")
            ),
        }
        if plan.stream and not already_final:
            return EventStreamResponse(
                _replay(as_stream(plan, answer) + [DONE_EVENT]), headers=headers
            )
        return JSONResponse(answer, headers=headers)

    def _error_response(
        self, error: ProxyError, record: RequestRecord, headers: dict[str, str]
    ) -> Response:
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


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    """Events already in hand, as an async body (a sync one would cost a thread hop)."""
    yield b"".join(events)
