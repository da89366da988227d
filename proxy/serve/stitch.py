"""Build the client's answer from P's first token and D's continuation.

The client must see what one colocated vLLM would have sent: one id, one ``created``,
the assistant role once, logprob offsets that continue across the seam, usage that
counts the real prompt and P's token once, and ``cached_tokens`` from P.

This module reads P's answer and writes whole (non-streamed) answers; the streamed
answers' writers are in :mod:`proxy.serve.writers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from ..wire.jsonutil import dumps, loads
from ..wire.sse import event
from .plan import Plan
from .vocabulary import CHAT


@dataclass
class PrefillResult:
    """P's non-streaming answer to the one-token request, read once."""

    kind: str
    raw: dict[str, Any]
    choice: dict[str, Any]
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, Any]
    kv_params: dict[str, Any] | None

    @property
    def first_token(self) -> int:
        return self.token_ids[0]

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens", len(self.prompt_token_ids)))

    @property
    def parsed_by_server(self) -> bool:
        """True when P's chat output went through a reasoning or tool parser."""
        message = self.choice.get("message") or {}
        return bool(
            message.get("reasoning")
            or message.get("reasoning_content")
            or message.get("tool_calls")
        ) or (self.kind == CHAT and message.get("content") is None)


def parse_prefill(kind: str, raw: dict[str, Any], backend: str) -> PrefillResult:
    try:
        choice = raw["choices"][0]
        if kind == CHAT:
            text = (choice.get("message") or {}).get("content") or ""
            prompt_ids = raw.get("prompt_token_ids")
        else:
            text = choice.get("text") or ""
            prompt_ids = choice.get("prompt_token_ids")
        token_ids = choice.get("token_ids")
        if (
            not isinstance(token_ids, list)
            or len(token_ids) != 1
            or not isinstance(prompt_ids, list)
        ):
            raise ValueError("no token ids (is this vLLM?)")
        return PrefillResult(
            kind=kind,
            raw=raw,
            choice=choice,
            text=text,
            token_ids=token_ids,
            prompt_token_ids=prompt_ids,
            finish_reason=choice.get("finish_reason"),
            usage=raw.get("usage") or {},
            kv_params=raw.get("kv_transfer_params"),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ProxyError(
            502, f"prefill backend {backend} sent an unexpected answer: {exc}", leg="prefill"
        ) from exc


def merged_usage(
    p: PrefillResult,
    decode_usage: dict[str, Any] | None,
    extra_tokens: int,
    per_chunk: bool = False,
) -> dict[str, Any]:
    """The client's usage: P's real prompt and cache hits, P's token plus D's tokens.

    ``extra_tokens`` is how many output tokens D did not count itself (1 when stitched:
    P's token; 0 in decode mode, where D regenerated it). ``per_chunk``: the usage a
    streamed chunk carries (``continuous_usage_stats``), which vLLM gives as the three
    counts only.
    """
    usage = dict(decode_usage or {})
    prompt = p.prompt_tokens
    completion = int(usage.get("completion_tokens", 0)) + extra_tokens
    if per_chunk:
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }
    usage["prompt_tokens"] = prompt
    usage["total_tokens"] = prompt + completion
    usage["completion_tokens"] = completion
    if "prompt_tokens_details" in usage or p.usage.get("prompt_tokens_details") is not None:
        details = p.usage.get("prompt_tokens_details")
        if details is None:
            usage.pop("prompt_tokens_details", None)
        else:
            usage["prompt_tokens_details"] = details
    return usage


def load_event(data: bytes, leg: str = "decode") -> dict[str, Any]:
    """Parse one backend stream event; a malformed one or an error event raises ProxyError."""
    try:
        chunk = loads(data)
    except ValueError as exc:
        raise ProxyError(502, f"{leg} backend sent an invalid stream event", leg=leg) from exc
    if not isinstance(chunk, dict):
        raise ProxyError(502, f"{leg} backend sent an unexpected stream event", leg=leg)
    if "error" in chunk and "choices" not in chunk:
        error = (
            chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        )
        code = error.get("code")
        if isinstance(code, int) and 400 <= code < 500:
            # vLLM refused the request itself (it validates some inputs only once the
            # stream has begun): the client's error, relayed as it is, not a failure.
            raise ProxyError(code, str(error.get("message")), leg=leg, body=chunk)
        raise ProxyError(
            502, f"{leg} backend failed mid-stream: {error.get('message')}", leg=leg, body=chunk
        )
    return chunk


def _is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return not chunk.get("choices") and chunk.get("usage") is not None


def _shift_offsets(logprobs: dict[str, Any] | None, base: int) -> None:
    if logprobs and base and logprobs.get("text_offset"):
        logprobs["text_offset"] = [offset + base for offset in logprobs["text_offset"]]


def _offset_after(logprobs: dict[str, Any] | None) -> int:
    """Where the next token's text_offset starts, as vLLM computes it."""
    if not logprobs or not logprobs.get("tokens"):
        return 0
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


# --- whole responses ----------------------------------------------------------------


