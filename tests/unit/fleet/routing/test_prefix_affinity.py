from proxy.fleet.routing import RouteContext
from proxy.fleet.routing.pipeline import best
from proxy.fleet.routing.prefix_affinity import prefix_affinity

from .helpers import instances


def test_prefix_affinity_is_sticky_and_consistent():
    pool = instances(*(f"http://p{i}" for i in range(4)))
    keys = [f"prompt {i}".encode() for i in range(200)]
    choice = {k: best(pool, prefix_affinity(pool, RouteContext(prefix_key=k))).url for k in keys}
    assert all(
        best(pool, prefix_affinity(pool, RouteContext(prefix_key=k))).url == choice[k] for k in keys
    )
    assert len(set(choice.values())) == 4  # spread over every instance
    smaller = pool[:3]  # p3 leaves: only its prefixes move
    moved = [
        k
        for k in keys
        if best(smaller, prefix_affinity(smaller, RouteContext(prefix_key=k))).url != choice[k]
    ]
    assert all(choice[k] == "http://p3" for k in moved)
