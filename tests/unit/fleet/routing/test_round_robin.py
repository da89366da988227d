from proxy.fleet.routing import RouteContext, make_router
from proxy.fleet.routing.round_robin import RoundRobin

from .helpers import instances


def test_round_robin_cycles():
    picker = RoundRobin()
    pool = instances("http://a", "http://b", "http://c")
    assert [picker(pool, [0, 0, 0]).url for _ in range(6)] == [
        "http://a",
        "http://b",
        "http://c",
    ] * 2


def test_round_robin_skips_the_unavailable():
    a, b, c = instances("http://a", "http://b", "http://c")
    b.healthy = False
    router = make_router("round_robin")
    assert {router.pick([a, b, c], RouteContext()).url for _ in range(4)} == {
        "http://a",
        "http://c",
    }
