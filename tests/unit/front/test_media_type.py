"""A generation request whose body is not JSON is refused before any backend, with
vLLM's own 400 (its exact words are checked against a real vLLM in the e2e suite)."""

import pytest

from tests.support.proxy_harness import harness


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data", None])
async def test_not_json_is_a_400_before_any_backend(content_type):
    async with harness() as h:
        headers = {"content-type": content_type} if content_type else {}
        response = await h.client.post(
            "/v1/completions", content=b'{"model": "m", "prompt": "x"}', headers=headers
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert "Only 'application/json' is allowed" in error["message"]
        assert error["type"] == "Bad Request" and error["code"] == 400
        assert all(not fake.calls for fake in h.backends.values())
        ok = await h.client.post(
            "/v1/completions",
            content=b'{"model": "m", "prompt": "x"}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert ok.status_code == 200
