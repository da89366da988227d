"""least_load: the instance with the least load, the proxy's view and the server's."""

from __future__ import annotations

from ..backends import Instance
from .pipeline import BASE_FILTERS, RouteContext, Router, best
from .registry import policy


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
    """A scorer: higher is less loaded."""
    return [-load_of(inst) for inst in candidates]


@policy("least_load")
def build() -> Router:
    return Router(BASE_FILTERS, least_load, best)
