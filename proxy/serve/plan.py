"""Read a client's generation request: validate it and decide how it can be served.

Nothing here talks to a backend. The proxy checks the fields it must understand (it
rewrites them for the legs) and answers 400 before any backend is called when they are
wrong; every other field passes through untouched, for vLLM to judge.

How a request can be served, from most to least disaggregated:

- **stitched**: P's first token is streamed at once and D continues *after* it (D's
  prompt is P's prompt token ids plus that token). Exact only when nothing in the
  request depends on where the seam falls; ``stitch_blockers`` lists what prevents it.
- **decode**: D receives the client's own request plus P's KV and regenerates from the
  first token on; exact for any sampling feature vLLM supports, P's token is dropped.
- **colocated**: one server does everything (``colocated_reason`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import bad_request
from .vocabulary import CHAT, COMPLETIONS

# Completions' protocol default when max_tokens is absent or null (vLLM and OpenAI).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# Request fields whose effect depends on which tokens are "output" rather than
# "prompt", or on state built from the first generated token on. With any of them,
# a continuation from prompt+first-token differs from a single server's output.
_POSITION_DEPENDENT = (
    "bad_words",
    "repetition_detection",
    "thinking_token_budget",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "logprob_token_ids",
    "return_token_offsets",
    "vllm_xargs",
    "watermarking",
    "reasoning_effort",
    "suffix",
)


@dataclass
class Plan:
    kind: str
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    continuous_usage: bool
    n: int
    max_tokens: int | None  # the client's limit; None = up to the context length
    min_tokens: int
    stop: list[str]
    return_token_ids: bool
    colocated_reason: str | None = None
    stitch_blockers: list[str] = field(default_factory=list)
    prefix_key: bytes = b""
    estimated_tokens: int = 0

    @property
    def stitchable(self) -> bool:
        return not self.stitch_blockers

    @property
    def tracks_tokens(self) -> bool:
        """Whether the decode legs may be asked for token ids. Not with ``echo``: vLLM
        then leaves the prompt's text out of the echo, so asking would change the answer
        (and such an answer cannot be continued elsewhere anyway)."""
        return self.return_token_ids or not self.body.get("echo")

    @property
    def holds_back_text(self) -> bool:
        """Whether vLLM streams this answer's text behind its tokens: with a stop string
        longer than a character (and not included in the output) it keeps the text's
        last characters back until it knows they do not begin the stop string."""
        longest = max((len(s) for s in self.stop), default=0)
        return longest > 1 and not self.body.get("include_stop_str_in_output")


# --- small typed readers that raise the 400 a client deserves -------------------------


def _get(body: dict[str, Any], key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"'{key}' must be {what}", key)
    if not isinstance(value, kinds):
        raise bad_request(f"'{key}' must be {what}", key)
    return value


def _int(body: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = _get(body, key, (int,), "an integer")
    if value is not None and minimum is not None and value < minimum:
        raise bad_request(f"'{key}' must be at least {minimum}, got {value}", key)
    return value


def _number(
    body: dict[str, Any], key: str, low: float | None = None, high: float | None = None
) -> float | None:
    value = _get(body, key, (int, float), "a number")
    if value is None:
        return None
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad_request(f"'{key}' must be between {low} and {high}, got {value}", key)
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool | None:
    return _get(body, key, (bool,), "a boolean")


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise bad_request("'stop' must be a string or a list of strings", "stop")


def _check_token_ids(value: Any, key: str) -> None:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise bad_request(f"'{key}' must be a list of non-negative integers", key)


# --- the plan -----------------------------------------------------------------------


def plan_request(kind: str, body: Any, max_tokens_limit: int = 0) -> Plan:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    if "kv_transfer_params" in body:
        raise bad_request(
            "'kv_transfer_params' is set by the proxy, not by clients", "kv_transfer_params"
        )

    stream = bool(_bool(body, "stream"))
    stream_options = body.get("stream_options")
    include_usage = continuous_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        if stream_options and not stream:
            raise bad_request(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        include_usage = bool(_bool(stream_options, "include_usage"))
        continuous_usage = include_usage and bool(_bool(stream_options, "continuous_usage_stats"))

    n = _int(body, "n", 1) or 1
    min_tokens = _int(body, "min_tokens", 0) or 0
    temperature = _number(body, "temperature", 0.0, None)
    _number(body, "top_p", 0.0, 1.0)
    presence = _number(body, "presence_penalty", -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "repetition_penalty", 0.0, None)
    _int(body, "top_k", -1)
    seed = _get(body, "seed", (int,), "an integer")
    for key in (
        "ignore_eos",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "use_beam_search",
        "return_token_ids",
    ):
        _bool(body, key)
    stop = _stop_list(body)
    if body.get("stop_token_ids") is not None:
        _check_token_ids(body["stop_token_ids"], "stop_token_ids")
    if body.get("logit_bias") is not None and not isinstance(body["logit_bias"], dict):
        raise bad_request("'logit_bias' must be an object", "logit_bias")

    if kind == COMPLETIONS:
        prompt, colocated_reason = _completion_prompt(body)
        max_tokens = _int(body, "max_tokens", 0)
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        logprobs = _int(body, "logprobs", -1)
        if _bool(body, "echo"):
            colocated_reason = colocated_reason or "echo"
        prefix_source = prompt if isinstance(prompt, str) else repr(prompt[:64])
        estimated = len(prompt) // 4 if isinstance(prompt, str) else len(prompt)
    else:
        prompt, colocated_reason = None, None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list", "messages")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request("each message must be an object with a 'role'", "messages")
        max_tokens = _int(body, "max_completion_tokens", 0)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 0)
        logprobs = None
        if _bool(body, "logprobs"):
            logprobs = _int(body, "top_logprobs", 0) or 0
        prefix_source = _messages_prefix(messages)
        estimated = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)

    if body.get("prompt_logprobs") is not None:
        _int(body, "prompt_logprobs", -1)
        colocated_reason = colocated_reason or "prompt_logprobs"
    if body.get("use_beam_search"):
        colocated_reason = colocated_reason or "beam_search"
    if max_tokens == 0:
        colocated_reason = colocated_reason or "max_tokens=0"

    if max_tokens_limit:
        if max_tokens is None:
            # "Up to the context length" becomes "up to the operator's cap".
            max_tokens = max_tokens_limit
            body = {
                **body,
                "max_completion_tokens" if kind == CHAT else "max_tokens": max_tokens_limit,
            }
        elif max_tokens > max_tokens_limit:
            raise bad_request(
                f"max_tokens may be at most {max_tokens_limit} on this server, got {max_tokens}.",
                "max_tokens",
            )
    if n > 1 and temperature == 0.0 and not body.get("use_beam_search"):
        # vLLM's own rule; checked here because P only ever sees n=1.
        raise bad_request(f"n must be 1 when using greedy sampling, got {n}.", "n")
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
            "min_tokens",
        )

    plan = Plan(
        kind=kind,
        body=body,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        n=n,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=stop,
        return_token_ids=bool(body.get("return_token_ids")),
        colocated_reason=colocated_reason,
        prefix_key=prefix_source[:512].encode("utf-8", "surrogatepass"),
        estimated_tokens=max(1, estimated),
    )
    plan.stitch_blockers = _stitch_blockers(plan, temperature, seed, presence, frequency, logprobs)
    return plan


def _completion_prompt(body: dict[str, Any]) -> tuple[Any, str | None]:
    if body.get("prompt_embeds") is not None:
        return "", "prompt_embeds"
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request(
                "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
            )
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            _check_token_ids(prompt, "prompt")
            return prompt, None
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            # One request, several prompts: vLLM returns one kv_transfer_params for the
            # whole batch, so it cannot be split across P and D.
            if len(prompt) == 1:
                only = prompt[0]
                if isinstance(only, list):
                    _check_token_ids(only, "prompt")
                elif not only:
                    raise bad_request(
                        "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
                    )
                return only, None
            return repr(prompt[:4]), "batched prompts"
    raise bad_request(
        "'prompt' must be a non-empty string, a list of token ids, or a list of those", "prompt"
    )


def _messages_prefix(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages[:4]:
        content = message.get("content")
        parts.append(
            f"{message.get('role')}:{content if isinstance(content, str) else repr(content)[:256]}"
        )
    return "\n".join(parts)


def _is_multimodal(messages: list[dict[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(
            not (isinstance(part, dict) and part.get("type") == "text") for part in content
        ):
            return True
    return False


def _stitch_blockers(
    plan: Plan,
    temperature: float | None,
    seed: Any,
    presence: float | None,
    frequency: float | None,
    logprobs: int | None,
) -> list[str]:
    body = plan.body
    blockers = []
    if plan.n > 1:
        blockers.append("n>1")
    if presence or frequency:
        blockers.append("presence/frequency penalty")  # they count output tokens only
    if seed is not None and temperature != 0.0:
        blockers.append("seeded sampling")  # the first token consumed a random draw
    blockers += [key for key in _POSITION_DEPENDENT if body.get(key) not in (None, [], {}, False)]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        blockers.append("response_format")
    if plan.kind == CHAT:
        tools = body.get("tools")
        if tools and body.get("tool_choice") != "none":
            blockers.append("tools")
        if logprobs is not None:
            blockers.append("chat logprobs")  # rebuilt exactly only by D's chat endpoint
        if body.get("echo"):
            blockers.append("echo")
        if _is_multimodal(body["messages"]):
            blockers.append("multimodal input")
    return blockers


def check_output_room(plan: Plan, context: int | None) -> None:
    """vLLM's rule, checked here because P only ever sees ``max_tokens=1``: no more
    output tokens than the model's context length (``context``, when known)."""
    if context is None or plan.max_tokens is None or plan.max_tokens <= context:
        return
    param = "max_tokens"
    if plan.kind == CHAT and plan.body.get("max_completion_tokens") is not None:
        param = "max_completion_tokens"
    raise bad_request(
        f"{param}={plan.max_tokens} cannot be greater than max_model_len={context}. "
        "Please request fewer output tokens.",
        param,
    )


def straddles_stop(text_so_far: str, stop: list[str]) -> bool:
    """True when a stop string could begin inside ``text_so_far`` and end after it.

    vLLM checks stop strings on the whole output text; a stitched D sees only its own
    text, so such a stop string would be missed there.
    """
    return any(text_so_far.endswith(s[:k]) for s in stop for k in range(1, len(s)))
