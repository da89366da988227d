"""A small deterministic stand-in for vLLM's OpenAI server, for the proxy's tests.

Its "model" picks each next token from the whole context, so a request continued from
prompt + first token yields exactly the tokens the uninterrupted request would: the
property that makes P/D stitching possible on a real vLLM. Token t's text is "w<t> ".
It records every request it gets, so tests can assert what each leg was sent.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import httpx

_ids = itertools.count()


def tokenize(text: str) -> list[int]:
    return [ord(ch) % 50 + 1 for ch in text]


def chat_prompt(messages: list[dict[str, Any]]) -> list[int]:
    text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"
    return [1] + tokenize(text)


def next_token(context: list[int]) -> int:
    return (sum(context) * 31 + len(context) * 7) % 97 + 100


def token_text(token: int) -> str:
    return f"w{token} "


@dataclass
class FakeVLLM:
    name: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    fail_status: int | None = None  # answer every call with this status
    fail_times: int = 0  # ...or only the next N calls
    eos_at: int | None = None  # emit EOS (token 2) once the context holds this many tokens
    port: int = 0  # where it is served (its kv_transfer_params point back here)
    override: Any = None  # a handler that replaces generation (tests of odd backends)
    routes: dict[str, Any] = field(default_factory=dict)  # other paths -> handler
    releases: list[str] = field(default_factory=list)  # transfer ids released via /pd/release
    max_model_len: int = 96  # the context: a chat answer with no limit fills it

    def handler(self, request: httpx.Request) -> Any:
        path = request.url.path
        if path == "/pd/release":
            self.releases.append(json.loads(request.content)["transfer_id"])
            return httpx.Response(200, json={"released": True})
        if path in self.routes:
            return self.routes[path](request)
        if path == "/v1/models":
            return httpx.Response(
                200,
                json={"object": "list", "data": [{"id": "m", "max_model_len": self.max_model_len}]},
            )
        if path == "/health":
            return httpx.Response(200)
        if self.override is not None:
            self.calls.append(
                {
                    "path": path,
                    "body": json.loads(request.content or b"{}"),
                    "headers": dict(request.headers),
                }
            )
            return self.override(request)
        return self.generation(request)

    def generation(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        chat = request.url.path.endswith("/chat/completions")
        self.calls.append(
            {"path": request.url.path, "body": body, "headers": dict(request.headers)}
        )
        if self.fail_status:
            status = self.fail_status
            if self.fail_times:
                self.fail_times -= 1
                if self.fail_times == 0:
                    self.fail_status = None
            return httpx.Response(
                status,
                json={
                    "error": {
                        "message": f"{self.name} says {status}",
                        "type": "X",
                        "param": None,
                        "code": status,
                    }
                },
            )
        if chat:
            prompt = chat_prompt(body["messages"])
            limit = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = (
                body["prompt"] if isinstance(body["prompt"], list) else tokenize(body["prompt"])
            )
            limit = body.get("max_tokens") or 16  # vLLM's completions default
        # As vLLM: no limit in chat is the rest of the context; any limit is cut to it.
        room = self.max_model_len - len(prompt)
        limit = room if limit is None else min(limit, room)
        tokens, texts, finish, stop_reason = self.generate(prompt, limit, body)
        request_id = request.headers.get("x-request-id", f"r{next(_ids)}")
        kv = None
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            kv = {
                "do_remote_prefill": True,
                "transfer_id": f"t-{request_id}",
                "remote_host": "127.0.0.1",
                "control_port": self.port,
            }
        if body.get("stream"):
            return self.stream(body, chat, request_id, prompt, tokens, texts, finish, stop_reason)
        return httpx.Response(
            200,
            json=self.whole(body, chat, request_id, prompt, tokens, texts, finish, stop_reason, kv),
        )

    def generate(self, prompt: list[int], limit: int, body: dict[str, Any]):
        context = list(prompt)
        tokens: list[int] = []
        text = ""
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        for _ in range(limit):
            token = 2 if len(context) == self.eos_at else next_token(context)
            tokens.append(token)
            context.append(token)
            if token == 2 and not body.get("ignore_eos"):
                return tokens, [token_text(t) if t != 2 else "" for t in tokens], "stop", None
            text += token_text(token)
            for s in stops:
                if s in text:
                    cut = text.index(s) + (len(s) if body.get("include_stop_str_in_output") else 0)
                    return tokens, self._split(tokens, text[:cut]), "stop", s
        return tokens, [token_text(t) for t in tokens], "length", None

    @staticmethod
    def _split(tokens: list[int], text: str) -> list[str]:
        out, used = [], 0
        for t in tokens:
            piece = token_text(t)[: max(len(text) - used, 0)]
            out.append(piece)
            used += len(piece)
        return out

    def _logprobs(self, tokens, texts, start_offset=0):
        offsets, pos = [], start_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(token_text(t))
        return {
            "text_offset": offsets,
            "token_logprobs": [-0.5] * len(tokens),
            "tokens": [token_text(t) for t in tokens],
            "top_logprobs": [{token_text(t): -0.5} for t in tokens],
        }

    def whole(self, body, chat, request_id, prompt, tokens, texts, finish, stop_reason, kv):
        usage = {
            "prompt_tokens": len(prompt),
            "total_tokens": len(prompt) + len(tokens),
            "completion_tokens": len(tokens),
            "prompt_tokens_details": {"cached_tokens": 7 if self.name.startswith("p") else 0},
            "completion_tokens_details": None,
        }
        want_ids = bool(body.get("return_token_ids"))
        if chat:
            choice = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(texts),
                    "reasoning": None,
                    "tool_calls": [],
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
                "token_ids": tokens if want_ids else None,
            }
            return {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": 1000,
                "model": "m",
                "choices": [choice],
                "system_fingerprint": "fp",
                "usage": usage,
                "prompt_token_ids": prompt if want_ids else None,
                "kv_transfer_params": kv,
            }
        choice = {
            "index": 0,
            "text": "".join(texts),
            "logprobs": self._logprobs(tokens, texts) if body.get("logprobs") is not None else None,
            "finish_reason": finish,
            "stop_reason": stop_reason,
            "token_ids": tokens if want_ids else None,
            "prompt_token_ids": prompt if want_ids else None,
        }
        return {
            "id": f"cmpl-{request_id}",
            "object": "text_completion",
            "created": 1000,
            "model": "m",
            "choices": [choice],
            "system_fingerprint": "fp",
            "usage": usage,
            "kv_transfer_params": kv,
        }

    def stream(self, body, chat, request_id, prompt, tokens, texts, finish, stop_reason):
        events = []
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        continuous = include_usage and (body.get("stream_options") or {}).get(
            "continuous_usage_stats"
        )
        want_ids = bool(body.get("return_token_ids"))
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1001,
            "model": "m",
        }
        if chat:
            events.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        offset = 0
        for i, (t, text) in enumerate(zip(tokens, texts)):
            last = i == len(tokens) - 1
            if chat:
                choice = {
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": None,
                    "finish_reason": finish if last else None,
                    "token_ids": [t] if want_ids else None,
                }
                if last:
                    choice["stop_reason"] = stop_reason
            else:
                lp = None
                if body.get("logprobs") is not None:
                    lp = self._logprobs([t], [text], offset)
                    offset += len(token_text(t))
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": finish if last else None,
                    "stop_reason": stop_reason if last else None,
                    "prompt_token_ids": prompt if (want_ids and i == 0) else None,
                    "token_ids": [t] if want_ids else None,
                }
            chunk = {**base, "choices": [choice]}
            if last and not include_usage:  # as vLLM: the terminal chunk, if no usage follows
                chunk["system_fingerprint"] = "fp"
            if continuous:
                chunk["usage"] = {
                    "prompt_tokens": len(prompt),
                    "total_tokens": len(prompt) + i + 1,
                    "completion_tokens": i + 1,
                }
            events.append(chunk)
        if include_usage:
            events.append(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": len(prompt),
                        "total_tokens": len(prompt) + len(tokens),
                        "completion_tokens": len(tokens),
                        "prompt_tokens_details": {"cached_tokens": 0},
                    },
                    "system_fingerprint": "fp",
                }
            )
        payload = (
            b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            + b"data: [DONE]\n\n"
        )
        return httpx.Response(200, content=payload, headers={"content-type": "text/event-stream"})
