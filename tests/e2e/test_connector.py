"""The PDConnector on real vLLM CPU servers, without the proxy (plain HTTP).

A prefill leg (``max_tokens=1``, ``do_remote_decode``) on one P/D server, then a decode
leg on another with P's ``kv_transfer_params``, in decode mode (same request) and in
stitched mode (P's prompt token ids + P's token): under greedy decoding the decode
server's tokens must equal a plain vLLM's. That alone would not prove the KV moved (a
silent recompute gives the same answer), so every test also checks the connector's
byte counters and D's ``vllm:prompt_tokens_by_source_total`` (only the tail computed
locally), and one test feeds D another prompt's KV to show its answer depends on it.

Servers are the shared session ``cluster`` (ref, p1, d1, p2, d2) plus one ``victim``
P that the last test kills. Prompts differ per test so prefix caches do not interfere.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from devkit import servers
from tests.support.scrape import by_source, metric, pd_stats

BLOCK = 128  # vLLM CPU block size
N = 12  # tokens each test generates
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "river",
    "engine",
    "proxy",
    "server",
    "request",
    "token",
    "cache",
    "decode",
    "prefill",
    "stream",
    "model",
    "café",
    "東京",
    "🙂",
]


# ---------------------------------------------------------------- helpers


def text_prompt(seed: int, words: int = 160) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def post(url: str, path: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    response = httpx.post(url + path, json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def completion(
    url: str, prompt: str | list[int], max_tokens: int = N, **extra: Any
) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    return post(url, "/v1/completions", body)


def chat(url: str, content: str, max_tokens: int = N, **extra: Any) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }
    return post(url, "/v1/chat/completions", body)


def prompt_ids(response: dict[str, Any]) -> list[int]:
    # Completions put them in the choice, chat at the top level.
    return response["choices"][0].get("prompt_token_ids") or response["prompt_token_ids"]


def ids(response: dict[str, Any]) -> list[int]:
    return response["choices"][0]["token_ids"]


def prefill(url: str, prompt: str | list[int], **params: Any) -> dict[str, Any]:
    return completion(
        url, prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True, **params}
    )


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def kv_usage(proc: servers.Process) -> float:
    return metric(proc.url, "vllm:kv_cache_usage_perc")


def wait_idle(*procs: servers.Process, timeout: float = 15) -> None:
    def idle(proc: servers.Process) -> bool:
        held = pd_stats(proc)
        return kv_usage(proc) == 0 and held["transfers_held"] == 0 and held["pulls_inflight"] == 0

    for proc in procs:
        wait_for(lambda proc=proc: idle(proc), timeout, f"{proc.name} to be idle")


def wait_counted(
    proc: servers.Process, before: dict[str, float], key: str, want: float
) -> dict[str, float]:
    """Counters reach the control plane one engine step after the fact."""
    return wait_for(
        lambda: (d := delta(pd_stats(proc), before))[key] >= want and d, 10, f"{proc.name} {key}"
    )


def wait_sources(
    proc: servers.Process, before: dict[str, float], external: float
) -> dict[str, float]:
    return wait_for(
        lambda: (d := delta(by_source(proc), before))["external_kv_transfer"] >= external and d,
        10,
        f"{proc.name} prompt token metrics",
    )


# ---------------------------------------------------------------- equality and proof of use


def test_decode_mode_completion_uses_transferred_kv(cluster):
    p, d = cluster.p1, cluster.d1
    text = text_prompt(1, 220)
    want = ids(completion(cluster.ref.url, text))
    p_before, d_before, src_before = pd_stats(p), pd_stats(d), by_source(d)

    first = prefill(p.url, text)
    params, length = first["kv_transfer_params"], len(prompt_ids(first))
    assert ids(first) == want[:1] and length > 2 * BLOCK
    for key in (
        "do_remote_prefill",
        "transfer_id",
        "remote_engine_id",
        "remote_host",
        "remote_port",
        "remote_ports",
        "control_port",
        "remote_block_ids",
        "remote_num_tokens",
        "layout",
    ):
        assert key in params, key
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_num_tokens"] == length
    assert len(params["remote_block_ids"]) == math.ceil(length / BLOCK)

    assert ids(completion(d.url, text, kv_transfer_params=params)) == want

    got = wait_counted(d, d_before, "transfers_ok", 1)
    sent = wait_counted(p, p_before, "pulls_served", 1)
    assert got["transfers_failed"] == 0
    assert got["blocks_received"] == len(params["remote_block_ids"])
    assert got["bytes_received"] == sent["bytes_sent"] > 0
    # D computed none of the prompt itself (vLLM re-runs the last position only).
    sources = wait_sources(d, src_before, length)
    assert sources == {"external_kv_transfer": length, "local_compute": 0}
    wait_idle(p, d)
    assert delta(pd_stats(p), p_before)["transfers_completed"] == 1


def test_stitched_mode_completion(cluster):
    p, d = cluster.p1, cluster.d1
    text = text_prompt(2, 300)
    want = ids(completion(cluster.ref.url, text))
    d_before, src_before = pd_stats(d), by_source(d)
    first = prefill(p.url, text)
    assert ids(first) == want[:1]
    stitched = prompt_ids(first) + ids(first)
    out = completion(
        d.url, stitched, max_tokens=N - 1, kv_transfer_params=first["kv_transfer_params"]
    )
    assert ids(out) == want[1:]
    length = len(prompt_ids(first))
    assert wait_counted(d, d_before, "transfers_ok", 1)["transfers_failed"] == 0
    # Only P's token is computed on D.
    assert wait_sources(d, src_before, length) == {
        "external_kv_transfer": length,
        "local_compute": 1,
    }
    wait_idle(p, d)


def test_chat_decode_and_stitched(cluster):
    p, d = cluster.p2, cluster.d2
    content = text_prompt(3, 200)
    want = ids(chat(cluster.ref.url, content))
    d_before = pd_stats(d)

    first = chat(p.url, content, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    assert ids(first) == want[:1]
    assert ids(chat(d.url, content, kv_transfer_params=first["kv_transfer_params"])) == want

    again = chat(p.url, content, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    stitched = prompt_ids(again) + ids(again)
    out = completion(
        d.url, stitched, max_tokens=N - 1, kv_transfer_params=again["kv_transfer_params"]
    )
    assert ids(out) == want[1:]
    got = wait_counted(d, d_before, "transfers_ok", 2)
    assert got["transfers_failed"] == 0 and got["bytes_received"] > 0
    wait_idle(p, d)


def test_decode_answer_depends_on_the_transferred_kv(cluster):
    """Another prompt's KV (same length) makes D answer differently: D really reads it."""
    p, d = cluster.p1, cluster.d1
    rng = random.Random(4)
    prompt_a = [rng.randrange(300, 600) for _ in range(200)]
    prompt_b = [rng.randrange(300, 600) for _ in range(200)]
    want = ids(completion(cluster.ref.url, prompt_a))
    other = prefill(p.url, prompt_b)["kv_transfer_params"]
    assert ids(completion(d.url, prompt_a, kv_transfer_params=other)) != want
    wait_idle(p, d)


