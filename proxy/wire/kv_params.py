"""The ``kv_transfer_params`` keys the proxy reads and writes, named once here.

The connector names the same keys on its side (``engine_ext/params.py``); a unit test
feeds the connector's real output through these readers so the two cannot drift.
The proxy never interprets the params beyond this: it copies P's answer into D's
request verbatim, and reads only where to send a release.
"""

from __future__ import annotations

from typing import Any

DO_REMOTE_DECODE = "do_remote_decode"  # prefill leg: hold the KV for a decode instance
CONSUMERS = "consumers"  # prefill leg: how many decode requests will pull it
TRANSFER_ID = "transfer_id"  # P's answer: the held transfer
REMOTE_HOST = "remote_host"  # P's answer: the connector's address
CONTROL_PORT = "control_port"  # P's answer: the connector's control plane (releases)
MIGRATION_KEY = "migration_key"  # a decode leg: the proxy may move it with its KV


def prefill_params(consumers: int) -> dict[str, Any]:
    """What the prefill leg asks P's connector for."""
    params: dict[str, Any] = {DO_REMOTE_DECODE: True}
    if consumers > 1:
        params[CONSUMERS] = consumers
    return params


def release_target(params: dict[str, Any] | None) -> tuple[str, str] | None:
    """(control-plane base URL, transfer id) of a held transfer, or None if the
    params do not say (P runs no connector, or an older one)."""
    params = params or {}
    host, port, transfer_id = (
        params.get(REMOTE_HOST),
        params.get(CONTROL_PORT),
        params.get(TRANSFER_ID),
    )
    if not (host and port and transfer_id):
        return None
    try:
        port = int(port)
    except (TypeError, ValueError):
        return None
    host = str(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}", str(transfer_id)


def with_migration_key(params: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """A decode leg's params: P's (if any) plus the key its connector knows it by."""
    return {**(params or {}), MIGRATION_KEY: key}


def without_pull(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A decode leg's params once it runs on a prefill instance (no decode instance is
    left): nothing to pull, since that instance computes the prompt itself (its prefix
    cache usually has it); only the migration key stays."""
    if params and MIGRATION_KEY in params:
        return {MIGRATION_KEY: params[MIGRATION_KEY]}
    return None
