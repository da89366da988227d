"""The legs' connection pool: a connection goes back to it only ready for the next
request."""

from __future__ import annotations

import asyncio

from proxy.wire.http import HTTPPool

BIG = b"x" * (400 * 1024)  # over the reader's high-water mark: reading pauses


def test_a_response_left_unread_does_not_hand_on_a_paused_connection():
    # A stream the proxy stops reading (its client left, it moved) after the backend
    # sent all of it: the connection is reusable, but its reading was paused.
    async def scenario() -> None:
        connections = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            answers = 0
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                answers += 1
                body = BIG if answers == 1 else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = HTTPPool(connect_timeout=1, max_per_origin=4, max_idle_per_origin=4)
        try:
            first = await pool.request(url, "POST", "/stream")
            assert await first.read()
            for _ in range(100):  # the rest arrives while nobody reads
                if first.complete:
                    break
                await asyncio.sleep(0.01)
            assert first.complete
            first.close()
            async with asyncio.timeout(2):
                second = await pool.request(url, "POST", "/next")
                assert (second.status, await second.body()) == (200, b"ok")
            assert connections == 1  # the same connection, reused
        finally:
            pool.close()
            server.close()

    asyncio.run(scenario())
