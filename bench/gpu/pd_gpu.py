"""The CUDA path, on the GPU machine: the PDConnector inside unmodified vLLM 0.26.0.

Run by ``bench/gpu/device.sh check`` once vLLM is installed there (README: "GPU").
On one GPU, P and D share the device, so the connector's ``auto`` transport takes the
host path (device -> host -> device); NCCL needs two GPUs.

1. Builds the test model (devkit.tiny_model: byte-level BPE that splits characters).
2. Starts a plain reference vLLM, a prefill and a decode vLLM with the PDConnector (all
   on the one GPU), and the proxy in front of P and D.
3. Greedy equality through the proxy against the reference: completions and chat,
   streamed and not, several prompts.
4. KV moved and was used: the connector's counters (bytes P sent, D received, pulls
   completed, none failed) and D's computed-token counters.
5. Host-path throughput with CUDA KV caches (1, 16, 256 MiB) against the device<->host
   copy bandwidth measured in the same run (``bench.kv_transfer --device cuda``).

Writes ``$OUT/gpu_report.json`` and prints a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from devkit import servers, tiny_model  # noqa: E402
from tests.support.compare import call  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
PROMPTS = [
    "The river ran past the old mill, where the engine had stood",
    "Hello the proxy at café",
    "東京 is a city; 数据 moves between servers 🙂",
    "def handle(request):\n    body = request.json()\n",
    "In the first week of the year the company counted every number twice, because "
    "the government wanted each part of the problem written down. " * 8,
]


def gpu_server(name: str, model: Path, extra_config: dict | None, log_dir: Path) -> servers.Process:
    argv_extra = [
        "--gpu-memory-utilization",
        "0.2",
        "--kv-cache-memory-bytes",
        "2147483648",
        "--enforce-eager",
    ]
    return servers.vllm_server(
        name,
        model,
        log_dir,
        kv_transfer_config=servers.pd_connector_config(**extra_config)
        if extra_config is not None
        else None,
        extra_args=argv_extra,
        extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "0"},
    )


def stats(url: str) -> dict:
    return httpx.get(url + "/pd/stats", timeout=10).json()


def total(tree: object, key: str) -> float:
    if isinstance(tree, dict):
        return sum(
            (v if k == key and isinstance(v, (int, float)) else total(v, key))
            for k, v in tree.items()
        )
    if isinstance(tree, list):
        return sum(total(v, key) for v in tree)
    return 0.0


def equality(ref: str, proxy: str) -> dict:
    results = {"checked": 0, "mismatches": [], "modes": {}}
    with httpx.Client() as client:
        for prompt in PROMPTS:
            for stream in (False, True):
                for path, body in (
                    (
                        "/v1/completions",
                        {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0},
                    ),
                    (
                        "/v1/chat/completions",
                        {
                            "model": "tiny",
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 24,
                            "temperature": 0,
                        },
                    ),
                ):
                    body = dict(body, stream=stream)
                    if stream:
                        body["stream_options"] = {"include_usage": True}
                    want, got = call(client, ref, path, body), call(client, proxy, path, body)
                    results["checked"] += 1
                    mode = got.headers.get("x-pdproxy-mode", "?")
                    results["modes"][mode] = results["modes"].get(mode, 0) + 1
                    if got.comparable() != want.comparable():
                        results["mismatches"].append(
                            {
                                "path": path,
                                "prompt": prompt[:40],
                                "stream": stream,
                                "proxy": got.texts,
                                "ref": want.texts,
                            }
                        )
    return results


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = OUT / "logs"
    report: dict = {
        "device": subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    }
    import vllm

    report["vllm"] = vllm.__version__
    model = tiny_model.build(Path("/root/tiny-llama"))
    ports = [servers.free_port() for _ in range(4)]
    ref = gpu_server("ref", model, None, log_dir)
    p = gpu_server(
        "prefill",
        model,
        {"host": "127.0.0.1", "zmq_port": ports[0], "control_port": ports[1]},
        log_dir,
    )
    d = gpu_server(
        "decode",
        model,
        {"host": "127.0.0.1", "zmq_port": ports[2], "control_port": ports[3]},
        log_dir,
    )
    started = time.time()
    procs = [ref, p, d]
    try:
        servers.start_all(procs, timeout=420)
        report["startup_s"] = round(time.time() - started, 1)
        proxy = (
            servers.proxy_server("proxy", log_dir, prefill_urls=[p.url], decode_urls=[d.url])
            .start()
            .wait_ready(60)
        )
        procs.append(proxy)
        p_ctl, d_ctl = f"http://127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[3]}"
        before_p, before_d = stats(p_ctl), stats(d_ctl)
        report["equality"] = equality(ref.url, proxy.url)
        after_p, after_d = stats(p_ctl), stats(d_ctl)
        report["kv"] = {
            key: total(after, key) - total(before, key)
            for before, after, keys in (
                (before_p, after_p, ("bytes_sent", "pulls_served")),
                (
                    before_d,
                    after_d,
                    (
                        "bytes_received",
                        "transfers_ok",
                        "transfers_failed",
                        "transfer_seconds_total",
                    ),
                ),
            )
            for key in keys
        }
        report["transport"] = after_d.get("transport") or after_p.get("transport") or "see logs"
    finally:
        for proc in reversed(procs):
            proc.stop()
    # The throughput benchmark runs with the GPU to itself.
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.kv_transfer",
            "--device",
            "cuda",
            "--repeats",
            "5",
            "--out",
            str(OUT / "kv_transfer_cuda.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report["kv_transfer_stdout"] = bench.stdout[-4000:] + bench.stderr[-2000:]
    ok = (
        not report["equality"]["mismatches"]
        and report["kv"].get("bytes_received", 0) > 0
        and report["kv"].get("transfers_failed", 1) == 0
    )
    report["pass"] = ok
    (OUT / "gpu_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "kv_transfer_stdout"}, indent=2))
    print(report["kv_transfer_stdout"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