def test_local_prefix_hit_pulls_only_the_tail(cluster):
    p, d = cluster.p2, cluster.d1
    rng = random.Random(5)
    head = [rng.randrange(300, 600) for _ in range(2 * BLOCK)]
    prompt = head + [rng.randrange(300, 600) for _ in range(70)]
    completion(d.url, head + [7, 8, 9], max_tokens=1)  # D caches the two full head blocks
    want = ids(completion(cluster.ref.url, prompt))
    d_before, src_before = pd_stats(d), by_source(d)
    params = prefill(p.url, prompt)["kv_transfer_params"]
    assert len(params["remote_block_ids"]) == 3
    assert ids(completion(d.url, prompt, kv_transfer_params=params)) == want
    got = wait_counted(d, d_before, "transfers_ok", 1)
    assert got["blocks_received"] == 1  # P's block 2 into D's block 2; 0 and 1 were local
    assert wait_sources(d, src_before, 70)["external_kv_transfer"] == 70
    wait_idle(p, d)


def test_hand_off_latency_on_an_idle_pair(cluster):
    """Regression guard for the P->D hand-off (generous bounds, not a benchmark).

    D's per-pull time and its wait for the KV (from the step that starts the pull to
    the step that sees it end) are milliseconds for a small prompt on loopback; they
    were tens to hundreds when D noticed finished pulls only at its next polled step,
    and an engine woken by nothing would wait out its idle safety net (10 s).
    """
    p, d = cluster.p1, cluster.d1
    wait_idle(p, d)
    before = pd_stats(d)
    rng = random.Random(12)
    handoffs = []
    for _ in range(6):
        prompt = [rng.randrange(300, 600) for _ in range(40)]
        params = prefill(p.url, prompt)["kv_transfer_params"]
        start = time.monotonic()
        completion(d.url, prompt, max_tokens=1, kv_transfer_params=params)
        handoffs.append(time.monotonic() - start)
    got = wait_counted(d, before, "transfers_ok", 6)
    assert got["transfers_failed"] == 0
    assert got["transfer_seconds_total"] / 6 < 0.25, got
    assert got["kv_wait_seconds_total"] / 6 < 0.25, got
    assert statistics.median(handoffs) < 1.0, handoffs
    wait_idle(p, d)


