"""The request schemas the proxy publishes in its OpenAPI document.

They describe the fields the proxy itself reads (and answers 400 for); every other field
passes through to vLLM untouched, so ``additionalProperties`` is open. The schema is what
``tests/unit/front/test_schema_fuzz.py`` fuzzes with schemathesis.
"""

from __future__ import annotations

from typing import Any

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_STOP = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
}
_COMMON: dict[str, Any] = {
    "model": {"type": "string"},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {
            "include_usage": {"type": "boolean"},
            "continuous_usage_stats": {"type": "boolean"},
        },
    },
    "n": {"type": "integer", "minimum": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 0},
    "min_tokens": {"type": "integer", "minimum": 0},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer"},
    "stop": _STOP,
    "stop_token_ids": _TOKEN_IDS,
    "include_stop_str_in_output": {"type": "boolean"},
    "ignore_eos": {"type": "boolean"},
    "return_token_ids": {"type": "boolean"},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": True,
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                _TOKEN_IDS,
                {"type": "array", "items": {"type": "string"}},
            ]
        },
        "logprobs": {"type": ["integer", "null"], "minimum": 0},
        "echo": {"type": "boolean"},
    },
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": True,
    "properties": {
        **_COMMON,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null"]}},
            },
        },
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 0},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0},
    },
}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body the handler reads itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
