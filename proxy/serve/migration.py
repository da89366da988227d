"""One move of a streamed answer to another decode instance, with its KV.

The source's connector holds a running request's KV when the proxy has *armed* it and
then ends it (``engine_ext/migrations.py``). A :class:`Migration` owns that from the
arming to the moment the destination took the KV: arm the source's request, let the
caller close the source's stream at a token boundary, collect the params that name the
held KV, and hand them to the continuation; if no destination takes them, release them
(the source's lease frees them anyway, later). Whatever fails on the way — the source
has no connector, the request ended first, the source died — the move continues by
recomputing instead: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..errors import ProxyError
from ..fleet.backends import Instance
from ..settings import Settings
from .held_kv import HeldKV
from .legs import call_json

log = logging.getLogger("pdproxy.migration")


class Migration:
    def __init__(self, dispatcher: Any, source: Instance, key: str, settings: Settings) -> None:
        self.dispatcher = dispatcher
        self.source = source
        self.key = key
        self.settings = settings
        # The hold at the source: "none" (not asked), "asked" (asked, no answer: it may
        # be armed), "armed" or "refused".
        self.hold = "none"
        self.collected = False
        self.held: HeldKV | None = None
        self.kv_params: dict[str, Any] | None = None

    async def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await call_json(
            self.dispatcher.registry.http,
            Instance(self.source.connector or ""),
            "migration",
            path,
            body,
            {},
            timeout,
        )

    async def arm(self) -> bool:
        """Ask the source to hold the request's KV when its stream ends."""
        if not self.source.connector:
            return False
        # Long enough for the destination to start its pull; freed as soon as it has.
        lease = self.settings.first_byte_timeout + self.settings.migration_timeout
        self.hold = "asked"
        try:
            answer = await self._post(
                "/pd/hold",
                {"key": self.key, "lease_seconds": lease},
                self.settings.migration_timeout,
            )
        except ProxyError as exc:
            log.warning("could not arm a move at %s: %s", self.source.url, exc.message)
            return False  # "asked": the request may have reached it
        self.hold = "armed" if answer.get("armed") else "refused"
        return self.hold == "armed"

    async def collect(self) -> dict[str, Any] | None:
        """After the source's stream was closed: the params that name its held KV (None:
        the move recomputes)."""
        if self.hold == "asked":
            # The arm went unanswered, so it may have taken: the move recomputes rather
            # than wait, and whatever the source holds is freed in the background.
            self.dispatcher.background(self.abandon())
            return None
        return await self._collect()

    async def _collect(self) -> dict[str, Any] | None:
        if self.hold not in ("armed", "asked") or self.collected:
            return self.kv_params
        try:
            answer = await self._wait_for_outcome()
        except ProxyError as exc:
            self.collected = True
            log.warning("no KV from %s for a move: %s", self.source.url, exc.message)
            return None
        # Only an answer counts: a collect cut short (the client left) is asked again
        # by ``abandon``, which must free what the source holds.
        self.collected = True
        if answer.get("outcome") != "held" or not isinstance(
            answer.get("kv_transfer_params"), dict
        ):
            log.info("move from %s recomputes: %s", self.source.url, answer.get("outcome"))
            return None
        self.kv_params = answer["kv_transfer_params"]
        self.held = HeldKV(self.kv_params, self.dispatcher.post_release)
        return self.kv_params

    async def _wait_for_outcome(self) -> dict[str, Any]:
        """Ask the source what became of the request, for up to ``migration_timeout``:
        one answer waits at most as long as the source allows (30 s), so a "pending"
        before the timeout means ask again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.migration_timeout
        while True:
            asked_at = loop.time()
            wait = deadline - asked_at
            answer = await self._post(
                "/pd/held",
                {"key": self.key, "wait_seconds": wait},
                wait + self.settings.connect_timeout,
            )
            waited = loop.time() - asked_at
            # An answer that did not wait (a source that cannot) ends the asking: no spin.
            if answer.get("outcome") != "pending" or deadline - loop.time() <= 0 or waited < 1:
                return answer

    def taken(self) -> None:
        """The destination's first event came: it has the KV."""
        if self.held is not None:
            self.held.taken()

    def release(self) -> None:
        """No destination took the KV: free it at the source now."""
        if self.held is not None:
            self.held.release()

    async def abandon(self) -> None:
        """The move stopped half way (the client left, the destination failed): free
        whatever the source holds for it now, collecting it first if need be, rather
        than at its lease's end."""
        try:
            await self._collect()
        finally:
            self.release()

    @property
    def tokens(self) -> int:
        return int((self.kv_params or {}).get("remote_num_tokens") or 0)
