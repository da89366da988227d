"""Noticing a client that leaves while the proxy waits for something else.

A P/D request spends most of its life waiting on a backend (P's answer, D's next token)
while the client sends nothing; a client that leaves then must cancel that work at once
(and free P's KV). :class:`DisconnectWatch` reads the ASGI ``receive`` channel on a small
watcher task and cancels the *current* task when ``http.disconnect`` arrives, so the work
itself runs inline: no extra task or loop turn per request on the hot path.
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive


class DisconnectWatch:
    """Cancel the calling task when the client disconnects; :meth:`close` when done.

    The task sees an ordinary ``CancelledError``; :attr:`gone` tells it apart from any
    other cancellation, and :meth:`absorb` takes back our cancellation request.
    """

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch needs a running task"
        self._task = task
        self.gone = False
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()

    def absorb(self) -> None:
        """The task handled the client leaving: undo our cancellation request."""
        self._task.uncancel()

    def close(self) -> None:
        self._watcher.cancel()
