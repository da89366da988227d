"""The proxy's request path against fake backends: stitching, accounting, fallbacks, errors."""

import asyncio
import json

import httpx
import pytest

from tests.support.compare import summarize_response, summarize_stream
from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 6, "temperature": 0}
CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 6,
    "temperature": 0,
}


def summary(response: httpx.Response):
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return summarize_stream(
            response.text.splitlines(),
            response.status_code,
            response.headers["content-type"],
            dict(response.headers),
        )
    return summarize_response(response)


async def compare(h, path, body, *, cached=True):
    got = await h.client.post(path, json=body)
    want = await h.reference(path, body)
    g, w = summary(got), summary(want)
    assert g.comparable() == w.comparable(), (got.text, want.text)
    return got, g


@pytest.mark.parametrize(
    "path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_stitched_equals_colocated(path, base, stream):
    async with harness() as h:
        body = dict(base, stream=stream)
        if stream:
            body["stream_options"] = {"include_usage": True}
        response, s = await compare(h, path, body)
        assert response.headers["x-pdproxy-mode"] == "stitched"
        assert len(s.ids) == 1
        # The legs: P got one token and the KV hold; D continued after P's token.
        p_call, d_call = h.backends["p1"].calls[0], h.backends["d1"].calls[0]
        assert (
            p_call["body"]["max_tokens"] == 1
            and p_call["body"]["kv_transfer_params"]["do_remote_decode"]
        )
        assert d_call["path"] == "/v1/completions" and d_call["body"]["max_tokens"] == 5
        assert d_call["body"]["kv_transfer_params"]["transfer_id"].startswith("t-")
        assert s.usage["prompt_tokens_details"] == {"cached_tokens": 7}  # P's, not D's
        if stream:
            assert s.content_type.startswith("text/event-stream") and s.done and s.usage_chunks == 1
            if "chat" in path:
                assert s.roles == 1


async def test_stream_without_usage_has_no_usage_chunk():
    async with harness() as h:
        body = dict(COMPLETION, stream=True)
        _, s = await compare(h, "/v1/completions", body)
        assert s.usage_chunks == 0 and s.done


async def test_continuous_usage_counts_p_token_once():
    async with harness() as h:
        body = dict(
            COMPLETION,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
        response = await h.client.post("/v1/completions", json=body)
        usages = [
            json.loads(line[6:])["usage"]
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        completion = [u["completion_tokens"] for u in usages if u]
        assert completion == [1, 2, 3, 4, 5, 6, 6]
        assert all(u["prompt_tokens"] == usages[0]["prompt_tokens"] for u in usages)
        # A chunk's usage is the three counts, as vLLM's; the last has the details.
        counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert all(set(u) == counts for u in usages[:-1])
        assert usages[-1]["prompt_tokens_details"] == {"cached_tokens": 7}  # P's cache hits


@pytest.mark.parametrize(
    "path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
async def test_decode_mode_sends_usage_only_as_asked(path, base):
    # continuous_usage_stats without include_usage: vLLM sends no usage at all.
    async with harness(stitch=False) as h:
        body = dict(base, stream=True, stream_options={"continuous_usage_stats": True})
        response, _ = await compare(h, path, body)
        assert response.headers["x-pdproxy-mode"] == "decode"
        lines = response.text.splitlines()
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert chunks and all(chunk.get("usage") is None for chunk in chunks)


@pytest.mark.parametrize("stitch", [True, False], ids=["stitched", "decode mode"])
@pytest.mark.parametrize(
    "path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
async def test_the_chunk_that_ends_the_answer_carries_the_fingerprint(path, base, stitch):
    # Without a usage chunk, vLLM stamps system_fingerprint on the choice's last chunk.
    async with harness(stitch=stitch) as h:
        body = dict(base, stream=True)
        got, want = await h.client.post(path, json=body), await h.reference(path, body)

        def last_chunk(response: httpx.Response) -> dict:
            lines = response.text.splitlines()
            return [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]

        assert last_chunk(got)["choices"][0]["finish_reason"] == "length"
        assert last_chunk(got).get("system_fingerprint") == last_chunk(want)["system_fingerprint"]


async def test_logprobs_offsets_continue_across_the_seam():
    async with harness() as h:
        for stream in (False, True):
            body = dict(COMPLETION, logprobs=1, stream=stream)
            _, s = await compare(h, "/v1/completions", body)
            offsets = s.text_offsets[0]
            assert offsets == sorted(offsets) and len(offsets) == 6 and offsets[0] == 0


async def test_token_ids_returned_when_asked():
    async with harness() as h:
        for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for stream in (False, True):
                _, s = await compare(h, path, dict(base, stream=stream, return_token_ids=True))
                assert len(s.token_ids[0]) == 6


async def test_max_tokens_one_never_calls_decode():
    async with harness() as h:
        for stream in (False, True):
            response, _ = await compare(
                h, "/v1/completions", dict(COMPLETION, max_tokens=1, stream=stream)
            )
            assert response.headers["x-pdproxy-mode"] == "prefill"
        assert h.backends["d1"].calls == []
        # Nobody will pull P's KV: the proxy released it.
        await asyncio.sleep(0.2)
        assert len(h.releases) == 2


async def test_eos_from_prefill_ends_the_request():
    async with harness() as h:
        h.backends["p1"].eos_at = h.ref.eos_at = (
            11  # "hello world" is 11 prompt tokens: EOS comes first
        )
        response, s = await compare(h, "/v1/completions", COMPLETION)
        assert s.finish[0] == "stop" and response.headers["x-pdproxy-mode"] == "prefill"
        assert h.backends["d1"].calls == []


@pytest.mark.parametrize("case", ["max_tokens=1", "P's token is EOS"])
async def test_n_choices_are_never_answered_with_p_s_one(case):
    # P samples one choice; the other n-1 are D's to sample (they need not end there).
    async with harness() as h:
        body = dict(COMPLETION, n=3, temperature=0.8)
        if case == "max_tokens=1":
            body["max_tokens"] = 1
        else:
            h.backends["p1"].eos_at = 11  # "hello world" is 11 prompt tokens
        response = await h.client.post("/v1/completions", json=body)
        assert response.status_code == 200
        assert response.headers["x-pdproxy-mode"] == "decode"
        assert [call["body"]["n"] for call in h.backends["d1"].calls] == [3]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_with_no_limit_runs_to_the_end_of_the_context(stream):
    # A completions leg's default is 16 tokens; a chat answer with no limit is not.
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"} | {"stream": stream}
    async with harness() as h:
        # Before any health check the context length is unknown: D runs the request as is.
        response, s = await compare(h, "/v1/chat/completions", body)
        assert response.headers["x-pdproxy-mode"] == "decode"
        assert response.headers["x-pdproxy-fallback"] == "context length unknown"
        await h.app.state.monitor.check_all()  # reads each instance's max_model_len
        response, s = await compare(h, "/v1/chat/completions", body)
        assert response.headers["x-pdproxy-mode"] == "stitched"
        d_body = h.backends["d1"].calls[-1]["body"]
        assert d_body["max_tokens"] == 96 - len(d_body["prompt"])  # the context left
        assert len(s.texts[0].split()) > 17 and s.finish[0] == "length"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", dict(COMPLETION, max_tokens=97), "max_tokens"),
        ("/v1/chat/completions", dict(CHAT, max_tokens=1000), "max_tokens"),
        ("/v1/chat/completions", dict(CHAT, max_completion_tokens=97), "max_completion_tokens"),
    ],
)
async def test_more_output_than_the_context_is_vllm_s_400(path, body, param, stream):
    # P only ever sees max_tokens=1, so it cannot refuse this; a single vLLM does.
    async with harness() as h:
        await h.app.state.monitor.check_all()  # the context length: 96 tokens
        response = await h.client.post(path, json=dict(body, stream=stream))
        assert response.status_code == 400
        error = response.json()["error"]
        assert (
            error["param"] == param
            and "cannot be greater than max_model_len=96" in error["message"]
        )
        assert h.backends["p1"].calls == []


async def test_stop_string_inside_decode_text():
    async with harness() as h:
        stop_at = (
            h.ref.handler(httpx.Request("POST", "http://ref/v1/completions", json=COMPLETION))
            .json()["choices"][0]["text"]
            .split()[3]
        )
        _, s = await compare(h, "/v1/completions", dict(COMPLETION, stop=[stop_at]))
        assert s.finish[0] == "stop" and s.stop_reason[0] == stop_at


async def test_stop_string_across_the_seam_falls_back_to_decode_mode():
    async with harness() as h:
        full = h.ref.handler(
            httpx.Request("POST", "http://ref/v1/completions", json=COMPLETION)
        ).json()["choices"][0]["text"]
        first = full.split(" ")[0] + " "
        straddling = first[-2:] + full[len(first) : len(first) + 2]
        response, s = await compare(
            h, "/v1/completions", dict(COMPLETION, stop=[straddling], stream=True)
        )
        assert response.headers["x-pdproxy-mode"] == "decode"
        assert response.headers["x-pdproxy-fallback"] == "stop string across the seam"
        assert s.stop_reason[0] == straddling


@pytest.mark.parametrize(
    "path, base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("asked", [False, True])
async def test_decode_mode_equals_colocated(path, base, stream, asked):
    # D is always asked for token ids (the proxy tracks what it sends); the client
    # sees them only when it asked, in whole answers as in streams.
    async with harness(stitch=False) as h:
        body = dict(base, stream=stream, return_token_ids=asked)
        response, s = await compare(h, path, body)
        assert response.headers["x-pdproxy-mode"] == "decode"
        assert h.backends["d1"].calls[0]["body"]["return_token_ids"] is True
        assert bool(s.token_ids) == asked


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"n": 2, "temperature": 0.5}, "n>1"),
        ({"presence_penalty": 1.0}, "presence/frequency penalty"),
        ({"seed": 1, "temperature": 0.7}, "seeded sampling"),
    ],
)
async def test_decode_mode_for_unstitchable_requests(extra, reason):
    async with harness() as h:
        body = dict(COMPLETION, **extra)
        response = await h.client.post("/v1/completions", json=body)
        assert response.status_code == 200
        assert (
            response.headers["x-pdproxy-mode"] == "decode"
            and response.headers["x-pdproxy-fallback"] == reason
        )
        d_body = h.backends["d1"].calls[0]["body"]
        assert d_body["prompt"] == "hello world" and d_body["kv_transfer_params"]["transfer_id"]
        if extra.get("n"):
            assert h.backends["p1"].calls[0]["body"]["kv_transfer_params"]["consumers"] == 2


