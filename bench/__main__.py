"""``python -m bench`` (``make bench``): the proxy against the direct P/D path, side by side.

Starts one fake P and one fake D engine (``bench.fake_engine`` subprocesses), then for
each target -- ``direct-pd`` (the load generator runs both legs itself: a proxy with zero
overhead), ``pdproxy`` (``python -m proxy``), and where given vLLM's toy P/D proxy
(``--toy-proxy PATH``) and the Rust ``vllm-router`` (``--vllm-router PATH``) -- runs
closed-loop cells: streaming chat and completions at each concurrency. Every proxy is
pinned to one core with ``taskset`` (``--proxy-core``); the fakes and the load generator
share the other core(s). A last group runs ``pdproxy`` with ``PDPROXY_WORKERS=2`` over all
cores. Per cell: requests/s, token chunks/s, TTFT and its excess over direct-pd, the gaps
between tokens, errors, the proxy's CPU time per 1,000 streamed chunks (its process tree's
utime+stime over the measurement window, from /proc) and its memory.

Prints a markdown table and writes JSON (``--out``) plus the same table as markdown next
to it. ``--quick`` is a one-minute smoke run. Peers are optional: their code is never part
of this project; pass the toy proxy's file and the router's executable to include them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from devkit.servers import Process, free_port

from . import loadgen
from . import profile as profiling
from .fake_engine import chat_prompt_ids, generate, token_text
from .procstat import TreeMeter

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

DIRECT, PDPROXY, TOY, ROUTER = "direct-pd", "pdproxy", "toy-proxy", "vllm-router"


@dataclasses.dataclass
class Options:
    quick: bool
    concurrency: list[int]
    endpoints: list[str]
    duration: float
    duration_c1: float
    warmup: float
    tokens: int
    prefill_ms: float
    itl_ms: float
    proxy_core: int
    load_cores: str
    workers: list[int]
    workers_concurrency: list[int]
    toy_proxy: str | None
    vllm_router: str | None
    out: Path
    log_dir: Path
    proxy_env: dict[str, str]
    peer_log_level: str | None
    profile: list[tuple[str, int]]  # (endpoint, concurrency) cells whose window py-spy records


# --- processes ---------------------------------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def fake_process(name: str, opts: Options) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", opts.load_cores,
        sys.executable, "-m", "bench.fake_engine",
        "--port", str(port),
        "--prefill-ms", str(opts.prefill_ms),
        "--itl-ms", str(opts.itl_ms),
        "--tokens", str(opts.tokens),
        "--kv-lease-s", "30",
    ]  # fmt: skip
    return Process(name, argv, _env(), port, opts.log_dir / f"{name}.log", ready_path="/health")


def proxy_process(opts: Options, p_url: str, d_url: str, workers: int, cores: str) -> Process:
    port = free_port()
    env = _env()
    env.update(
        {
            "PDPROXY_PREFILL_URLS": p_url,
            "PDPROXY_DECODE_URLS": d_url,
            "PDPROXY_HOST": "127.0.0.1",
            "PDPROXY_PORT": str(port),
            "PDPROXY_WORKERS": str(workers),
        }
    )
    env.update(opts.proxy_env)
    argv = ["taskset", "-c", cores, sys.executable, "-m", "proxy"]
    return Process(f"pdproxy-w{workers}", argv, env, port, opts.log_dir / f"pdproxy-w{workers}.log", ready_path="/ready")


def toy_process(opts: Options, p_port: int, d_port: int) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", str(opts.proxy_core),
        sys.executable, opts.toy_proxy or "",
        "--host", "127.0.0.1", "--port", str(port),
        "--prefiller-hosts", "127.0.0.1", "--prefiller-ports", str(p_port),
        "--decoder-hosts", "127.0.0.1", "--decoder-ports", str(d_port),
    ]  # fmt: skip
    return Process(TOY, argv, _env(), port, opts.log_dir / "toy-proxy.log", ready_path="/healthcheck")


def router_process(opts: Options, p_url: str, d_url: str) -> Process:
    port = free_port()
    argv = [
        "taskset", "-c", str(opts.proxy_core),
        opts.vllm_router or "",
        "--vllm-pd-disaggregation",
        "--prefill", p_url, "--decode", d_url,
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()),
    ]  # fmt: skip
    if opts.peer_log_level:
        argv += ["--log-level", opts.peer_log_level]
    return Process(ROUTER, argv, _env(), port, opts.log_dir / "vllm-router.log", ready_path="/health")


# --- one cell ----------------------------------------------------------------------------


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
    # py-spy reads Python stacks: the Rust router has none worth sampling.
    want_profile = proxy is not None and target != ROUTER and (endpoint, concurrency) in opts.profile

    def on_window(which: str) -> None:
        if which == "start" and want_profile:
            out = opts.out.with_name(f"{opts.out.stem}-profile-{label}-{endpoint}-c{concurrency}.txt")
            spy["out"] = out
            spy["proc"] = profiling.start(proxy.pid, duration, out, cores=opts.load_cores)  # type: ignore[union-attr]
        fakes_at[which] = asyncio.ensure_future(fake_stats(p_url, d_url))
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
        "load_side_cpu_util": side_cpu / window if window else None,  # fakes + load generator, in cores
    }
    if profile_summary is not None:
        cell["profile"] = profile_summary
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
                        (marks["end"]["proxy_cpu_by_pid"][pid] - marks["start"]["proxy_cpu_by_pid"].get(pid, 0.0)) / window
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
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    # What one engine generates for this prompt: P's token + D's continuation must equal it.
    prompt = chat_prompt_ids(body["messages"]) if endpoint == "chat" else list(body["prompt"].encode())
    expected = "".join(token_text(t) for t in generate(prompt, tokens))
    got = "".join(text)
    return {"status": status, "mode": mode, "matches_single_engine": got == expected, "text": got[:80]}


# --- the run -----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    vllm = subprocess.run(["pgrep", "-af", "vllm.entrypoints"], capture_output=True, text=True, check=False).stdout.strip()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in ("fastapi", "starlette", "uvicorn", "httpx", "httpcore", "uvloop", "httptools", "orjson", "h11", "aiohttp"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    return {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "other_vllm_servers": vllm.splitlines(),
        "libs": libs,
    }


async def run_bench(opts: Options) -> dict[str, Any]:
    env = environment()
    if env["other_vllm_servers"]:
        print(f"WARNING: {len(env['other_vllm_servers'])} vLLM server process(es) running: numbers will be noisy", flush=True)
    nofile = raise_nofile()
    os.sched_setaffinity(0, {int(c) for c in _cores(opts.load_cores)})
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
                cores = str(opts.proxy_core) if workers == 1 else ",".join(str(c) for c in range(os.cpu_count() or 1))
                proc = proxy_process(opts, p.url, d.url, workers, cores)
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
                    sanity_checks[f"{label}/{endpoint}"] = await sanity(proc.url, endpoint, opts.tokens)
                for concurrency in concurrencies:
                    cell = await run_cell(opts, name, label, proc.url if proc else None, endpoint, concurrency, fakes, p.url, d.url, meter)
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
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
            "fake": {"prefill_ms": opts.prefill_ms, "itl_ms": opts.itl_ms, "tokens": opts.tokens},
        },
        "skipped": skipped,
        "sanity": sanity_checks,
        "cells": cells,
    }
    add_comparisons(results)
    return results


def _cores(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _progress(cell: dict[str, Any]) -> str:
    cpu = cell.get("proxy_cpu_us_per_chunk")
    return (
        f"{cell['label']:>16} {cell['endpoint']:>11} c={cell['concurrency']:<5} "
        f"{cell['requests_per_s']:8.1f} req/s {cell['chunks_per_s']:9.0f} chunks/s "
        f"ttft p50 {cell['ttft_ms'].get('p50', float('nan')):7.2f} ms  itl p99 {cell['itl_ms'].get('p99', float('nan')):7.2f} ms "
        f"err {cell['errors']}" + (f"  cpu {cpu:6.1f} us/chunk" if cpu else "")
    )


# --- comparisons, table ------------------------------------------------------------------


def add_comparisons(results: dict[str, Any]) -> None:
    cells = results["cells"]
    direct = {(c["endpoint"], c["concurrency"]): c for c in cells if c["target"] == DIRECT}
    for cell in cells:
        base = direct.get((cell["endpoint"], cell["concurrency"]))
        if cell["target"] == DIRECT or base is None:
            continue
        for p in ("p50", "p99"):
            ours, theirs = cell["ttft_ms"].get(p), base["ttft_ms"].get(p)
            if ours is not None and theirs is not None:
                cell[f"added_ttft_{p}_ms"] = ours - theirs
                cell[f"added_ttft_{p}_pct"] = 100 * (ours - theirs) / theirs if theirs else None

    def cpu(label: str, endpoint: str, conc: int) -> float | None:
        for c in cells:
            if c["label"] == label and c["endpoint"] == endpoint and c["concurrency"] == conc:
                return c.get("proxy_cpu_us_per_chunk")
        return None

    ratios: dict[str, Any] = {}
    for peer in (TOY, ROUTER):
        per_cell = {}
        for c in cells:
            if c["label"] != PDPROXY:
                continue
            ours, theirs = c.get("proxy_cpu_us_per_chunk"), cpu(peer, c["endpoint"], c["concurrency"])
            if ours and theirs:
                per_cell[f"{c['endpoint']}/c{c['concurrency']}"] = ours / theirs
        if per_cell:
            ratios[peer] = per_cell
    results["cpu_ratio_ours_over_peer"] = ratios

    # The targets, each against its measured value.
    targets: list[dict[str, Any]] = []
    for endpoint in sorted({c["endpoint"] for c in cells}):
        one = next((c for c in cells if c["label"] == PDPROXY and c["endpoint"] == endpoint and c["concurrency"] == 1), None)
        if one and "added_ttft_p50_ms" in one:
            targets.append(
                {
                    "target": f"added TTFT p50 at c=1 ({endpoint}) <= 1 ms",
                    "measured": f"{one['added_ttft_p50_ms']:.2f} ms",
                    "met": one["added_ttft_p50_ms"] <= 1.0,
                }
            )
        c256 = next((c for c in cells if c["label"] == PDPROXY and c["endpoint"] == endpoint and c["concurrency"] == 256), None)
        if c256 and c256.get("added_ttft_p50_pct") is not None:
            targets.append(
                {
                    "target": f"added TTFT at c=256 ({endpoint}) <= 10%",
                    "measured": f"p50 {c256['added_ttft_p50_pct']:.1f}% ({c256['added_ttft_p50_ms']:.2f} ms), "
                    f"p99 {c256['added_ttft_p99_pct']:.1f}% ({c256['added_ttft_p99_ms']:.2f} ms)",
                    "met": c256["added_ttft_p50_pct"] <= 10.0,
                }
            )
    for peer, limit in ((TOY, 1 / 3), (ROUTER, 1.0)):
        values = ratios.get(peer)
        if values:
            busy = {k: v for k, v in values.items() if not k.endswith("/c1")}
            worst = max((busy or values).values())
            targets.append(
                {
                    "target": f"proxy CPU per chunk / {peer}'s " + ("<= 1/3" if peer == TOY else "(parity = 1.0, aim)"),
                    "measured": f"worst {worst:.2f}x over c>1 cells; " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()),
                    "met": worst <= limit,
                }
            )
    big = [c for c in cells if c["label"] == PDPROXY and c["concurrency"] >= 1024]
    if big:
        targets.append(
            {
                "target": "zero errors at c=1024",
                "measured": ", ".join(f"{c['endpoint']}: {c['errors']}" for c in big),
                "met": all(c["errors"] == 0 for c in big),
            }
        )
        targets.append(
            {
                "target": "memory bounded (peak RSS at c=1024)",
                "measured": ", ".join(f"{c['endpoint']}: {c['proxy_rss_peak_mib']:.0f} MiB" for c in big),
                "met": None,
            }
        )
    results["targets"] = targets


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "–"
    return fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    env = results["environment"]
    lines = [
        f"Fakes: prefill {cfg['prefill_ms']:g} ms, {cfg['itl_ms']:g} ms between tokens, {cfg['tokens']} tokens per request; "
        f"proxies pinned to core {cfg['proxy_core']}, fakes + load generator on core(s) {cfg['load_cores']}. "
        f"{env['cpus']} CPUs ({env['cpu']}), Python {env['python']}, {env['time']}."
        + (f" **{len(env['other_vllm_servers'])} other vLLM server process(es) were running: noisy.**" if env["other_vllm_servers"] else ""),
        "",
        "| target | endpoint | conc | req/s | chunks/s | TTFT p50 ms | TTFT p99 ms | +TTFT p50 | +TTFT p99 | ITL p50 ms | ITL p99 ms | errors | proxy CPU µs/chunk | CPU-s/1k chunks | proxy cores | load-side cores | RSS peak MiB | new conns/req P, D |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["cells"]:
        added50 = c.get("added_ttft_p50_ms")
        added99 = c.get("added_ttft_p99_ms")
        lines.append(
            "| "
            + " | ".join(
                [
                    c["label"],
                    c["endpoint"],
                    str(c["concurrency"]),
                    _f(c["requests_per_s"], "{:.1f}"),
                    _f(c["chunks_per_s"], "{:.0f}"),
                    _f(c["ttft_ms"].get("p50")),
                    _f(c["ttft_ms"].get("p99")),
                    "–" if added50 is None else f"{added50:+.2f} ms ({c['added_ttft_p50_pct']:+.0f}%)",
                    "–" if added99 is None else f"{added99:+.2f} ms ({c['added_ttft_p99_pct']:+.0f}%)",
                    _f(c["itl_ms"].get("p50")),
                    _f(c["itl_ms"].get("p99")),
                    str(c["errors"]),
                    _f(c.get("proxy_cpu_us_per_chunk"), "{:.1f}"),
                    _f(c.get("proxy_cpu_s_per_1k_chunks"), "{:.3f}"),
                    _f(c.get("proxy_cpu_util")),
                    _f(c.get("load_side_cpu_util")),
                    _f(c.get("proxy_rss_peak_mib"), "{:.0f}"),
                    f"{_f(c.get('p_new_conns_per_request'))}, {_f(c.get('d_new_conns_per_request'))}",
                ]
            )
            + " |"
        )
    if results.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in results["targets"]:
            met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    for c in results["cells"]:
        prof = c.get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines += ["", f"Profile of {c['label']} {c['endpoint']} c={c['concurrency']}: {prof['error']}"]
            continue
        libs = ", ".join(f"{k} {v:.0f}%" for k, v in prof["by_library_pct"].items() if v >= 1)
        top = ", ".join(f"{k} {v:.0f}%" for k, v in prof["top_self_pct"][:8])
        lines += [
            "",
            f"Profile of {c['label']} {c['endpoint']} c={c['concurrency']} ({prof['samples']} samples, {prof['file']}):",
            f"- by library: {libs}",
            f"- hottest functions (self): {top}",
        ]
    if results.get("skipped"):
        lines += [""] + [f"- skipped {k}: {v}" for k, v in results["skipped"].items()]
    unstitched = [
        f"{c['label']} {c['endpoint']} c={c['concurrency']}: {c['served_modes']}"
        for c in results["cells"]
        if c.get("served_modes") and set(c["served_modes"]) != {"stitched"}
    ]
    if unstitched:
        lines += ["", "- **not every answer was served stitched** (x-pdproxy-mode): " + "; ".join(unstitched)]
    bad = {k: v for k, v in results.get("sanity", {}).items() if v.get("status") != 200 or not v.get("matches_single_engine")}
    if bad:
        lines += [""] + [f"- sanity check failed for {k}: {v}" for k, v in bad.items()]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (c=1,32, short cells, no worker scaling)")
    parser.add_argument("--concurrency", type=_ints, default=None, help="comma list (default 1,32,256,1024)")
    parser.add_argument("--endpoints", default="chat,completions")
    parser.add_argument("--duration", type=float, default=None, help="measurement window per cell, seconds (default 8)")
    parser.add_argument("--duration-c1", type=float, default=None, help="window of the c=1 cells (default 16)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before each window (default 2)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--proxy-core", type=int, default=0)
    parser.add_argument("--load-cores", default=None, help="cores of the fakes and the load generator (default: all but the proxy's)")
    parser.add_argument("--workers", type=_ints, default=None, help="PDPROXY_WORKERS values to run (default 1,2)")
    parser.add_argument("--workers-concurrency", type=_ints, default=None, help="concurrency of the workers>1 cells (default 256,1024)")
    parser.add_argument("--toy-proxy", default=os.environ.get("BENCH_TOY_PROXY"), help="path of vLLM's toy_proxy_server.py")
    parser.add_argument("--vllm-router", default=os.environ.get("BENCH_VLLM_ROUTER"), help="path of the vllm-router executable")
    parser.add_argument("--peer-log-level", default=None, help="--log-level for vllm-router (default: its own, info)")
    parser.add_argument("--proxy-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for pdproxy")
    parser.add_argument("--profile", action="append", default=[], metavar="ENDPOINT:CONC", help="py-spy the proxies during this cell (repeatable), e.g. chat:256")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/bench-<time>.json)")
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    load_cores = args.load_cores or ",".join(str(c) for c in range(cpus) if c != args.proxy_core) or str(args.proxy_core)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"bench-{'quick-' if args.quick else ''}{stamp}.json"
    proxy_env = dict(item.split("=", 1) for item in args.proxy_env)
    return Options(
        quick=args.quick,
        concurrency=args.concurrency or ([1, 32] if args.quick else [1, 32, 256, 1024]),
        endpoints=[e for e in args.endpoints.split(",") if e],
        duration=args.duration or (3.0 if args.quick else 8.0),
        duration_c1=args.duration_c1 or (4.0 if args.quick else 16.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        tokens=args.tokens,
        prefill_ms=args.prefill_ms,
        itl_ms=args.itl_ms,
        proxy_core=args.proxy_core,
        load_cores=load_cores,
        workers=args.workers or ([1] if args.quick else [1, 2]),
        workers_concurrency=args.workers_concurrency or [256, 1024],
        toy_proxy=args.toy_proxy,
        vllm_router=args.vllm_router,
        out=out,
        log_dir=out.parent / (out.stem + "-logs"),
        proxy_env=proxy_env,
        peer_log_level=args.peer_log_level,
        profile=[(e, int(c)) for e, c in (item.split(":") for item in args.profile)],
    )


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    try:
        import uvloop

        results = uvloop.run(run_bench(opts))
    except ImportError:  # pragma: no cover
        results = asyncio.run(run_bench(opts))
    results["command"] = " ".join([Path(sys.executable).name, "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    table = markdown(results)
    print()
    print(table)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2, default=str))
    opts.out.with_suffix(".md").write_text(f"`{results['command']}`\n\n" + table)
    print(f"wrote {opts.out} and {opts.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
