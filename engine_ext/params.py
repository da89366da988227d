"""``kv_transfer_params``: the keys the connector reads and writes, named once here.

vLLM carries a request's ``kv_transfer_params`` from the HTTP body to the connector
and puts what ``request_finished`` returns into the HTTP answer. The proxy copies P's
answer into D's request verbatim; it names the keys it reads itself on its side
(``proxy/wire/kv_params.py``), and a unit test feeds this module's real output through
the proxy's readers so the two sides cannot drift.

Everything read here comes from an HTTP body: a malformed value must cost a
recompute, never an exception inside the engine's scheduler.
"""

from __future__ import annotations

import math
from typing import Any

# A prefill request asks P to hold its KV; a decode request says where the KV is.
DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"
# P's answer (and so D's request):
TRANSFER_ID = "transfer_id"
REMOTE_ENGINE_ID = "remote_engine_id"
REMOTE_HOST = "remote_host"
REMOTE_PORT = "remote_port"  # ZMQ port of P's TP rank 0
REMOTE_PORTS = "remote_ports"  # ZMQ port of each of P's TP ranks (rank r: index r)
CONTROL_PORT = "control_port"  # P's control plane (POST /pd/release)
REMOTE_BLOCK_IDS = "remote_block_ids"
REMOTE_NUM_TOKENS = "remote_num_tokens"
LAYOUT = "layout"
# A prefill request's options:
CONSUMERS = "consumers"  # how many decode requests will pull the KV (default 1)
LEASE_SECONDS = "lease_seconds"  # hold for less than the configured lease
# Any request's option: the proxy may move it to another engine with its KV
# (engine_ext/migrations.py).
MIGRATION_KEY = "migration_key"

# What a decode request's params must carry (all of it produced by held_params).
REQUIRED = (
    TRANSFER_ID,
    REMOTE_ENGINE_ID,
    REMOTE_HOST,
    REMOTE_PORT,
    REMOTE_BLOCK_IDS,
    REMOTE_NUM_TOKENS,
    LAYOUT,
)


def wants_hold(params: dict[str, Any] | None) -> bool:
    """A prefill request whose KV a decode instance will pull."""
    return bool(params) and bool(params.get(DO_REMOTE_DECODE))


def is_remote_prefill(params: dict[str, Any] | None) -> bool:
    """A decode request whose prompt KV lives on a prefill instance."""
    return (
        bool(params) and bool(params.get(DO_REMOTE_PREFILL)) and all(k in params for k in REQUIRED)
    )


def migration_key(params: dict[str, Any] | None) -> str | None:
    key = (params or {}).get(MIGRATION_KEY)
    return key if isinstance(key, str) and 0 < len(key) <= 256 else None


def _positive(value: Any, default: Any) -> Any:
    """A positive number from client-supplied params, else the default."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) and number > 0 else default


def requested_consumers(params: dict[str, Any]) -> int:
    return max(1, int(_positive(params.get(CONSUMERS), 1)))


def requested_lease(params: dict[str, Any]) -> float | None:
    return _positive(params.get(LEASE_SECONDS), None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def problem(params: dict[str, Any], prompt_len: int, block_size: int) -> str | None:
    """Why remote-prefill params cannot be used (None if they can)."""
    if not isinstance(params[TRANSFER_ID], str) or not isinstance(params[REMOTE_HOST], str):
        return f"{TRANSFER_ID} and {REMOTE_HOST} must be strings"
    if not _is_int(params[REMOTE_PORT]) or not 0 < params[REMOTE_PORT] < 65536:
        return f"{REMOTE_PORT} must be a port number"
    tokens, blocks = params[REMOTE_NUM_TOKENS], params[REMOTE_BLOCK_IDS]
    if not _is_int(tokens) or tokens < 0 or not isinstance(params[LAYOUT], dict):
        return f"{REMOTE_NUM_TOKENS} must be a count and {LAYOUT} a dict"
    if not isinstance(blocks, list) or not all(_is_int(b) and b >= 0 for b in blocks):
        return f"{REMOTE_BLOCK_IDS} must be a list of block ids"
    ports = params.get(REMOTE_PORTS, [])
    if not isinstance(ports, list) or not all(_is_int(p) and 0 < p < 65536 for p in ports):
        return f"{REMOTE_PORTS} must be a list of port numbers"
    if len(blocks) < math.ceil(min(tokens, prompt_len) / block_size):
        return f"{len(blocks)} remote blocks cannot hold {min(tokens, prompt_len)} tokens"
    return None


def rank_ports(params: dict[str, Any]) -> tuple[int, ...]:
    """P's ZMQ port per TP rank (empty: rank r listens on remote_port + r)."""
    return tuple(params.get(REMOTE_PORTS) or ())


def held_params(
    transfer_id: str,
    engine_id: str,
    host: str,
    zmq_ports: list[int],
    control_port: int,
    block_ids: list[int],
    num_tokens: int,
    layout: dict[str, Any],
) -> dict[str, Any]:
    """P's answer for a held transfer: what a decode request passes back to pull it."""
    return {
        DO_REMOTE_PREFILL: True,
        DO_REMOTE_DECODE: False,
        TRANSFER_ID: transfer_id,
        REMOTE_ENGINE_ID: engine_id,
        REMOTE_HOST: host,
        REMOTE_PORT: zmq_ports[0],
        REMOTE_PORTS: zmq_ports,
        CONTROL_PORT: control_port,
        REMOTE_BLOCK_IDS: block_ids,
        REMOTE_NUM_TOKENS: num_tokens,
        LAYOUT: layout,
    }
