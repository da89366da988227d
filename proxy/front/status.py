"""The live status page: ``/status`` (one static HTML file) and ``/status.json`` (what it
polls). Both sit with ``/health``, ``/ready`` and ``/metrics`` behind
``PDPROXY_PROTECT_OPS_ENDPOINTS`` (``guard.OPS_PATHS``).

The numbers are this process's: with several workers, each answers with its own last
minute (``pid`` says which); Prometheus is the place for the sum.
"""

from __future__ import annotations

import os
import time
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..fleet.backends import DECODE, PREFILL
from .admin import describe

router = APIRouter(include_in_schema=False)

# Read once: the page is package data and never changes while the process runs.
PAGE = files(__package__).joinpath("status.html").read_text(encoding="utf-8")


def _state(inst: dict[str, Any]) -> str:
    """One word for the page, worst first: down, draining, ejected, healthy."""
    if not inst["healthy"]:
        return "down"
    if inst["draining"]:
        return "draining"
    if inst["ejected"]:
        return "ejected"
    return "healthy"


def status(request: Request) -> dict[str, Any]:
    state = request.app.state
    pools = {}
    for role in (PREFILL, DECODE):
        instances = [
            describe(i, state.live.count(i.url)) for i in state.registry.pool(role).instances
        ]
        for inst in instances:
            inst["state"] = _state(inst)
        pools[role] = instances
    return {
        "time": time.time(),
        "pid": os.getpid(),
        "ready": state.monitor.ready,
        "pools": pools,
        "recent": state.gateway.recent.snapshot(),
    }


@router.get("/status")
async def status_page() -> Response:
    return HTMLResponse(PAGE, headers={"cache-control": "no-store"})


@router.get("/status.json")
async def status_json(request: Request) -> Response:
    return JSONResponse(status(request), headers={"cache-control": "no-store"})
