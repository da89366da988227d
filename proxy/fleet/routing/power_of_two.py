"""power_of_two: two random candidates, the less loaded wins: near least-load, no
herding when many proxies see the same loads."""

from __future__ import annotations

import random

from ..backends import Instance
from .least_load import least_load
from .pipeline import BASE_FILTERS, Router, best
from .registry import policy


def power_of_two(candidates: list[Instance], scores: list[float]) -> Instance:
    if len(candidates) <= 2:
        return best(candidates, scores)
    i, j = random.sample(range(len(candidates)), 2)
    return candidates[i] if scores[i] >= scores[j] else candidates[j]


@policy("power_of_two")
def build() -> Router:
    return Router(BASE_FILTERS, least_load, power_of_two)
