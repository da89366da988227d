"""What a streamed answer has sent the client so far, token by token.

The decode legs are asked for ``return_token_ids`` (the ids are stripped again unless
the client asked for them), so the proxy knows every output token it forwarded. That
is what lets the answer continue on another decode instance: the continuation's prompt
is the prompt's token ids plus every token sent, and nothing is repeated or lost.

A continuation must start where the text sent so far ends on a character boundary:
byte-level tokenizers split a character's bytes across tokens, vLLM sends ``""`` for
a token that ends inside one, and an engine given a prompt that ends inside a character
would emit the wrong text for it. ``boundary`` is how many of the tokens sent end on
one: up to a chunk of one token whose text was not empty (the rule the stitched seam
uses). A chunk of several tokens (vLLM merges a request's outputs while its server is
behind) with text says only that one of them completed a character, so it moves no
boundary and leaves the transcript ``unsure``: a move then asks the source's tokenizer
where the text is whole (``settle``), as does a continuation after a failure (another
decode instance's tokenizer: the source's is gone), else it restarts at the boundary;
the new leg's writer drops the tokens and characters the client already has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

TAIL_CHARS = 256  # output text kept for checking stop strings across a continuation
SETTLE_TRIES = 6  # tokens stepped back from the last to find where the text is whole
WINDOW = 16  # tokens decoded to see whether the text ends inside a character


@dataclass
class Transcript:
    prompt_ids: list[int] | None = None  # the prompt's token ids (None: not known)
    ids: list[int] = field(default_factory=list)  # output tokens sent
    boundary: int = 0  # tokens sent up to the last one known to end a character
    text_len: int = 0  # characters of output text sent (logprob offsets continue there)
    text_at_boundary: int = 0  # characters of output text the tokens up to boundary make
    tail: str = ""  # the last TAIL_CHARS characters of output text sent
    base: dict[str, Any] = field(default_factory=dict)  # id, created, model, fingerprint
    finish_reason: str | None = None
    unsure: bool = False  # a merged chunk with text came after the boundary
    prompt_tokens_details: dict[str, Any] | None = None

    def add(self, ids: list[int] | None, text: str | None) -> None:
        """A chunk forwarded to the client: its tokens and their text."""
        if ids:
            self.ids.extend(ids)
        if text:
            self.text_len += len(text)
            self.tail = (self.tail + text)[-TAIL_CHARS:]
            if ids is None or len(ids) == 1:
                self.boundary, self.text_at_boundary = len(self.ids), self.text_len
                self.unsure = False
            else:
                self.unsure = True

    def settle(self, boundary: int) -> None:
        """The tokens after ``boundary`` end inside a character (the tokenizer says so):
        none of them has had text yet, so every character sent is before it."""
        self.boundary, self.text_at_boundary, self.unsure = boundary, self.text_len, False

    async def settle_with(self, detokenize: Callable[[list[int]], Awaitable[str | None]]) -> bool:
        """Find the last token sent where the text is whole, stepping back from the last
        (a character is at most four bytes): decoded, the tokens up to it do not end in
        U+FFFD, so vLLM, which holds back text that does, sent none for those after it.
        Whether it found one (and settled there)."""
        last = len(self.ids)
        for end in range(last, max(self.boundary, last - SETTLE_TRIES), -1):
            text = await detokenize(self.ids[max(0, end - WINDOW) : end])
            if text is None:
                return False
            if not text.endswith("\ufffd"):
                self.settle(end)
                return True
        return False

    def set_base(self, chunk: dict[str, Any]) -> None:
        """The client's stream identity, from its first chunk (decode mode: D's)."""
        if not self.base:
            self.base = {k: chunk.get(k) for k in ("id", "created", "model")}
            if chunk.get("system_fingerprint") is not None:
                self.base["system_fingerprint"] = chunk["system_fingerprint"]

    @property
    def at_boundary(self) -> bool:
        return self.boundary == len(self.ids)

    @property
    def resumable(self) -> bool:
        return self.prompt_ids is not None
