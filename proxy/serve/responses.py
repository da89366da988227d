"""A streaming response that notices a client leaving even while nothing is being sent.

Starlette's ``StreamingResponse`` stops listening for ``http.disconnect`` on servers that
speak ASGI 2.4 and relies on the next ``send`` failing instead. A P/D stream often sends
nothing for a while (between P's token and D's first byte, or while D is slow), and a
client that leaves then must cancel D and free P's KV at once. So this one always
listens (:class:`~proxy.disconnect.DisconnectWatch`), and cancels the body's generator
the moment the client is gone.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .disconnect import DisconnectWatch


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body runs inline (its first chunk goes out without a task hop); a watcher
        # cancels it the moment the client leaves.
        watch = DisconnectWatch(receive)
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            watch.absorb()
        except OSError:
            pass  # the client went away mid-send
        finally:
            watch.close()
            if self.background is not None:
                # Always, even when the client left before the body ever started.
                await asyncio.shield(self.background())

    async def _stream(self, send: Send) -> None:
        """Starlette's ``stream_response`` without its per-chunk checks: the body is bytes."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
