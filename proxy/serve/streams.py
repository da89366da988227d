"""The bodies of streamed answers: P's token then D's continuation, or a relayed stream.

Both generators end every stream with ``data: [DONE]``; a failure after the first byte
becomes one error event before it. When the client leaves, the generator is cancelled
(``EventStreamResponse`` notices even while nothing is being sent): the backend's
connection is closed, which makes vLLM abort, and P's KV is released if D never got it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anyio

from ..errors import ProxyError, stream_error_event
from ..fleet import health
from ..fleet.backends import DECODE, Instance, Occupied
from ..observe.metrics import ITL, RequestRecord
from ..wire.sse import DONE_EVENT
from .dispatch import Dispatcher
from .held_kv import HeldKV
from .legs import EventStream, LegError
from .plan import Plan
from .stitch import PrefillResult, load_event, make_writer
from .vocabulary import Mode


class DecodeLeg:
    """Who owns D's stream for one streamed answer, whatever happens to the response.

    The body generator normally opens, reads and closes it. If the client leaves before
    the generator ever runs, ``cleanup`` (the response's background task) does it:
    closes a stream opened ahead (decode mode) or frees P's KV that no D will pull.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        p: PrefillResult,
        held: HeldKV,
        opened: tuple[EventStream, Instance] | None,
    ) -> None:
        self.dispatcher = dispatcher
        self.p = p
        self.held = held
        self.opened = opened
        self.started = False

    async def cleanup(self) -> None:
        if self.started:
            return
        if self.opened is not None:
            await self.opened[0].aclose()
        self.held.release()


async def decode_stream(
    leg: DecodeLeg,
    plan: Plan,
    mode: Mode,
    record: RequestRecord,
    headers: dict[str, str],
    deadline: float,
) -> AsyncIterator[bytes]:
    """The client's stream after P: P's token first when stitched, then D's events."""
    leg.started = True
    dispatcher, p, held = leg.dispatcher, leg.p, leg.held
    writer = make_writer(mode, plan, p)
    if leg.opened is None:
        # Stitched: D starts now, while P's token goes to the client.
        opening: asyncio.Future[tuple[EventStream, Instance]] = asyncio.ensure_future(
            dispatcher.open_decode_stream(plan, p, held, mode, record, headers, deadline)
        )
    else:
        opening = asyncio.get_running_loop().create_future()
        opening.set_result(leg.opened)
    stream: EventStream | None = None
    inst: Instance | None = None
    occupied: Occupied | None = None
    try:
        try:
            for chunk in writer.opening():
                record.first_token = record.first_token or time.perf_counter()
                yield chunk
            # Shielded: a client leaving cancels this generator, which must not reach
            # into the opening request's own clean-up; the finally below cancels it
            # exactly once.
            stream, inst = await asyncio.shield(opening)
            occupied = Occupied(inst, DECODE, plan.estimated_tokens).__enter__()
            itl = ITL.labels(record.endpoint)
            rewrite = writer.rewrite
            last = time.perf_counter()
            async for batch in stream.batches():
                out = [chunk for chunk in map(rewrite, batch) if chunk is not None]
                if not out:
                    continue
                now = time.perf_counter()
                if record.first_token is None:
                    record.first_token = now
                else:
                    itl.observe(now - last)
                last = now
                yield out[0] if len(out) == 1 else b"".join(out)
            if not stream.done_seen:
                raise LegError(502, f"decode backend {inst.url} ended the stream early", leg=DECODE)
            for chunk in writer.closing():
                yield chunk
        except ProxyError as error:
            record.outcome, record.error = "error", error.message
            if inst is not None and error.status >= 500:
                health.record_failure(inst, DECODE, dispatcher.settings)
            yield stream_error_event(error)
        yield DONE_EVENT
    except (asyncio.CancelledError, GeneratorExit):
        record.outcome, record.status = "client_gone", 499
        raise
    finally:
        if stream is None:
            # D never started: cancel its opening; P's KV is freed now, not at lease expiry.
            opening.cancel()
            opening.add_done_callback(_settle_abandoned)
        else:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # closing the connection makes vLLM abort D's request
        held.release()  # a no-op once D took the KV
        if occupied is not None:
            occupied.__exit__(None, None, None)
        record.completion_tokens = writer.completion_tokens_seen
        record.finish()


async def relay_stream(
    stream: EventStream, inst: Instance, record: RequestRecord, tokens: int
) -> AsyncIterator[bytes]:
    """A backend's stream passed through as it is (each event checked to be sound)."""
    occupied = Occupied(inst, DECODE, tokens).__enter__()
    try:
        try:
            async for batch in stream.batches():
                for data in batch:
                    load_event(data)  # a malformed event becomes a clean error event
                record.first_token = record.first_token or time.perf_counter()
                yield b"".join(b"data: " + data + b"\n\n" for data in batch)
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
        occupied.__exit__(None, None, None)
        record.finish()


def _settle_abandoned(task: "asyncio.Future[tuple[EventStream, Instance]]") -> None:
    """Settle an abandoned decode opening: close its stream if it won the race."""
    if task.cancelled() or task.exception() is not None:
        return  # (retrieving the exception keeps asyncio from logging it)
    stream, _ = task.result()
    asyncio.ensure_future(stream.aclose())
