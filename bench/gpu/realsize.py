"""The hand-off at a real model's size, on one GPU, against a single vLLM in the same run.

Run by ``bench/gpu/device.sh realsize`` on the GPU machine (README: "The GPU run").

1. A Llama-3-8B-shaped model with random weights (``--load-format dummy``: 32 layers,
   8 KV heads of 128, bf16, 128 KiB of KV per token; the test tokenizer), served three
   times on the one GPU: a plain vLLM (the baseline), and a prefill and a decode vLLM
   with the PDConnector (``transport: auto``), the proxy in front of those two.
2. For prompts of 1k, 4k and 16k fresh random token ids (no prefix-cache help), each
   streamed through the proxy and to the plain vLLM (16 tokens, greedy,
   ``ignore_eos``): time to token 1, the gap from token 1 to token 2 (through the
   proxy: P's token, then D's first after the KV moved), and the decode step (median
   gap between later tokens). The connector's counters give each pull's bytes and time.
3. With the servers gone, device copies in this process for the same KV layout: a
   contiguous device-to-device copy (the bandwidth any transfer is measured against),
   the block-copy kernel in-process and out of another process's memory mapped over
   CUDA IPC, and torch's index ops; and what happens to such a mapping when the
   process that exported it is killed.

Writes ``$OUT/realsize.json`` and prints a table. ``--cpu`` runs the same flow on vLLM
CPU with the tiny model and short prompts (a rehearsal of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import sse  # noqa: E402
from devkit import servers, tiny_model  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GPU_ARGS = [
    "--load-format",
    "dummy",
    "--dtype",
    "bfloat16",
    "--gpu-memory-utilization",
    "0.28",
    "--kv-cache-memory-bytes",
    str(8 << 30),
]
EAGER = ["--enforce-eager"]
# CUDA graphs for decode batches only, no torch.compile: starts in seconds, and a
# decode step (and D's first step, one token on loaded KV) is a graph replay.
GRAPHS = [
    "-cc.mode=none",
    "-cc.cudagraph_mode=FULL_DECODE_ONLY",
    "-cc.max_cudagraph_capture_size=8",
]


def shaped_model(tiny: Path, out: Path) -> Path:
    """The 8B shape with the tiny model's tokenizer (no weights: vLLM makes them up)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    tiny_config = json.loads((tiny / "config.json").read_text())
    config = dict(
        LLAMA3_8B,
        vocab_size=tiny_config["vocab_size"],
        bos_token_id=tiny_config.get("bos_token_id"),
        eos_token_id=tiny_config.get("eos_token_id"),
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def engine_pair(log_dir: Path, max_model_len: int) -> list:
    """Two engines of the 8B shape with the PDConnector on the one GPU, CUDA graphs for
    decode steps: ``bench.migration --shape 8b-gpu`` moves streams between them."""
    tiny = tiny_model.build(Path("/root/tiny-llama"))
    model = shaped_model(tiny, Path("/root/llama3-8b-shape"))
    return [
        servers.vllm_server(
            name,
            model,
            log_dir,
            kv_transfer_config=servers.pd_connector_config(host="127.0.0.1"),
            max_model_len=max_model_len,
            extra_args=GPU_ARGS + GRAPHS,
            extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"},
        )
        for name in ("a", "b")
    ]


def stream_times(client: httpx.Client, url: str, body: dict) -> tuple[list[float], str]:
    """Arrival time of every streamed token chunk (seconds from sending), and the mode."""
    start = time.perf_counter()
    times = []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        mode = response.headers.get("x-pdproxy-mode", "single")
        for line in sse.lines(response):
            if line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                times.append(time.perf_counter() - start)
    return times, mode


def stats(url: str) -> dict:
    return httpx.get(url + "/pd/stats", timeout=10).json()


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def measure(
    ref_url: str,
    proxy_url: str,
    d_ctl: str,
    sizes,
    count: int,
    vocab: int,
    model: str,
    max_tokens: int,
) -> list[dict]:
    rng = random.Random(2026)
    rows = []
    with httpx.Client(timeout=600) as client:
        # Warm-up: first requests pay one-off costs (CUDA IPC mapping, kernel builds).
        for target in (ref_url, proxy_url):
            body = {
                "model": model,
                "prompt": [rng.randrange(3, vocab) for _ in range(64)],
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            stream_times(client, target, body)
        for size in sizes:
            ref, cached, pd, pulls = [], [], [], []
            for _ in range(count):
                prompt = [rng.randrange(3, vocab) for _ in range(size)]
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                ref.append(stream_times(client, ref_url, body)[0])
                # What D does in a hand-off, on one vLLM with no transfer: a new request
                # whose prompt is cached but for its last token.
                again = dict(body, prompt=[*prompt, rng.randrange(3, vocab)])
                cached.append(stream_times(client, ref_url, again)[0])
                before = stats(d_ctl)
                times, mode = stream_times(client, proxy_url, body)
                time.sleep(0.2)  # the connector's counters arrive with D's next step
                after = stats(d_ctl)
                pd.append((times, mode))
                pulls.append(
                    {
                        k: after.get(k, 0) - before.get(k, 0)
                        for k in (
                            "bytes_received",
                            "transfer_seconds_total",
                            "kv_wait_seconds_total",
                            "move_seconds_total",
                            "transfers_ok",
                            "transfers_failed",
                            "transfers_ipc",
                            "transfers_host",
                            "transfers_nccl",
                        )
                    }
                )
            rows.append(summarise(size, ref, cached, pd, pulls))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(size: int, ref: list, cached: list, pd: list, pulls: list[dict]) -> dict:
    def med(values):
        return ms(statistics.median(values)) if values else None

    stitched = [t for t, mode in pd if mode == "stitched" and len(t) > 2]
    steps = [b - a for t in ref for a, b in zip(t[1:], t[2:])]
    moved = sum(p["bytes_received"] for p in pulls)
    seconds = sum(p["transfer_seconds_total"] for p in pulls)
    ok = sum(p["transfers_ok"] for p in pulls)
    return {
        "prompt_tokens": size,
        "requests": len(ref),
        "single_ttft_ms": med([t[0] for t in ref]),
        "single_gap_ms": med([t[1] - t[0] for t in ref]),
        "single_step_ms": med(steps),
        "single_cached_ttft_ms": med([t[0] for t in cached]),
        "pd_ttft_ms": med([t[0] for t, _ in pd]),
        "pd_gap_ms": med([t[1] - t[0] for t in stitched]),
        "pd_gaps_ms": [ms(t[1] - t[0]) for t in stitched],
        "pd_step_ms": med([b - a for t in stitched for a, b in zip(t[1:], t[2:])]),
        "modes": {m: sum(1 for _, x in pd if x == m) for m in {x for _, x in pd}},
        "kv_bytes_per_pull": moved // max(1, ok),
        "pull_ms": ms(seconds / max(1, ok)),
        "copy_ms": ms(sum(p["move_seconds_total"] for p in pulls) / max(1, ok)),
        "pull_gb_s": round(moved / seconds / 1e9, 3) if seconds else None,
        "kv_wait_ms": ms(sum(p["kv_wait_seconds_total"] for p in pulls) / max(1, ok)),
        "pulls_ok": ok,
        "pulls_failed": sum(p["transfers_failed"] for p in pulls),
        "paths": {k: sum(p[f"transfers_{k}"] for p in pulls) for k in ("ipc", "nccl", "host")},
    }


# ---------------------------------------------------------------- device copies

PEER = r"""
import json, sys, torch
from engine_ext.transport_ipc import export_caches
layers, blocks, shape = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(1)
caches = [torch.randn((blocks, *shape), device="cuda").to(torch.bfloat16) for _ in range(layers)]
torch.cuda.synchronize()
print(json.dumps(export_caches(caches)), flush=True)
sys.stdin.readline()  # hold the memory until told (or killed)
"""


def timed(fn, repeats: int = 10) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def contiguous_copy(nbytes: int, dev) -> float:
    """Seconds per contiguous device-to-device copy of ``nbytes`` in this process."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return timed(lambda: b.copy_(a))


def copy_bench(kv_bytes: int = 512 << 20) -> dict:
    """Device copies of ``kv_bytes`` of KV laid out like the 8B model's (32 layers,
    blocks of 16 tokens x 8 heads x 256 (K and V of 128) bf16 = 64 KiB per layer)."""
    import torch

    from engine_ext import block_copy
    from engine_ext.transport_ipc import open_caches

    layers, shape = 32, [8, 16, 256]
    per_block = 32 * 8 * 16 * 256 * 2
    moved_blocks = kv_bytes // per_block
    total_blocks = moved_blocks * 2 + 8
    rng = random.Random(7)
    src_ids = rng.sample(range(1, total_blocks), moved_blocks)
    dst_ids = rng.sample(range(1, total_blocks), moved_blocks)
    dev = torch.device("cuda", 0)
    local_src = [
        torch.randn((total_blocks, *shape), device=dev).to(torch.bfloat16) for _ in range(layers)
    ]
    dst = [
        torch.zeros((total_blocks, *shape), device=dev, dtype=torch.bfloat16) for _ in range(layers)
    ]
    dims = [0] * layers
    out: dict = {"kv_bytes": kv_bytes, "blocks": moved_blocks, "runs": moved_blocks * layers}

    def gbs(seconds: float) -> float:
        return round(kv_bytes / seconds / 1e9, 1)

    out["contiguous_copy_gb_s"] = gbs(contiguous_copy(kv_bytes, dev))
    tables = block_copy.tables(local_src, dst, dims)
    out["kernel_in_process_gb_s"] = gbs(
        timed(lambda: block_copy.run_tables(tables, src_ids, dst_ids))
    )
    out["index_ops_gb_s"] = gbs(
        timed(lambda: block_copy.copy_with_index_ops(local_src, dst, dims, src_ids, dst_ids), 3)
    )

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(layers), str(total_blocks), json.dumps(shape)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        description = json.loads(peer.stdout.readline())
        started = time.perf_counter()
        remote = open_caches(description, dev)
        out["ipc_open_ms"] = ms(time.perf_counter() - started)
        out["ipc_tensors"] = len(remote)
        remote_tables = block_copy.tables(remote, dst, dims)
        out["kernel_over_ipc_gb_s"] = gbs(
            timed(lambda: block_copy.run_tables(remote_tables, src_ids, dst_ids))
        )
        torch.cuda.synchronize()
        out["ipc_copy_exact"] = all(
            torch.equal(remote[layer][s], dst[layer][d])
            for layer in (0, 31)
            for s, d in zip(src_ids[:64], dst_ids[:64])
        )
        out["ipc_index_ops_gb_s"] = gbs(
            timed(lambda: block_copy.copy_with_index_ops(remote, dst, dims, src_ids, dst_ids), 3)
        )
        out["ratio_kernel_over_ipc_to_contiguous"] = round(
            out["kernel_over_ipc_gb_s"] / out["contiguous_copy_gb_s"], 3
        )
        # The exporter dies while we hold its memory mapped: what does a copy read?
        keep = [t[s].clone() for t, s in zip(remote[:2], src_ids[:2])]
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait(timeout=30)
        time.sleep(1.0)
        try:
            block_copy.run_tables(remote_tables, src_ids, dst_ids)
            torch.cuda.synchronize()
            out["copy_after_exporter_killed"] = "completed, " + (
                "data intact"
                if all(torch.equal(remote[i][src_ids[i]], keep[i]) for i in range(2))
                else "data changed"
            )
        except Exception as exc:  # noqa: BLE001 - this is what we want to know
            out["copy_after_exporter_killed"] = f"failed: {exc!r}"[:300]
    finally:
        if peer.poll() is None:
            peer.kill()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--cpu", action="store_true", help="rehearse on vLLM CPU with the tiny model"
    )
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--sizes", default="1024,4096,16384")
    parser.add_argument("--skip-copies", action="store_true")
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="CUDA graphs for decode steps instead of --enforce-eager",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = OUT / "logs"
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tiny = tiny_model.build(Path("/root/tiny-llama" if not args.cpu else ".cache/tiny-llama"))
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.cpu:
        model, extra, max_len = tiny, [], 2048
    else:
        import vllm

        report["vllm"] = vllm.__version__
        report["device"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        model = shaped_model(tiny, Path("/root/llama3-8b-shape"))
        extra, max_len = GPU_ARGS + (GRAPHS if args.graphs else EAGER), 20000
        report["engine_mode"] = "cuda graphs (decode)" if args.graphs else "eager"
    ports = [servers.free_port() for _ in range(4)]
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}

    def server(name, connector, core):
        config = servers.pd_connector_config(**connector) if connector is not None else None
        return servers.vllm_server(
            name,
            model,
            log_dir,
            kv_transfer_config=config,
            max_model_len=max_len,
            extra_args=extra,
            extra_env=env,
            cpu_core=core if args.cpu else None,
        )

    ref = server("ref", None, 1)
    p = server("prefill", {"host": "127.0.0.1", "zmq_port": ports[0], "control_port": ports[1]}, 0)
    d = server("decode", {"host": "127.0.0.1", "zmq_port": ports[2], "control_port": ports[3]}, 1)
    procs = [ref, p, d]
    started = time.time()
    try:
        servers.start_all(procs, timeout=420)
        report["startup_s"] = round(time.time() - started, 1)
        print(f"servers up in {report['startup_s']} s", flush=True)
        proxy = servers.proxy_server("proxy", log_dir, prefill_urls=[p.url], decode_urls=[d.url])
        procs.append(proxy.start().wait_ready(60))
        d_ctl = f"http://127.0.0.1:{ports[3]}"
        report["sizes"] = measure(
            ref.url, proxy.url, d_ctl, sizes, args.requests, vocab, "tiny", 16
        )
        report["decode_stats"] = stats(d_ctl)
        report["prefill_stats"] = stats(f"http://127.0.0.1:{ports[1]}")
    finally:
        for proc in reversed(procs):
            proc.stop()
    if not args.cpu and not args.skip_copies:
        report["copies"] = copy_bench()
    name = "realsize_graphs.json" if args.graphs else "realsize.json"
    (OUT / name).write_text(json.dumps(report, indent=1))
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report.get('engine_mode', 'cpu rehearsal')}")
    print(
        "| prompt | KV | single: token 1 / gap / step | single, cached prompt: token 1 "
        "| pdproxy: token 1 / gap | gap - step | pull ms | pull GB/s | path |"
    )
    print("|---:|---:|---|---:|---|---:|---:|---:|---|")
    for row in report.get("sizes", []):
        kv = row["kv_bytes_per_pull"] / (1 << 20)
        excess = (row["pd_gap_ms"] or 0) - (row["single_step_ms"] or 0)
        print(
            f"| {row['prompt_tokens']} | {kv:.0f} MiB "
            f"| {row['single_ttft_ms']} / {row['single_gap_ms']} / {row['single_step_ms']} ms "
            f"| {row['single_cached_ttft_ms']} ms | {row['pd_ttft_ms']} / {row['pd_gap_ms']} ms "
            f"| {excess:+.1f} ms | {row['pull_ms']} | {row['pull_gb_s']} | {row['paths']} |"
        )
    if "copies" in report:
        print(json.dumps(report["copies"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
