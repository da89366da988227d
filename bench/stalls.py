"""The proxy's event-loop stalls in a measurement window, from its own ``/metrics``.

pdproxy exports how late its loop-lag probe woke (``pdproxy_event_loop_lag_seconds``)
and each garbage collection's pause (``pdproxy_gc_pause_seconds``); read before and after
a window, their difference says whether a TTFT tail was the proxy's loop being busy
elsewhere, and with what.
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

LAG = "pdproxy_event_loop_lag_seconds"
GC = "pdproxy_gc_pause_seconds"
OVER = (0.002, 0.005, 0.01, 0.02, 0.05)  # lag thresholds reported, in seconds


async def scrape(url: str) -> dict[str, float] | None:
    """Every bucket, count and sum of the two histograms, keyed by sample name and labels."""
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            text = (await client.get(url + "/metrics")).text
    except httpx.HTTPError:
        return None
    return parse(text)


def parse(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (LAG, GC):
            continue
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def _get(values: dict[str, float], name: str, **labels: str) -> float:
    key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return values.get(f"{name}{{{key}}}", 0.0)


def window(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """What happened between two scrapes: loop-lag samples over each threshold, and
    collections with their total pause per generation."""
    if before is None or after is None:
        return {}

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    probes = delta(LAG + "_count")
    lag = {
        "probes": int(probes),
        "mean_ms": delta(LAG + "_sum") / probes * 1000 if probes else None,
        # Bucket bounds are printed as Prometheus writes them ("0.005").
        "over_ms": {
            f"{limit * 1000:g}": int(probes - delta(LAG + "_bucket", le=repr(limit)))
            for limit in OVER
        },
    }
    gc = {}
    for generation in ("0", "1", "2"):
        count = delta(GC + "_count", generation=generation)
        if count:
            total = delta(GC + "_sum", generation=generation)
            gc[generation] = {"count": int(count), "total_ms": round(total * 1000, 2)}
    return {"loop_lag": lag, "gc": gc}


def describe(stalls: dict[str, Any]) -> str:
    """One short line for the progress output."""
    if not stalls:
        return ""
    over = stalls["loop_lag"]["over_ms"]
    gc2 = stalls["gc"].get("2", {})
    return (
        f"lag>5ms {over['5']} >20ms {over['20']}"
        f"  gc2 {gc2.get('count', 0)}x {gc2.get('total_ms', 0):.0f} ms"
    )
