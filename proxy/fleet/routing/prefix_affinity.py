"""prefix_affinity: the same prompt prefix goes to the same instance, so its prefix
cache hits (rendezvous, or highest-random-weight, hashing)."""

from __future__ import annotations

import hashlib

from ..backends import Instance
from .pipeline import BASE_FILTERS, RouteContext, Router, best
from .registry import policy


def prefix_affinity(candidates: list[Instance], ctx: RouteContext) -> list[float]:
    """A scorer: each instance's hash of the prefix. Adding or removing an instance
    moves only the prefixes that hashed to it."""
    scores = []
    for inst in candidates:
        digest = hashlib.blake2b(ctx.prefix_key + b"|" + inst.url.encode(), digest_size=8).digest()
        scores.append(int.from_bytes(digest, "big") / 2**64)
    return scores


@policy("prefix_affinity")
def build() -> Router:
    return Router(BASE_FILTERS, prefix_affinity, best)
