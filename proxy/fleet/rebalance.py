"""Load balance across decode instances by moving running streams (Llumnix's D-to-D
migration, on stock vLLM).

Routing places each request once; streams then run for seconds to minutes, and the
decode instances drift apart (long answers pile up on one, short ones finish on
another). When the most and the least loaded decode instance differ by more than
``PDPROXY_REBALANCE_THRESHOLD`` (the routing's own load: in-flight requests plus the
servers' running and waiting counts and KV usage), the rebalancer asks a few streams of
the busier one to move to the other, with their KV. Never more than half the gap per
look (the order of the two cannot flip), never more than
``PDPROXY_REBALANCE_MAX_MOVES``, no new look while the last look's moves are on
their way, never a stream that moved within
``PDPROXY_MIGRATION_COOLDOWN``: no ping-pong. Off by default (``PDPROXY_REBALANCE``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import background
from ..settings import Settings
from .backends import Registry
from .live import LiveStreams, Movable
from .routing.least_load import load_of

log = logging.getLogger("pdproxy.rebalance")


class Rebalancer:
    def __init__(self, settings: Settings, registry: Registry, live: LiveStreams) -> None:
        self.settings = settings
        self.registry = registry
        self.live = live
        self._task: asyncio.Task[None] | None = None
        self._moving: list[Movable] = []  # asked in an earlier look, still on their way

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pdproxy-rebalance")

    async def stop(self) -> None:
        await background.cancel(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rebalance_interval)
            try:
                self.look()
            except Exception:  # noqa: BLE001 - the balancer must outlive any one round
                log.exception("rebalance round failed")

    def look(self) -> int:
        """One look at the decode loads; how many streams were asked to move."""
        # Streams on their way are counted on neither instance: wait until they arrive,
        # or the next look would move more than half the gap.
        self._moving = [stream for stream in self._moving if stream.moving]
        if self._moving:
            return 0
        decode = [inst for inst in self.registry.decode.instances if inst.available()]
        if len(decode) < 2:
            return 0
        loads = {inst.url: load_of(inst) for inst in decode}
        source = max(decode, key=lambda inst: loads[inst.url])
        target = min(decode, key=lambda inst: loads[inst.url])
        gap = loads[source.url] - loads[target.url]
        log.debug("rebalance: loads %s", loads)
        if gap <= self.settings.rebalance_threshold:
            return 0
        budget = min(self.settings.rebalance_max_moves, int(gap // 2))
        now, moved = time.monotonic(), 0
        for stream in self.live.on(source.url):
            if moved >= budget:
                break
            if now - stream.moved_at < self.settings.migration_cooldown:
                continue
            if stream.move("rebalance", target):
                self._moving.append(stream)
                moved += 1
        if moved:
            log.info(
                "rebalance: moving %d stream(s) %s -> %s (loads %.1f / %.1f)",
                moved,
                source.url,
                target.url,
                loads[source.url],
                loads[target.url],
            )
        return moved
