"""The front door, as plain ASGI middleware: authentication, body size, concurrency.

Plain ASGI rather than a Starlette ``BaseHTTPMiddleware``: it adds no task or memory
stream per request. A declared ``content-length`` over the limit is refused before a
byte of the body is read; a chunked body is cut off by the readers in ``flow`` and
``app`` as soon as it passes the limit.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import error_body
from ..serve.vocabulary import KIND_OF_PATH
from ..settings import Settings

OPS_PATHS = ("/health", "/ready", "/metrics", "/status", "/status.json")


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token:
                return token.strip()
    return None


def key_matches(presented: bytes | None, keys: list[bytes]) -> bool:
    """Constant-time comparison against every configured key (no early exit)."""
    if presented is None:
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


async def _reject(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.protect_ops = settings.protect_ops_endpoints
        self.max_body = settings.max_body_bytes
        self.max_concurrent = settings.max_concurrent_requests
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/admin/"):
            await self.app(scope, receive, send)  # the admin API checks its own key
            return
        if self.keys and (self.protect_ops or path not in OPS_PATHS):
            if not key_matches(_bearer(scope), self.keys):
                await _reject(
                    send, 401, "Invalid or missing API key (Authorization: Bearer <key>)."
                )
                return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > self.max_body:
                    await _reject(send, 413, f"request body larger than {self.max_body} bytes")
                    return
                break
        limited = self.max_concurrent and path in KIND_OF_PATH
        if limited:
            if self.in_flight >= self.max_concurrent:
                await _reject(send, 429, "too many concurrent requests", [(b"retry-after", b"1")])
                return
            self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if limited:
                self.in_flight -= 1
