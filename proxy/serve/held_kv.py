"""P's held KV for one request: one owner from P's answer to its single release.

After the prefill leg, P's connector holds the prompt's KV blocks until a decode
instance pulls them, the proxy releases them, or their lease ends. ``HeldKV`` is the
one object that knows this: the request path tells it when D has taken the KV (D's
first event came, so D pulled it) and asks it to release otherwise. ``release`` is
idempotent and does nothing once D took the KV, so every way out of a request (an
error, a client that leaves, P's token ending the answer) may simply call it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..wire.kv_params import release_target


class HeldKV:
    """The KV P holds for one request; ``post_release(base_url, transfer_id)`` sends
    the release (in the background: the lease frees the blocks if it fails)."""

    __slots__ = ("target", "_post_release", "state")

    def __init__(self, params: dict[str, Any] | None, post_release: Callable[[str, str], None]):
        self.target = release_target(params)
        self._post_release = post_release
        self.state = "held" if self.target else "none"

    def taken(self) -> None:
        """D has the KV (its first event came): there is nothing left to release."""
        if self.state == "held":
            self.state = "taken"

    def release(self) -> None:
        """Free P's blocks now rather than at lease expiry, once, unless D took them."""
        if self.state != "held":
            return
        self.state = "released"
        base_url, transfer_id = self.target
        self._post_release(base_url, transfer_id)
