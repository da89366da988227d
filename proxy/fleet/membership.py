"""Which instances belong to each pool, changed without a restart.

Two sources, combined:

- the configured URLs, whose hostnames are re-resolved every
  ``PDPROXY_DISCOVERY_INTERVAL`` seconds: a name with several addresses (a Kubernetes
  headless Service) stands for one instance per address;
- the admin API's additions, removals and drains, shared by the worker processes
  (:mod:`proxy.fleet.journal`).

Removing an instance drains it: it leaves the pool, so nothing new is routed there,
while the requests already on it hold their own reference and finish.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from .. import background
from ..settings import Settings
from .backends import DECODE, PREFILL, Registry
from .journal import POLL_SECONDS, AdminJournal, State, empty_state

log = logging.getLogger("pdproxy.membership")

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def with_host(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Membership:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        resolver: Resolver = resolve_host,
        journal: AdminJournal | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.resolver = resolver
        self.journal = journal  # shares the admin state with the other workers, if any
        self.configured = {PREFILL: list(settings.prefill_urls), DECODE: list(settings.decode_urls)}
        self.discovered: dict[str, list[str]] = {PREFILL: [], DECODE: []}
        self.admin: State = empty_state()  # instances added, removed, draining
        # Asks the streams on an instance that starts draining to move; how many will.
        self.on_drain: Callable[[str], int] | None = None
        self._last_good: dict[str, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def members(self, role: str) -> list[str]:
        base = self.discovered[role] if self.settings.discovery_interval else self.configured[role]
        removed = set(self.admin["removed"].get(role, ()))
        urls = [url for url in [*base, *self.admin["added"].get(role, ())] if url not in removed]
        return list(dict.fromkeys(urls))

    def apply(self) -> None:
        for role in (PREFILL, DECODE):
            self.registry.set_pool_urls(role, self.members(role))
        draining = set(self.admin["draining"])
        for inst in self.registry.all_instances():
            inst.draining = inst.url in draining

    # --- the admin API's verbs (for every worker) ------------------------------------

    def add(self, role: str, url: str) -> None:
        def change(state: State) -> None:
            _discard(state["removed"], role, url)
            if url not in (added := state["added"].setdefault(role, [])):
                added.append(url)

        self._change(change)

    def remove(self, role: str, url: str) -> bool:
        if url not in self.members(role):
            return False

        def change(state: State) -> None:
            _discard(state["added"], role, url)
            if url not in (removed := state["removed"].setdefault(role, [])):
                removed.append(url)

        self._change(change)
        return True

    def drain(self, url: str, draining: bool = True) -> int | None:
        """Send the instance nothing new (or again); None if no such instance, else how
        many of this worker's streams on it were asked to move (the other workers move
        theirs when they adopt the change)."""
        if not any(inst.url == url for inst in self.registry.all_instances()):
            return None

        def change(state: State) -> None:
            urls = set(state["draining"]) - {url}
            state["draining"] = sorted(urls | {url} if draining else urls)

        self._change(change, asked=url)
        return self.on_drain(url) if draining and self.on_drain else 0

    def _change(self, change: Callable[[State], None], asked: str | None = None) -> None:
        if self.journal is None:
            state = copy.deepcopy(self.admin)
            change(state)
        else:
            state = self.journal.update(change)  # with whatever the others changed since
        self._adopt(state, asked)

    def follow(self) -> None:
        """Adopt what another worker changed."""
        if self.journal is not None and (state := self.journal.changed()) is not None:
            self._adopt(state)

    def _adopt(self, state: State, asked: str | None = None) -> None:
        """Take ``state`` as the admin state; the streams here on instances that start
        draining with it are asked to move (but ``asked``'s: its caller does that)."""
        newly = set(state["draining"]) - set(self.admin["draining"]) - {asked}
        self.admin = state
        self.apply()
        for url in sorted(newly):
            if self.on_drain is not None:
                self.on_drain(url)

    async def _follow_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                self.follow()
            except Exception:  # noqa: BLE001 - a bad read must not end the following
                log.exception("reading the admin state shared by the workers failed")

    # --- DNS discovery --------------------------------------------------------------

    async def refresh(self) -> None:
        for role in (PREFILL, DECODE):
            urls: list[str] = []
            for url in self.configured[role]:
                urls += await self._expand(url)
            self.discovered[role] = urls
        self.apply()

    async def _expand(self, url: str) -> list[str]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if _is_ip(host):
            return [url]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except OSError as exc:
            log.warning("cannot resolve %s (%s); keeping its last known addresses", host, exc)
            return self._last_good.get(url, [])
        expanded = [with_host(url, address) for address in addresses]
        if expanded:
            self._last_good[url] = expanded
        return expanded

    def start(self) -> None:
        if self.settings.discovery_interval:
            self._tasks.append(asyncio.create_task(self._run(), name="pdproxy-discovery"))
        if self.journal is not None:
            self.follow()  # a worker that (re)starts takes what was changed before
            self._tasks.append(
                asyncio.create_task(self._follow_forever(), name="pdproxy-admin-follow")
            )

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - discovery must outlive one bad round
                log.exception("discovery round failed")
            await asyncio.sleep(self.settings.discovery_interval)

    async def stop(self) -> None:
        for task in self._tasks:
            await background.cancel(task)


def _discard(by_role: dict[str, list[str]], role: str, url: str) -> None:
    if url in (urls := by_role.get(role, [])):
        urls.remove(url)
