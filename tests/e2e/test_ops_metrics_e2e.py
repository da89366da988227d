"""The dashboard's and the alerts' engine-side metric names on a real vLLM server.

The unit tests (tests/unit/deploy/test_ops_config.py) check ``pdproxy_*`` and ``pd_connector_*``
names against the proxy and the connector's control server; the ``vllm:*`` names can only
come from vLLM itself. One scrape of a server of the shared cluster (already running for
the other end-to-end tests): its HTTP ``/metrics`` for vLLM's names and its connector's
control port ``/metrics`` for ours, as served from inside a real engine.
"""

from __future__ import annotations

import httpx

from tests.support.promql import (
    alert_queries,
    dashboard_queries,
    exported_series,
    load_alerts,
    load_dashboard,
    metric_names,
)


def used_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries(load_dashboard()) + alert_queries(load_alerts()):
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


def test_engine_metrics_used_by_the_dashboard_and_alerts_exist(cluster):
    server = cluster.p1
    vllm = exported_series(httpx.get(server.url + "/metrics", timeout=30).text)
    connector = exported_series(httpx.get(server.control_url + "/metrics", timeout=30).text)
    used = used_names()
    assert any(name.startswith("vllm:") for name in used), "the dashboard shows vLLM's load"

    def missing(prefix: str, exported: dict[str, str]) -> str:
        return "\n".join(
            f"{name} (used by {', '.join(sorted(where))})"
            for name, where in sorted(used.items())
            if name.startswith(prefix) and name not in exported
        )

    assert not missing("vllm:", vllm), "not on vLLM's /metrics:\n" + missing("vllm:", vllm)
    assert not missing("pd_connector_", connector), (
        "not on the engine's connector /metrics:\n" + missing("pd_connector_", connector)
    )
