"""The lines of a streamed (SSE) httpx response, split where SSE splits them.

httpx's ``iter_lines`` splits as ``str.splitlines`` does: also at U+2028, U+2029, U+0085
and the separators U+001C..U+001E. A model may generate any of them, and vLLM puts them
into its JSON strings as they are, so ``iter_lines`` cuts such an event in two. SSE ends
a line at LF (a CR before it is dropped), which is what these do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx


class _Lines:
    def __init__(self) -> None:
        self._rest = b""

    def feed(self, piece: bytes) -> list[str]:
        *lines, self._rest = (self._rest + piece).split(b"\n")
        return [line.removesuffix(b"\r").decode() for line in lines]

    def end(self) -> list[str]:
        return [self._rest.removesuffix(b"\r").decode()] if self._rest else []


def lines(response: httpx.Response) -> Iterator[str]:
    split = _Lines()
    for piece in response.iter_bytes():
        yield from split.feed(piece)
    yield from split.end()


async def alines(response: httpx.Response) -> AsyncIterator[str]:
    split = _Lines()
    async for piece in response.aiter_bytes():
        for line in split.feed(piece):
            yield line
    for line in split.end():
        yield line
