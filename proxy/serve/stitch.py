"""Build the client's answer from P's first token and D's continuation.

The client must see what one colocated vLLM would have sent: one id, one ``created``,
the assistant role once, logprob offsets that continue across the seam, usage that
counts the real prompt and P's token once, and ``cached_tokens`` from P.

Three writers share one interface (``opening`` events, ``rewrite`` per D event,
``closing`` events):

- ``CompletionStitcher``: stitched /v1/completions.
- ``ChatStitcher``: stitched /v1/chat/completions; D ran as a token-id completion, so
  its chunks are rewritten into chat chunks.
- ``DecodeRelay``: decode mode; D's own stream is already the answer, only usage is
  fixed (and dropped when the client did not ask for it).

The non-streaming merges at the bottom do the same for whole responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from ..wire.jsonutil import dumps, loads
from ..wire.sse import event
from .plan import Plan
from .vocabulary import CHAT, Mode


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
    p: PrefillResult, decode_usage: dict[str, Any] | None, extra_tokens: int
) -> dict[str, Any]:
    """The client's usage: P's real prompt and cache hits, P's token plus D's tokens.

    ``extra_tokens`` is how many output tokens D did not count itself (1 when stitched:
    P's token; 0 in decode mode, where D regenerated it).
    """
    usage = dict(decode_usage or {})
    prompt = p.prompt_tokens
    completion = int(usage.get("completion_tokens", 0)) + extra_tokens
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


class _Writer:
    # Output tokens D does not count itself: P's token when stitched, none in decode mode.
    extra_tokens = 1

    def __init__(self, plan: Plan, p: PrefillResult) -> None:
        self.plan = plan
        self.p = p
        self.decode_usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def _load(self, data: bytes) -> dict[str, Any]:
        return load_event(data)

    def _usage_for_client(self) -> dict[str, Any]:
        return merged_usage(self.p, self.decode_usage, self.extra_tokens)

    @property
    def completion_tokens_seen(self) -> int | None:
        if not self.decode_usage:
            return None
        return int(self.decode_usage.get("completion_tokens", 0)) + self.extra_tokens


class CompletionStitcher(_Writer):
    """Stitched /v1/completions stream: P's token chunk, then D's chunks rewritten."""

    def __init__(self, plan: Plan, p: PrefillResult) -> None:
        super().__init__(plan, p)
        self.id = p.raw.get("id")
        self.created = p.raw.get("created")
        self.model = p.raw.get("model")
        self.offset_base = _offset_after(p.choice.get("logprobs"))

    def opening(self) -> list[bytes]:
        choice = {
            "index": 0,
            "text": self.p.text,
            "logprobs": self.p.choice.get("logprobs"),
            "finish_reason": None,
            "stop_reason": None,
            "prompt_token_ids": self.p.prompt_token_ids if self.plan.return_token_ids else None,
            "token_ids": self.p.token_ids if self.plan.return_token_ids else None,
        }
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.plan.continuous_usage:
            prompt = self.p.prompt_tokens
            chunk["usage"] = {
                "prompt_tokens": prompt,
                "total_tokens": prompt + 1,
                "completion_tokens": 1,
            }
        return [event(dumps(chunk))]

    def rewrite(self, data: bytes) -> bytes | None:
        chunk = self._load(data)
        if _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            return None  # re-emitted by closing(), with the client's numbers
        # Most chunks need nothing changed: relay their bytes as they are.
        changed = (
            chunk.get("created") != self.created
            or chunk.get("id") != self.id
            or chunk.get("model") != self.model
        )
        for choice in chunk.get("choices") or ():
            if choice.get("logprobs"):
                _shift_offsets(choice["logprobs"], self.offset_base)
                changed = True
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = None  # D's prompt is P's prompt + P's token
                changed = True
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage") is not None:
            chunk["usage"] = merged_usage(self.p, chunk["usage"], self.extra_tokens)
            changed = True
        if not changed:
            return event(data)
        chunk["id"], chunk["created"], chunk["model"] = self.id, self.created, self.model
        return event(dumps(chunk))

    def closing(self) -> list[bytes]:
        if not self.plan.include_usage:
            return []
        chunk = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self._usage_for_client(),
        }
        if self.p.raw.get("system_fingerprint") is not None:
            chunk["system_fingerprint"] = self.p.raw["system_fingerprint"]
        return [event(dumps(chunk))]


class ChatStitcher(_Writer):
    """Stitched chat stream: the role chunk, P's token, then D's completion chunks as chat."""

    def __init__(self, plan: Plan, p: PrefillResult) -> None:
        super().__init__(plan, p)
        self.base = {
            "id": p.raw.get("id"),
            "object": "chat.completion.chunk",
            "created": p.raw.get("created"),
            "model": p.raw.get("model"),
        }
        self.role = (p.choice.get("message") or {}).get("role") or "assistant"
        self.completion_tokens = 1

    def _chunk(
        self, choice: dict[str, Any], completion_tokens: int | None = None
    ) -> dict[str, Any]:
        chunk = {**self.base, "choices": [choice]}
        if self.plan.continuous_usage and completion_tokens is not None:
            prompt = self.p.prompt_tokens
            chunk["usage"] = {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion_tokens,
                "completion_tokens": completion_tokens,
            }
        return chunk

    def opening(self) -> list[bytes]:
        role_choice = {
            "index": 0,
            "delta": {"role": self.role, "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        role_chunk = self._chunk(role_choice, 0)
        role_chunk["prompt_token_ids"] = (
            self.p.prompt_token_ids if self.plan.return_token_ids else None
        )
        role_chunk["prompt_text"] = self.p.raw.get("prompt_text")
        token_choice = {
            "index": 0,
            "delta": {"content": self.p.text},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": self.p.token_ids if self.plan.return_token_ids else None,
        }
        return [event(dumps(role_chunk)), event(dumps(self._chunk(token_choice, 1)))]

    def rewrite(self, data: bytes) -> bytes | None:
        chunk = self._load(data)
        if _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            return None
        out = None
        for choice in chunk.get("choices") or ():
            ids = choice.get("token_ids")
            if chunk.get("usage") is not None:
                self.completion_tokens = int(chunk["usage"].get("completion_tokens", 0)) + 1
            elif isinstance(ids, list):
                self.completion_tokens += len(ids)
            chat_choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": choice.get("text") or ""},
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
            }
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                chat_choice["stop_reason"] = choice.get("stop_reason")
            chat_choice["token_ids"] = ids if self.plan.return_token_ids else None
            out = self._chunk(chat_choice, self.completion_tokens)
            if choice.get("finish_reason") is not None and not self.plan.include_usage:
                fingerprint = self.p.raw.get("system_fingerprint")
                if fingerprint is not None:
                    out["system_fingerprint"] = fingerprint
        return event(dumps(out)) if out is not None else None

    def closing(self) -> list[bytes]:
        if not self.plan.include_usage:
            return []
        chunk = {**self.base, "choices": [], "usage": self._usage_for_client()}
        if self.p.raw.get("system_fingerprint") is not None:
            chunk["system_fingerprint"] = self.p.raw["system_fingerprint"]
        return [event(dumps(chunk))]


class DecodeRelay(_Writer):
    """Decode mode: D's stream is the answer; usage gets P's prompt numbers and cache hits."""

    extra_tokens = 0

    def opening(self) -> list[bytes]:
        return []

    def rewrite(self, data: bytes) -> bytes | None:
        chunk = self._load(data)  # a malformed event must become a clean error, not pass on
        if chunk.get("usage") is None:
            return event(data)  # the common chunk: relayed byte for byte
        if _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            if not self.plan.include_usage:
                return None
            chunk["usage"] = self._usage_for_client()
            return event(dumps(chunk))
        if chunk.get("usage") is not None:
            chunk["usage"] = merged_usage(self.p, chunk["usage"], self.extra_tokens)
        return event(dumps(chunk))

    def closing(self) -> list[bytes]:
        return []


def make_writer(mode: Mode, plan: Plan, p: PrefillResult) -> _Writer:
    if mode == Mode.DECODE:
        return DecodeRelay(plan, p)
    return ChatStitcher(plan, p) if plan.kind == CHAT else CompletionStitcher(plan, p)


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
    if plan.return_token_ids:
        choice["token_ids"] = p.token_ids + list(d_choice.get("token_ids") or [])
    else:
        choice["token_ids"] = None
        if plan.kind != CHAT:
            choice["prompt_token_ids"] = None
        else:
            answer["prompt_token_ids"] = None
    choice["finish_reason"] = d_choice.get("finish_reason")
    choice["stop_reason"] = d_choice.get("stop_reason")
    answer["choices"] = [choice]
    answer["usage"] = merged_usage(p, d.get("usage"), 1)
    answer["kv_transfer_params"] = None
    return answer


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
    return answer


def prefill_only_answer(plan: Plan, p: PrefillResult) -> dict[str, Any]:
    """P's token ended the request: P's answer is the whole answer."""
    answer = dict(p.raw)
    answer["kv_transfer_params"] = None
    if not plan.return_token_ids:
        choice = dict(p.choice)
        choice["token_ids"] = None
        if plan.kind == CHAT:
            answer["prompt_token_ids"] = None
        else:
            choice["prompt_token_ids"] = None
        answer["choices"] = [choice]
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
