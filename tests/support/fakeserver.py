"""Serve a test double's handler on a real socket, so the proxy's own HTTP client is used.

The handler takes an ``httpx.Request`` and returns an ``httpx.Response`` (or awaits one).
A response whose content is an iterator of byte strings is sent as one HTTP chunk per
item, so tests decide exactly where the bytes of a stream are cut.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import httptools
import httpx

Handler = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


class _Conn(asyncio.Protocol):
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        request = httpx.Request(
            method,
            f"http://{self.server.name}{self.url.decode()}",
            headers=[(k.decode(), v.decode()) for k, v in self.headers],
            content=bytes(self.body),
        )
        self.url, self.headers, self.body = b"", [], bytearray()
        self.task = asyncio.ensure_future(self._answer(request))

    async def _answer(self, request: httpx.Request) -> None:
        try:
            result = self.server.handler(request)
            response = await result if inspect.isawaitable(result) else result
        except Exception as exc:  # a broken test double answers 599, never hangs
            response = httpx.Response(599, text=f"fake backend failed: {exc!r}")
        assert self.transport is not None
        head = f"HTTP/1.1 {response.status_code} X\r\n".encode()
        for name, value in response.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding"):
                head += f"{name}: {value}\r\n".encode()
        stream = response.stream
        if isinstance(stream, httpx.ByteStream):
            body = response.read()
            self.transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
            return
        self.transport.write(head + b"transfer-encoding: chunked\r\n\r\n")
        for piece in stream:  # type: ignore[union-attr]
            if piece:
                self.transport.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                await asyncio.sleep(0)
        self.transport.write(b"0\r\n\r\n")


class FakeServer:
    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.handler = handler
        self.connections: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
