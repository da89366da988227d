"""Soak: hold many concurrent streams through the proxy for a long time; watch for leaks.

``python -m bench.soak`` (defaults: 1,000 concurrent streaming chat requests for 10
minutes, against a fake prefill and a fake decode engine on loopback). It samples the
proxy's resident memory and open file descriptors every few seconds and reports:

- errors (must be zero);
- resident memory at the end of warm-up, its peak and its final value afterwards (the
  target: within 10% of the warm-up level);
- open file descriptors at the end of warm-up and at the end (no growth);
- requests, chunks and the proxy's CPU time.

It is a benchmark, not a test: ``make soak`` runs it; the numbers go in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from devkit.servers import Process, free_port

from . import loadgen
from .__main__ import raise_nofile
from .procstat import descendants, rss_bytes


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def fake(name: str, log_dir: Path, itl_ms: float, prefill_ms: float) -> Process:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.fake",
        "--port",
        str(port),
        "--itl-ms",
        str(itl_ms),
        "--prefill-ms",
        str(prefill_ms),
    ]
    return Process(
        name, argv, dict(os.environ), port, log_dir / f"{name}.log", ready_path="/health"
    )


async def soak(args: argparse.Namespace) -> dict:
    raise_nofile()
    log_dir = Path(tempfile.mkdtemp(prefix="pdproxy-soak-"))
    p = fake("soak-prefill", log_dir, args.itl_ms, args.prefill_ms).start()
    d = fake("soak-decode", log_dir, args.itl_ms, args.prefill_ms).start()
    procs = [p, d]
    try:
        for proc in procs:
            proc.wait_ready(30)
        port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "PDPROXY_PREFILL_URLS": p.url,
                "PDPROXY_DECODE_URLS": d.url,
                "PDPROXY_HOST": "127.0.0.1",
                "PDPROXY_PORT": str(port),
                "PDPROXY_LOG_LEVEL": "warning",
            }
        )
        proxy = Process(
            "soak-proxy", [sys.executable, "-m", "proxy"], env, port, log_dir / "proxy.log"
        ).start()
        procs.append(proxy)
        proxy.wait_ready(30)
        assert proxy.proc is not None

        samples: list[dict] = []
        start = time.monotonic()

        async def sample_forever() -> None:
            while True:
                pids = descendants(proxy.proc.pid)
                samples.append(
                    {
                        "t": round(time.monotonic() - start, 1),
                        "rss": rss_bytes(pids),
                        "fds": open_fds(pids),
                    }
                )
                await asyncio.sleep(args.sample_every)

        sampler = asyncio.create_task(sample_forever())
        spec = loadgen.LoadSpec(
            url=proxy.url,
            endpoint=args.endpoint,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            tokens=args.tokens,
            ramp=min(args.warmup, 10.0),
            keep_samples=False,
            timeout=max(60.0, args.tokens * args.itl_ms / 1000 * 4),
        )
        result = await loadgen.run(spec)
        sampler.cancel()
        after_warmup = [s for s in samples if s["t"] >= args.warmup]
        base = after_warmup[0] if after_warmup else samples[-1]
        report = {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "requests": result.requests_started,
            "errors": result.errors,
            "error_kinds": result.error_kinds,
            "chunks_per_s": round(result.chunks_per_s),
            "requests_per_s": round(result.requests_per_s, 1),
            "ttft_ms": result.ttft_ms,
            "rss_after_warmup_mib": round(base["rss"] / 2**20, 1),
            "rss_peak_mib": round(max(s["rss"] for s in after_warmup) / 2**20, 1),
            "rss_final_mib": round(after_warmup[-1]["rss"] / 2**20, 1),
            "rss_growth_pct": round(
                100 * (max(s["rss"] for s in after_warmup) - base["rss"]) / base["rss"], 1
            ),
            "fds_after_warmup": base["fds"],
            "fds_final": after_warmup[-1]["fds"],
            "fds_max": max(s["fds"] for s in after_warmup),
        }
        report["pass"] = (
            report["errors"] == 0
            and report["rss_growth_pct"] <= 10.0
            and report["fds_final"] <= report["fds_after_warmup"]
        )
        return report
    finally:
        for proc in procs:
            proc.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument(
        "--duration", type=float, default=600.0, help="seconds measured after warm-up"
    )
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--itl-ms", type=float, default=200.0, help="fake decode's gap between tokens"
    )
    parser.add_argument("--prefill-ms", type=float, default=20.0)
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
