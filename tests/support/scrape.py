"""What the real servers in the end-to-end tests report: Prometheus samples summed over
label sets, vLLM's prompt tokens by where they came from, the connector's own counters."""

from __future__ import annotations

from typing import Any

import httpx


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples at ``url``/metrics whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def by_source(proc: Any) -> dict[str, float]:
    """A vLLM server's prompt tokens computed locally and received over the connector."""
    return {
        s: metric(proc.url, "vllm:prompt_tokens_by_source_total", source=s)
        for s in ("local_compute", "external_kv_transfer")
    }


def pd_stats(proc: Any) -> dict[str, float]:
    """The connector's counters, from its control plane."""
    return httpx.get(proc.control_url + "/pd/stats", timeout=10).json()
