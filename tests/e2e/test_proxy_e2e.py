"""Through the proxy, on real vLLM CPU servers with the PDConnector, against a plain vLLM.

Under greedy decoding the proxy's answer must equal what one colocated vLLM returns for
the same request, token for token, with the same usage and finish reasons, streamed or
not. The tiny model has random weights and a byte-level tokenizer whose multi-byte
characters stay split, so the P/D seam often falls inside a UTF-8 character: both the
stitched path and the decode fallback are exercised by the same prompts.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid

import httpx
import pytest

from tests.support.compare import call
from tests.support.scrape import metric

PROMPTS = [
    "The river ran past the old mill, where the engine had stood",
    "Hello the proxy at café",
    "東京 is a city; 数据 moves between servers 🙂",
    "def handle(request):\n    body = request.json()\n",
    "a",
    "In the first week of the year the company counted every number twice, because "
    "the government wanted each part of the problem written down. " * 6,
]


def chat(prompt: str, **extra) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 24,
        **extra,
    }


def completion(prompt: str, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 24, **extra}


def assert_same(ref_url: str, proxy_url: str, path: str, body: dict) -> dict:
    with httpx.Client() as client:
        want = call(client, ref_url, path, body)
        got = call(client, proxy_url, path, body)
    assert got.comparable() == want.comparable(), f"{path} {body}\nproxy: {got}\nref:   {want}"
    if body.get("stream") and got.status == 200:
        assert got.content_type.startswith("text/event-stream")
        assert got.done and len(got.ids) == 1
        assert got.usage_chunks == (
            1 if (body.get("stream_options") or {}).get("include_usage") else 0
        )
    return got.headers


@pytest.fixture(scope="module")
def proxy(cluster):
    return cluster.proxy("proxy-1p1d", [cluster.p1], [cluster.d1])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_greedy_equality(cluster, proxy, prompt, stream):
    options = {"stream": stream}
    if stream:
        options["stream_options"] = {"include_usage": True}
    modes = set()
    for path, body in (
        ("/v1/completions", completion(prompt, **options)),
        ("/v1/chat/completions", chat(prompt, **options)),
    ):
        headers = assert_same(cluster.ref.url, proxy.url, path, body)
        modes.add(headers["x-pdproxy-mode"])
    assert modes <= {"stitched", "decode"}


def test_both_seam_paths_are_exercised(cluster, proxy):
    """Across the prompts, some seams are clean (stitched) and some fall inside a character."""
    seen = set()
    for prompt in PROMPTS:
        for path, body in (
            ("/v1/completions", completion(prompt)),
            ("/v1/chat/completions", chat(prompt)),
        ):
            response = httpx.post(proxy.url + path, json=body, timeout=120)
            seen.add(
                (response.headers["x-pdproxy-mode"], response.headers.get("x-pdproxy-fallback"))
            )
    assert ("stitched", None) in seen
    assert ("decode", "seam inside a character") in seen


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 1},
        {"max_tokens": 2},
        {"logprobs": 3},
        {"return_token_ids": True},
        {"min_tokens": 5, "max_tokens": 8},
        {"n": 2, "temperature": 0.8, "seed": 7},
        {"n": 2},  # vLLM refuses n>1 with greedy; so must the proxy, with the same 400
        {"max_tokens": 0},
        {"echo": True, "max_tokens": 4},
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "stream": True},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items())[:40],
)
def test_completion_features(cluster, proxy, extra):
    for stream in (False, True):
        body = completion(PROMPTS[0], **{"stream": stream, **extra})
        if body.get("stream_options") and not body["stream"]:
            continue
        if body.get("n", 1) > 1 and body.get("temperature") == 0 and stream:
            continue
        assert_same(cluster.ref.url, proxy.url, "/v1/completions", body)


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 1},
        {"max_completion_tokens": 6},
        {"logprobs": True, "top_logprobs": 2},
        {"return_token_ids": True},
        {"n": 2, "temperature": 0.9, "seed": 3},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items())[:40],
)
def test_chat_features(cluster, proxy, extra):
    for stream in (False, True):
        body = chat(PROMPTS[2], **{"stream": stream, **extra})
        if stream:
            body["stream_options"] = {"include_usage": True}
        assert_same(cluster.ref.url, proxy.url, "/v1/chat/completions", body)


def test_chat_with_no_limit_runs_to_the_end_of_the_context(cluster, proxy):
    """No max_tokens in chat: the answer runs to the end of the context, as on a single
    server (a stitched continuation is a completions request, whose default is 16)."""
    modes = set()
    for seed in range(len(PROMPTS)):
        # A long prompt: the context (2,048 tokens) leaves about 200 to generate.
        prompt = PROMPTS[seed]
        while _tokens(cluster.ref.url, prompt) < 1800:
            prompt += " " + PROMPTS[-1]
        prompt = prompt[: len(prompt) * 1800 // _tokens(cluster.ref.url, prompt)]
        for stream in (False, True):
            body = {k: v for k, v in chat(prompt, stream=stream).items() if k != "max_tokens"}
            headers = assert_same(cluster.ref.url, proxy.url, "/v1/chat/completions", body)
            modes.add(headers["x-pdproxy-mode"])
        if "stitched" in modes:
            break
    assert "stitched" in modes, modes


def _tokens(ref_url: str, prompt: str) -> int:
    answer = httpx.post(ref_url + "/tokenize", json={"model": "tiny", "prompt": prompt}, timeout=30)
    return int(answer.json()["count"])


def _clean_seam_prompt(ref_url: str) -> tuple[str, str, str]:
    """A prompt whose first output token has text (so the answer is stitched), with its
    first token's text and the whole greedy output."""
    with httpx.Client(timeout=120) as client:
        for prompt in PROMPTS:
            first = client.post(
                ref_url + "/v1/completions", json=completion(prompt, max_tokens=1)
            ).json()["choices"][0]["text"]
            text = client.post(ref_url + "/v1/completions", json=completion(prompt)).json()[
                "choices"
            ][0]["text"]
            if first and len(text) > len(first) + 6:
                return prompt, first, text
    raise AssertionError("no prompt with a clean first token")


