"""The proxy's background tasks (health checks, discovery, rebalancing, probes) end one way."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait until it has stopped (shutdown is then clean:
    no task outlives the app's lifespan, none is destroyed while pending)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
