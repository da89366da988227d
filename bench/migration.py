"""The pause a stream sees when it moves to another decode server, on real vLLM CPU servers.

``python -m bench.migration [--shape tiny|small|8b-gpu] [--lengths 256,1024,2048] [--reps 8]
[--tokens 1536]``

Starts two vLLM servers with the PDConnector (on CPU each on its own core; ``8b-gpu``:
both on the one GPU, see below) and two proxies
in front of both: one moves streams with their KV (``PDPROXY_MIGRATE_KV=true``, the
default), one by recomputing (``false``). Requests run colocated (one server per answer,
``PDPROXY_MIN_PREFILL_TOKENS`` above every prompt), so a round is exactly: a stream of
fresh random token ids of the given context length starts on server A (B drained); after
16 chunks, B is undrained and A drained, which moves the stream to B; the stream ends.
Rounds alternate the two proxies and the direction, so both kinds share conditions.

Per kind and context length: the stream's pause at the move as its client saw it (the
largest gap between chunks after the drain) p50 and max, next to the same stream's
ordinary inter-token gap (median of the gaps before the drain) and the proxy's own
``pause_ms`` from its ``stream_moved`` log line; ``kv_tokens`` is how much KV came over.
``--shape small`` uses devkit's ``small`` model (64 KiB of KV per token), where both the
transfer and the recompute cost something; the tiny one shows the floor. ``--shape
8b-gpu`` (``bench/gpu/device.sh migration``) serves the Llama-3-8B shape of
``bench/gpu/realsize.py`` (random weights, 128 KiB of KV per token, CUDA graphs for
decode steps) twice on the one GPU: the KV moves over CUDA IPC, and a recompute is a
real prefill of the whole context.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from . import sse
from .results import save

ADMIN = "bench-admin"
AUTH = {"authorization": f"Bearer {ADMIN}"}
BEFORE_MOVE = 16  # chunks relayed before the drain
TOKENS = 1536  # tokens per stream: long enough to be moved mid-way (~2 s on the tiny model)
SHAPES = ("tiny", "small", "8b-gpu")


class NotMoved(Exception):
    """The stream ended before the drain reached it."""


def _drain(proxy_url: str, url: str, draining: bool) -> int:
    answer = httpx.post(
        proxy_url + "/admin/instances/drain",
        json={"role": "decode", "url": url, "draining": draining},
        headers=AUTH,
        timeout=10,
    )
    answer.raise_for_status()
    return int(answer.json()["moving_streams"])


def one_round(
    proxy_url: str, source: str, target: str, length: int, tokens: int, rng: random.Random
) -> dict[str, Any]:
    """One stream moved from ``source`` to ``target`` mid-way; its timings."""
    _drain(proxy_url, target, True)
    _drain(proxy_url, source, False)
    body = {
        "model": "tiny",
        "prompt": [rng.randrange(300, 600) for _ in range(length)],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    request_id = f"move-{uuid.uuid4().hex[:12]}"
    times: list[float] = []
    ready = threading.Event()
    moved_at: list[float] = []
    error: list[BaseException] = []

    def read() -> None:
        try:
            with httpx.Client(timeout=300) as client:
                with client.stream(
                    "POST",
                    proxy_url + "/v1/completions",
                    json=body,
                    headers={"x-request-id": request_id},
                ) as response:
                    response.raise_for_status()
                    for line in sse.lines(response):
                        if line.startswith("data: {"):
                            times.append(time.perf_counter())
                            if len(times) == BEFORE_MOVE:
                                ready.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            error.append(exc)
            ready.set()

    reader = threading.Thread(target=read)
    reader.start()
    ready.wait(300)
    _drain(proxy_url, target, False)
    moved_at.append(time.perf_counter())
    moving = _drain(proxy_url, source, True)
    reader.join(300)
    if error:
        raise error[0]
    if moving != 1:
        raise NotMoved()
    gaps = [b - a for a, b in zip(times, times[1:])]
    before = gaps[1 : BEFORE_MOVE - 1]
    after = [b - a for a, b in zip(times, times[1:]) if b > moved_at[0]]
    return {"pause": max(after), "itl": statistics.median(before), "request_id": request_id}


def moves_logged(log_path: Path) -> list[dict[str, Any]]:
    """The proxy's ``stream_moved`` events: its log lines are JSON, and the event is the
    line's message, itself JSON (so its quotes arrive escaped)."""
    out = []
    for line in log_path.read_text().splitlines():
        if "stream_moved" not in line:
            continue
        try:
            message = json.loads(line).get("msg")
            moved = json.loads(message) if isinstance(message, str) else None
        except (ValueError, AttributeError):
            continue
        if isinstance(moved, dict) and moved.get("event") == "stream_moved":
            out.append(moved)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from devkit import servers

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="migration-"))
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + args.tokens + 16
    if args.shape == "8b-gpu":
        from bench.gpu import realsize  # the GPU machine's engines

        engines = realsize.engine_pair(log_dir, max_model_len=max_len)
    else:
        engines = servers.engine_pair(args.shape, log_dir, max_model_len=max_len)
    print(f"logs in {log_dir}", flush=True)
    servers.start_all(engines, timeout=420)
    proxies = {}
    try:
        for kind, with_kv in (("kv", "true"), ("recompute", "false")):
            proc = servers.proxy_server(
                f"proxy-{kind}",
                log_dir,
                prefill_urls=[engines[0].url],  # never used: every prompt runs colocated
                decode_urls=[e.url for e in engines],
                extra_env={
                    "PDPROXY_ADMIN_KEY": ADMIN,
                    "PDPROXY_MIGRATE_KV": with_kv,
                    "PDPROXY_MIN_PREFILL_TOKENS": str(10 * max(lengths)),
                    "PDPROXY_HEALTH_INTERVAL": "1",
                    "PDPROXY_LOG_LEVEL": "info",
                },
            )
            proxies[kind] = proc.start().wait_ready(60)
        time.sleep(3)  # the health checks learn the connectors
        rng = random.Random(args.seed)
        results: dict[str, dict[int, list[dict[str, Any]]]] = {k: {} for k in proxies}
        unmoved = {k: 0 for k in proxies}
        a, b = (e.url for e in engines)
        for length in lengths:
            for rep in range(args.reps + 1):  # the first round of each length warms up
                for kind, proc in proxies.items():
                    source, target = (a, b) if rep % 2 == 0 else (b, a)
                    timing = None
                    for _ in range(6):  # a stream may outrun the drain on a starved box
                        try:
                            timing = one_round(proc.url, source, target, length, args.tokens, rng)
                            time.sleep(0.2)  # its log line is written as the move ends
                            moved = {m["request_id"] for m in moves_logged(proc.log_path)}
                            if timing["request_id"] not in moved:
                                raise NotMoved()  # asked too late: it ended where it was
                            break
                        except NotMoved:
                            unmoved[kind] += 1
                            timing = None  # that stream does not count
                    if timing is None:
                        raise RuntimeError("six streams in a row ended before they moved")
                    if rep:
                        results[kind].setdefault(length, []).append(timing)
            print(f"context {length}: done", flush=True)
        time.sleep(0.5)
        report: dict[str, Any] = {
            "shape": args.shape,
            "tokens": args.tokens,
            "rows": [],
            "unmoved_rounds": unmoved,
        }
        for kind, proc in proxies.items():
            logged = {m["request_id"]: m for m in moves_logged(proc.log_path)}
            assert all(m["kind"] == kind for m in logged.values()), logged
            for length in lengths:
                rounds = results[kind][length]
                pauses = sorted(r["pause"] * 1000 for r in rounds)
                moves = [logged[r["request_id"]] for r in rounds]
                proxy_pauses = sorted(m["pause_ms"] for m in moves)
                report["rows"].append(
                    {
                        "kind": kind,
                        "context": length,
                        "n": len(rounds),
                        "pause_p50_ms": round(statistics.median(pauses), 1),
                        "pause_max_ms": round(pauses[-1], 1),
                        "proxy_pause_p50_ms": round(statistics.median(proxy_pauses), 1),
                        "itl_p50_ms": round(statistics.median(r["itl"] for r in rounds) * 1000, 1),
                        "kv_tokens_p50": statistics.median(m["kv_tokens"] for m in moves),
                    }
                )
        return report
    finally:
        for proc in [*proxies.values(), *engines]:
            proc.stop()


def table(report: dict[str, Any]) -> str:
    head = (
        "| move | context | n | pause p50 | pause max | proxy's pause p50 | ITL p50 | KV tokens |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['kind']} | {r['context']} | {r['n']} | {r['pause_p50_ms']} ms | "
        f"{r['pause_max_ms']} ms | {r['proxy_pause_p50_ms']} ms | {r['itl_p50_ms']} ms | "
        f"{r['kv_tokens_p50']:.0f} |\n"
        for r in report["rows"]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=SHAPES)
    parser.add_argument("--lengths", default="256,1024,2048")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    save(report, args.out, f"migration-{args.shape}")
    return report


if __name__ == "__main__":
    main()
