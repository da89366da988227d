"""The client's stream, written from the decode legs' streams.

The client must see what one colocated vLLM would have sent: one id, one ``created``,
the assistant role once, logprob offsets that continue across every seam, usage that
counts the real prompt and every output token once, and ``cached_tokens`` from P.

Three writers share one interface (``opening`` events, ``rewrite`` per decode event,
``closing`` events); each records what it forwards in the answer's
:class:`~proxy.serve.transcript.Transcript`:

- ``CompletionStitcher``: /v1/completions continued by a token-id completion (after
  P's token, or after every token sent when the answer moved to another instance).
- ``ChatStitcher``: the same for /v1/chat/completions: the leg ran as a token-id
  completion, so its chunks are rewritten into chat chunks.
- ``DecodeRelay``: the leg's own stream is the answer (decode mode, or one instance
  doing it all); only usage is fixed, and the token ids the proxy asked for removed.

A *resumed* writer continues an answer already under way: it sends no opening, counts
the tokens sent before its leg, and trims from the leg's first chunks the tokens and
characters the client already has (the leg restarted at the last character boundary,
and greedy decoding repeats what followed it).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..wire.jsonutil import dumps
from ..wire.sse import event
from .plan import Plan
from .stitch import (
    PrefillResult,
    _is_usage_chunk,
    _offset_after,
    _shift_offsets,
    load_event,
    merged_usage,
)
from .transcript import Transcript
from .vocabulary import CHAT, Mode

# Token id lists: digits, commas (and, from other writers than vLLM's, spaces). One
# pattern per field, each with a literal replacement: a group reference in the
# replacement costs three times as much per chunk.
_TOKEN_IDS = re.compile(rb'"token_ids"\s*:\s*\[[0-9,\s]*\]')
_PROMPT_IDS = re.compile(rb'"prompt_token_ids"\s*:\s*\[[0-9,\s]*\]')


def without_ids(data: bytes) -> bytes:
    """An event with the token ids the proxy asked for (not the client) nulled."""
    data = _TOKEN_IDS.sub(b'"token_ids":null', data)
    return _PROMPT_IDS.sub(b'"prompt_token_ids":null', data)


class _News(NamedTuple):
    """What a decode choice adds to the answer: tokens, text, and how many of the
    choice's tokens were repeats trimmed off (their logprobs go with them)."""

    ids: list[int] | None
    text: str | None
    dropped: int
    trimmed: bool


class _Writer:
    def __init__(
        self, plan: Plan, p: PrefillResult | None, transcript: Transcript, resumed_at: int = -1
    ) -> None:
        self.plan = plan
        self.p = p
        self.t = transcript
        self.resumed = resumed_at >= 0
        # Output tokens this leg does not count itself: P's token when stitched, every
        # token before the resume point when resumed, none in decode mode.
        self.extra_tokens = resumed_at if self.resumed else self.first_extra
        # Tokens and characters after the resume point the client already has: the leg
        # repeats them, and they are trimmed from its first chunks.
        self.repeat_ids = len(transcript.ids) - resumed_at if self.resumed else 0
        self.repeat_chars = transcript.text_len - transcript.text_at_boundary if self.resumed else 0
        self.decode_usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    first_extra = 1

    def _usage_for_client(self) -> dict[str, Any]:
        return merged_usage(self.p, self.decode_usage, self.extra_tokens)

    def _stamp(self, chunk: dict[str, Any]) -> bool:
        """vLLM puts its ``system_fingerprint`` on a chunk that ends a choice when no usage
        chunk follows; the leg was asked for usage, so its chunk lacks it. Whether added."""
        if self.plan.include_usage or chunk.get("system_fingerprint") is not None:
            return False
        fingerprint = self.t.base.get("system_fingerprint")
        if fingerprint is None and self.p is not None:
            fingerprint = self.p.raw.get("system_fingerprint")
        if fingerprint is None:
            return False
        chunk["system_fingerprint"] = fingerprint
        return True

    def _take(self, ids: list[int] | None, text: str | None) -> _News | None:
        """Record a choice's tokens and text; what of them the client has not seen (None:
        the choice only repeats what it has)."""
        dropped = cut = 0
        if self.repeat_ids and ids:
            dropped = min(len(ids), self.repeat_ids)
            ids, self.repeat_ids = ids[dropped:], self.repeat_ids - dropped
        if self.repeat_chars and text:
            cut = min(len(text), self.repeat_chars)
            text, self.repeat_chars = text[cut:], self.repeat_chars - cut
        if (dropped or cut) and not ids and not text:
            return None
        self.t.add(ids, text)
        return _News(ids, text, dropped, bool(dropped or cut))

    @property
    def completion_tokens_seen(self) -> int | None:
        if not self.decode_usage:
            return None
        return int(self.decode_usage.get("completion_tokens", 0)) + self.extra_tokens