def merge_stitched(plan: Plan, p: PrefillResult, d: dict[str, Any]) -> dict[str, Any]:
    """P's one-token answer plus D's token-id completion, as one response."""
    try:
        d_choice = d["choices"][0]
    except (KeyError, IndexError, TypeError) as exc:
        raise ProxyError(502, "decode backend sent an unexpected answer", leg="decode") from exc
    answer = dict(p.raw)
    choice = dict(p.choice)
    d_text = d_choice.get("text") or ""
    if plan.kind == CHAT:
        message = dict(choice.get("message") or {})
        message["content"] = p.text + d_text
        choice["message"] = message
    else:
        choice["text"] = p.text + d_text
        choice["logprobs"] = _merge_logprobs(choice.get("logprobs"), d_choice.get("logprobs"))
    choice["token_ids"] = p.token_ids + list(d_choice.get("token_ids") or [])
    choice["finish_reason"] = d_choice.get("finish_reason")
    choice["stop_reason"] = d_choice.get("stop_reason")
    answer["choices"] = [choice]
    answer["usage"] = merged_usage(p, d.get("usage"), 1)
    answer["kv_transfer_params"] = None
    return hide_token_ids(plan, answer)


def _merge_logprobs(
    first: dict[str, Any] | None, rest: dict[str, Any] | None
) -> dict[str, Any] | None:
    if first is None or rest is None:
        return first or rest
    base = _offset_after(first)
    return {
        "text_offset": list(first.get("text_offset") or [])
        + [o + base for o in rest.get("text_offset") or []],
        "token_logprobs": list(first.get("token_logprobs") or [])
        + list(rest.get("token_logprobs") or []),
        "tokens": list(first.get("tokens") or []) + list(rest.get("tokens") or []),
        "top_logprobs": list(first.get("top_logprobs") or [])
        + list(rest.get("top_logprobs") or []),
    }


def fix_decode_answer(plan: Plan, p: PrefillResult, d: dict[str, Any]) -> dict[str, Any]:
    """Decode mode, whole response: D's answer with P's prompt accounting."""
    answer = dict(d)
    answer["usage"] = merged_usage(p, d.get("usage"), 0)
    answer["kv_transfer_params"] = None
    return hide_token_ids(plan, answer)


def prefill_only_answer(plan: Plan, p: PrefillResult) -> dict[str, Any]:
    """P's token ended the request: P's answer is the whole answer."""
    answer = dict(p.raw)
    answer["kv_transfer_params"] = None
    return hide_token_ids(plan, answer)


def hide_token_ids(plan: Plan, answer: dict[str, Any]) -> dict[str, Any]:
    """Every leg is asked for token ids (the proxy tracks what it sends); the client
    sees them only if it asked, as vLLM shows them: null fields."""
    if plan.return_token_ids:
        return answer
    answer = dict(answer)
    choices = []
    for choice in answer.get("choices") or []:
        choice = dict(choice)
        choice["token_ids"] = None
        if plan.kind != CHAT:
            choice["prompt_token_ids"] = None
        choices.append(choice)
    answer["choices"] = choices
    if plan.kind == CHAT:
        answer["prompt_token_ids"] = None
    return answer


def as_stream(plan: Plan, answer: dict[str, Any]) -> list[bytes]:
    """A whole answer (P's, when its token ended the request) as stream events."""
    base = {key: answer.get(key) for key in ("id", "created", "model")}
    events = []
    usage = answer.get("usage")
    for choice in answer.get("choices") or ():
        if plan.kind == CHAT:
            base["object"] = "chat.completion.chunk"
            message = choice.get("message") or {}
            role_chunk = {
                **base,
                "choices": [
                    {
                        "index": choice["index"],
                        "delta": {"role": message.get("role", "assistant"), "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            role_chunk["prompt_token_ids"] = answer.get("prompt_token_ids")
            events.append(event(dumps(role_chunk)))
            delta: dict[str, Any] = {"content": message.get("content") or ""}
            stream_choice = {
                "index": choice["index"],
                "delta": delta,
                "logprobs": choice.get("logprobs"),
            }
        else:
            base["object"] = "text_completion"
            stream_choice = {
                "index": choice["index"],
                "text": choice.get("text") or "",
                "logprobs": choice.get("logprobs"),
            }
        stream_choice["finish_reason"] = choice.get("finish_reason")
        stream_choice["stop_reason"] = choice.get("stop_reason")
        if plan.kind != CHAT:
            stream_choice["prompt_token_ids"] = choice.get("prompt_token_ids")
        stream_choice["token_ids"] = choice.get("token_ids")
        chunk = {**base, "choices": [stream_choice]}
        if plan.continuous_usage and usage:
            chunk["usage"] = {
                k: usage[k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")
            }
        if not plan.include_usage and answer.get("system_fingerprint") is not None:
            chunk["system_fingerprint"] = answer["system_fingerprint"]
        events.append(event(dumps(chunk)))
    if plan.include_usage and usage:
        usage_chunk = {
            **base,
            "choices": [],
            "usage": {k: v for k, v in usage.items() if v is not None},
        }
        if answer.get("system_fingerprint") is not None:
            usage_chunk["system_fingerprint"] = answer["system_fingerprint"]
        events.append(event(dumps(usage_chunk)))
    return events
