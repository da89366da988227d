"""The benchmark tooling still works: fake engine + load generator against the real proxy app.

In-process and fast (a few seconds): two ``bench.fake.FakeEngine`` instances on the
test's loop, the proxy app served by uvicorn on a free port, ``bench.loadgen`` in proxy
and direct-pd modes. Also covers the fake's fault modes, which the proxy's tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from bench import loadgen
from bench.fake import FakeEngine, chat_prompt_ids, generate, token_text
from proxy.front.app import create_app
from proxy.settings import Settings

TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def served_proxy(p_url: str, d_url: str) -> AsyncIterator[str]:
    settings = Settings(prefill_urls=[p_url], decode_urls=[d_url], log_level="warning")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            for _ in range(400):  # /ready: the proxy's own P/D canary passed through the fakes
                await asyncio.sleep(0.025)
                if server.started and (await client.get(url + "/ready")).status_code == 200:
                    break
            else:
                raise AssertionError("the proxy never became ready against the fake engines")
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _text(events: list[bytes]) -> str:
    out = []
    for event in events:
        if not event.startswith(b"data: {"):
            continue
        chunk = json.loads(event[6:])
        for choice in chunk.get("choices") or ():
            out.append(
                choice.get("text")
                or (choice.get("delta") or {}).get("content")
                or ((choice.get("message") or {}).get("content"))
                or ""
            )
    return "".join(out)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_loadgen_through_proxy_and_direct(endpoint: str) -> None:
    async with (
        FakeEngine(prefill_ms=2, itl_ms=1) as p,
        FakeEngine(prefill_ms=2, itl_ms=1) as d,
        served_proxy(p.url, d.url) as url,
    ):
        p.reset_stats()
        d.reset_stats()
        common: dict = {
            "endpoint": endpoint,
            "concurrency": 3,
            "requests": 6,
            "tokens": TOKENS,
            "keep_events": True,
            "ramp": 0,
        }
        via_proxy = await loadgen.run(loadgen.LoadSpec(url=url, **common))
        direct = await loadgen.run(
            loadgen.LoadSpec(mode="direct-pd", prefill_url=p.url, decode_url=d.url, **common)
        )

    for result in (via_proxy, direct):
        assert result.errors == 0, result.error_kinds
        assert result.requests_started == 6
        assert result.ttft_ms["p50"] > 0 and result.itl_ms
        for sample in result.samples:
            assert sample.chunks == TOKENS
            assert sample.completion_tokens == TOKENS
    body = loadgen.request_body(loadgen.LoadSpec(endpoint=endpoint, tokens=TOKENS))
    prompt = (
        chat_prompt_ids(body["messages"]) if endpoint == "chat" else list(body["prompt"].encode())
    )
    expected = "".join(token_text(t) for t in generate(prompt, TOKENS))
    assert via_proxy.served_modes == {"stitched": 6}
    for sample in via_proxy.samples:
        assert sample.headers["x-pdproxy-mode"] == "stitched"
        assert _text(sample.events) == expected
    for sample in direct.samples:
        assert _text(sample.events) == expected
    # Each request ran P then D once: 6 via the proxy + 6 direct.
    assert p.stats()["generations"] == {"prefill": 12}
    assert d.stats()["generations"] == {"decode": 12}
    assert p.stats()["kv_pulled"] == 12 and p.stats()["kv_held"] == 0


async def test_fake_engine_faults() -> None:
    body = {"model": "fake", "prompt": "hi", "max_tokens": 4, "stream": True}
    async with (
        FakeEngine(prefill_ms=1, itl_ms=1) as engine,
        httpx.AsyncClient(base_url=engine.url, trust_env=False, timeout=5) as client,
    ):
        engine.configure(fault="error", fault_times=1)
        assert (await client.post("/v1/completions", json=body)).status_code == 500
        assert (await client.post("/v1/completions", json=body)).status_code == 200  # only once

        engine.configure(fault="flap")
        codes = [(await client.post("/v1/completions", json=body)).status_code for _ in range(4)]
        assert codes == [200, 500, 200, 500]

        engine.configure(fault="close", close_after_chunks=2)
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_raw():
                    pass

        engine.configure(fault="hang")
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=body, timeout=0.2)

        engine.configure(fault="slow_first_byte", first_byte_ms=150)
        started = asyncio.get_running_loop().time()
        response = await client.post("/v1/completions", json={**body, "stream": False})
        assert response.status_code == 200
        assert asyncio.get_running_loop().time() - started >= 0.15

        engine.configure(fault="error", fault_legs=("prefill",))
        assert (
            await client.post("/v1/completions", json={**body, "stream": False})
        ).status_code == 200
        prefill = {**body, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        assert (await client.post("/v1/completions", json=prefill)).status_code == 500

        engine.configure(fault=None)
        answer = (await client.post("/v1/completions", json={**prefill, "max_tokens": 1})).json()
        params = answer["kv_transfer_params"]
        assert params["do_remote_prefill"] and params["control_port"] == engine.port
        release = await client.post("/pd/release", json={"transfer_id": params["transfer_id"]})
        assert release.json() == {"released": True}
        stats = (await client.get("/fake/stats")).json()
        assert stats["faults"] == {"error": 4, "close": 1, "hang": 1, "slow_first_byte": 1}
        assert stats["kv_released"] == 1 and stats["kv_held"] == 0


def test_fake_engine_in_thread() -> None:
    with FakeEngine(prefill_ms=1, itl_ms=1).in_thread() as engine:
        response = httpx.post(
            engine.url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "return_token_ids": True,
            },
            trust_env=False,
        )
        answer = response.json()
        assert answer["choices"][0]["token_ids"] == generate(answer["prompt_token_ids"], 3)
        assert httpx.get(engine.url + "/health", trust_env=False).status_code == 200
        assert engine.stats()["generations"] == {"plain": 1}


def test_kv_transfer_bench_moves_the_bytes():
    """``bench.kv_transfer`` (the host path against raw TCP) still runs and checks its data."""
    pytest.importorskip("torch")
    pytest.importorskip("zmq")
    from bench import kv_transfer

    report = kv_transfer.run([1], repeats=1)
    (row,) = report["results"]
    assert row["bytes"] == 1 << 20 and row["transport_gbps"] > 0 and row["raw_tcp_gbps"] > 0
    assert "| 1 MiB |" in kv_transfer.table(report)


def test_scaling_bench_runs_a_cell(tmp_path):
    """``bench.scaling`` starts its fakes, a proxy and its load generators, and measures."""
    from bench import scaling

    args = scaling.parse_args(
        ["--workers", "1", "--proxy-cores", "0", "--load-cores", "0", "--fakes", "1",
         "--loadgens", "2", "--concurrency-per-worker", "4", "--duration", "2",
         "--warmup", "1"]
    )  # fmt: skip
    (cell,) = scaling.run(args)["cells"]
    assert cell["workers"] == 1 and cell["concurrency"] == 4 and cell["errors"] == 0
    assert cell["chunks_per_s"] > 0 and cell["proxy_cores_busy"] > 0
    assert len(cell["loadgens_cores_busy"]) == 2 and len(cell["fakes_cores_busy"]) == 2