def test_stop_strings(cluster, proxy):
    """A stop string inside D's text, and one that straddles P's token and D's text."""
    prompt, first, text = _clean_seam_prompt(cluster.ref.url)
    inside = text[len(first) + 2 : len(first) + 5]
    straddle = first[-1] + text[len(first) : len(first) + 2]
    for stop in ([inside], [straddle], [straddle, inside], "\n"):
        for stream in (False, True):
            for include in (False, True):
                body = completion(
                    prompt, stop=stop, stream=stream, include_stop_str_in_output=include
                )
                assert_same(cluster.ref.url, proxy.url, "/v1/completions", body)


def test_bad_requests_get_400_before_any_backend(proxy):
    with httpx.Client(timeout=30) as client:
        before = client.get(proxy.url + "/metrics").text.count("pdproxy_backend_errors_total{")
        for body in (
            {"model": "tiny", "prompt": "x", "max_tokens": "lots"},
            {"model": "tiny"},
            {"model": "tiny", "prompt": "x", "temperature": -1},
        ):
            response = client.post(proxy.url + "/v1/completions", json=body)
            assert response.status_code == 400 and response.json()["error"]["message"]
        response = client.post(
            proxy.url + "/v1/completions",
            content=b"{",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        unknown_model = client.post(
            proxy.url + "/v1/completions", json={"model": "nope", "prompt": "x"}
        )
        assert (
            unknown_model.status_code == 404 and "nope" in unknown_model.json()["error"]["message"]
        )
        assert (
            client.get(proxy.url + "/metrics").text.count("pdproxy_backend_errors_total{") == before
        )


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_is_not_json_is_refused_as_vllm_does(cluster, proxy, path, content_type):
    body = b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}'
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(timeout=30) as client:
        want = client.post(cluster.ref.url + path, content=body, headers=headers)
        got = client.post(proxy.url + path, content=body, headers=headers)
    assert got.status_code == want.status_code == 400
    assert got.json() == want.json()


