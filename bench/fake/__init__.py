"""A fast fake vLLM engine: the OpenAI API and the ``kv_transfer_params`` protocol, no model.

Used by the benchmarks (it must never be the bottleneck) and by the proxy's tests for
fault injection. Reading order: ``model`` (the tokens), ``shapes`` (vLLM's wire
format), ``config`` (answers and faults), ``server`` (HTTP and the generations),
``__main__`` (``python -m bench.fake``).
"""

from .config import FAULTS, LEGS, FakeConfig
from .model import chat_prompt_ids, generate, next_token, token_text
from .server import FakeEngine

__all__ = [
    "FAULTS",
    "LEGS",
    "FakeConfig",
    "FakeEngine",
    "chat_prompt_ids",
    "generate",
    "next_token",
    "token_text",
]