class _Stitcher(_Writer):
    """A writer whose leg is a token-id completion continuing the answer: on a first leg
    the answer's identity and prompt are P's."""

    def __init__(self, plan: Plan, p: PrefillResult, transcript: Transcript, resumed_at=-1):
        super().__init__(plan, p, transcript, resumed_at)
        if not self.resumed:
            transcript.set_base(p.raw)
            transcript.prompt_ids = p.prompt_token_ids


class CompletionStitcher(_Stitcher):
    """A /v1/completions answer continued by a token-id completion leg."""

    def __init__(self, plan: Plan, p: PrefillResult, transcript: Transcript, resumed_at=-1):
        super().__init__(plan, p, transcript, resumed_at)
        self.id = transcript.base.get("id")
        self.created = transcript.base.get("created")
        self.model = transcript.base.get("model")
        self.offset_base = (
            transcript.text_at_boundary if self.resumed else _offset_after(p.choice.get("logprobs"))
        )

    def opening(self) -> list[bytes]:
        if self.resumed:
            return []
        self.t.add(self.p.token_ids, self.p.text)
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
        chunk = load_event(data)
        if _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            return None  # re-emitted by closing(), with the client's numbers
        # Most chunks need nothing changed: relay their bytes as they are.
        changed = (
            chunk.get("created") != self.created
            or chunk.get("id") != self.id
            or chunk.get("model") != self.model
        )
        ids_present = False
        for choice in chunk.get("choices") or ():
            news = self._take(choice.get("token_ids"), choice.get("text"))
            if news is None:
                return None
            if news.trimmed:
                choice["token_ids"], choice["text"] = news.ids, news.text or ""
                _drop_first(choice.get("logprobs"), news.dropped)
                changed = True
            ids_present = ids_present or choice.get("token_ids") is not None
            if choice.get("logprobs"):
                _shift_offsets(choice["logprobs"], self.offset_base)
                changed = True
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = None  # the leg's prompt is not the client's
                changed = True
            if choice.get("finish_reason") is not None:
                self.finish_reason = self.t.finish_reason = choice["finish_reason"]
                changed = self._stamp(chunk) or changed
        if chunk.get("usage") is not None:
            chunk["usage"] = merged_usage(self.p, chunk["usage"], self.extra_tokens, per_chunk=True)
            changed = True
        if not changed:
            if ids_present and not self.plan.return_token_ids:
                return event(without_ids(data))
            return event(data)
        if not self.plan.return_token_ids:
            for choice in chunk.get("choices") or ():
                choice["token_ids"] = None
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
        if self.t.base.get("system_fingerprint") is not None:
            chunk["system_fingerprint"] = self.t.base["system_fingerprint"]
        return [event(dumps(chunk))]


