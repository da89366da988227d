from proxy.fleet.routing import RouteContext, make_router
from proxy.fleet.routing.least_load import least_load

from .helpers import instances


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


def test_the_policy_picks_the_least_loaded():
    a, b, c = instances("http://a", "http://b", "http://c")
    a.in_flight, b.in_flight = 2, 1
    c.load.kv_usage = 0.9  # 3.6 of load
    assert make_router("least_load").pick([a, b, c], RouteContext()) is b