async def test_colocated_requests_skip_prefill():
    async with harness() as h:
        response = await h.client.post("/v1/completions", json=dict(COMPLETION, echo=True))
        assert (
            response.headers["x-pdproxy-mode"] == "colocated"
            and response.headers["x-pdproxy-fallback"] == "echo"
        )
        assert h.backends["p1"].calls == [] and len(h.backends["d1"].calls) == 1


async def test_short_prompts_skip_prefill():
    async with harness(min_prefill_tokens=100) as h:
        response, _ = await compare(h, "/v1/completions", dict(COMPLETION, stream=True))
        assert response.headers["x-pdproxy-fallback"] == "short prompt"
        assert h.backends["p1"].calls == []


async def test_request_id_is_honoured_and_sent_to_both_legs():
    async with harness() as h:
        response = await h.client.post(
            "/v1/completions",
            json=COMPLETION,
            headers={
                "x-request-id": "abc-123",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            },
        )
        assert response.headers["x-request-id"] == "abc-123"
        for name in ("p1", "d1"):
            headers = h.backends[name].calls[0]["headers"]
            assert headers["x-request-id"] == "abc-123"
            assert headers["traceparent"].startswith("00-0af7")
        generated = await h.client.post("/v1/completions", json=COMPLETION)
        assert len(generated.headers["x-request-id"]) >= 16


