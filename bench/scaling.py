"""Does ``PDPROXY_WORKERS=N`` scale the proxy across cores?

For each N in ``--workers``, pdproxy runs N workers pinned to N cores of its own
(``--proxy-cores``, the first N of them), in front of ``--fakes`` fake prefill and
``--fakes`` fake decode engines (xPyD: the proxy spreads the load over them) and
``--loadgens`` closed-loop load generators, all on the other cores (``--load-cores``).
The concurrency grows with N (``--concurrency-per-worker`` each), enough to keep every
worker busy, so a cell measures what N workers can carry: token chunks per second, the
proxy's CPU (its whole process tree) per chunk, and how busy the proxy's and the load
side's cores were. A cell where the proxy's cores were not nearly all busy did not
measure the proxy's capacity (the offered load, the fakes or the load generators set its
rate): its line says so.

``python -m bench.scaling --workers 1,2,4 --proxy-cores 0-3 --load-cores 4-15``
(defaults: the first half of the cores for the proxy, the rest for the load).
Writes ``bench/results/scaling-<time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from devkit.servers import Process, free_port

from .procstat import TreeMeter
from .results import save
from .targets import child_env, cores, environment, raise_nofile


def _pinned(where: list[int], *argv: str) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, where)), sys.executable, *argv]


def fake(name: str, args: argparse.Namespace, logs: Path) -> Process:
    port = free_port()
    argv = _pinned(
        cores(args.load_cores), "-m", "bench.fake", "--port", str(port),
        "--prefill-ms", str(args.prefill_ms), "--itl-ms", str(args.itl_ms),
        "--tokens", str(args.tokens), "--kv-lease-s", "30",
    )  # fmt: skip
    return Process(name, argv, child_env(), port, logs / f"{name}.log", ready_path="/health")


def proxy(workers: int, p_urls: list[str], d_urls: list[str], args, logs: Path) -> Process:
    port = free_port()
    env = child_env()
    env.update(
        PDPROXY_PREFILL_URLS=",".join(p_urls),
        PDPROXY_DECODE_URLS=",".join(d_urls),
        PDPROXY_HOST="127.0.0.1",
        PDPROXY_PORT=str(port),
        PDPROXY_WORKERS=str(workers),
    )
    argv = _pinned(cores(args.proxy_cores)[:workers], "-m", "proxy")
    return Process(f"pdproxy-w{workers}", argv, env, port, logs / f"pdproxy-w{workers}.log",
                   ready_path="/ready")  # fmt: skip


def cell(workers: int, url: str, meter: TreeMeter, load: list[TreeMeter], args) -> dict:
    """One measurement: the load generators run together; CPU is read over their window."""
    concurrency = workers * args.concurrency_per_worker
    shares = [concurrency // args.loadgens + (i < concurrency % args.loadgens)
              for i in range(args.loadgens)]  # fmt: skip
    gens = [
        subprocess.Popen(
            _pinned(
                cores(args.load_cores),
                "-m",
                "bench.loadgen",
                "--url",
                url,
                "--concurrency",
                str(share),
                "--duration",
                str(args.duration),
                "--warmup",
                str(args.warmup),
                "--tokens",
                str(args.tokens),
            ),
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for share in shares
    ]
    gen_meters = [TreeMeter(g.pid) for g in gens]
    time.sleep(args.warmup + 0.5)  # the generators' own warm-up (and their start)
    start = time.perf_counter()
    cpu0, load0 = meter.cpu(), [m.cpu() for m in load + gen_meters]
    time.sleep(args.duration - 1.0)  # inside every generator's window
    window = time.perf_counter() - start
    cpu1, load1 = meter.cpu(), [m.cpu() for m in load + gen_meters]
    results = [json.loads(g.communicate(timeout=args.duration + 120)[0]) for g in gens]
    chunks_per_s = sum(r["chunks_per_s"] for r in results)
    proxy_cores = (cpu1 - cpu0) / window
    busy = [(b - a) / window for a, b in zip(load0, load1)]
    return {
        "workers": workers,
        "concurrency": concurrency,
        "chunks_per_s": chunks_per_s,
        "requests_per_s": sum(r["requests_per_s"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": dict(sum((Counter(r.get("error_kinds", {})) for r in results), Counter())),
        "proxy_cores_busy": proxy_cores,
        "proxy_cpu_us_per_chunk": 1e6 * proxy_cores / chunks_per_s if chunks_per_s else None,
        "fakes_cores_busy": busy[: len(load)],
        "loadgens_cores_busy": busy[len(load) :],
        "load_cores_busy": sum(busy),
        # each generator's own percentiles (they are not merged)
        "ttft_ms_p50": [r["ttft_ms"].get("p50") for r in results],
        "ttft_ms_p99": [r["ttft_ms"].get("p99") for r in results],
        "proxy_bound": proxy_cores >= 0.9 * workers,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="pdproxy-scaling-"))
    logs.mkdir(parents=True, exist_ok=True)
    fakes = [fake(f"{role}{i}", args, logs) for role in "pd" for i in range(args.fakes)]
    cells: list[dict[str, Any]] = []
    try:
        for f in fakes:
            f.start()
        for f in fakes:
            f.wait_ready(60)
        p_urls = [f.url for f in fakes[: args.fakes]]
        d_urls = [f.url for f in fakes[args.fakes :]]
        load = [TreeMeter(f.proc.pid) for f in fakes]  # type: ignore[union-attr]
        for workers in args.workers:
            server = proxy(workers, p_urls, d_urls, args, logs).start()
            try:
                server.wait_ready(60)
                result = cell(workers, server.url, TreeMeter(server.proc.pid), load, args)  # type: ignore[union-attr]
            finally:
                server.stop()
            cells.append(result)
            print(line(result, cells[0]), flush=True)
    finally:
        for f in fakes:
            f.stop()
    return {
        "benchmark": "scaling",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "cpus": os.cpu_count(),
        "environment": environment(),
        "cells": cells,
        "logs": str(logs),
    }


def line(c: dict[str, Any], base: dict[str, Any]) -> str:
    speedup = c["chunks_per_s"] / base["chunks_per_s"] if base["chunks_per_s"] else 0.0
    note = (
        ""
        if c["proxy_bound"]
        else "  (proxy not saturated: the offered load or the load side set the rate)"
    )
    return (
        f"workers {c['workers']:>2}  c={c['concurrency']:<5} {c['chunks_per_s']:>9.0f} chunks/s"
        f"  x{speedup:.2f}  proxy {c['proxy_cores_busy']:.2f} cores"
        f"  {c['proxy_cpu_us_per_chunk'] or 0:.1f} us/chunk"
        f"  load side {c['load_cores_busy']:.2f} cores  errors {c['errors']}{note}"
        + "".join(f"\n    {n} x {kind}" for kind, n in c.get("error_kinds", {}).items())
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    half = max(1, (os.cpu_count() or 2) // 2)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="PDPROXY_WORKERS values, e.g. 1,2,4")
    parser.add_argument("--proxy-cores", default=f"0-{half - 1}")
    parser.add_argument("--load-cores", default=f"{half}-{(os.cpu_count() or 2) - 1}")
    parser.add_argument("--fakes", type=int, default=2, help="fake P and fake D engines each")
    parser.add_argument("--loadgens", type=int, default=2, help="load generator processes")
    parser.add_argument("--concurrency-per-worker", type=int, default=96)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill-ms", type=float, default=10.0)
    parser.add_argument("--itl-ms", type=float, default=2.0)
    parser.add_argument("--log-dir", default=None, help="the processes' logs (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if max(args.workers) > len(cores(args.proxy_cores)):
        parser.error("more workers than --proxy-cores")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    save(run(args), args.out, "scaling")


if __name__ == "__main__":
    main()
