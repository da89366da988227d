"""HTTP control plane of one engine: release held blocks, read transfer metrics.

Runs in the engine-core process (next to the scheduler-side connector, which owns the
leases) as a stdlib ``ThreadingHTTPServer`` on a daemon thread, so it needs nothing
beyond the standard library and never blocks the engine loop.

* ``POST /pd/release`` ``{"transfer_id": "..."}`` -> ``200 {"released": true|false}``:
  idempotent; true only for the call that released a transfer still held. The proxy
  calls it when a client goes away between the prefill and the decode leg.
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
    ):
        handler = _make_handler(release, stats, metrics)
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


def _make_handler(release, stats, metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            if self.path.split("?", 1)[0] != "/pd/release":
                self._json(404, {"error": "not found"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise ValueError("body required (at most 64 KiB)")
                body = json.loads(self.rfile.read(length))
                transfer_id = body["transfer_id"]
                if not isinstance(transfer_id, str):
                    raise TypeError("transfer_id must be a string")
            except (ValueError, KeyError, TypeError) as exc:
                self._json(400, {"error": f'expected {{"transfer_id": str}}: {exc}'})
                return
            released = release(transfer_id)
            logger.info("control: release %s -> %s", transfer_id, released)
            self._json(200, {"released": released})

    return Handler
