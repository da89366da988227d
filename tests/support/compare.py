"""Read OpenAI responses and streams into comparable summaries.

The end-to-end tests send the same request to a plain colocated vLLM and through the
proxy, and compare these summaries: everything a client can observe except ids,
timestamps and chunk boundaries (which vLLM itself does not fix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import sse


@dataclass
class Summary:
    status: int
    texts: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish: dict[int, Any] = field(default_factory=dict)
    stop_reason: dict[int, Any] = field(default_factory=dict)
    logprobs: dict[int, list[Any]] = field(default_factory=dict)
    text_offsets: dict[int, list[int]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    usage_chunks: int = 0
    ids: set[str] = field(default_factory=set)
    roles: int = 0
    done: bool = False
    content_type: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    error: Any = None
    most_ids_in_a_chunk: int = 0  # > 1: the server merged tokens into one chunk

    def comparable(self, *, cached: bool = False) -> dict[str, Any]:
        usage = dict(self.usage or {})
        details = usage.pop("prompt_tokens_details", None)
        if cached:
            usage["cached_tokens"] = (details or {}).get("cached_tokens")
        usage.pop("completion_tokens_details", None)
        return {
            "status": self.status,
            "texts": self.texts,
            "token_ids": self.token_ids,
            "finish": self.finish,
            "stop_reason": self.stop_reason,
            "logprobs": self.logprobs,
            "text_offsets": self.text_offsets,
            "usage": usage,
            "usage_chunks": self.usage_chunks,
            "roles": self.roles,
            "done": self.done,
        }


def _add_logprobs(summary: Summary, index: int, logprobs: Any) -> None:
    if not logprobs:
        return
    if "content" in logprobs:  # chat
        for item in logprobs["content"] or []:
            summary.logprobs.setdefault(index, []).append(
                (
                    item["token"],
                    round(item["logprob"], 3),
                    [(t["token"], round(t["logprob"], 3)) for t in item.get("top_logprobs", [])],
                )
            )
        return
    tokens = logprobs.get("tokens") or []
    for i, token in enumerate(tokens):
        top = (logprobs.get("top_logprobs") or [None] * len(tokens))[i]
        lp = logprobs["token_logprobs"][i]
        summary.logprobs.setdefault(index, []).append(
            (
                token,
                None if lp is None else round(lp, 3),
                sorted((k, round(v, 3)) for k, v in (top or {}).items()),
            )
        )
    summary.text_offsets.setdefault(index, []).extend(logprobs.get("text_offset") or [])


def summarize_response(response: httpx.Response) -> Summary:
    summary = Summary(
        status=response.status_code, content_type=response.headers.get("content-type", "")
    )
    summary.headers = dict(response.headers)
    body = response.json()
    if response.status_code != 200:
        summary.error = body
        return summary
    summary.ids.add(body["id"])
    for choice in body["choices"]:
        index = choice["index"]
        if "message" in choice:
            summary.texts[index] = choice["message"].get("content") or ""
            summary.roles += 1
        else:
            summary.texts[index] = choice["text"]
        if choice.get("token_ids") is not None:
            summary.token_ids[index] = choice["token_ids"]
        summary.finish[index] = choice["finish_reason"]
        summary.stop_reason[index] = choice.get("stop_reason")
        _add_logprobs(summary, index, choice.get("logprobs"))
    summary.usage = body.get("usage")
    summary.done = True
    return summary


def summarize_stream(
    lines: list[str], status: int, content_type: str, headers: dict[str, str] | None = None
) -> Summary:
    summary = Summary(status=status, content_type=content_type)
    summary.headers = headers or {}
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            summary.done = True
            continue
        assert not summary.done, "data after [DONE]"
        chunk = json.loads(data)
        if "error" in chunk and "choices" not in chunk:
            summary.error = chunk["error"]
            continue
        summary.ids.add(chunk["id"])
        if chunk.get("usage") is not None and not chunk.get("choices"):
            summary.usage_chunks += 1
            summary.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice["index"]
            if "delta" in choice:
                delta = choice["delta"]
                if delta.get("role"):
                    summary.roles += 1
                summary.texts[index] = summary.texts.get(index, "") + (delta.get("content") or "")
            else:
                summary.texts[index] = summary.texts.get(index, "") + choice["text"]
            if choice.get("token_ids") is not None:
                summary.token_ids.setdefault(index, []).extend(choice["token_ids"])
                summary.most_ids_in_a_chunk = max(
                    summary.most_ids_in_a_chunk, len(choice["token_ids"])
                )
            if choice.get("finish_reason") is not None:
                summary.finish[index] = choice["finish_reason"]
                summary.stop_reason[index] = choice.get("stop_reason")
            _add_logprobs(summary, index, choice.get("logprobs"))
    return summary


def call(
    client: httpx.Client,
    base_url: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Summary:
    if body.get("stream"):
        with client.stream(
            "POST", base_url + path, json=body, headers=headers, timeout=300
        ) as response:
            if response.status_code != 200:
                response.read()
                return summarize_response(response)
            lines = list(sse.lines(response))
            return summarize_stream(
                lines,
                response.status_code,
                response.headers.get("content-type", ""),
                dict(response.headers),
            )
    return summarize_response(client.post(base_url + path, json=body, headers=headers, timeout=300))


def _first_difference(a, b) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def differences(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> str:
    """Where comparable summaries differ, one line per field, sequences from their first
    difference on: a failed comparison of long streams says what broke."""
    lines = [f"{len(got)} answers, {len(want)} expected"] if len(got) != len(want) else []
    for i, (g, w) in enumerate(zip(got, want)):
        for key in w:
            if g.get(key) == w[key]:
                continue
            if key not in ("texts", "token_ids"):
                lines.append(f"#{i} {key}: got {g.get(key)!r} want {w[key]!r}")
                continue
            for index in sorted(set(g[key]) | set(w[key])):
                a, b = g[key].get(index, []), w[key].get(index, [])
                at = _first_difference(a, b)
                window = slice(max(0, at - 40), at + 60)
                lines.append(
                    f"#{i} {key}[{index}] differ at {at} of {len(a)}/{len(b)}:"
                    f" got {a[window]!r} want {b[window]!r}"
                )
    return "\n".join(lines)
