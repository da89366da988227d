"""The status page in a real headless browser, against the proxy on a real port.

Two fake engines (one prefill, one decode) on real sockets, the proxy's health checks on
a short interval: the rendered page shows both healthy; once the decode engine stops, the
health checks mark it down and the next rendering says so.
"""

import re

import httpx
import pytest

from bench.fake import FakeEngine
from tests.support.browser import chromium, dump_dom, row_attributes
from tests.support.live_proxy import live_proxy, wait_for

pytestmark = pytest.mark.skipif(
    chromium() is None, reason="no chromium binary on PATH (`make tools` installs Debian's)"
)

COMPLETION = {"model": "fake", "prompt": "hello there", "max_tokens": 8, "temperature": 0}


def states(url: str) -> dict[str, str | None]:
    """Instance URL -> the state the rendered page shows for it."""
    return {
        row["data-url"]: row.get("data-state")
        for row in row_attributes(dump_dom(url + "/status"))
        if row.get("data-url")
    }


def test_the_page_shows_instances_healthy_then_a_stopped_one_down():
    with (
        FakeEngine(prefill_ms=1, itl_ms=1).in_thread() as p,
        FakeEngine(prefill_ms=1, itl_ms=1).in_thread() as d,
    ):
        with live_proxy([p.url], [d.url], monitor=True, health_interval=0.2) as url:
            assert httpx.post(url + "/v1/completions", json=COMPLETION).status_code == 200
            assert states(url) == {p.url: "healthy", d.url: "healthy"}
            # The last minute: this request and the readiness canaries, all stitched.
            rate = re.search(
                r'<div id="rate">(\d+) requests in the last 60 s', dump_dom(url + "/status")
            )
            assert rate and int(rate.group(1)) >= 1

            d.close()
            assert wait_for(
                lambda: not httpx.get(url + "/status.json").json()["pools"]["decode"][0]["healthy"]
            )
            assert states(url) == {p.url: "healthy", d.url: "down"}
