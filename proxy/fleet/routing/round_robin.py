"""round_robin: every instance in turn (URL order), skipping ones filtered out."""

from __future__ import annotations

import itertools

from ..backends import Instance
from .pipeline import BASE_FILTERS, Router, no_score
from .registry import policy


class RoundRobin:
    """A picker that cycles through the candidates, whatever the scores."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self, candidates: list[Instance], scores: list[float]) -> Instance:
        ordered = sorted(candidates, key=lambda inst: inst.url)
        return ordered[next(self._counter) % len(ordered)]


@policy("round_robin")
def build() -> Router:
    return Router(BASE_FILTERS, no_score, RoundRobin())
