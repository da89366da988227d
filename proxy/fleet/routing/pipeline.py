"""The routing pipeline: filter the candidates, score them, pick one.

Each piece is small and swappable (the llm-d inference scheduler's shape); a policy
module combines them.

- Filters drop instances that must not get the request (unhealthy, draining, already
  tried for this request).
- Scorers give each remaining instance a number; higher is better.
- Pickers choose one instance given the scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..backends import Instance


@dataclass
class RouteContext:
    """What routing may know about a request."""

    prefix_key: bytes = b""  # the prompt's first characters, for prefix affinity
    tokens: int = 0  # estimated prompt tokens
    exclude: set[str] = field(default_factory=set)  # URLs already tried for this request
    prefer: str | None = None  # this URL, if it passes the filters (a move's destination)


Filter = Callable[[list[Instance], RouteContext], list[Instance]]
Scorer = Callable[[list[Instance], RouteContext], list[float]]
Picker = Callable[[list[Instance], list[float]], Instance]


# --- filters ------------------------------------------------------------------------


def available(candidates: list[Instance], ctx: RouteContext) -> list[Instance]:
    return [inst for inst in candidates if inst.available()]


def not_tried(candidates: list[Instance], ctx: RouteContext) -> list[Instance]:
    return [inst for inst in candidates if inst.url not in ctx.exclude]


# --- scorers ------------------------------------------------------------------------


def no_score(candidates: list[Instance], ctx: RouteContext) -> list[float]:
    return [0.0] * len(candidates)


# --- pickers ------------------------------------------------------------------------


def best(candidates: list[Instance], scores: list[float]) -> Instance:
    top = max(scores)
    winners = [inst for inst, score in zip(candidates, scores) if score == top]
    return winners[0] if len(winners) == 1 else random.choice(winners)


# --- the pipeline -------------------------------------------------------------------


class Router:
    def __init__(self, filters: Sequence[Filter], scorer: Scorer, picker: Picker) -> None:
        self.filters = list(filters)
        self.scorer = scorer
        self.picker = picker

    def candidates(self, instances: list[Instance], ctx: RouteContext) -> list[Instance]:
        for keep in self.filters:
            instances = keep(instances, ctx)
            if not instances:
                break
        return instances

    def pick(self, instances: list[Instance], ctx: RouteContext) -> Instance | None:
        remaining = self.candidates(instances, ctx)
        if not remaining:
            return None
        if ctx.prefer is not None:
            for inst in remaining:
                if inst.url == ctx.prefer:
                    return inst
        return self.picker(remaining, self.scorer(remaining, ctx))


BASE_FILTERS: tuple[Filter, ...] = (available, not_tried)
