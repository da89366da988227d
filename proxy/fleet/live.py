"""The streamed answers in progress, by the decode instance serving each.

Draining an instance and rebalancing the decode pool both act on what runs on an
instance now: they ask its streams to move (``Movable.move``); each stream moves itself
at its next token boundary (:mod:`proxy.serve.session`), so this registry only knows
who is where.
"""

from __future__ import annotations

from typing import Protocol

from .backends import Instance


class Movable(Protocol):
    moved_at: float  # when it last moved (time.monotonic), for the no-ping-pong cooldown
    moving: bool  # asked to move and not yet running elsewhere

    def move(self, reason: str, target: Instance | None = None) -> bool:
        """Ask the stream to continue elsewhere; False if it cannot."""
        ...


class LiveStreams:
    def __init__(self) -> None:
        self._by_url: dict[str, set[Movable]] = {}

    def attach(self, url: str, stream: Movable) -> None:
        self._by_url.setdefault(url, set()).add(stream)

    def detach(self, url: str, stream: Movable) -> None:
        streams = self._by_url.get(url)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_url[url]

    def on(self, url: str) -> list[Movable]:
        return list(self._by_url.get(url, ()))

    def count(self, url: str) -> int:
        return len(self._by_url.get(url, ()))

    def move_all(self, url: str, reason: str) -> int:
        """Ask every stream on ``url`` to move; how many will."""
        return sum(1 for stream in self.on(url) if stream.move(reason))
