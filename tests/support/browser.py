"""A real headless browser (Debian's Chromium, installed by ``make tools``) for page tests.

Each call is one fresh browser process with a throw-away profile: it loads the page, lets
its scripts run for ``budget_ms`` of virtual time (timers fire at once; network waits are
real), then prints the DOM or saves a screenshot.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    return next((path for path in map(shutil.which, BINARIES) if path), None)


def _run(url: str, *flags: str, budget_ms: int) -> str:
    binary = chromium()
    assert binary, "no chromium binary (make tools installs Debian's)"
    with tempfile.TemporaryDirectory(prefix="pdproxy-chromium-") as profile:
        done = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",  # tests run as root in containers
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *flags,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(url: str, budget_ms: int = 3000) -> str:
    return _run(url, "--dump-dom", budget_ms=budget_ms)


def screenshot(url: str, path: str, size: str = "1200,800", budget_ms: int = 3000) -> None:
    _run(url, f"--screenshot={path}", f"--window-size={size}", budget_ms=budget_ms)


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append(dict(attrs))


def row_attributes(dom: str) -> list[dict[str, str | None]]:
    """The attributes of every table row in ``dom``."""
    parser = _Rows()
    parser.feed(dom)
    return parser.rows
