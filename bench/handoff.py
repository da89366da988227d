"""P->D hand-off latency on real vLLM CPU servers, driven directly over HTTP (no proxy).

``python -m bench.handoff [--requests 40] [--p-url URL --d-url URL] [--out FILE]``

Starts one P and one D (the tiny model, each on its own core) unless URLs are given.
Each round sends a prefill leg to P (``max_tokens=1``, ``do_remote_decode``), then the
decode leg to D with P's ``kv_transfer_params`` as a stream, and times the *hand-off*:
from P's answer to D's first streamed token, which is what the proxy logs as
``handoff``. Prompts are 10-300 random token ids, fresh each round (no prefix hits).
The baseline is D's time to first token for a plain 8-token prompt (HTTP + one engine
step): the hand-off can only beat that by nothing, and should exceed it by the pull.

Prints median/p90/max of both and the connector's per-pull time from ``/pd/stats``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from . import sse
from .plots import draw_beside


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p90_ms": round(pct(values, 0.9) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


def first_token_time(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    """Seconds from now until the first streamed chunk carrying text or a token."""
    start = time.perf_counter()
    with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        first = None
        for line in sse.lines(r):
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
        assert first is not None, "no data"
    return first - start


def handoff_round(client: httpx.Client, p_url: str, d_url: str, prompt: list[int]) -> float:
    """Seconds from P's answer to D's first streamed token, for one fresh prompt."""
    body = {"model": "tiny", "prompt": prompt, "temperature": 0}
    pre = client.post(
        p_url + "/v1/completions",
        json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    pre.raise_for_status()
    params = pre.json()["kv_transfer_params"]
    # The clock starts when P's answer is in hand, as in the proxy.
    return first_token_time(client, d_url, {**body, "max_tokens": 2, "kv_transfer_params": params})


def baseline_time(client: httpx.Client, d_url: str, rng: random.Random) -> float:
    """D's own time to first token for a plain 8-token prompt: HTTP and one engine step."""
    body = {
        "model": "tiny",
        "prompt": [rng.randrange(300, 600) for _ in range(8)],
        "max_tokens": 2,
        "temperature": 0,
    }
    return first_token_time(client, d_url, body)


def run(p_url: str, d_url: str, requests: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    handoffs: list[float] = []
    baseline: list[float] = []
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm both engines and the P->D connection
            handoff_round(client, p_url, d_url, [rng.randrange(300, 600) for _ in range(40)])
            baseline_time(client, d_url, rng)
        for _ in range(requests):
            length = rng.randrange(10, 301)
            prompt = [rng.randrange(300, 600) for _ in range(length)]
            handoffs.append(handoff_round(client, p_url, d_url, prompt))
            baseline.append(baseline_time(client, d_url, rng))
            time.sleep(0.05)
    return {
        "handoff": summary(handoffs),
        "d_ttft_baseline": summary(baseline),
        "handoff_raw_ms": [round(h * 1000, 2) for h in handoffs],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--p-url")
    parser.add_argument("--d-url")
    parser.add_argument("--d-control", help="D's control URL, to read /pd/stats")
    parser.add_argument("--log-dir", help="server logs (default: a temporary directory)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    procs = []
    d_control = args.d_control
    if not (args.p_url and args.d_url):
        from devkit import servers, tiny_model
        from tests.e2e.conftest import connector_port

        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="handoff-"))
        model = tiny_model.build(servers.REPO_ROOT / ".cache" / "tiny-llama")
        for name, core in (("p", 0), ("d", 1)):
            config = {
                "host": "127.0.0.1",
                "zmq_port": connector_port(),
                "control_port": connector_port(),
            }
            proc = servers.vllm_server(
                name,
                model,
                log_dir,
                cpu_core=core,
                kv_transfer_config=servers.pd_connector_config(**config),
            )
            proc.control_url = f"http://127.0.0.1:{config['control_port']}"
            procs.append(proc)
        print(f"logs in {log_dir}", flush=True)
        servers.start_all(procs)
        args.p_url, args.d_url = procs[0].url, procs[1].url
        d_control = procs[1].control_url
    try:
        before = httpx.get(d_control + "/pd/stats").json() if d_control else None
        report = run(args.p_url, args.d_url, args.requests)
        if before is not None:
            time.sleep(0.5)
            after = httpx.get(d_control + "/pd/stats").json()
            ok = after["transfers_ok"] - before["transfers_ok"]
            secs = after["transfer_seconds_total"] - before["transfer_seconds_total"]
            report["d_pulls"] = {
                "ok": ok,
                "failed": after["transfers_failed"] - before["transfers_failed"],
                "mean_pull_ms": round(secs / ok * 1000, 2) if ok else None,
            }
    finally:
        for proc in procs:
            proc.stop()
    print(json.dumps({k: v for k, v in report.items() if k != "handoff_raw_ms"}, indent=1))
    print("handoffs ms:", sorted(report["handoff_raw_ms"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        draw_beside(args.out)
    return report


if __name__ == "__main__":
    main()
