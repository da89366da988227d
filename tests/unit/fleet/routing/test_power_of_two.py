import collections

from proxy.fleet.routing.power_of_two import power_of_two

from .helpers import instances


def test_power_of_two_prefers_the_less_loaded_of_two():
    pool = instances(*(f"http://{i}" for i in range(5)))
    scores = [-10, -10, -10, -10, 0]
    picks = collections.Counter(power_of_two(pool, scores).url for _ in range(400))
    # The idle one wins whenever it is drawn (2 of 5 draws include it: 40%).
    assert picks["http://4"] > 100
    assert len(picks) > 1  # but not always: no herding on one instance


def test_two_candidates_or_fewer_take_the_best():
    a, b = instances("http://a", "http://b")
    assert all(power_of_two([a, b], [-1.0, 0.0]) is b for _ in range(20))
