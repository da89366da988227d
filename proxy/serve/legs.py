"""Calls to one backend: a JSON call, and an SSE stream, each with deadlines.

Every failure becomes a ``ProxyError`` naming the leg and the backend, with a status a
client can act on: a backend's own 4xx passes through with its message; an unreachable
backend is 502; a silent one is 504. ``retryable`` tells the caller whether another
instance may be tried (never for a client's own mistake).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import ProxyError, error_body
from ..fleet.backends import Instance
from ..wire.http import HTTPError, HTTPPool, Response
from ..wire.jsonutil import dumps, loads
from ..wire.sse import DONE, SSEParser, SSEProtocolError

MAX_ERROR_BODY = 64 * 1024


class _Silent(Exception):
    """Raised into a read by the stream's watchdog."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PoolUnreachable(Exception):
    """Every instance tried for a leg was unreachable: its pool is gone, as far as this
    request can tell (the pool-down policy applies to it at once)."""

    def __init__(self, error: "LegError") -> None:
        super().__init__(error.message)
        self.error = error


class LegError(ProxyError):
    """A ProxyError from a backend call; ``retryable`` when another instance may help."""

    def __init__(
        self, *args: Any, retryable: bool = False, unreachable: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.retryable = retryable
        self.unreachable = unreachable  # nothing listens there (the connection was refused)


def _backend_error(leg: str, inst: Instance, status: int, raw: bytes) -> LegError:
    """Turn a backend's non-200 answer into the error the client gets."""
    try:
        body = loads(raw)
        message = (
            body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("message")
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        body, message = None, None
    if 400 <= status < 500 and status not in (408, 429):
        # The client's request was refused: pass vLLM's answer through as it is.
        if not isinstance(body, dict) or "error" not in body:
            body = error_body(status, message or raw[:512].decode("utf-8", "replace"))
        return LegError(status, str(message), leg=leg, body=body)
    text = message or raw[:512].decode("utf-8", "replace") or f"HTTP {status}"
    return LegError(
        502 if status != 503 else 503,
        f"{leg} backend {inst.url} failed with HTTP {status}: {text}",
        leg=leg,
        retryable=True,
    )


def _too_long(leg: str, inst: Instance) -> LegError:
    return LegError(504, f"{leg} backend {inst.url}: request took too long", leg=leg)


def _transport_error(
    leg: str, inst: Instance, exc: Exception, timeout: float | None = None
) -> LegError:
    if isinstance(exc, TimeoutError):
        limit = f" within {timeout:g}s" if timeout else ""
        return LegError(
            504, f"{leg} backend {inst.url} did not answer{limit}", leg=leg, retryable=True
        )
    if isinstance(exc, HTTPError) and exc.connect:
        return LegError(
            502,
            f"{leg} backend {inst.url} is unreachable: {exc}",
            leg=leg,
            retryable=True,
            unreachable=True,
        )
    return LegError(
        502,
        f"{leg} backend {inst.url} failed: {type(exc).__name__}: {exc}",
        leg=leg,
        retryable=True,
    )


async def call_json(
    pool: HTTPPool,
    inst: Instance,
    leg: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    timeout: float,
    deadline: float | None = None,
) -> dict[str, Any]:
    """POST a JSON body and return the backend's JSON answer, within ``timeout`` and
    the request's ``deadline`` (loop time). Running out of the deadline is the request's
    end, not the instance's fault: that error is not retried elsewhere."""
    by_deadline = False
    if deadline is not None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise _too_long(leg, inst)
        by_deadline, timeout = left <= timeout, min(timeout, left)
    response: Response | None = None
    try:
        async with asyncio.timeout(timeout):
            response = await pool.request(inst.url, "POST", path, dumps(body), {**headers, **JSON})
            raw = await response.body()
    except (TimeoutError, HTTPError) as exc:
        if by_deadline and isinstance(exc, TimeoutError):
            raise _too_long(leg, inst) from exc
        raise _transport_error(leg, inst, exc, timeout) from exc
    finally:
        if response is not None:
            response.close()
    if response.status != 200:
        raise _backend_error(leg, inst, response.status, raw[:MAX_ERROR_BODY])
    try:
        answer = loads(raw)
    except ValueError as exc:
        raise LegError(
            502, f"{leg} backend {inst.url} sent invalid JSON", leg=leg, retryable=True
        ) from exc
    if not isinstance(answer, dict):
        raise LegError(
            502, f"{leg} backend {inst.url} sent an unexpected answer", leg=leg, retryable=True
        )
    return answer


JSON = {"content-type": "application/json"}


class EventStream:
    """An SSE stream from a backend, opened until its first event (or failure).

    ``open`` returns only once the first event is in hand, so a backend that fails
    before its first byte can still be replaced by another one. ``next_batch`` returns
    the data of the events that have arrived, several at once when the backend is ahead
    of us (so they can be forwarded in one write), and None at ``[DONE]``; ``done_seen``
    tells whether the backend ended the stream properly.
    """

    def __init__(self, leg: str, inst: Instance, idle_timeout: float, deadline: float) -> None:
        self.leg = leg
        self.inst = inst
        self.idle_timeout = idle_timeout
        self.deadline = deadline  # loop time by which the whole request must be done
        self.done_seen = False
        self._response: Response | None = None
        self._parser = SSEParser()
        self._first: list[bytes] | None = None
        self._closed = False
        # One watchdog timer per stream, re-armed lazily: cheaper than a timer per read.
        self._last_event = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(
        cls,
        pool: HTTPPool,
        inst: Instance,
        leg: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        *,
        first_byte_timeout: float,
        idle_timeout: float,
        deadline: float,
    ) -> "EventStream":
        stream = cls(leg, inst, idle_timeout, deadline)
        try:
            async with asyncio.timeout(first_byte_timeout):
                stream._response = await pool.request(
                    inst.url,
                    "POST",
                    path,
                    dumps(body),
                    {**headers, **JSON, "accept": "text/event-stream"},
                )
                if stream._response.status != 200:
                    raw = await stream._response.body(MAX_ERROR_BODY)
                    raise _backend_error(leg, inst, stream._response.status, raw)
                stream._first = await stream._next_batch()
        except LegError:
            stream.close()
            raise
        except (TimeoutError, HTTPError, SSEProtocolError) as exc:
            stream.close()
            raise _transport_error(leg, inst, exc, first_byte_timeout) from exc
        except BaseException:
            stream.close()
            raise
        return stream

    async def _next_batch(self) -> list[bytes] | None:
        """Events received so far (waiting for at least one); None at the end."""
        assert self._response is not None
        if self.done_seen:
            return None
        response = self._response
        while True:
            piece = await response.read()
            if piece is None:
                tail = self._parser.close()
                return self._until_done([tail]) if tail is not None else None
            events = self._parser.feed(piece)
            while (more := response.read_nowait()) is not None:  # already here: same batch
                events += self._parser.feed(more)
            if events:
                return self._until_done(events)

    def _until_done(self, events: list[bytes]) -> list[bytes] | None:
        for index, data in enumerate(events):
            if data == DONE:
                self.done_seen = True
                return events[:index] or None
        return events

    async def next_batch(self) -> list[bytes] | None:
        """The data of the events that have arrived (at least one; several when the
        backend is ahead, to be forwarded in one write); None at ``[DONE]`` or the end.
        A call, not an async generator: a session that stops reading to move the stream
        leaves nothing behind to finalise, and its ``_detach`` closes the stream."""
        loop = self._loop
        if self._watchdog is None and not self._closed:
            self._last_event = loop.time()
            self._watchdog = loop.call_at(self._next_due(), self._watch)
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            batch = await self._next_batch()
        except _Silent as silent:
            raise LegError(504, silent.message, leg=self.leg) from None
        except (HTTPError, SSEProtocolError) as exc:
            raise _transport_error(self.leg, self.inst, exc) from exc
        if batch is not None:
            self._last_event = loop.time()
        return batch

    def _next_due(self) -> float:
        return min(self._last_event + self.idle_timeout, self.deadline)

    def _watch(self) -> None:
        """The watchdog: interrupt a read that waited past the idle or total deadline."""
        self._watchdog = None
        if self._closed or self._response is None:
            return
        loop = self._loop
        due = self._next_due()
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._watch)
            return
        if due >= self.deadline:
            message = f"{self.leg} backend {self.inst.url}: request took too long"
        else:
            message = f"{self.leg} backend {self.inst.url} went silent for {self.idle_timeout:g}s"
        self._response.interrupt(_Silent(message))

    def close(self) -> None:
        """Done with the stream; closing it mid-way makes vLLM abort the request."""
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._response is not None:
            self._response.close()

    async def aclose(self) -> None:
        self.close()