async def test_bad_json_is_400_before_any_backend():
    async with harness() as h:
        response = await h.client.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "BadRequestError"
        response = await h.client.post("/v1/completions", json=dict(COMPLETION, max_tokens="many"))
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
        assert h.backends["p1"].calls == [] and h.backends["d1"].calls == []


async def test_json_nested_too_deeply_is_400_before_any_backend():
    async with harness() as h:
        deep = b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        response = await h.client.post(
            "/v1/completions", content=deep, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "BadRequestError"
        assert h.backends["p1"].calls == [] and h.backends["d1"].calls == []


async def test_a_lone_surrogate_reaches_the_backend_as_sent():
    # Valid JSON that no UTF-8 encoder takes: passed on escaped, for vLLM to judge.
    async with harness() as h:
        body = b'{"model":"m","prompt":"hello \\ud800 world","max_tokens":4}'
        response = await h.client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code < 500
        assert h.backends["p1"].calls[0]["body"]["prompt"] == "hello \ud800 world"


async def test_backend_4xx_reaches_the_client_unchanged():
    async with harness() as h:
        h.backends["p1"].fail_status = 404
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "p1 says 404"
        assert response.headers["x-pdproxy-failed-leg"] == "prefill"
        assert len(h.backends["p1"].calls) == 1  # a client's mistake is not retried


async def test_prefill_failure_moves_to_another_prefill():
    async with harness(prefill=("p1", "p2")) as h:
        failing = h.backends["p1"]
        failing.fail_status = 500
        for _ in range(2):
            response = await h.client.post("/v1/completions", json=COMPLETION)
            assert response.status_code == 200
        assert h.backends["p2"].calls


async def test_decode_failure_before_first_byte_moves_to_another_decode():
    async with harness(decode=("d1", "d2")) as h:
        h.backends["d1"].fail_status = 503
        h.instance("d2").load.waiting = 5  # so d1 is tried first
        # The first D tried fails before its first byte; the second one answers.
        response, _ = await compare(h, "/v1/completions", dict(COMPLETION, stream=True))
        assert response.status_code == 200 and response.headers["x-pdproxy-mode"] == "stitched"
        calls = sorted(len(h.backends[name].calls) for name in ("d1", "d2"))
        assert calls == [1, 1]


async def test_all_prefill_failing_is_a_502_naming_the_leg():
    async with harness() as h:
        h.backends["p1"].fail_status = 500
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 502
        assert f"prefill backend {h.url('p1')}" in response.json()["error"]["message"]


async def test_decode_failing_mid_stream_ends_with_error_event_and_done():
    async with harness() as h:
        h.backends["d1"].fail_status = 500
        response = await h.client.post("/v1/completions", json=dict(COMPLETION, stream=True))
        assert response.status_code == 200  # P's token was already sent
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(lines[0][6:])["choices"][0]["text"]
        assert "error" in json.loads(lines[-2][6:])
        assert lines[-1] == "data: [DONE]"
        await asyncio.sleep(0.2)
        assert h.releases  # D never pulled: P's KV was released


async def test_models_and_other_routes_pass_through():
    async with harness() as h:
        h.backends["d1"].routes["/tokenize"] = lambda request: httpx.Response(
            200, json={"tokens": [1, 2], "count": 2}
        )
        models = await h.client.get("/v1/models")
        assert models.json()["data"][0]["id"] == "m"
        tokens = await h.client.post("/tokenize", json={"model": "m", "prompt": "hi"})
        assert tokens.json()["count"] == 2


async def test_health_and_metrics():
    async with harness() as h:
        await h.client.post("/v1/completions", json=COMPLETION)
        assert (await h.client.get("/health")).json() == {"status": "ok"}
        text = (await h.client.get("/metrics")).text
        assert 'pdproxy_requests_total{endpoint="completions",mode="stitched",outcome="ok"}' in text
        assert "pdproxy_phase_seconds_bucket" in text
        ready = await h.client.get("/ready")
        assert ready.status_code == 503  # no canary has run (the monitor is off in unit tests)


async def test_a_refusal_inside_the_stream_is_relayed_not_failed_over():
    # vLLM checks some inputs only once its stream has begun (token ids out of the
    # vocabulary): its 4xx error event is the client's answer, not a decode failure.
    refusal = {
        "error": {
            "message": "Token id 999 is out of vocabulary",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }

    def refuse(request):
        return httpx.Response(
            200,
            content=b"data: " + json.dumps(refusal).encode() + b"\n\ndata: [DONE]\n\n",
            headers={"content-type": "text/event-stream"},
        )

    async with harness(prefill=("p1",), decode=("d1", "d2"), min_prefill_tokens=10**6) as h:
        h.backends["d1"].override = h.backends["d2"].override = refuse
        body = dict(COMPLETION, stream=True)
        response = await h.client.post("/v1/completions", json=body)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert response.status_code == 200 and events == [json.dumps(refusal), "[DONE]"]
        assert len(h.backends["d1"].calls) + len(h.backends["d2"].calls) == 1  # no resume
        assert all(i.consecutive_failures == 0 for i in h.app.state.registry.decode.instances)


@pytest.mark.parametrize("stream", [False, True])
async def test_echo_is_not_asked_for_token_ids(stream):
    # vLLM leaves the prompt's text out of an echo when token ids are asked for: the
    # proxy must not ask on the client's behalf.
    async with harness() as h:
        body = dict(COMPLETION, echo=True, stream=stream)
        response = await h.client.post("/v1/completions", json=body)
        assert response.headers["x-pdproxy-mode"] == "colocated"
        assert "return_token_ids" not in h.backends["d1"].calls[0]["body"]


async def test_events_that_go_out_together_are_one_write():
    # Each ASGI body message is a write to the client's socket, the costliest step of
    # relaying: the chat opening (role, P's token) is one, and so is the end (usage, DONE).
    async with harness() as h:
        body = json.dumps(dict(CHAT, stream=True, stream_options={"include_usage": True})).encode()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays

        messages = []

        async def send(message):
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"pdproxy"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(h.app(scope, receive, send), 10)
        writes = [m["body"] for m in messages if m["type"] == "http.response.body" and m["body"]]
        events = [
            [json.loads(e[6:]) if e != b"data: [DONE]" else "DONE" for e in w.split(b"\n\n") if e]
            for w in writes
        ]
        assert len(events[0]) == 2, events[0]
        role, token = events[0]
        assert role["choices"][0]["delta"]["role"] == "assistant"
        assert (
            "role" not in token["choices"][0]["delta"] and token["choices"][0]["delta"]["content"]
        )
        assert len(events[-1]) == 2 and events[-1][0]["usage"] and events[-1][1] == "DONE"
