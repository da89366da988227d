"""Which instances belong to each pool, changed without a restart.

Two sources, combined:

- the configured URLs, whose hostnames are re-resolved every
  ``PDPROXY_DISCOVERY_INTERVAL`` seconds: a name with several addresses (a Kubernetes
  headless Service) stands for one instance per address;
- the admin API's additions and removals.

Removing an instance drains it: it leaves the pool, so nothing new is routed there,
while the requests already on it hold their own reference and finish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from .. import background
from ..settings import Settings
from .backends import DECODE, PREFILL, Registry

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
        self, settings: Settings, registry: Registry, resolver: Resolver = resolve_host
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.resolver = resolver
        self.configured = {PREFILL: list(settings.prefill_urls), DECODE: list(settings.decode_urls)}
        self.discovered: dict[str, list[str]] = {PREFILL: [], DECODE: []}
        self.added: dict[str, list[str]] = {PREFILL: [], DECODE: []}
        self.removed: dict[str, set[str]] = {PREFILL: set(), DECODE: set()}
        self._last_good: dict[str, list[str]] = {}
        self._task: asyncio.Task[None] | None = None

    def members(self, role: str) -> list[str]:
        base = self.discovered[role] if self.settings.discovery_interval else self.configured[role]
        urls = [url for url in [*base, *self.added[role]] if url not in self.removed[role]]
        return list(dict.fromkeys(urls))

    def apply(self) -> None:
        for role in (PREFILL, DECODE):
            self.registry.set_pool_urls(role, self.members(role))

    # --- the admin API's verbs ------------------------------------------------------

    def add(self, role: str, url: str) -> None:
        self.removed[role].discard(url)
        if url not in self.added[role]:
            self.added[role].append(url)
        self.apply()

    def remove(self, role: str, url: str) -> bool:
        if url not in self.members(role):
            return False
        self.removed[role].add(url)
        if url in self.added[role]:
            self.added[role].remove(url)
        self.apply()
        return True

    def drain(self, url: str, draining: bool = True) -> bool:
        inst = next((i for i in self.registry.all_instances() if i.url == url), None)
        if inst is None:
            return False
        inst.draining = draining
        return True

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
            self._task = asyncio.create_task(self._run(), name="pdproxy-discovery")

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
        await background.cancel(self._task)
