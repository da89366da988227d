"""/status and /status.json: the shape of what the page polls, and the ops protection."""

import pytest

from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 4, "temperature": 0}
INSTANCE_FIELDS = {
    "url",
    "state",
    "healthy",
    "draining",
    "ejected",
    "in_flight",
    "live_streams",
    "kv_connector",
    "server_running",
    "server_waiting",
    "kv_cache_usage",
}


async def test_status_json_shows_the_pools_and_the_last_minute():
    async with harness(prefill=("p1",), decode=("d1", "d2"), admin_key="k") as h:
        assert (await h.client.post("/v1/completions", json=COMPLETION)).status_code == 200
        h.backends["d1"].fail_status = h.backends["d2"].fail_status = 500
        failed = await h.client.post(
            "/v1/completions", json=COMPLETION, headers={"x-request-id": "doomed"}
        )
        assert failed.status_code >= 500
        await h.client.post(
            "/admin/instances/drain",
            json={"role": "decode", "url": h.url("d2")},
            headers={"authorization": "Bearer k"},
        )

        response = await h.client.get("/status.json")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        status = response.json()
        assert set(status) == {"time", "pid", "ready", "pools", "recent"}
        assert [i["url"] for i in status["pools"]["prefill"]] == [h.url("p1")]
        decode = {i["url"]: i for i in status["pools"]["decode"]}
        assert all(set(i) == INSTANCE_FIELDS for i in decode.values())
        assert decode[h.url("d1")]["state"] == "healthy"
        assert decode[h.url("d2")]["state"] == "draining"

        recent = status["recent"]
        assert recent["requests"] == 2 and sum(recent["per_second"]) == 2
        assert recent["by_mode"] == {"stitched": 2}  # the second one failed on its decode leg
        assert recent["by_outcome"] == {"ok": 1, "error": 1}
        assert set(recent["phases"]) == {"prefill", "handoff", "decode", "proxy"}
        assert recent["phases"]["prefill"]["mean_ms"] > 0
        [error] = recent["errors"]
        assert error["request_id"] == "doomed" and error["status"] == failed.status_code
        assert error["message"]


async def test_status_page_is_one_self_contained_html_file():
    async with harness() as h:
        response = await h.client.get("/status")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert 'fetch("status.json"' in page
        # No external assets: nothing is loaded from anywhere but the proxy.
        assert "http://" not in page and "https://" not in page and "src=" not in page


@pytest.mark.parametrize("path", ["/status", "/status.json"])
async def test_status_is_protected_like_the_other_ops_endpoints(path):
    async with harness(api_keys=["secret"], protect_ops_endpoints=True) as h:
        assert (await h.client.get(path)).status_code == 401
        ok = await h.client.get(path, headers={"authorization": "Bearer secret"})
        assert ok.status_code == 200
    async with harness(api_keys=["secret"]) as h:
        assert (await h.client.get(path)).status_code == 200  # open unless protected
