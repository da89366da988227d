"""vLLM's wire format, as the fake writes it: whole answers, stream chunks, errors,
``/v1/models`` and ``/metrics`` (field for field what vLLM 0.32 sends)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .model import TOKEN_JSON, token_text

try:  # orjson is faster where present; the stdlib works the same
    import orjson

    loads = orjson.loads

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - depends on the environment
    loads = json.loads

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


SYSTEM_FINGERPRINT = "vllm-0.32.0-fake"

if TYPE_CHECKING:
    from .config import FakeConfig
    from .server import FakeEngine, _Gen, _Request


def error_json(status: int, message: str, param: str | None = None) -> bytes:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def prompt_details(
    config: FakeConfig, req: _Request, chat: bool, streaming: bool
) -> dict[str, Any] | None:
    if not config.prompt_tokens_details:
        return None
    # A decode leg found its prompt in the transferred KV: D "cached" it all, which is
    # exactly the figure a proxy must not report (cached tokens come from P).
    cached = len(req.prompt_ids) if req.leg == "decode" else config.cached_tokens
    if streaming:
        return (
            {"cached_tokens": cached, "created_cache_tokens": 0}
            if chat
            else {"cached_tokens": cached}
        )
    return {
        "cached_tokens": cached,
        "created_cache_tokens": 0 if chat else None,
        "multimodal_tokens": None,
    }


def stream_usage(gen: _Gen) -> dict[str, Any]:
    req = gen.req
    prompt, completion = len(req.prompt_ids), len(gen.tokens)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    details = prompt_details(gen.conn.engine.config, req, req.endpoint == "chat", streaming=True)
    if details is not None:
        usage["prompt_tokens_details"] = details
    return usage


def stream_prefix(req: _Request, rid: str, created: int) -> bytes:
    kind = b"chat.completion.chunk" if req.endpoint == "chat" else b"text_completion"
    return b'{"id":"%s","object":"%s","created":%d,"model":%s,' % (
        rid.encode(),
        kind,
        created,
        dumps(req.model),
    )


def ids_json(ids: list[int]) -> bytes:
    return b"[" + ",".join(map(str, ids)).encode() + b"]"


def continuous_usage(gen: _Gen, completion: int, chat: bool) -> bytes:
    prompt = len(gen.req.prompt_ids)
    tail = b',"completion_tokens_details":null' if chat else b""
    return b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d%s}' % (
        prompt,
        prompt + completion,
        completion,
        tail,
    )


def close_token_chunk(parts: list[bytes], gen: _Gen, last: bool, chat: bool) -> bytes:
    """What both endpoints' token chunks end with: continuous usage, the fingerprint."""
    if gen.req.continuous_usage:
        parts.append(continuous_usage(gen, len(gen.tokens), chat=chat))
    if last and not gen.req.include_usage:
        parts.append(b',"system_fingerprint":"' + SYSTEM_FINGERPRINT.encode() + b'"')
    parts.append(b"}")
    return b"".join(parts)


def completion_token_chunk(gen: _Gen, token: int, last: bool) -> bytes:
    req = gen.req
    first = len(gen.tokens) == 1
    parts = [
        gen.prefix,
        b'"choices":[{"index":0,"text":',
        TOKEN_JSON[token] if token < len(TOKEN_JSON) else dumps(token_text(token)),
        b',"logprobs":null,"finish_reason":',
        b'"length"' if last else b"null",
        b',"stop_reason":null,"prompt_token_ids":',
        ids_json(req.prompt_ids) if (first and req.return_token_ids) else b"null",
        b',"token_ids":',
        b"[%d]" % token if req.return_token_ids else b"null",
        b"}]",
    ]
    return close_token_chunk(parts, gen, last, chat=False)


def chat_role_chunk(req: _Request, prefix: bytes) -> bytes:
    parts = [
        prefix,
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]',
    ]
    if req.continuous_usage:
        prompt = len(req.prompt_ids)
        parts.append(
            b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":0,"completion_tokens_details":null}'
            % (prompt, prompt)
        )
    parts.append(b',"prompt_token_ids":')
    parts.append(ids_json(req.prompt_ids) if req.return_token_ids else b"null")
    parts.append(b',"prompt_text":null}')
    return b"".join(parts)


def chat_token_chunk(gen: _Gen, token: int, last: bool) -> bytes:
    req = gen.req
    parts = [
        gen.prefix,
        b'"choices":[{"index":0,"delta":{"content":',
        TOKEN_JSON[token] if token < len(TOKEN_JSON) else dumps(token_text(token)),
        b'},"logprobs":null,"finish_reason":',
        b'"length","stop_reason":null' if last else b"null",
        b',"token_ids":',
        b"[%d]" % token if req.return_token_ids else b"null",
        b"}]",
    ]
    return close_token_chunk(parts, gen, last, chat=True)


def whole_answer(gen: _Gen) -> dict[str, Any]:
    req = gen.req
    engine = gen.conn.engine
    config = engine.config
    text = "".join(token_text(t) for t in gen.tokens)
    prompt, completion = len(req.prompt_ids), len(gen.tokens)
    chat = req.endpoint == "chat"
    usage = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": prompt_details(config, req, chat, streaming=False),
        "completion_tokens_details": None,
    }
    kv = engine._kv_params(prompt) if req.leg == "prefill" else None
    token_ids = list(gen.tokens) if req.return_token_ids else None
    prompt_ids = req.prompt_ids if req.return_token_ids else None
    if chat:
        choice = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": token_ids,
            "routed_experts": None,
        }
        return {
            "id": gen.rid,
            "object": "chat.completion",
            "created": gen.created,
            "model": req.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids,
            "prompt_text": None,
            "kv_transfer_params": kv,
            "ec_transfer_params": None,
            "metrics": None,
        }
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
        "token_ids": token_ids,
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_ids,
        "routed_experts": None,
    }
    return {
        "id": gen.rid,
        "object": "text_completion",
        "created": gen.created,
        "model": req.model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage,
        "kv_transfer_params": kv,
        "ec_transfer_params": None,
        "metrics": None,
    }


def models_answer(config: FakeConfig) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": config.model,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": config.model,
                "parent": None,
                "max_model_len": config.max_model_len,
                "permission": [],
            }
        ],
    }


def metrics_text(engine: FakeEngine) -> bytes:
    engine._expire_held()
    labels = f'engine="0",model_name="{engine.config.model}"'
    running = engine._stats["in_flight"]
    usage = min(1.0, (running + len(engine._held)) / 1000)
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} {float(running)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} {usage}\n"
    ).encode()


# --- command line ------------------------------------------------------------------------
