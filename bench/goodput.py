"""Goodput under latency SLOs: P/D through pdproxy against colocated serving, same servers.

``python -m bench.goodput [--shape small] [--mixes chat,rag] [--rates R,R,..] [--seconds 40]``

Two vLLM CPU servers with the PDConnector, each on its own core, and one proxy per arm in
front of both, so every arm runs on the same hardware and the same engines:

- ``pd``: server A prefills, server B decodes (``PDPROXY_PREFILL_URLS=A``, ``DECODE=B``);
- ``colocated``: both serve whole requests, least-loaded first (both are decode instances
  and ``PDPROXY_MIN_PREFILL_TOKENS`` is above every prompt);
- ``pd-min<N>`` (with ``--min-prefill N``): P/D for prompts of N tokens or more, the rest
  colocated on B (conditional disaggregation).

The workload is open-loop: Poisson arrivals at each rate, prompt and output lengths drawn
from a named mix (log-normal around a median, clipped), ``ignore_eos`` so every answer
has its drawn length. The same seed gives every arm the same requests at the same
offsets; their prompts are random token ids drawn afresh for each arm, because the arms
share the servers and a prompt one arm sent would be a prefix-cache hit for the next.

Per arm, mix and rate: TTFT p50/p99, ITL p50/p99 over all gaps, the worst gap any stream
saw (p50 and max over streams), throughput, and goodput: requests per second that met
both SLOs, a TTFT SLO and one on their mean time per output token (TPOT, DistServe's
decode SLO), set per mix in ``MIXES``, with both SLOs halved and doubled; and with a
reader's SLO instead of TPOT: no pause longer than the gap SLO (a mean hides the stalls a
long prefill causes in the streams beside it, which is what P/D removes). Each request's
TTFT, TPOT and worst gap are kept in the JSON, for other SLOs. ``bench.plots`` draws
goodput against rate beside the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import sse
from .results import save


@dataclass
class Slo:
    ttft: float  # seconds to the first token
    tpot: float  # mean seconds per output token after the first (DistServe's decode SLO)
    gap: float  # the longest pause a stream may see (what a reader notices)


# Per mix: median and clip range of prompt and output lengths in tokens, the arrival
# rates swept, and the SLOs (scaled to what one CPU core serves with devkit's "small"
# model: prefill ~500 tokens/s, a decode step ~35 ms, while sharing the machine).
MIXES: dict[str, dict[str, Any]] = {
    "chat": {
        "prompt": (96, 16, 512),
        "output": (64, 16, 128),
        "rates": (0.5, 1.0, 2.0),
        "slo": Slo(ttft=1.0, tpot=0.1, gap=0.5),
    },
    "rag": {
        "prompt": (1024, 384, 1800),
        "output": (32, 8, 64),
        "rates": (0.1, 0.2, 0.3),
        "slo": Slo(ttft=6.0, tpot=0.1, gap=0.5),
    },
}
SPREAD = 0.6  # sigma of the log-normal draws


@dataclass
class Job:
    at: float  # seconds after the run's start
    prompt_len: int
    output: int
    index: int

    def prompt(self, arm: str, seed: int) -> list[int]:
        """Fresh token ids of the drawn length, different for every arm."""
        rng = random.Random(f"{seed}-{arm}-{self.index}-{self.at}")
        return [rng.randrange(300, 600) for _ in range(self.prompt_len)]


@dataclass
class Outcome:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def _draw(rng: random.Random, median: int, low: int, high: int) -> int:
    return max(low, min(high, round(median * math.exp(rng.gauss(0.0, SPREAD)))))


def workload(mix: str, rate: float, seconds: float, seed: int) -> list[Job]:
    """The requests of one run: the same for every arm with the same seed."""
    rng = random.Random(f"{seed}-{mix}-{rate}")
    shape, jobs, at = MIXES[mix], [], 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return jobs
        jobs.append(Job(at, _draw(rng, *shape["prompt"]), _draw(rng, *shape["output"]), len(jobs)))


async def _one(client: httpx.AsyncClient, url: str, job: Job, prompt: list[int], start: float):
    await asyncio.sleep(max(start + job.at - time.perf_counter(), 0.0))
    sent = time.perf_counter()
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": job.output,
        "min_tokens": job.output,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    out, last = Outcome(), sent
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}"
                return out
            async for line in sse.alines(response):
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if out.ttft is None:
                    out.ttft = now - sent
                else:
                    out.gaps.append(now - last)
                last = now
                out.tokens += 1
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__
    return out


async def drive(url: str, jobs: list[Job], arm: str, seed: int) -> tuple[list[Outcome], float]:
    """Send every job at its time; wait for all; the outcomes and the makespan."""
    prompts = [job.prompt(arm, seed) for job in jobs]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600.0, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(_one(client, url, job, prompt, start) for job, prompt in zip(jobs, prompts))
        )
        return list(outcomes), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(outcomes: list[Outcome], seconds: float, makespan: float, slo: Slo) -> dict:
    done = [o for o in outcomes if o.error is None and o.ttft is not None]
    gaps = [g for o in done for g in o.gaps]
    worst = [max(o.gaps) for o in done if o.gaps]
    # Per request: TTFT, TPOT and worst gap (ms), kept so other SLOs can be applied later.
    samples = [
        (o.ttft, statistics.fmean(o.gaps) if o.gaps else 0.0, max(o.gaps, default=0.0))
        for o in done
    ]

    def goodput(scale: float, gap: bool = False) -> float:
        met = sum(
            1
            for ttft, tpot, longest in samples
            if ttft <= slo.ttft * scale
            and (longest <= slo.gap * scale if gap else tpot <= slo.tpot * scale)
        )
        return round(met / seconds, 3)

    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(done),
        "ttft_p50_ms": ms(_pct([o.ttft for o in done], 0.5)),
        "ttft_p99_ms": ms(_pct([o.ttft for o in done], 0.99)),
        "itl_p50_ms": ms(_pct(gaps, 0.5)),
        "itl_p99_ms": ms(_pct(gaps, 0.99)),
        "worst_gap_p50_ms": ms(_pct(worst, 0.5)),
        "worst_gap_max_ms": ms(max(worst) if worst else None),
        "throughput_rps": round(len(done) / makespan, 3),
        "tokens_per_s": round(sum(o.tokens for o in done) / makespan, 1),
        "goodput_rps": goodput(1.0),
        "goodput_tight_rps": goodput(0.5),
        "goodput_loose_rps": goodput(2.0),
        "goodput_gap_rps": goodput(1.0, gap=True),
        "samples_ms": [[ms(v) for v in sample] for sample in samples],
    }


def _arms(args: argparse.Namespace, a: str, b: str) -> dict[str, dict[str, Any]]:
    """Each arm: its proxy's pools and settings."""
    never = str(10**6)  # above every prompt: nothing is disaggregated
    arms = {
        "pd": {"prefill": [a], "decode": [b], "env": {}},
        "colocated": {
            "prefill": [a],
            "decode": [a, b],
            "env": {"PDPROXY_MIN_PREFILL_TOKENS": never},
        },
    }
    for threshold in args.min_prefill:
        arms[f"pd-min{threshold}"] = {
            "prefill": [a], "decode": [b], "env": {"PDPROXY_MIN_PREFILL_TOKENS": str(threshold)}
        }  # fmt: skip
    return arms


