"""One measurement cell (a target, an endpoint, a concurrency), and the whole run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from devkit.servers import Process

from . import loadgen, sse, stalls
from . import profile as profiling
from .fake import chat_prompt_ids, generate, token_text
from .options import DIRECT, PDPROXY, ROUTER, TOY, Options
from .procstat import TreeMeter
from .report import add_comparisons
from .targets import (
    cores,
    environment,
    fake_process,
    proxy_process,
    raise_nofile,
    router_process,
    toy_process,
)


async def run_cell(
    opts: Options,
    target: str,
    label: str,
    url: str | None,
    endpoint: str,
    concurrency: int,
    fakes: list[TreeMeter],
    p_url: str,
    d_url: str,
    proxy: TreeMeter | None,
) -> dict[str, Any]:
    duration = opts.duration_c1 if concurrency == 1 else opts.duration
    spec = loadgen.LoadSpec(
        url=url or "",
        endpoint=endpoint,
        mode="direct-pd" if target == DIRECT else "proxy",
        prefill_url=p_url,
        decode_url=d_url,
        concurrency=concurrency,
        duration=duration,
        warmup=opts.warmup,
        tokens=opts.tokens,
        ramp=min(opts.warmup, 1.0),
        timeout=120.0,
        keep_samples=False,
    )
    marks: dict[str, dict[str, Any]] = {}
    spy: dict[str, Any] = {}
    fakes_at: dict[str, asyncio.Future[dict[str, dict[str, Any]]]] = {}
    stalls_at: dict[str, asyncio.Future[dict[str, float] | None]] = {}
    # pdproxy reports its own event-loop stalls; the other targets have no such metric.
    want_stalls = proxy is not None and url is not None and target not in (ROUTER, TOY)
    # py-spy reads Python stacks: the Rust router has none worth sampling.
    want_profile = (
        proxy is not None and target != ROUTER and (endpoint, concurrency) in opts.profile
    )

    def on_window(which: str) -> None:
        if which == "start" and want_profile:
            out = opts.out.with_name(
                f"{opts.out.stem}-profile-{label}-{endpoint}-c{concurrency}.txt"
            )
            spy["out"] = out
            spy["proc"] = profiling.start(proxy.pid, duration, out, cores=opts.load_cores)  # type: ignore[union-attr]
        fakes_at[which] = asyncio.ensure_future(fake_stats(p_url, d_url))
        if want_stalls:
            stalls_at[which] = asyncio.ensure_future(stalls.scrape(url))
        marks[which] = {
            "t": time.perf_counter(),
            "proxy_cpu": proxy.cpu() if proxy else 0.0,
            "proxy_cpu_by_pid": proxy.cpu_by_pid() if proxy else {},
            "fakes_cpu": sum(f.cpu() for f in fakes),
            "self_cpu": time.process_time(),
        }

    rss_samples: list[int] = []

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(1.0)
            if proxy is not None:
                rss_samples.append(proxy.rss())

    sampler = asyncio.ensure_future(sample_rss())
    try:
        result = await loadgen.run(spec, on_window)
    finally:
        sampler.cancel()
    before, after = await fakes_at["start"], await fakes_at["end"]
    profile_summary = None
    if spy.get("proc") is not None:
        try:
            spy["proc"].wait(timeout=duration + 30)
            profile_summary = profiling.summarize(spy["out"]) | {"file": str(spy["out"])}
        except Exception as exc:  # noqa: BLE001 - a failed profile must not fail the run
            profile_summary = {"error": f"{type(exc).__name__}: {exc}"}
    elif want_profile:
        profile_summary = {"error": "py-spy not found (pip install py-spy)"}
    window = marks["end"]["t"] - marks["start"]["t"]
    proxy_cpu = marks["end"]["proxy_cpu"] - marks["start"]["proxy_cpu"]
    side_cpu = (marks["end"]["fakes_cpu"] - marks["start"]["fakes_cpu"]) + (
        marks["end"]["self_cpu"] - marks["start"]["self_cpu"]
    )
    chunks = result.chunks_in_window
    cell = {
        "target": target,
        "label": label,
        "endpoint": endpoint,
        "concurrency": concurrency,
        "window_s": window,
        "requests_per_s": result.requests_per_s,
        "chunks_per_s": result.chunks_per_s,
        "chunks_in_window": chunks,
        "requests_counted": result.requests_started,
        "chunks_per_request": result.chunks_per_request,
        "errors": result.errors,
        "error_kinds": result.error_kinds,
        "served_modes": result.served_modes,
        "ttft_ms": result.ttft_ms,
        "itl_ms": result.itl_ms,
        "e2e_ms": result.e2e_ms,
        "load_side_cpu_util": side_cpu / window
        if window
        else None,  # fakes + load generator, in cores
    }
    if profile_summary is not None:
        cell["profile"] = profile_summary
    if want_stalls:
        cell["stalls"] = stalls.window(await stalls_at["start"], await stalls_at["end"])
    # New TCP connections the fakes accepted per generation they served in the window: ~0
    # when connections are kept alive, ~1 when every request opens one.
    for leg, fake_url in (("p", p_url), ("d", d_url)):
        served = after[fake_url]["completed"] - before[fake_url]["completed"]
        opened = after[fake_url]["connections_total"] - before[fake_url]["connections_total"]
        cell[f"{leg}_new_conns_per_request"] = opened / served if served else None
    if proxy is not None:
        cell.update(
            {
                "proxy_cpu_s": proxy_cpu,
                "proxy_cpu_util": proxy_cpu / window if window else None,  # in cores
                "proxy_cpu_s_per_1k_chunks": (proxy_cpu / chunks * 1000) if chunks else None,
                "proxy_cpu_us_per_chunk": (proxy_cpu / chunks * 1e6) if chunks else None,
                # Each process of the proxy's tree (workers > 1: is the load spread?), in cores.
                "proxy_cpu_util_by_process": sorted(
                    (
                        (
                            marks["end"]["proxy_cpu_by_pid"][pid]
                            - marks["start"]["proxy_cpu_by_pid"].get(pid, 0.0)
                        )
                        / window
                        for pid in marks["end"]["proxy_cpu_by_pid"]
                    ),
                    reverse=True,
                )
                if window
                else None,
                "proxy_rss_mib": proxy.rss() / 2**20,
                "proxy_rss_peak_mib": max(rss_samples + [proxy.peak_rss]) / 2**20,
            }
        )
    return cell


async def fake_stats(*urls: str) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        return {url: (await client.get(url + "/fake/stats")).json() for url in urls}


async def sanity(url: str, endpoint: str, tokens: int) -> dict[str, Any]:
    """One streamed request: its serving mode, and the text (compared with direct-pd)."""
    body = loadgen.request_body(loadgen.LoadSpec(endpoint=endpoint, tokens=tokens))
    text, mode = [], None
    async with (
        httpx.AsyncClient(timeout=30, trust_env=False) as client,
        client.stream("POST", url + loadgen.PATHS[endpoint], json=body) as response,
    ):
        mode = response.headers.get("x-pdproxy-mode")
        status = response.status_code
        async for line in sse.alines(response):
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    text.append(
                        choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    )
    # What one engine generates for this prompt: P's token + D's continuation must equal it.
    prompt = (
        chat_prompt_ids(body["messages"]) if endpoint == "chat" else list(body["prompt"].encode())
    )
    expected = "".join(token_text(t) for t in generate(prompt, tokens))
    got = "".join(text)
    return {
        "status": status,
        "mode": mode,
        "matches_single_engine": got == expected,
        "text": got[:80],
    }


# --- the run -----------------------------------------------------------------------------


async def run_bench(opts: Options) -> dict[str, Any]:
    env = environment()
    if env["other_vllm_servers"]:
        print(
            f"WARNING: {len(env['other_vllm_servers'])} vLLM server process(es) running: "
            "numbers will be noisy",
            flush=True,
        )
    nofile = raise_nofile()
    os.sched_setaffinity(0, {int(c) for c in cores(opts.load_cores)})
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    p = fake_process("fake-p", opts)
    d = fake_process("fake-d", opts)
    started: list[Process] = []
    cells: list[dict[str, Any]] = []
    sanity_checks: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    try:
        for proc in (p, d):
            proc.start()
            started.append(proc)
        for proc in (p, d):
            proc.wait_ready(30)
        fakes = [TreeMeter(p.proc.pid), TreeMeter(d.proc.pid)]  # type: ignore[union-attr]
        targets: list[tuple[str, Process | None, int]] = [(DIRECT, None, 1), (PDPROXY, None, 1)]
        if opts.toy_proxy:
            if Path(opts.toy_proxy).is_file():
                targets.append((TOY, None, 1))
            else:
                skipped[TOY] = f"{opts.toy_proxy} not found"
        else:
            skipped[TOY] = "no --toy-proxy given"
        if opts.vllm_router:
            if Path(opts.vllm_router).is_file() and os.access(opts.vllm_router, os.X_OK):
                targets.append((ROUTER, None, 1))
            else:
                skipped[ROUTER] = f"{opts.vllm_router} is not an executable"
        else:
            skipped[ROUTER] = "no --vllm-router given"
        for workers in opts.workers:
            if workers > 1:
                targets.append((PDPROXY, None, workers))

        for name, _, workers in targets:
            label = name if workers == 1 else f"{name} w{workers}"
            proc: Process | None = None
            if name == PDPROXY:
                proxy_cores = (
                    str(opts.proxy_core)
                    if workers == 1
                    else ",".join(str(c) for c in range(os.cpu_count() or 1))
                )
                proc = proxy_process(opts, p.url, d.url, workers, proxy_cores)
            elif name == TOY:
                proc = toy_process(opts, p.port, d.port)
            elif name == ROUTER:
                proc = router_process(opts, p.url, d.url)
            if proc is not None:
                proc.start()
                started.append(proc)
                try:
                    proc.wait_ready(60)
                except (RuntimeError, TimeoutError) as exc:
                    skipped[label] = f"did not start: {str(exc)[-400:]}"
                    print(f"skipping {label}: {skipped[label]}", flush=True)
                    proc.stop()
                    continue
            meter = TreeMeter(proc.proc.pid) if proc is not None else None  # type: ignore[union-attr]
            concurrencies = opts.concurrency if workers == 1 else opts.workers_concurrency
            for endpoint in opts.endpoints:
                if proc is not None:
                    sanity_checks[f"{label}/{endpoint}"] = await sanity(
                        proc.url, endpoint, opts.tokens
                    )
                for concurrency in concurrencies:
                    cell = await run_cell(
                        opts,
                        name,
                        label,
                        proc.url if proc else None,
                        endpoint,
                        concurrency,
                        fakes,
                        p.url,
                        d.url,
                        meter,
                    )
                    cell["workers"] = workers if name == PDPROXY else None
                    cells.append(cell)
                    print(_progress(cell), flush=True)
                    await asyncio.sleep(0.5)
            if proc is not None:
                proc.stop()
                started.remove(proc)
    finally:
        for proc in reversed(started):
            proc.stop()
    env["loadavg_end"] = os.getloadavg()
    env["nofile"] = nofile
    results = {
        "environment": env,
        "config": {
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(opts).items()
            },
            "fake": {"prefill_ms": opts.prefill_ms, "itl_ms": opts.itl_ms, "tokens": opts.tokens},
        },
        "skipped": skipped,
        "sanity": sanity_checks,
        "cells": cells,
    }
    add_comparisons(results)
    return results


def _progress(cell: dict[str, Any]) -> str:
    cpu = cell.get("proxy_cpu_us_per_chunk")
    return (
        f"{cell['label']:>16} {cell['endpoint']:>11} c={cell['concurrency']:<5} "
        f"{cell['requests_per_s']:8.1f} req/s {cell['chunks_per_s']:9.0f} chunks/s "
        f"ttft p50 {cell['ttft_ms'].get('p50', float('nan')):7.2f} ms "
        f"p99 {cell['ttft_ms'].get('p99', float('nan')):7.2f} ms  "
        f"itl p99 {cell['itl_ms'].get('p99', float('nan')):7.2f} ms "
        f"err {cell['errors']}"
        + (f"  cpu {cpu:6.1f} us/chunk" if cpu else "")
        + (f"  {stalls.describe(cell['stalls'])}" if cell.get("stalls") else "")
    )


# --- comparisons, table ------------------------------------------------------------------
