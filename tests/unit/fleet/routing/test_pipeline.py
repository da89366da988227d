"""The pipeline's pieces and the registry of policies."""

import pytest

from proxy.fleet.routing import POLICIES, RouteContext, Router, make_router
from proxy.fleet.routing.least_load import least_load
from proxy.fleet.routing.pipeline import available, best, not_tried

from .helpers import instances


def test_filters():
    a, b, c = instances("http://a", "http://b", "http://c")
    b.healthy = False
    c.draining = True
    assert available([a, b, c], RouteContext()) == [a]
    assert not_tried([a, b, c], RouteContext(exclude={"http://a"})) == [b, c]


def test_router_filters_scores_and_picks():
    a, b = instances("http://a", "http://b")
    a.in_flight = 3
    router = Router([available, not_tried], least_load, best)
    assert router.pick([a, b], RouteContext()) is b
    assert router.pick([a, b], RouteContext(exclude={"http://b"})) is a
    assert router.pick([a, b], RouteContext(exclude={"http://a", "http://b"})) is None


def test_every_policy_the_settings_name_is_registered():
    from proxy.settings import DecodePolicy, PrefillPolicy

    named = {p.value for p in PrefillPolicy} | {p.value for p in DecodePolicy}
    assert named <= set(POLICIES)
    a, b = instances("http://a", "http://b")
    for name in POLICIES:
        assert make_router(name).pick([a, b], RouteContext(prefix_key=b"x")) in (a, b)
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_router("nope")