def run(args: argparse.Namespace) -> dict[str, Any]:
    from devkit import servers

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="goodput-"))
    longest = max(MIXES[m]["prompt"][2] + MIXES[m]["output"][2] for m in args.mixes)
    engines = servers.engine_pair(args.shape, log_dir, max_model_len=longest + 16)
    print(f"logs in {log_dir}", flush=True)
    servers.start_all(engines)
    proxies = {}
    try:
        a, b = (e.url for e in engines)
        for arm, spec in _arms(args, a, b).items():
            proc = servers.proxy_server(
                f"proxy-{arm}", log_dir, prefill_urls=spec["prefill"], decode_urls=spec["decode"],
                extra_env={"PDPROXY_LOG_LEVEL": "warning", **spec["env"]},
            )  # fmt: skip
            proxies[arm] = proc.start().wait_ready(60)
        # One request per arm first: every engine's and connection's first use is paid here.
        warm = workload(args.mixes[0], 4.0, 1.0, seed=-1)[:2]
        for arm, proc in proxies.items():
            asyncio.run(drive(proc.url, warm, arm, seed=-1))
        rows = []
        for mix in args.mixes:
            slo = MIXES[mix]["slo"]
            for turn, rate in enumerate(args.rates or MIXES[mix]["rates"]):
                jobs = workload(mix, rate, args.seconds, args.seed)
                arms = list(proxies.items())
                # Each rate starts with another arm: no arm always runs on the freshest box.
                for arm, proc in arms[turn % len(arms) :] + arms[: turn % len(arms)]:
                    outcomes, makespan = asyncio.run(drive(proc.url, jobs, arm, args.seed))
                    row = {"mix": mix, "rate": rate, "arm": arm}
                    row |= {f"{k}_slo_ms": v * 1000 for k, v in dataclasses.asdict(slo).items()}
                    row |= summarize(outcomes, args.seconds, makespan, slo)
                    rows.append(row)
                    print(_line(row), flush=True)
                    time.sleep(1.0)  # the servers drain before the next arm
        return {
            "benchmark": "goodput",
            "shape": args.shape,
            "seconds": args.seconds,
            "seed": args.seed,
            "rows": rows,
        }
    finally:
        for proc in [*proxies.values(), *engines]:
            proc.stop()


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['mix']:>5} rate {row['rate']:5.2f}/s {row['arm']:>12}: goodput "
        f"{row['goodput_rps']:.2f}/s (gap SLO {row['goodput_gap_rps']:.2f}/s) of "
        f"{row['requests']} req, TTFT p50/p99 "
        f"{row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms, ITL p50/p99 {row['itl_p50_ms']}/"
        f"{row['itl_p99_ms']} ms, worst gap max {row['worst_gap_max_ms']} ms, err {row['errors']}"
    )


