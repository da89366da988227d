"""The bodies of the requests the proxy sends its backends, each built from a
:class:`~proxy.serve.plan.Plan`: P's prefill (one token, KV held for D), D's
continuation of the client's own request (decode mode), a token-id continuation after
the tokens already sent (stitched, or after a move), and one instance doing it all
(colocated). The plan decided which; these only write it down.
"""

from __future__ import annotations

from typing import Any

from ..wire.kv_params import prefill_params, with_migration_key
from .plan import Plan
from .vocabulary import CHAT

# Keys the prompt is built from: P uses them, the stitched decode leg must not.
_PROMPT_KEYS = (
    "prompt",
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "add_special_tokens",
    "truncate_prompt_tokens",
    "truncation_side",
    "echo",
    "response_format",
    "include_reasoning",
    "return_prompt_text",
    "max_completion_tokens",
    "top_logprobs",
)


def prefill_body(plan: Plan, consumers: int) -> dict[str, Any]:
    """P computes the prompt and one token, then holds the KV for D."""
    body = dict(plan.body)
    body.pop("stream_options", None)
    body["stream"] = False
    body["max_tokens"] = 1
    if plan.kind == CHAT:
        body["max_completion_tokens"] = 1
    body["n"] = 1
    body["min_tokens"] = min(plan.min_tokens, 1)
    body["return_token_ids"] = True
    body["kv_transfer_params"] = prefill_params(consumers)
    return body


def decode_body(plan: Plan, kv_params: dict[str, Any] | None) -> dict[str, Any]:
    """D runs the client's own request on top of P's KV (decode mode)."""
    body = dict(plan.body)
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    if plan.tracks_tokens:
        body["return_token_ids"] = True  # the proxy tracks every token it forwards
    if plan.stream:
        # Usage is always asked for: the proxy needs it for accounting; it is dropped
        # again if the client did not ask.
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        # Usage on every chunk only as the client asked it (vLLM ignores
        # continuous_usage_stats without include_usage, which is now forced on).
        options["continuous_usage_stats"] = plan.continuous_usage
        body["stream_options"] = options
    return body


def continuation_body(
    plan: Plan,
    model: str,
    prompt_token_ids: list[int],
    sent: list[int],
    kv_params: dict[str, Any] | None,
    context: int | None = None,
) -> dict[str, Any]:
    """A leg that continues the answer after the tokens ``sent`` (P's token when
    stitched; every token forwarded when the answer moves to another instance): a
    token-id completion request, as many tokens shorter.

    Without ``kv_params`` the instance computes the whole prompt itself; the answer
    is the same, only slower. ``context`` is the model's context length, needed when the
    client set no limit.
    """
    body = {key: value for key, value in plan.body.items() if key not in _PROMPT_KEYS}
    body["model"] = model
    body["prompt"] = [*prompt_token_ids, *sent]
    if plan.max_tokens is not None:
        body["max_tokens"] = plan.max_tokens - len(sent)
    else:
        # A chat request with no limit runs to the end of the context, where a completions
        # request with none would stop at 16 tokens: the limit is what the context has
        # left after this leg's prompt, as the server computes it for the chat request.
        assert context is not None, "an unbounded answer continues only where the context is known"
        body["max_tokens"] = context - len(body["prompt"])
    body["min_tokens"] = max(plan.min_tokens - len(sent), 0)
    body["n"] = 1
    body["return_token_ids"] = True
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    if plan.kind == CHAT:
        body.pop("logprobs", None)
    if plan.stream:
        body["stream"] = True
        body["stream_options"] = {
            "include_usage": True,
            "continuous_usage_stats": plan.continuous_usage,
        }
    else:
        body["stream"] = False
        body.pop("stream_options", None)
    return body


def colocated_body(plan: Plan, key: str) -> dict[str, Any]:
    """One instance runs the client's request; the proxy still tracks its tokens."""
    body = dict(plan.body)
    if plan.tracks_tokens:
        body["return_token_ids"] = True
    body["kv_transfer_params"] = with_migration_key(body.get("kv_transfer_params"), key)
    return body
