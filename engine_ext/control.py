"""HTTP control plane of one engine: release held blocks, read transfer metrics.

Runs in the engine-core process (next to the scheduler-side connector, which owns the
leases) as a stdlib ``ThreadingHTTPServer`` on a daemon thread, so it needs nothing
beyond the standard library and never blocks the engine loop.

* ``POST /pd/release`` ``{"transfer_id": "..."}`` -> ``200 {"released": true|false}``:
  idempotent; true only for the call that released a transfer still held. The proxy
  calls it when a client goes away between the prefill and the decode leg.
* ``POST /pd/hold`` ``{"key": "...", "lease_seconds": s}`` -> ``200 {"armed": bool}``:
  hold the KV of the running request with that ``migration_key`` when it ends (the
  proxy then ends it: :mod:`engine_ext.migrations`).
* ``POST /pd/held`` ``{"key": "...", "wait_seconds": w}`` -> ``200 {"outcome": ...}``:
  what became of an armed request, waiting up to ``w`` seconds (30 at most) for it to
  end: ``held`` (with the ``kv_transfer_params`` of its KV), ``finished`` (it ended
  normally first), ``not_held``, ``pending`` (not ended yet: ask again) or ``unknown``
  (never armed here, or already collected).
* ``GET /pd/stats`` -> JSON totals (what the tests read).
* ``GET /metrics`` -> the same totals as Prometheus text.
* ``GET /pd/health`` -> ``{"ok": true}``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Under "vllm." so vLLM's logging config (handler, VLLM_LOGGING_LEVEL) applies to it.
logger = logging.getLogger("vllm.pd.control")

MAX_BODY = 64 * 1024


class ControlServer:
    def __init__(
        self,
        bind_host: str,
        port: int,
        release: Callable[[str], bool],
        stats: Callable[[], dict[str, Any]],
        metrics: Callable[[], str],
        arm: Callable[[str, float | None], bool] | None = None,
        collect: Callable[[str, float], dict[str, Any] | None] | None = None,
    ):
        posts = {"/pd/release": _release(release)}
        if arm is not None and collect is not None:
            posts["/pd/hold"] = _hold(arm)
            posts["/pd/held"] = _held(collect)
        handler = _make_handler(posts, stats, metrics)
        self._server = ThreadingHTTPServer((bind_host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="pd-control",
            daemon=True,
        )

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class BadRequest(ValueError):
    pass


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    return value


def _seconds(body: dict[str, Any], name: str, default: float | None) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequest(f"{name} must be a number of seconds")
    return float(value)


def _release(release: Callable[[str], bool]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def handle(body: dict[str, Any]) -> dict[str, Any]:
        transfer_id = _string(body, "transfer_id")
        released = release(transfer_id)
        logger.info("control: release %s -> %s", transfer_id, released)
        return {"released": released}

    return handle


def _hold(arm: Callable[[str, float | None], bool]) -> Callable[[dict[str, Any]], dict]:
    def handle(body: dict[str, Any]) -> dict[str, Any]:
        key = _string(body, "key")
        armed = arm(key, _seconds(body, "lease_seconds", None))
        logger.info("control: hold %s -> %s", key, armed)
        return {"armed": armed}

    return handle


def _held(collect: Callable[[str, float], dict[str, Any] | None]) -> Callable[[dict], dict]:
    def handle(body: dict[str, Any]) -> dict[str, Any]:
        key = _string(body, "key")
        outcome = collect(key, _seconds(body, "wait_seconds", 0.0) or 0.0)
        return outcome if outcome is not None else {"outcome": "pending"}

    return handle


def _make_handler(posts, stats, metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; on a kept-alive connection Nagle's
        # algorithm would hold the body until the client's delayed ACK (~40 ms), which
        # every release, and every move of a stream, would wait for.
        disable_nagle_algorithm = True

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: no access log
            logger.debug("control: " + fmt, *args)

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode())

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/pd/stats":
                self._json(200, stats())
            elif path == "/metrics":
                self._send(200, metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/pd/health":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            handle = posts.get(self.path.split("?", 1)[0])
            if handle is None:
                self._json(404, {"error": "not found"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise BadRequest("body required (at most 64 KiB)")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                answer = handle(body)
            except (BadRequest, ValueError) as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, answer)

    return Handler
