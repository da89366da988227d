"""What shapes the fake's answers and its faults (``FakeConfig``), and its counters."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

FAULTS = (None, "error", "hang", "close", "slow_first_byte", "flap")
LEGS = ("prefill", "decode", "plain")


@dataclasses.dataclass
class FakeConfig:
    """Everything that shapes the fake's answers; change it live with ``configure``."""

    model: str = "fake"
    max_model_len: int = 8192
    prefill_ms: float = 20.0  # prefill and plain legs: time to the first token
    itl_ms: float = 10.0  # time between streamed tokens
    decode_first_ms: float | None = None  # decode leg: KV pull + first step; None = itl_ms
    tokens: int = 64  # output tokens when the request sets no max_tokens
    cached_tokens: int = 0  # prefill/plain legs: prompt_tokens_details.cached_tokens
    prompt_tokens_details: bool = True  # like vLLM's --enable-prompt-tokens-details
    fault: str | None = None
    fault_legs: tuple[str, ...] = LEGS
    fault_times: int = 0  # fault only the next N matching requests; 0 = every one
    fault_status: int = 500
    fault_health: bool = False
    close_after_chunks: int = 2
    first_byte_ms: float = 1000.0
    kv_lease_s: float = 60.0
    advertise_host: str | None = None  # remote_host in kv_transfer_params; default: bound host
    keep_requests: int = 64  # recent request bodies kept for tests (stats()["recent"])

    def validate(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")
        if isinstance(self.fault_legs, str):
            self.fault_legs = tuple(x for x in self.fault_legs.split(",") if x)
        self.fault_legs = tuple(self.fault_legs)
        bad = set(self.fault_legs) - set(LEGS)
        if bad:
            raise ValueError(f"fault_legs must be among {LEGS}, got {sorted(bad)}")


def new_stats() -> dict[str, Any]:
    return {
        "requests": 0,  # HTTP requests of any kind
        "paths": collections.Counter(),
        "generations": collections.Counter(),  # by leg: prefill, decode, plain
        "by_endpoint": collections.Counter(),  # completions, chat
        "streams": 0,
        "non_streams": 0,
        "completed": 0,  # generations answered to the end
        "client_gone": 0,  # the client closed before the answer was complete
        "chunks": 0,  # streamed token chunks
        "tokens": 0,  # output tokens, streamed or not
        "faults": collections.Counter(),
        "bad_requests": 0,
        "in_flight": 0,
        "max_in_flight": 0,
        "connections_open": 0,
        "connections_total": 0,
        "kv_issued": 0,
        "kv_released": 0,  # via POST /pd/release while held
        "kv_release_unknown": 0,  # release of an id not held (any more)
        "kv_pulled": 0,  # decode legs (in this process) that named a held transfer
        "kv_expired": 0,
        "kv_migrations_held": 0,  # running generations whose KV was held for a move
    }