def process_group_cpu_seconds(proc: servers.Process) -> float:
    """CPU time (user + system) of every process of a server (its process group)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == proc.proc.pid:  # pgid: servers start their own session
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def test_holding_engine_does_not_spin(cluster):
    """A P that holds blocks nobody pulls steps with nothing to do; it must not burn a
    core meanwhile (vLLM busy-polls for a second after each step: the connector makes
    such steps rare)."""
    p = cluster.p2
    wait_idle(p)
    prefill(p.url, text_prompt(13, 60), lease_seconds=8)
    time.sleep(1.5)  # past vLLM's own second of busy-polling after the prefill
    before, start = process_group_cpu_seconds(p), time.monotonic()
    time.sleep(3)
    used = (process_group_cpu_seconds(p) - before) / (time.monotonic() - start)
    assert pd_stats(p)["transfers_held"] == 1
    assert used < 0.3, f"P used {used:.2f} cores while only holding blocks"
    wait_idle(p, timeout=20)


# ---------------------------------------------------------------- holding and releasing


def test_release_frees_at_once_and_a_late_pull_recomputes(cluster):
    p, d = cluster.p1, cluster.d2
    text = text_prompt(6, 180)
    want = ids(completion(cluster.ref.url, text))
    p_before, d_before = pd_stats(p), pd_stats(d)
    params = prefill(p.url, text)["kv_transfer_params"]
    wait_for(lambda: kv_usage(p) > 0, 10, "P to hold the prefill's blocks")
    release = f"http://{params['remote_host']}:{params['control_port']}/pd/release"
    start = time.monotonic()
    assert httpx.post(release, json={"transfer_id": params["transfer_id"]}).json() == {
        "released": True
    }
    wait_idle(p, timeout=10)
    assert time.monotonic() - start < 10  # not the 30 s lease
    assert httpx.post(release, json={"transfer_id": params["transfer_id"]}).json() == {
        "released": False
    }
    assert httpx.post(release, json={"transfer_id": "no-such-id"}).json() == {"released": False}
    assert delta(pd_stats(p), p_before)["releases"] == 1

    # D is sent the released transfer anyway: the pull is refused, D recomputes.
    assert ids(completion(d.url, text, kv_transfer_params=params)) == want
    got = wait_counted(d, d_before, "transfers_failed", 1)
    assert got["transfers_ok"] == 0
    wait_idle(p, d)


def test_unpulled_lease_expires(cluster):
    p = cluster.p2
    before = pd_stats(p)
    prefill(p.url, text_prompt(7, 150), lease_seconds=2)  # a request may shorten its lease
    wait_for(lambda: kv_usage(p) > 0, 10, "P to hold the prefill's blocks")
    wait_idle(p, timeout=20)
    got = delta(pd_stats(p), before)
    assert got["lease_expiries"] == 1 and got["transfers_completed"] == 0


def test_fan_out_to_n_consumers(cluster):
    """n>1 on D: vLLM forks the decode request, each child pulls; P waits for all."""
    p, d = cluster.p1, cluster.d1
    text = text_prompt(8, 170)
    sampling = {"n": 2, "temperature": 0.8, "seed": 1234}
    want = sorted(c["token_ids"] for c in completion(cluster.ref.url, text, **sampling)["choices"])
    p_before, d_before = pd_stats(p), pd_stats(d)
    params = prefill(p.url, text, consumers=2)["kv_transfer_params"]
    out = completion(d.url, text, kv_transfer_params=params, **sampling)
    assert sorted(c["token_ids"] for c in out["choices"]) == want
    assert wait_counted(d, d_before, "transfers_ok", 2)["transfers_failed"] == 0
    sent = wait_counted(p, p_before, "pulls_served", 2)
    wait_idle(p, d)
    sent = delta(pd_stats(p), p_before)
    assert sent["transfers_completed"] == 1 and sent["lease_expiries"] == 0


def test_decode_abort_during_pull_cleans_up(cluster):
    """The client leaves while D waits for an unreachable P: the pull is cancelled."""
    p, d = cluster.p2, cluster.d2
    text = text_prompt(9, 150)
    params = prefill(p.url, text)["kv_transfer_params"]
    gone = servers.free_port()
    dead = dict(params, remote_port=gone, remote_ports=[gone])
    d_before = pd_stats(d)
    body = {
        "model": "tiny",
        "prompt": text,
        "max_tokens": N,
        "temperature": 0,
        "stream": True,
        "kv_transfer_params": dead,
    }
    start = time.monotonic()
    timeout = httpx.Timeout(10, read=1.0)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", d.url + "/v1/completions", json=body, timeout=timeout) as r,
    ):
        for _ in r.iter_raw():
            pass
    got = wait_counted(d, d_before, "transfers_cancelled", 1)
    assert got["transfers_failed"] == 0
    wait_idle(d, timeout=10)
    # Cancelled, not timed out: well before D would have given up on P.
    assert time.monotonic() - start < d.pd_config.get("connect_timeout_seconds", 5.0) + 3
    httpx.post(p.control_url + "/pd/release", json={"transfer_id": params["transfer_id"]})
    wait_idle(p)


def test_layout_mismatch_is_refused_and_recomputed(cluster):
    p, d = cluster.p1, cluster.d2
    text = text_prompt(10, 140)
    want = ids(completion(cluster.ref.url, text))
    params = prefill(p.url, text)["kv_transfer_params"]
    d_before = pd_stats(d)
    wrong = dict(params, layout=dict(params["layout"], block_size=16))
    assert ids(completion(d.url, text, kv_transfer_params=wrong)) == want
    got = wait_counted(d, d_before, "pulls_skipped", 1)
    assert got["pulls_started"] == 0
    wait_idle(p, d)  # the skip notice released P's blocks without waiting for the lease


# ---------------------------------------------------------------- concurrency and failures


def flow(p: servers.Process, d: servers.Process, text: str) -> list[int]:
    first = prefill(p.url, text)
    return ids(completion(d.url, text, kv_transfer_params=first["kv_transfer_params"]))


def test_two_prefills_into_one_decode_and_one_into_two(cluster):
    cases = [(cluster.p1, cluster.d1), (cluster.p2, cluster.d1)] * 2 + [
        (cluster.p1, cluster.d2)
    ] * 2
    texts = [text_prompt(100 + i, 150 + 20 * i) for i in range(len(cases))]
    wants = [ids(completion(cluster.ref.url, t)) for t in texts]
    before = {proc.name: pd_stats(proc) for proc in (cluster.d1, cluster.d2)}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        got = list(
            pool.map(lambda args: flow(*args), [(p, d, t) for (p, d), t in zip(cases, texts)])
        )
    assert got == wants
    assert wait_counted(cluster.d1, before["d1"], "transfers_ok", 4)["transfers_failed"] == 0
    assert wait_counted(cluster.d2, before["d2"], "transfers_ok", 2)["transfers_failed"] == 0
    wait_idle(cluster.p1, cluster.p2, cluster.d1, cluster.d2)


def test_prefill_killed_before_pull(cluster, victim):
    victim.wait_ready()
    d = cluster.d1
    text = text_prompt(11, 200)
    want = ids(completion(cluster.ref.url, text))
    params = prefill(victim.url, text)["kv_transfer_params"]
    victim.kill()
    d_before = pd_stats(d)
    start = time.monotonic()
    assert ids(completion(d.url, text, kv_transfer_params=params)) == want
    # A dead P is noticed within the connect timeout, not the 30 s pull timeout.
    assert time.monotonic() - start < d.pd_config.get("connect_timeout_seconds", 5.0) + 5
    got = wait_counted(d, d_before, "transfers_failed", 1)
    assert got["transfers_ok"] == 0
    wait_idle(d)
