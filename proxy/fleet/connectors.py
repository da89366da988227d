"""Where each instance's KV connector listens (its control plane: holds, releases).

Only the connector knows its control port, and it says so in the ``kv_transfer_params``
of every prefill it holds KV for. The proxy records it from every prefill answer it
reads; for an instance that never served a prefill (a decode instance), the health
monitor asks once with the smallest prefill there is — one token, its KV released at
once — so that a stream can later move off that instance with its KV.
"""

from __future__ import annotations

import logging

import httpx

from ..wire.kv_params import release_target
from .backends import Instance

log = logging.getLogger("pdproxy.connectors")


def learn(inst: Instance, kv_params: dict | None) -> None:
    """Record the connector of ``inst`` from a prefill answer's params."""
    target = release_target(kv_params)
    if target is not None:
        inst.connector = target[0]


async def probe(client: httpx.AsyncClient, inst: Instance, headers: dict[str, str]) -> None:
    """Ask an instance's connector where it listens, with a one-token prefill."""
    model = next(iter(inst.max_model_len), None)
    body = {
        "prompt": "pdproxy connector probe",
        "max_tokens": 1,
        "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True, "lease_seconds": 0.5},
    }
    if model:
        body["model"] = model
    try:
        response = await client.post(
            inst.url + "/v1/completions", json=body, headers={**headers, "x-request-id": "probe"}
        )
        if response.status_code != 200:
            return  # a busy or starting server: asked again at the next check
        params = response.json().get("kv_transfer_params")
    except Exception:  # noqa: BLE001 - a probe must never break a health check
        return  # asked again at the next check
    target = release_target(params)
    if target is None:
        inst.connector = ""  # no connector there: streams leave it by recomputing
        return
    inst.connector, transfer_id = target
    try:  # nobody will pull it
        await client.post(inst.connector + "/pd/release", json={"transfer_id": transfer_id})
    except httpx.HTTPError:
        pass  # its half-second lease frees it anyway
    log.info("%s: KV connector control plane at %s", inst.url, inst.connector)
