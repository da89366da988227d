"""The event-loop stall probes: a blocked loop and a collection are both seen."""

import asyncio
import gc
import time

from prometheus_client import REGISTRY

from proxy.observe.stalls import WARN_EVERY, StallLog, StallProbes


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_blocked_loop_and_a_collection_are_recorded():
    over_20ms = "pdproxy_event_loop_lag_seconds_bucket"
    lag_count = "pdproxy_event_loop_lag_seconds_count"
    before_lag = _value(lag_count) - _value(over_20ms, le="0.02")
    before_gc = _value("pdproxy_gc_pause_seconds_count", generation="2")
    probes = StallProbes()
    probes.start()
    try:
        await asyncio.sleep(0.15)
        time.sleep(0.12)  # the loop is held: the probe wakes about this late
        await asyncio.sleep(0.15)
        gc.collect()
    finally:
        await probes.stop()
    assert _value(lag_count) - _value(over_20ms, le="0.02") > before_lag  # one lag > 20 ms
    assert _value("pdproxy_gc_pause_seconds_count", generation="2") == before_gc + 1
    assert probes._gc not in gc.callbacks


def test_stall_warnings_are_one_line_per_period_with_a_count(caplog):
    now = [0.0]
    warn = StallLog(clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="pdproxy.stalls"):
        for at, ms in ((0.0, 60.0), (0.3, 900.0), (0.6, 70.0), (WARN_EVERY + 1, 55.0)):
            now[0] = at
            warn(ms, "loop woke %.1f ms late", ms)
    assert [r.getMessage() for r in caplog.records] == [
        "loop woke 60.0 ms late",
        "loop woke 55.0 ms late (and 2 more since the last such line, the worst 900.0 ms)",
    ]


async def test_the_gc_hook_writes_no_metric_while_the_collector_runs():
    # A collection may start while prometheus-client holds its (multiprocess: global,
    # not reentrant) lock; an observation from inside it would wait on that lock for ever.
    collecting = False

    def begins(phase: str, info: dict[str, int]) -> None:
        nonlocal collecting
        collecting = collecting or phase == "start"

    def ends(phase: str, info: dict[str, int]) -> None:
        nonlocal collecting
        collecting = collecting and phase != "stop"

    probes = StallProbes()
    observed_inside: list[bool] = []
    for child in probes._gc.children:
        child.observe = lambda amount: observed_inside.append(collecting)  # type: ignore
    gc.callbacks.insert(0, begins)  # the first hook at "start"
    probes.start()
    gc.callbacks.append(ends)  # the last hook at "stop"
    try:
        gc.collect()
    finally:
        await probes.stop()
        gc.callbacks.remove(begins)
        gc.callbacks.remove(ends)
    assert observed_inside and not any(observed_inside)
