"""The proxy on a real socket (uvicorn on a thread), for tests that need real disconnects."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from devkit.servers import free_port
from proxy.front.app import create_app
from proxy.settings import Settings


@contextlib.contextmanager
def live_proxy(
    prefill: list[str], decode: list[str], monitor: bool = False, **overrides
) -> Iterator[str]:
    port = free_port()
    settings = Settings(
        prefill_urls=prefill, decode_urls=decode, host="127.0.0.1", port=port, **overrides
    )
    config = uvicorn.Config(
        create_app(settings, monitor=monitor),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