def test_prompt_too_long_is_the_backends_400(cluster, proxy):
    body = completion("word " * 3000)
    with httpx.Client(timeout=60) as client:
        want = client.post(cluster.ref.url + "/v1/completions", json=body)
        got = client.post(proxy.url + "/v1/completions", json=body)
    assert want.status_code == got.status_code == 400
    assert got.json()["error"]["message"] == want.json()["error"]["message"]


def test_concurrent_requests(cluster, proxy):
    bodies = [completion(p, max_tokens=16) for p in PROMPTS] + [
        chat(p, max_tokens=16) for p in PROMPTS[:2]
    ]
    paths = ["/v1/completions"] * len(PROMPTS) + ["/v1/chat/completions"] * 2
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(lambda pb: assert_same(cluster.ref.url, proxy.url, *pb), zip(paths, bodies)))


def test_kv_moved_and_was_used(cluster, proxy):
    """D loads the prompt's KV from P and computes only the tail: fails if D recomputes."""
    # A few hundred tokens (several blocks), never seen before: no prefix-cache hit on D.
    prompt = f"Request {uuid.uuid4().hex}: " + PROMPTS[-1]
    external_before = metric(
        cluster.d1.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
    )
    local_before = metric(
        cluster.d1.url, "vllm:prompt_tokens_by_source_total", source="local_compute"
    )
    p_prompt_before = metric(cluster.p1.url, "vllm:prompt_tokens_total")
    response = httpx.post(
        proxy.url + "/v1/completions", json=completion(prompt, max_tokens=4), timeout=120
    )
    assert response.status_code == 200
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 200
    # vLLM updates these counters when it logs stats; give it a moment.
    for _ in range(50):
        external = (
            metric(
                cluster.d1.url, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
            )
            - external_before
        )
        if external:
            break
        time.sleep(0.2)
    local = (
        metric(cluster.d1.url, "vllm:prompt_tokens_by_source_total", source="local_compute")
        - local_before
    )
    assert external >= prompt_tokens - 1, (external, local)
    assert local <= 2, (external, local)  # P's token (stitched) or the recomputed last token
    assert metric(cluster.p1.url, "vllm:prompt_tokens_total") - p_prompt_before >= prompt_tokens
    stats = httpx.get(cluster.d1.control_url + "/pd/stats", timeout=10).json()
    assert _find_number(stats, "bytes_received") > 0


def _find_number(tree, key: str) -> float:
    """Sum every numeric field named ``key`` in a JSON tree."""
    if isinstance(tree, dict):
        return sum(
            (v if k == key and isinstance(v, (int, float)) else _find_number(v, key))
            for k, v in tree.items()
        )
    if isinstance(tree, list):
        return sum(_find_number(v, key) for v in tree)
    return 0.0


def test_ready_reports_a_passed_canary(proxy):
    for _ in range(60):
        response = httpx.get(proxy.url + "/ready", timeout=10)
        if response.status_code == 200:
            break
        time.sleep(1)
    assert response.json() == {"ready": True}


def test_metrics_after_real_requests(proxy):
    httpx.post(proxy.url + "/v1/completions", json=completion(PROMPTS[1], stream=True), timeout=120)
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    for family in (
        "pdproxy_requests_total",
        "pdproxy_request_duration_seconds_bucket",
        "pdproxy_time_to_first_token_seconds_bucket",
        "pdproxy_inter_token_seconds_bucket",
        'pdproxy_phase_seconds_count{phase="prefill"}',
        'pdproxy_phase_seconds_count{phase="handoff"}',
        "pdproxy_backend_healthy{",
    ):
        assert family in text, family
    count = float(
        re.search(r'pdproxy_phase_seconds_count\{phase="prefill"\} ([0-9.e+]+)', text).group(1)
    )
    assert count >= 1