def table(report: dict[str, Any]) -> str:
    head = (
        "| mix | rate/s | arm | goodput/s, TTFT+TPOT (½×, 1×, 2× SLO) | goodput/s, TTFT+gap | "
        "TTFT p50 / p99 ms | ITL p50 / p99 ms | worst gap p50 / max ms | req/s | errors |\n"
        "|---|---:|---|---|---:|---|---|---|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['mix']} | {r['rate']:g} | {r['arm']} | {r['goodput_tight_rps']:.2f}, "
        f"**{r['goodput_rps']:.2f}**, {r['goodput_loose_rps']:.2f} | "
        f"{r['goodput_gap_rps']:.2f} | {r['ttft_p50_ms']} / "
        f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | "
        f"{r['worst_gap_p50_ms']} / {r['worst_gap_max_ms']} | {r['throughput_rps']:.2f} | "
        f"{r['errors']} |\n"
        for r in report["rows"]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=("tiny", "small"))
    parser.add_argument("--mixes", default="chat,rag", type=lambda s: s.split(","))
    parser.add_argument("--rates", default=None, help="comma list (default: the mix's own)",
                        type=lambda s: [float(x) for x in s.split(",")])  # fmt: skip
    parser.add_argument("--seconds", type=float, default=40.0, help="arrivals per run")
    parser.add_argument("--min-prefill", default="", help="comma list: pd-min<N> arms",
                        type=lambda s: [int(x) for x in s.split(",") if x])  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    save(report, args.out, f"goodput-{args.shape}")
    return report


if __name__ == "__main__":
    main()
