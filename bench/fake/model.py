"""The fake's "model": deterministic greedy tokens, and how prompts become ids.

Tokens are a function of the sequence so far (``next_token``), so P's token followed by
D's continuation of ``prompt + [P's token]`` equals what one engine generates from the
prompt, exactly as with a real greedy vLLM. Each output token has the text ``" w<id>"``.
A string prompt is its UTF-8 bytes; a chat prompt a simple template over the messages.
"""

from __future__ import annotations

from typing import Any

VOCAB_BASE = 256  # ids below this are prompt bytes
VOCAB_SIZE = 4096
TOKEN_TEXT = [f" w{t}" for t in range(VOCAB_BASE + VOCAB_SIZE)]
TOKEN_JSON = [b'" w%d"' % t for t in range(VOCAB_BASE + VOCAB_SIZE)]


def next_token(prev: int, position: int) -> int:
    """The "greedy" token after a sequence whose last token is ``prev`` and length ``position``."""
    return VOCAB_BASE + (prev * 7919 + position * 104729) % VOCAB_SIZE


def token_text(token: int) -> str:
    return TOKEN_TEXT[token] if token < len(TOKEN_TEXT) else f" w{token}"


def generate(prompt_ids: list[int], count: int) -> list[int]:
    """The tokens one engine generates after ``prompt_ids`` (what P + D must reproduce)."""
    prev = prompt_ids[-1] if prompt_ids else 0
    position = len(prompt_ids)
    out = []
    for _ in range(count):
        prev = next_token(prev, position)
        out.append(prev)
        position += 1
    return out


def chat_prompt_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The fake chat template: ``<|role|>content\\n`` per message, then ``<|assistant|>``."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role')}|>{content or ''}\n")
    parts.append("<|assistant|>")
    return list("".join(parts).encode())
