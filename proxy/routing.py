"""Routing as a pipeline: filter the candidates, score them, pick one.

Each piece is small and swappable (the llm-d inference scheduler's shape). A policy is
a named combination; ``make_router`` builds one from the settings' policy name.

- Filters drop instances that must not get the request (unhealthy, draining, already
  tried for this request).
- Scorers give each remaining instance a number; higher is better.
- Pickers choose one instance given the scores.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .backends import Instance


@dataclass
class RouteContext:
    """What routing may know about a request."""

    prefix_key: bytes = b""  # the prompt's first characters, for prefix affinity
    tokens: int = 0  # estimated prompt tokens
    exclude: set[str] = field(default_factory=set)  # URLs already tried for this request


Filter = Callable[[list[Instance], RouteContext], list[Instance]]
Scorer = Callable[[list[Instance], RouteContext], list[float]]
Picker = Callable[[list[Instance], list[float]], Instance]


# --- filters ------------------------------------------------------------------------


def available(candidates: list[Instance], ctx: RouteContext) -> list[Instance]:
    return [inst for inst in candidates if inst.available()]


def not_tried(candidates: list[Instance], ctx: RouteContext) -> list[Instance]:
    return [inst for inst in candidates if inst.url not in ctx.exclude]


# --- scorers ------------------------------------------------------------------------


def load_of(inst: Instance) -> float:
    """One number for how busy an instance is: the proxy's own view plus the server's.

    The proxy's in-flight counts are exact and instant; the server's running/waiting
    counts and KV usage (refreshed from its /metrics) add what other proxies sent.
    """
    server = inst.load
    return (
        inst.in_flight
        + inst.in_flight_tokens / 4096.0
        + max(server.running - inst.in_flight, 0.0) * 0.5
        + server.waiting
        + server.kv_usage * 4.0
    )


def least_load(candidates: list[Instance], ctx: RouteContext) -> list[float]:
    return [-load_of(inst) for inst in candidates]


def no_score(candidates: list[Instance], ctx: RouteContext) -> list[float]:
    return [0.0] * len(candidates)


def prefix_affinity(candidates: list[Instance], ctx: RouteContext) -> list[float]:
    """Rendezvous (highest-random-weight) hashing of the prompt prefix.

    The same prefix prefers the same instance, so its prefix cache hits; adding or
    removing an instance moves only the prefixes that hashed to it.
    """
    scores = []
    for inst in candidates:
        digest = hashlib.blake2b(ctx.prefix_key + b"|" + inst.url.encode(), digest_size=8).digest()
        scores.append(int.from_bytes(digest, "big") / 2**64)
    return scores


# --- pickers ------------------------------------------------------------------------


def best(candidates: list[Instance], scores: list[float]) -> Instance:
    top = max(scores)
    winners = [inst for inst, score in zip(candidates, scores) if score == top]
    return winners[0] if len(winners) == 1 else random.choice(winners)


class RoundRobin:
    """Cycles through candidates in URL order, skipping ones filtered out."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self, candidates: list[Instance], scores: list[float]) -> Instance:
        ordered = sorted(candidates, key=lambda inst: inst.url)
        return ordered[next(self._counter) % len(ordered)]


def power_of_two(candidates: list[Instance], scores: list[float]) -> Instance:
    """Two random candidates, the better one wins: near least-load, no herding."""
    if len(candidates) <= 2:
        return best(candidates, scores)
    i, j = random.sample(range(len(candidates)), 2)
    return candidates[i] if scores[i] >= scores[j] else candidates[j]


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
        return self.picker(remaining, self.scorer(remaining, ctx))


BASE_FILTERS: tuple[Filter, ...] = (available, not_tried)


def make_router(policy: str) -> Router:
    if policy == "round_robin":
        return Router(BASE_FILTERS, no_score, RoundRobin())
    if policy == "least_load":
        return Router(BASE_FILTERS, least_load, best)
    if policy == "power_of_two":
        return Router(BASE_FILTERS, least_load, power_of_two)
    if policy == "prefix_affinity":
        return Router(BASE_FILTERS, prefix_affinity, best)
    raise ValueError(f"unknown routing policy {policy!r}")
