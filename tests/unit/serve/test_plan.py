import pytest

from proxy.errors import ProxyError
from proxy.serve.bodies import continuation_body, decode_body, prefill_body
from proxy.serve.plan import plan_request, straddles_stop
from proxy.serve.vocabulary import CHAT, COMPLETIONS


def plan(kind=COMPLETIONS, **body):
    base = (
        {"model": "m", "prompt": "hello"}
        if kind == COMPLETIONS
        else {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    return plan_request(kind, {**base, **body})


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"stop": [1, 2]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"kv_transfer_params": {"do_remote_decode": True}}, "kv_transfer_params"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"n": 2, "temperature": 0}, "n"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"model": 3}, "model"),
        ({"logit_bias": [1]}, "logit_bias"),
    ],
)
def test_bad_completion_requests_are_400(body, param):
    with pytest.raises(ProxyError) as info:
        plan(**body)
    assert info.value.status == 400
    assert info.value.param == param


def test_body_must_be_an_object():
    with pytest.raises(ProxyError):
        plan_request(COMPLETIONS, [1, 2])


def test_chat_needs_messages():
    with pytest.raises(ProxyError) as info:
        plan_request(CHAT, {"model": "m", "messages": []})
    assert info.value.param == "messages"


def test_defaults_and_usage_options():
    p = plan(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert p.max_tokens == 16 and p.stream and p.include_usage and p.continuous_usage
    assert p.stitchable and p.colocated_reason is None
    assert plan(kind=CHAT).max_tokens is None
    assert plan(kind=CHAT, max_completion_tokens=7, max_tokens=9).max_tokens == 7


@pytest.mark.parametrize(
    "body, blocker",
    [
        ({"n": 2, "temperature": 0.7}, "n>1"),
        ({"presence_penalty": 0.5}, "presence/frequency penalty"),
        ({"seed": 3, "temperature": 0.7}, "seeded sampling"),
        ({"bad_words": ["x"]}, "bad_words"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ],
)
def test_features_that_block_stitching(body, blocker):
    assert blocker in plan(**body).stitch_blockers


def test_chat_only_blockers():
    assert (
        "tools"
        in plan(kind=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]).stitch_blockers
    )
    assert plan(
        kind=CHAT, tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none"
    ).stitchable
    assert "chat logprobs" in plan(kind=CHAT, logprobs=True).stitch_blockers
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert "multimodal input" in plan_request(CHAT, {"messages": [image]}).stitch_blockers
    assert plan(seed=3, temperature=0).stitchable  # greedy ignores the seed


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"prompt": ["a", "b"]}, "batched prompts"),
        ({"echo": True}, "echo"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"use_beam_search": True}, "beam_search"),
        ({"max_tokens": 0}, "max_tokens=0"),
    ],
)
def test_colocated_requests(body, reason):
    assert plan(**body).colocated_reason == reason


def test_single_item_prompt_lists_are_disaggregated():
    assert plan(prompt=["just one"]).colocated_reason is None
    assert plan(prompt=[[1, 2, 3]]).colocated_reason is None


def test_max_tokens_limit():
    with pytest.raises(ProxyError):
        plan_request(COMPLETIONS, {"prompt": "x", "max_tokens": 100}, max_tokens_limit=50)
    capped = plan_request(
        CHAT, {"messages": [{"role": "user", "content": "x"}]}, max_tokens_limit=50
    )
    assert capped.max_tokens == 50 and capped.body["max_completion_tokens"] == 50


def test_prefill_body():
    p = plan(
        kind=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        n=3,
        temperature=0.9,
        min_tokens=4,
        max_tokens=10,
    )
    body = prefill_body(p, consumers=3)
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert body["stream"] is False and "stream_options" not in body
    assert body["n"] == 1 and body["min_tokens"] == 1 and body["return_token_ids"] is True
    assert body["kv_transfer_params"] == {"do_remote_decode": True, "consumers": 3}
    assert body["temperature"] == 0.9
    assert p.body["n"] == 3  # the client's body is not modified


def test_decode_body_keeps_the_request_and_asks_for_usage():
    p = plan(stream=True, seed=5, vllm_custom_field=1)
    body = decode_body(p, {"transfer_id": "t"})
    assert body["kv_transfer_params"] == {"transfer_id": "t"}
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert body["vllm_custom_field"] == 1 and body["seed"] == 5


def test_continuation_body_continues_after_the_tokens_sent():
    p = plan(
        kind=CHAT,
        max_tokens=10,
        min_tokens=3,
        stop=["\n"],
        top_k=5,
        chat_template_kwargs={"a": 1},
        unknown_knob=True,
    )
    body = continuation_body(p, "m", [1, 2, 3], [42], {"transfer_id": "t"})
    assert body["prompt"] == [1, 2, 3, 42]
    assert body["max_tokens"] == 9 and body["min_tokens"] == 2
    assert body["return_token_ids"] is True  # the proxy tracks every token sent
    later = continuation_body(p, "m", [1, 2, 3], [42, 43, 44, 45], None)
    assert later["prompt"] == [1, 2, 3, 42, 43, 44, 45]
    assert later["max_tokens"] == 6 and later["min_tokens"] == 0
    assert body["stop"] == ["\n"] and body["top_k"] == 5 and body["unknown_knob"] is True
    assert (
        "messages" not in body
        and "chat_template_kwargs" not in body
        and "max_completion_tokens" not in body
    )
    # No limit in chat: to the end of the context (a completions leg's default is 16).
    unlimited = continuation_body(plan(kind=CHAT), "m", [1], [2], None, context=4096)
    assert unlimited["max_tokens"] == 4094 and "kv_transfer_params" not in unlimited


def test_straddles_stop():
    assert straddles_stop("Hello wo", ["world"])
    assert straddles_stop("abc", ["cd"])
    assert not straddles_stop("abc", ["xy", "abc"])  # wholly inside: P already stopped there
    assert not straddles_stop("abc", [])
