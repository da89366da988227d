"""The bench's reading of the proxy's stall metrics, from a real exposition."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench import stalls
from proxy.observe.stalls import STALL_BUCKETS


def _scrape(lags, pauses):
    registry = CollectorRegistry()
    lag = Histogram(stalls.LAG, "x", buckets=STALL_BUCKETS, registry=registry)
    gc = Histogram(stalls.GC, "x", ["generation"], buckets=STALL_BUCKETS, registry=registry)
    for value in lags:
        lag.observe(value)
    for generation, value in pauses:
        gc.labels(str(generation)).observe(value)
    return stalls.parse(generate_latest(registry).decode())


def test_window_counts_stalls_and_collections_between_scrapes():
    before = _scrape([0.0001] * 5, [(0, 0.0001)])
    after = _scrape([0.0001] * 5 + [0.0001, 0.003, 0.03], [(0, 0.0001), (2, 0.012), (2, 0.008)])
    got = stalls.window(before, after)
    assert got["loop_lag"]["probes"] == 3
    assert got["loop_lag"]["over_ms"] == {"2": 2, "5": 1, "10": 1, "20": 1, "50": 0}
    assert got["gc"] == {"2": {"count": 2, "total_ms": 20.0}}
    assert stalls.describe(got) == "lag>5ms 1 >20ms 1  gc2 2x 20 ms"
    assert stalls.window(None, after) == {}
