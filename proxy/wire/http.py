"""A small HTTP/1.1 client for the legs: asyncio protocols, httptools' C parser, a pool.

Why not httpx here (it is still used for everything off the hot path): measured on this
machine (``bench/micro.py``), relaying a backend's SSE stream through httpx cost 265 µs
of CPU per event and a POST 3.7 ms, with pool look-ups growing with the number of idle
connections; the same work on asyncio + httptools costs 17 µs per event and 45 µs per
POST. A P/D proxy relays one event per generated token, so that difference decides how
many streams one core can carry. httptools is the parser uvicorn already uses.

Scope, deliberately narrow: HTTP/1.1 to a few known backends, keep-alive, bodies sent
whole, responses read with ``Content-Length``, chunked encoding or until close. Reads
apply back-pressure (the socket stops being read while the consumer lags). Cancelling a
request or closing its response closes the connection, which makes vLLM abort.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # buffered body bytes before the socket is paused


class HTTPError(Exception):
    """A transport failure; ``connect`` tells whether it happened before any request."""

    connect = False


class ConnectError(HTTPError):
    connect = True


class ConnectTimeout(ConnectError):
    pass


class ReadError(HTTPError):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one response in flight at a time."""

    def __init__(self, pool_key: str) -> None:
        self.pool_key = pool_key
        # Kept: asking asyncio for the running loop costs a getpid() system call (3.11).
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ReadError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            if response.until_close and exc is None:
                response._finish()
            else:
                self._fail(ReadError(f"connection closed by the backend: {exc or 'EOF'}"))

    def pause_writing(self) -> None:  # the request body is sent whole; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ----------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._response
        if response is None:
            return
        response.status = self.parser.get_status_code()
        response.headers = self._headers
        response.keep_alive = self.parser.should_keep_alive()
        response.until_close = not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in self._headers
        )
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None:
            response._finish()

    # --- the client side --------------------------------------------------------------

    def start(self, request: bytes) -> tuple["Response", asyncio.Future[None]]:
        self._headers = []
        self._response = Response(self)
        self._headers_done = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self._response, self._headers_done

    def _fail(self, error: Exception) -> None:
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_exception(error)
        if self._response is not None:
            self._response._error(error)

    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A backend's answer; its body is read in pieces as they arrive."""

    __slots__ = (
        "_conn", "status", "headers", "keep_alive", "until_close", "complete",
        "_pieces", "_buffered", "_waiter", "_exc", "_released", "_on_done",
    )  # fmt: skip

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.until_close = False
        self.complete = False
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._exc: Exception | None = None
        self._released = False
        self._on_done: "Callable[[Response], None] | None" = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._buffered += len(piece)
        if self._buffered > _HIGH_WATER and self._conn.transport is not None:
            self._conn.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _error(self, exc: Exception) -> None:
        self._exc = exc
        self._wake()

    async def read(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            if self._pieces:
                return self._take()
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return None
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def interrupt(self, exc: BaseException) -> None:
        """Make a waiting ``read`` raise ``exc`` (a watchdog's deadline)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def read_nowait(self) -> bytes | None:
        """A piece already received, if any (never waits)."""
        return self._take() if self._pieces else None

    def _take(self) -> bytes:
        piece = self._pieces.popleft()
        self._buffered -= len(piece)
        if self._buffered <= _HIGH_WATER // 2 and self._conn.transport is not None:
            self._conn.transport.resume_reading()
        return piece

    async def body(self, limit: int = 256 * 1024 * 1024) -> bytes:
        data = bytearray()
        while (piece := await self.read()) is not None:
            data += piece
            if len(data) > limit:
                raise ReadError(f"response body larger than {limit} bytes")
        return bytes(data)

    def close(self) -> None:
        """Done with this response: its connection goes back to the pool, or is closed
        when the body was not read to the end (which makes vLLM abort the request)."""
        if self._released:
            return
        self._released = True
        if not self.complete:
            self._conn.close()
        elif self._pieces:
            # Whole but not all read (its reader left or moved on): drop the rest, and
            # let the connection read again, or the next request on it never would.
            self._pieces.clear()
            self._buffered = 0
            transport = self._conn.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        if self._on_done is not None:
            self._on_done(self)


class Origin:
    """Where requests for one backend go: address, a Host header, idle connections."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.encode()
        self.prefix = parts.path.rstrip("/").encode()
        self.idle: list[_Connection] = []


class HTTPPool:
    """Keep-alive connections to the backends, at most ``max_per_origin`` each."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        max_per_origin: int,
        max_idle_per_origin: int,
        default_headers: dict[str, str] | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.max_per_origin = max_per_origin
        self.max_idle = max_idle_per_origin
        self._origins: dict[str, Origin] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._default = b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in (default_headers or {}).items()
        )
        self._ssl: ssl.SSLContext | None = None

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
            self._slots[base_url] = asyncio.Semaphore(self.max_per_origin)
        return origin

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send a request; return once the response's status and headers are in."""
        origin = self.origin(base_url)
        head = (
            f"{method} ".encode()
            + origin.prefix
            + path.encode()
            + b" HTTP/1.1\r\nHost: "
            + origin.host_header
            + b"\r\n"
            + self._default
            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in (headers or {}).items())
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        slots = self._slots[base_url]
        await slots.acquire()
        conn: _Connection | None = None
        try:
            conn, reused = await self._connection(origin)
            response, headers_done = conn.start(head + body)
            try:
                await headers_done
            except ReadError:
                if not reused or response._pieces or response.status:
                    raise
                # The backend closed an idle keep-alive connection just as it was reused:
                # nothing reached it, so a fresh connection is safe.
                conn.close()
                conn = await self._connect(origin)
                response, headers_done = conn.start(head + body)
                await headers_done
        except BaseException:
            if conn is not None:
                conn.close()
            slots.release()
            raise

        def give_back(done: Response) -> None:
            slots.release()
            assert conn is not None
            if (
                done.complete
                and done.keep_alive
                and conn.reusable()
                and len(origin.idle) < self.max_idle
            ):
                conn._response = None
                origin.idle.append(conn)
            else:
                conn.close()

        response._on_done = give_back
        return response

    async def _connection(self, origin: Origin) -> tuple[_Connection, bool]:
        while origin.idle:
            conn = origin.idle.pop()
            if conn.reusable():
                return conn, True
        return await self._connect(origin), False

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        ssl_context = None
        if origin.tls:
            ssl_context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin.host), origin.host, origin.port, ssl=ssl_context
                )
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"connect to {origin.host}:{origin.port} timed out after {self.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        return conn

    def close(self) -> None:
        for origin in self._origins.values():
            for conn in origin.idle:
                conn.close()
            origin.idle.clear()
