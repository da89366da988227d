"""``python -m proxy`` / ``pdproxy``: read the settings, then serve.

A bad or missing setting stops start-up with one line per variable, named as the
operator must write it (``PDPROXY_DECODE_URLS: ...``), and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

from pydantic import ValidationError

from .settings import Settings, describe_error, load_settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str) -> None:
    """Operational logs as JSON on stderr; the access log (JSON already) on stdout."""
    root = logging.getLogger()
    if getattr(root, "_pdproxy_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("pdproxy.access")
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [access_handler]
    access.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call is noise
    root._pdproxy_configured = True  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings()
    except ValidationError as error:
        print("pdproxy: invalid configuration\n" + describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None
    serve(settings)


def serve(settings: Settings) -> None:
    import uvicorn

    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker is its own process; prometheus-client aggregates them through files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pdproxy-metrics-")
    configure_logging(settings.log_level)
    uvicorn.run(
        "proxy.main:app",
        factory=False,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
