"""Each routing piece alone, then the pipelines the policies build."""

import collections

from proxy.backends import Instance
from proxy.routing import (
    RoundRobin,
    RouteContext,
    Router,
    available,
    best,
    least_load,
    make_router,
    not_tried,
    power_of_two,
    prefix_affinity,
)


def instances(*urls):
    return [Instance(url) for url in urls]


def test_filters():
    a, b, c = instances("http://a", "http://b", "http://c")
    b.healthy = False
    c.draining = True
    assert available([a, b, c], RouteContext()) == [a]
    assert not_tried([a, b, c], RouteContext(exclude={"http://a"})) == [b, c]


def test_least_load_counts_the_proxys_and_the_servers_view():
    a, b = instances("http://a", "http://b")
    a.in_flight = 2
    assert least_load([a, b], RouteContext()) == [-2.0, 0.0]
    b.load.waiting = 5  # another proxy's queue on b
    scores = least_load([a, b], RouteContext())
    assert scores[0] > scores[1]
    a.in_flight = 0
    a.load.kv_usage = 0.9
    assert least_load([a], RouteContext())[0] < 0


def test_round_robin_cycles():
    picker = RoundRobin()
    pool = instances("http://a", "http://b", "http://c")
    assert [picker(pool, [0, 0, 0]).url for _ in range(6)] == ["http://a", "http://b", "http://c"] * 2


def test_power_of_two_prefers_the_less_loaded_of_two():
    pool = instances(*(f"http://{i}" for i in range(5)))
    scores = [-10, -10, -10, -10, 0]
    picks = collections.Counter(power_of_two(pool, scores).url for _ in range(400))
    # The idle one wins whenever it is drawn (2 of 5 draws include it: 40%).
    assert picks["http://4"] > 100


def test_prefix_affinity_is_sticky_and_consistent():
    pool = instances(*(f"http://p{i}" for i in range(4)))
    keys = [f"prompt {i}".encode() for i in range(200)]
    choice = {k: best(pool, prefix_affinity(pool, RouteContext(prefix_key=k))).url for k in keys}
    assert all(best(pool, prefix_affinity(pool, RouteContext(prefix_key=k))).url == choice[k] for k in keys)
    assert len(set(choice.values())) == 4  # spread over every instance
    smaller = pool[:3]  # p3 leaves: only its prefixes move
    moved = [k for k in keys if best(smaller, prefix_affinity(smaller, RouteContext(prefix_key=k))).url != choice[k]]
    assert all(choice[k] == "http://p3" for k in moved)


def test_router_pipeline_and_policies():
    a, b = instances("http://a", "http://b")
    a.in_flight = 3
    router = Router([available, not_tried], least_load, best)
    assert router.pick([a, b], RouteContext()) is b
    assert router.pick([a, b], RouteContext(exclude={"http://b"})) is a
    assert router.pick([a, b], RouteContext(exclude={"http://a", "http://b"})) is None
    for policy in ("round_robin", "least_load", "power_of_two", "prefix_affinity"):
        assert make_router(policy).pick([a, b], RouteContext(prefix_key=b"x")) in (a, b)
