"""The request path's words, each named once: request kinds and their endpoints, and
the modes a request is served in (as the ``x-pdproxy-mode`` header and the metrics say
them)."""

from __future__ import annotations

from enum import StrEnum

COMPLETIONS = "completions"
CHAT = "chat"

# The two generation endpoints: the only requests split into a prefill and a decode leg.
ENDPOINTS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
KIND_OF_PATH = {path: kind for kind, path in ENDPOINTS.items()}

# Set in the ASGI scope of the readiness canary's own requests (they never come from the
# network): it checks the P/D path, so the client-facing limits and policies do not apply.
CANARY_SCOPE = "pdproxy.canary"


class Mode(StrEnum):
    """How a generation request was served."""

    STITCHED = "stitched"  # P's first token streamed at once; D continues after it
    DECODE = "decode"  # D runs the client's own request on P's KV (regenerates token 1)
    PREFILL = "prefill"  # P's token ended the request; D is not called
    COLOCATED = "colocated"  # one instance runs the whole request
