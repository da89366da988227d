"""OpenAI-style errors, and the one exception type the request path raises.

Every error a client sees has the shape ``{"error": {"message", "type", "param", "code"}}``
that the OpenAI SDKs parse. Errors that come from a backend keep the backend's message
and status; errors the proxy makes name the leg that failed, so an operator reading a
502 knows whether prefill or decode broke.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_body(
    status: int, message: str, *, param: str | None = None, err_type: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err_type or _TYPES.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


class ProxyError(Exception):
    """A failure that ends a request with an HTTP status and an OpenAI error body.

    ``leg`` is "prefill", "decode" or None (the proxy itself); ``body`` overrides the
    generated body when a backend's own error must reach the client unchanged.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        leg: str | None = None,
        param: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        err_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.leg = leg
        self.param = param
        self.body = body
        self.headers = headers or {}
        self.err_type = err_type

    def to_body(self) -> dict[str, Any]:
        if self.body is not None:
            return self.body
        return error_body(self.status, self.message, param=self.param, err_type=self.err_type)

    def to_response(self, headers: dict[str, str] | None = None) -> Response:
        merged = {**self.headers, **(headers or {})}
        return Response(
            json.dumps(self.to_body()),
            status_code=self.status,
            media_type="application/json",
            headers=merged,
        )


def bad_request(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param)


def stream_error_event(error: ProxyError) -> bytes:
    """The SSE event that ends a stream after a mid-stream failure (then ``[DONE]``)."""
    return b"data: " + json.dumps(error.to_body()).encode() + b"\n\n"
