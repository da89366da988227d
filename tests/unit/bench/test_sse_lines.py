"""bench.sse splits a stream's lines only where SSE does, not inside a JSON string."""

from __future__ import annotations

import asyncio
import json

import httpx

from bench import sse

TEXT = "a\u2028b\u0085c\x1cd\u2029e"  # characters str.splitlines (and httpx) split at


def response(pieces: list[bytes]) -> httpx.Response:
    return httpx.Response(200, stream=httpx.ByteStream(b"".join(pieces)))


def test_lines_split_only_at_newlines():
    event = b"data: " + json.dumps({"text": TEXT}, ensure_ascii=False).encode() + b"\r\n\r\n"
    body = [event, b"data: [DONE]\n\n", b"data: tail"]
    got = list(sse.lines(response(body)))
    assert got == [event.decode()[:-4], "", "data: [DONE]", "", "data: tail"]
    assert json.loads(got[0][6:])["text"] == TEXT
    # what httpx's own iter_lines would have done to it
    assert len(list(response(body).iter_lines())) > len(got)


def test_async_lines_are_the_same():
    body = [b'data: {"text": "' + TEXT.encode() + b'"}\n\n']

    async def collect():
        return [line async for line in sse.alines(response(body))]

    assert asyncio.run(collect()) == list(sse.lines(response(body)))
