"""``make demo``: P/D disaggregation end to end on this machine, no GPU needed.

Builds the tiny model, starts a prefill and a decode vLLM CPU server with the
PDConnector and the proxy in front of them, sends one chat request through the OpenAI
SDK (streamed, as a chat UI would), prints the answer and where the time went, and
shuts everything down. The same steps with a real model on GPUs are in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from . import servers, tiny_model

REPO = Path(__file__).resolve().parent.parent


def _stats(control_port: int) -> dict:
    try:
        return httpx.get(f"http://127.0.0.1:{control_port}/pd/stats", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _total(tree: object, key: str) -> float:
    if isinstance(tree, dict):
        return sum(
            (v if k == key and isinstance(v, (int, float)) else _total(v, key))
            for k, v in tree.items()
        )
    if isinstance(tree, list):
        return sum(_total(v, key) for v in tree)
    return 0.0


def _phase_sums(proxy_url: str) -> dict[str, float]:
    sums = {}
    for line in httpx.get(proxy_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("pdproxy_phase_seconds_sum{"):
            phase = line.split('phase="')[1].split('"')[0]
            sums[phase] = float(line.rsplit(" ", 1)[1])
    return sums


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(REPO / ".cache" / "tiny-llama"))
    # (Word tokens end on a character boundary, so the answer is stitched: P's token at
    # once, D continuing after it.)
    parser.add_argument("--prompt", default="Describe the old mill by the river.")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    from openai import OpenAI

    print("== building the tiny model (random weights, byte-level BPE) ...", flush=True)
    model_dir = tiny_model.build(args.model_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="pdproxy-demo-"))
    ports = {name: servers.free_port() for name in ("p_zmq", "p_ctl", "d_zmq", "d_ctl")}
    prefill = servers.vllm_server(
        "prefill",
        model_dir,
        log_dir,
        cpu_core=0,
        kv_transfer_config=servers.pd_connector_config(
            host="127.0.0.1", zmq_port=ports["p_zmq"], control_port=ports["p_ctl"]
        ),
    )
    decode = servers.vllm_server(
        "decode",
        model_dir,
        log_dir,
        cpu_core=1,
        kv_transfer_config=servers.pd_connector_config(
            host="127.0.0.1", zmq_port=ports["d_zmq"], control_port=ports["d_ctl"]
        ),
    )
    started: list[servers.Process] = []
    try:
        print(
            "== starting a prefill and a decode vLLM CPU server with the PDConnector "
            f"(logs: {log_dir}); about 2 minutes ...",
            flush=True,
        )
        started += servers.start_all([prefill, decode])
        proxy = servers.proxy_server(
            "proxy", log_dir, prefill_urls=[prefill.url], decode_urls=[decode.url]
        )
        started.append(proxy.start().wait_ready(60))
        print(f"== prefill {prefill.url}   decode {decode.url}   proxy {proxy.url}\n", flush=True)

        client = OpenAI(base_url=proxy.url + "/v1", api_key="unused")
        # Random weights emit stray bytes of split characters; asking for word tokens
        # only (a vLLM sampling parameter the proxy passes on) reads as random words.
        words = {"allowed_token_ids": tiny_model.word_token_ids(model_dir)}
        # One unprinted request first: the SDK's and the servers' one-time costs (pydantic
        # building its validators, first connections) would otherwise land in the timings.
        for _ in client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Warm up."}],
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body=words,
        ):
            pass
        before_d = _stats(ports["d_ctl"])
        before_phases = _phase_sums(proxy.url)
        print(f"user> {args.prompt}\nassistant> ", end="", flush=True)
        t0 = time.perf_counter()
        first_token_at = None
        pieces = []
        usage = None
        # with_streaming_response: the body is read as it arrives (with_raw_response would
        # read it whole before the first chunk is parsed).
        with client.chat.completions.with_streaming_response.create(
            model="tiny",
            messages=[{"role": "user", "content": args.prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=words,
        ) as raw:
            for chunk in raw.parse():
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first_token_at = first_token_at or time.perf_counter()
                        pieces.append(choice.delta.content)
                        print(choice.delta.content, end="", flush=True)
        total = time.perf_counter() - t0
        print("\n   (random weights: the words are noise; what matters is how they got here)\n")
        after_phases = _phase_sums(proxy.url)
        after_d = _stats(ports["d_ctl"])
        phases = {
            k: (after_phases.get(k, 0.0) - before_phases.get(k, 0.0)) * 1000
            for k in ("prefill", "handoff", "decode", "proxy")
        }

        def delta(key: str) -> float:
            return _total(after_d, key) - _total(before_d, key)

        moved, transfer_s, waited_s = (
            delta("bytes_received"),
            delta("transfer_seconds_total"),
            delta("kv_wait_seconds_total"),
        )
        mode = raw.headers.get("x-pdproxy-mode")
        if raw.headers.get("x-pdproxy-fallback"):
            mode += f" ({raw.headers['x-pdproxy-fallback']})"
        prompt_tokens = usage.prompt_tokens if usage else "?"
        completion_tokens = usage.completion_tokens if usage else "?"
        rows = [
            ("prefill (P)", phases["prefill"], f"prompt of {prompt_tokens} tokens, first token"),
            ("KV transfer", transfer_s * 1000, f"{moved / 1024:.1f} KiB pulled by D from P"),
            ("D's KV wait", waited_s * 1000, "from D claiming the KV to D seeing it arrive"),
            ("hand-off", phases["handoff"], "P's answer to D's first byte (transfer + D's step)"),
            ("decode (D)", phases["decode"], f"{completion_tokens} tokens in all"),
            ("proxy itself", phases["proxy"], ""),
        ]
        print("== where the time went")
        print(f"   served as       {mode}")
        for name, ms, what in rows:
            print(f"   {name:<15} {ms:8.1f} ms   {what}".rstrip())
        ttft_ms = ((first_token_at or t0) - t0) * 1000
        print(f"   client TTFT     {ttft_ms:8.1f} ms, total {total * 1000:.1f} ms")
        if os.environ.get("PDPROXY_DEMO_JSON"):
            print(json.dumps({"phases_ms": phases, "kv_bytes": moved, "text": "".join(pieces)}))
        return 0
    finally:
        print("\n== shutting down", flush=True)
        for proc in reversed(started or [prefill, decode]):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
