"""One streamed answer, from its first decode leg to ``data: [DONE]``, on whichever
decode instances serve it.

``DecodeSession.body`` is the client's stream. It relays the current leg through its
writer (:mod:`proxy.serve.writers`), which records every token sent in the answer's
:class:`~proxy.serve.transcript.Transcript`, and when the leg cannot go on it continues
the answer on another decode instance with a leg that starts after the tokens sent:

- *after a failure* (the connection dropped, an error event, a 5xx, a silence past the
  idle timeout) the new instance recomputes the prompt and the tokens sent, up to
  ``PDPROXY_MAX_RESUMES`` times;
- *when asked to move* (a drain, the rebalancer: :meth:`DecodeSession.move`) it moves at
  the next character boundary with its KV (:class:`~proxy.serve.migration.Migration`),
  or by recomputing where the KV cannot move.

The client sees one stream: the same id, no token twice or missing, one usage at the
end. An answer that cannot be continued exactly (see ``can_continue``) ends with an
error event, as any stream does when nothing can save it. When the client leaves, the
generator is cancelled (``EventStreamResponse`` notices even while nothing is sent):
the current leg's connection is closed, which makes vLLM abort, and P's KV is released
if no D took it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import anyio

from ..errors import ProxyError, stream_error_event
from ..fleet import health
from ..fleet.backends import DECODE, Instance, Occupied
from ..fleet.live import LiveStreams
from ..fleet.routing import RouteContext
from ..observe.metrics import (
    ITL,
    STREAM_MOVE_KV_TOKENS,
    STREAM_MOVE_PAUSE,
    STREAM_MOVES,
    RequestRecord,
)
from ..wire.kv_params import with_migration_key
from ..wire.sse import DONE_EVENT
from .bodies import continuation_body
from .dispatch import Dispatcher
from .held_kv import HeldKV
from .legs import EventStream, LegError, call_json
from .migration import Migration
from .plan import Plan, straddles_stop
from .stitch import PrefillResult
from .transcript import Transcript
from .vocabulary import CHAT, COMPLETIONS, ENDPOINTS, Mode
from .writers import make_writer, resume_writer

log = logging.getLogger("pdproxy.session")


class DecodeSession:
    """Owns one streamed answer's decode legs, whatever happens to the response."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        live: LiveStreams,
        plan: Plan,
        p: PrefillResult | None,
        held: HeldKV | None,
        mode: Mode,
        record: RequestRecord,
        headers: dict[str, str],
        deadline: float,
        opened: tuple[EventStream, Instance] | None = None,
    ) -> None:
        self.dispatcher, self.settings, self.live = dispatcher, dispatcher.settings, live
        self.plan, self.p, self.held, self.mode = plan, p, held, mode
        self.record, self.headers, self.deadline = record, headers, deadline
        self.opened = opened
        self.transcript = Transcript()
        if p is not None:
            self.transcript.prompt_ids = p.prompt_token_ids
        self.started = False
        self.legs = 1  # numbers the legs' migration keys
        self.resumes = 0
        self.moved_at = float("-inf")  # when it last moved (the rebalancer's cooldown)
        self._move: tuple[str, Instance | None] | None = None
        self.moving = False  # asked to move, until the next leg runs (or the move failed)
        self._failure: ProxyError | None = None  # why the last leg broke
        self.stream: EventStream | None = None  # the current leg (None: not started)
        self.inst: Instance | None = None
        self.last_sent = time.perf_counter()
        self._leg_open = False
        self._occupied: Occupied | None = None
        self._settled_ms: float | None = None  # the tokenizer asked where to move, for the log

    # --- the leg's identity, known to its connector ----------------------------------

    def leg_key(self, leg: int | None = None) -> str:
        return f"{self.record.request_id}/{leg or self.legs}"

    # --- asked from outside (drain, rebalance) -----------------------------------------

    def move(self, reason: str, target: Instance | None = None) -> bool:
        """Continue on another instance at the next token boundary (with the KV)."""
        if not self._leg_open or self.moving or self._move is not None:
            return False  # moving already (the leg stays open until the move's arm is in)
        if not self.can_continue():
            return False
        self._move = (reason, target)
        self.moving = True
        return True

    def can_continue(self) -> bool:
        """Whether another instance can continue this answer exactly where it is."""
        plan, t = self.plan, self.transcript
        if plan.stitch_blockers or not t.resumable or plan.n > 1:
            return False  # e.g. structured output, tools, seeded sampling, logprobs in chat
        if plan.kind == CHAT and (
            not self.settings.stitch_chat or (self.p is not None and self.p.parsed_by_server)
        ):
            return False  # the servers' output parsers see only their own part
        if plan.max_tokens is not None and t.boundary >= plan.max_tokens:
            return False
        if plan.max_tokens is None and (
            self._context is None or len(t.prompt_ids) + t.boundary >= self._context
        ):
            return False  # no limit: the continuation needs the context's room left
        if plan.holds_back_text and t.ids:
            return False  # the text kept back for sent tokens would be lost with the leg
        return not straddles_stop(t.tail, plan.stop)

    # --- the client's stream ------------------------------------------------------------

    async def cleanup(self) -> None:
        """The response's background task: what the body did not get to do."""
        if self.started:
            return
        if self.opened is not None:
            await self.opened[0].aclose()
        if self.held is not None:
            self.held.release()

    async def body(self) -> AsyncIterator[bytes]:
        self.started = True
        record, plan = self.record, self.plan
        writer = make_writer(self.mode, plan, self.p, self.transcript)
        opening = self._first_leg()
        try:
            try:
                # Events that go out together are yielded together: each yield is a write
                # to the client's socket, the costliest step of relaying one.
                if events := writer.opening():
                    record.first_token = record.first_token or time.perf_counter()
                    yield b"".join(events)
                # Shielded: a client leaving cancels this generator, which must not reach
                # into the opening request's own clean-up; the finally cancels it once.
                self._attach(*await asyncio.shield(opening))
                while True:
                    async for chunk in self._relay(writer):
                        yield chunk
                    if self._move is None:
                        break  # the answer is complete
                    writer = await self._continue(*self._move)
                tail = writer.closing()
            except ProxyError as error:
                record.outcome, record.error = "error", error.message
                if self.inst is not None and error.status >= 500:
                    health.record_failure(self.inst, DECODE, self.settings)
                tail = [stream_error_event(error)]
            yield b"".join([*tail, DONE_EVENT])
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome, record.status = "client_gone", 499
            raise
        finally:
            # A move asked for but not carried out (the answer ended first, the client
            # left) is forgotten: the rebalancer waits for every stream it asked to move.
            self._move, self.moving = None, False
            if self.stream is None:
                # D never started: cancel its opening; P's KV is freed now.
                opening.cancel()
                opening.add_done_callback(_settle_abandoned)
            await self._detach()
            if self.held is not None:
                self.held.release()  # a no-op once D took the KV
            record.completion_tokens = writer.completion_tokens_seen
            record.finish()

    def _first_leg(self) -> asyncio.Future[tuple[EventStream, Instance]]:
        if self.opened is not None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(self.opened)
            return done
        # Stitched: D starts now, while P's token goes to the client.
        return asyncio.ensure_future(
            self.dispatcher.open_decode_stream(
                self.plan,
                self.p,
                self.held,
                self.mode,
                self.record,
                self.headers,
                self.deadline,
                self.leg_key(),
            )
        )

    async def _relay(self, writer) -> AsyncIterator[bytes]:
        """The current leg's events to the client, until it ends or the session must go
        on elsewhere (``self._move`` set: asked to, or the leg failed)."""
        record = self.record
        itl = ITL.labels(record.endpoint)
        last = time.perf_counter()
        try:
            stream = self.stream
            while (batch := await stream.next_batch()) is not None:
                out = [chunk for chunk in map(writer.rewrite, batch) if chunk is not None]
                if out:
                    now = time.perf_counter()
                    if record.first_token is None:
                        record.first_token = now
                    else:
                        itl.observe(now - last)
                    last = self.last_sent = now
                    yield out[0] if len(out) == 1 else b"".join(out)
                t = self.transcript
                if self._move is not None and (
                    t.at_boundary or (t.unsure and await self._settle_boundary())
                ):
                    if writer.finish_reason is None and self.can_continue():
                        return  # asked to move: here, on a character boundary
                    # Too late: the answer ends on this leg (its last tokens are out).
                    self._move, self.moving = None, False
            if not stream.done_seen:
                raise LegError(
                    502, f"decode backend {self.inst.url} ended the stream early", leg=DECODE
                )
            self._move = None
        except ProxyError as error:
            if writer.finish_reason is not None:
                self._move = None  # the answer was complete; only its tail was lost
                return
            if error.status < 500:
                raise  # the request's own fault: another instance would refuse it too
            if self.resumes >= self.settings.max_resumes or not self.can_continue():
                raise
            self.resumes += 1
            log.warning("decode leg failed mid-stream (%s); continuing elsewhere", error.message)
            if self.inst is not None:
                health.record_failure(self.inst, DECODE, self.settings)
            self._failure = error
            self._move = ("failure", None)

    async def _settle_boundary(self, inst: Instance | None = None) -> bool:
        """After a merged chunk: where the text sent is whole, from a tokenizer (see
        ``Transcript.settle_with``): the source's, or ``inst``'s (every decode instance
        serves the same model); whether it found it. On any doubt the move waits for the
        next chunk that marks a boundary itself."""
        asked = inst or self.inst
        started, found = time.perf_counter(), False
        try:
            found = await self.transcript.settle_with(lambda ids: self._detokenize(asked, ids))
        except ProxyError as exc:
            log.info("no boundary from %s's tokenizer: %s", asked.url, exc.message)
        self.transcript.unsure = False  # asked once per merged chunk
        self._settled_ms = (time.perf_counter() - started) * 1000
        return found

    def _tokenizer_after_failure(self) -> Instance | None:
        """Whom to ask where the text is whole once the source has failed: any other
        decode instance that is up."""
        others = self.dispatcher.registry.pool(DECODE).available()
        return next((inst for inst in others if inst is not self.inst), None)

    @property
    def _context(self) -> int | None:
        """The model's context length, if known (an answer with no limit needs it)."""
        return self.dispatcher.registry.context_length(self._model or "")

    @property
    def _model(self) -> str | None:
        """The model the answer names (P's, or D's in decode mode)."""
        return (self.p.raw.get("model") if self.p else None) or self.transcript.base.get("model")

    async def _detokenize(self, inst: Instance, tokens: list[int]) -> str | None:
        answer = await call_json(
            self.dispatcher.registry.http, inst, DECODE, "/detokenize",
            {"model": self._model, "tokens": tokens}, {}, self.settings.migration_timeout,
        )  # fmt: skip
        text = answer.get("prompt")
        return text if isinstance(text, str) else None

    async def _continue(self, reason: str, target: Instance | None):
        """Close the current leg and continue the answer on another instance: with the
        KV when asked to move, by recomputing after a failure (or when the KV cannot
        move). Returns the new leg's writer."""
        self._move = None
        try:
            return await self._continue_on_another(reason, target)
        finally:
            self.moving = False

    async def _continue_on_another(self, reason: str, target: Instance | None):
        source, t = self.inst, self.transcript
        paused_at = self.last_sent
        if reason == "failure" and t.unsure and (helper := self._tokenizer_after_failure()):
            # The source is gone, so its tokenizer cannot say where the text after a
            # merged chunk is whole; another's can, and less is generated again.
            await self._settle_boundary(helper)
        migration = Migration(self.dispatcher, source, self.leg_key(), self.settings)
        steps: dict[str, float] = {}  # where the pause went, for the log line
        if self._settled_ms is not None:
            steps["boundary"], self._settled_ms = self._settled_ms, None
        mark = time.perf_counter()

        def step(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            steps[name], mark = (now - mark) * 1000, now

        try:
            if reason != "failure" and self.settings.migrate_kv:
                await migration.arm()
            step("arm")
            await self._detach()  # closing the connection makes vLLM end the request there
            step("close")
            kv_params = await migration.collect()
            step("collect")
            self.legs += 1
            resumed_at = t.boundary
            body = continuation_body(
                self.plan,
                self._model or "",
                t.prompt_ids,
                t.ids[:resumed_at],
                with_migration_key(kv_params, self.leg_key()),
                self._context,
            )
            ctx = RouteContext(tokens=self.plan.estimated_tokens, prefer=target and target.url)
            if source is not None:
                ctx.exclude.add(source.url)
            kind = "kv" if kv_params else "recompute"
            opened = await self.dispatcher.open_stream(
                self.record,
                ENDPOINTS[COMPLETIONS],
                body,
                self.headers,
                self.deadline,
                self.plan.estimated_tokens,
                ctx=ctx,
                first=False,
            )
        except ProxyError as exc:
            self.dispatcher.background(migration.abandon())
            STREAM_MOVES.labels(reason, "failed").inc()
            failure = self._failure if reason == "failure" else None
            if failure is None:
                raise
            # The client is told what broke first, and that nothing could take over.
            raise ProxyError(
                failure.status,
                f"{failure.message}; no other decode instance could continue: {exc.message}",
                leg=DECODE,
            ) from exc
        except BaseException:  # the client left half way: free the source's KV now
            self.dispatcher.background(migration.abandon())
            raise
        step("open")
        migration.taken()
        self._attach(*opened)
        self.moved_at = time.monotonic()
        pause = time.perf_counter() - paused_at
        STREAM_MOVES.labels(reason, kind).inc()
        STREAM_MOVE_PAUSE.labels(kind).observe(pause)
        if kv_params:
            STREAM_MOVE_KV_TOKENS.inc(migration.tokens)
        log.info(
            '{"event":"stream_moved","request_id":"%s","reason":"%s","kind":"%s",'
            '"from":"%s","to":"%s","tokens_sent":%d,"kv_tokens":%d,"pause_ms":%.1f,'
            '"steps_ms":{%s}}',
            self.record.request_id,
            reason,
            kind,
            source.url if source else "",
            self.inst.url,
            resumed_at,
            migration.tokens,
            pause * 1000,
            ",".join(f'"{name}":{ms:.1f}' for name, ms in steps.items()),
        )
        return resume_writer(self.plan, self._prefix(), t, resumed_at)

    def _prefix(self) -> PrefillResult:
        """What the resumed writer needs of "P": P's answer, or (no P: one instance did
        it all) the prompt's numbers from the transcript."""
        if self.p is not None:
            return self.p
        prompt = self.transcript.prompt_ids or []
        return PrefillResult(
            kind=self.plan.kind,
            raw=dict(self.transcript.base),
            choice={},
            text="",
            token_ids=[],
            prompt_token_ids=prompt,
            finish_reason=None,
            usage={"prompt_tokens": len(prompt)},
            kv_params=None,
        )

    # --- which leg runs now ------------------------------------------------------------

    def _attach(self, stream: EventStream, inst: Instance) -> None:
        self.stream, self.inst, self._leg_open = stream, inst, True
        self._occupied = Occupied(inst, DECODE, self.plan.estimated_tokens).__enter__()
        self.live.attach(inst.url, self)

    async def _detach(self) -> None:
        """Close the current leg (once): its connection, its place among the live
        streams, its count in the instance's load."""
        if not self._leg_open:
            return
        self._leg_open = False
        self.live.detach(self.inst.url, self)
        self._occupied.__exit__(None, None, None)
        self._occupied = None
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


def _settle_abandoned(task: asyncio.Future[tuple[EventStream, Instance]]) -> None:
    """Settle an abandoned decode opening: close its stream if it won the race."""
    if task.cancelled() or task.exception() is not None:
        return  # (retrieving the exception keeps asyncio from logging it)
    stream, _ = task.result()
    asyncio.ensure_future(stream.aclose())
