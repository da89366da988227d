"""The admin API: list, add, drain and remove instances at run time.

Off unless ``PDPROXY_ADMIN_KEY`` is set; then every call needs that key as a bearer
token (the client API keys do not open it). URLs are validated like the configured ones.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from ..errors import ProxyError
from ..fleet.backends import DECODE, PREFILL, Instance
from ..settings import check_base_url
from .guard import key_matches

router = APIRouter(prefix="/admin", include_in_schema=False)


def _authorize(request: Request) -> None:
    key = request.app.state.gateway.settings.admin_key
    if not key:
        raise ProxyError(404, "Not Found")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip().encode(), [key.encode()]):
        raise ProxyError(401, "Invalid or missing admin key.")


def describe(inst: Instance, live_streams: int) -> dict[str, Any]:
    return {
        "url": inst.url,
        "healthy": inst.healthy,
        "draining": inst.draining,
        "ejected": not inst.available() and inst.healthy and not inst.draining,
        "in_flight": inst.in_flight,
        "live_streams": live_streams,  # streams this proxy relays from it (movable)
        # Its KV connector's control plane: streams leave it with their KV through it;
        # "" when it has none (they recompute), null until the proxy has asked.
        "kv_connector": inst.connector,
        "server_running": inst.load.running,
        "server_waiting": inst.load.waiting,
        "kv_cache_usage": inst.load.kv_usage,
    }


async def _target(request: Request) -> tuple[str, str]:
    try:
        body = await request.json()
        role, url = body["role"], body["url"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProxyError(
            400, 'body must be {"role": "prefill"|"decode", "url": "http://host:port"}'
        ) from exc
    if role not in (PREFILL, DECODE):
        raise ProxyError(400, "role must be 'prefill' or 'decode'", param="role")
    try:
        return role, check_base_url(str(url))
    except ValueError as exc:
        raise ProxyError(400, str(exc), param="url") from exc


@router.get("/instances")
async def list_instances(request: Request) -> Response:
    _authorize(request)
    registry, live = request.app.state.registry, request.app.state.live
    return JSONResponse(
        {
            role: [describe(i, live.count(i.url)) for i in registry.pool(role).instances]
            for role in (PREFILL, DECODE)
        }
    )


@router.post("/instances")
async def add_instance(request: Request) -> Response:
    _authorize(request)
    role, url = await _target(request)
    request.app.state.membership.add(role, url)
    return JSONResponse({"added": url, "role": role})


@router.delete("/instances")
async def remove_instance(request: Request) -> Response:
    """Drain and remove: no new requests go there; those running finish."""
    _authorize(request)
    role, url = await _target(request)
    if not request.app.state.membership.remove(role, url):
        raise ProxyError(404, f"{url} is not in the {role} pool")
    return JSONResponse({"removed": url, "role": role})


@router.post("/instances/drain")
async def drain_instance(request: Request) -> Response:
    """Keep the instance listed but send it nothing new (``"draining": false`` undoes it);
    with PDPROXY_MIGRATE_ON_DRAIN, its live streams move to other decode instances."""
    _authorize(request)
    role, url = await _target(request)
    body = await request.json()
    draining = bool(body.get("draining", True))
    moving = request.app.state.membership.drain(url, draining)
    if moving is None:
        raise ProxyError(404, f"{url} is not a known instance")
    return JSONResponse({"url": url, "draining": draining, "moving_streams": moving})