class ChatStitcher(_Stitcher):
    """A chat answer continued by a token-id completion leg, rewritten into chat chunks."""

    def __init__(self, plan: Plan, p: PrefillResult, transcript: Transcript, resumed_at=-1):
        super().__init__(plan, p, transcript, resumed_at)
        self.base = {
            "id": transcript.base.get("id"),
            "object": "chat.completion.chunk",
            "created": transcript.base.get("created"),
            "model": transcript.base.get("model"),
        }
        self.role = (p.choice.get("message") or {}).get("role") or "assistant"
        self.completion_tokens = self.extra_tokens

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
        if self.resumed:
            return []
        self.t.add(self.p.token_ids, self.p.text)
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
        chunk = load_event(data)
        if _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            return None
        out = None
        for choice in chunk.get("choices") or ():
            ids = choice.get("token_ids")
            news = self._take(ids, choice.get("text"))
            if news is None:
                return None
            if chunk.get("usage") is not None:
                used = int(chunk["usage"].get("completion_tokens", 0))
                self.completion_tokens = used + self.extra_tokens
            elif isinstance(ids, list):
                self.completion_tokens += len(ids)
            chat_choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": news.text or ""},
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
            }
            if choice.get("finish_reason") is not None:
                self.finish_reason = self.t.finish_reason = choice["finish_reason"]
                chat_choice["stop_reason"] = choice.get("stop_reason")
            chat_choice["token_ids"] = news.ids if self.plan.return_token_ids else None
            out = self._chunk(chat_choice, self.completion_tokens)
            if choice.get("finish_reason") is not None and not self.plan.include_usage:
                fingerprint = self.t.base.get("system_fingerprint")
                if fingerprint is not None:
                    out["system_fingerprint"] = fingerprint
        return event(dumps(out)) if out is not None else None

    def closing(self) -> list[bytes]:
        if not self.plan.include_usage:
            return []
        chunk = {**self.base, "choices": [], "usage": self._usage_for_client()}
        if self.t.base.get("system_fingerprint") is not None:
            chunk["system_fingerprint"] = self.t.base["system_fingerprint"]
        return [event(dumps(chunk))]


class DecodeRelay(_Writer):
    """The leg's own stream is the answer (decode mode; with no P, one instance doing it
    all): usage gets P's prompt numbers and cache hits when there was a P."""

    first_extra = 0

    def opening(self) -> list[bytes]:
        return []

    def rewrite(self, data: bytes) -> bytes | None:
        chunk = load_event(data)  # a malformed event must become a clean error, not pass on
        self.t.set_base(chunk)
        if self.t.prompt_ids is None:  # the first chunk carries the prompt's ids
            ids = chunk.get("prompt_token_ids")
            for choice in chunk.get("choices") or ():
                ids = ids if ids is not None else choice.get("prompt_token_ids")
            if isinstance(ids, list):
                self.t.prompt_ids = ids
        ids_present = chunk.get("prompt_token_ids") is not None
        stamped = False
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if self.plan.kind == CHAT else None
            if self._take(choice.get("token_ids"), choice.get("text") or text) is None:
                return None
            ids_present = ids_present or choice.get("token_ids") is not None
            ids_present = ids_present or choice.get("prompt_token_ids") is not None
            if choice.get("finish_reason") is not None:
                self.finish_reason = self.t.finish_reason = choice["finish_reason"]
                stamped = (chunk.get("usage") is None and self._stamp(chunk)) or stamped
        if chunk.get("usage") is None:
            if not stamped:
                # The common chunk: relayed byte for byte (less the ids the proxy asked for).
                if ids_present and not self.plan.return_token_ids:
                    return event(without_ids(data))
                return event(data)
        elif _is_usage_chunk(chunk):
            self.decode_usage = chunk["usage"]
            if not self.plan.include_usage:
                return None
            chunk["usage"] = self._usage_for_client()
        elif self.p is not None:
            chunk["usage"] = merged_usage(self.p, chunk["usage"], self.extra_tokens, per_chunk=True)
        out = dumps(chunk)
        return event(without_ids(out) if not self.plan.return_token_ids else out)

    def _usage_for_client(self) -> dict[str, Any]:
        if self.p is None:
            return dict(self.decode_usage or {})
        return super()._usage_for_client()

    def closing(self) -> list[bytes]:
        return []


def _drop_first(logprobs: dict[str, Any] | None, count: int) -> None:
    """Trim a completions choice's logprobs by its first ``count`` tokens."""
    if logprobs and count:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            if isinstance(logprobs.get(key), list):
                logprobs[key] = logprobs[key][count:]


def make_writer(mode: Mode, plan: Plan, p: PrefillResult | None, transcript: Transcript):
    """The writer of an answer's first decode leg."""
    if mode in (Mode.DECODE, Mode.COLOCATED):
        return DecodeRelay(plan, p, transcript)
    stitcher = ChatStitcher if plan.kind == CHAT else CompletionStitcher
    return stitcher(plan, p, transcript)


def resume_writer(plan: Plan, p: PrefillResult, transcript: Transcript, resumed_at: int):
    """The writer of a leg that continues the answer after ``resumed_at`` tokens: a
    token-id completion, whatever the first leg was."""
    stitcher = ChatStitcher if plan.kind == CHAT else CompletionStitcher
    return stitcher(plan, p, transcript, resumed_at)
