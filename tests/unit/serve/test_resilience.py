"""Pool-down policies, passive ejection and re-admission, against fake backends."""

import asyncio
import json

import httpx
import pytest

from proxy.fleet.backends import Instance, Registry
from proxy.fleet.health import HealthMonitor, parse_load, record_failure
from proxy.settings import Settings
from tests.support.fakeserver import FakeServer
from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def same_answer(response, reference) -> bool:
    """The same text as one colocated server's answer (whole or streamed)."""
    return _text(response) == _text(reference)


def _text(response) -> str:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
        return "".join(c["text"] for e in events for c in json.loads(e).get("choices", []))
    return response.json()["choices"][0]["text"]


def down(h, role, healthy=False):
    for inst in h.app.state.registry.pool(role).instances:
        inst.healthy = healthy


def up(h, role):
    down(h, role, healthy=True)


async def test_no_prefill_runs_colocated_on_a_decode_instance():
    async with harness() as h:
        down(h, "prefill")
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 200
        assert response.headers["x-pdproxy-mode"] == "colocated"
        assert response.headers["x-pdproxy-fallback"] == "no prefill instance"
        assert h.backends["p1"].calls == [] and h.backends["d1"].calls[0]["body"] == COMPLETION
        metrics = (await h.client.get("/metrics")).text
        assert 'pdproxy_fallbacks_total{reason="no prefill instance"}' in metrics


async def test_no_decode_runs_colocated_on_a_prefill_instance():
    async with harness() as h:
        down(h, "decode")
        response = await h.client.post("/v1/completions", json=dict(COMPLETION, stream=True))
        assert (
            response.status_code == 200
            and response.headers["x-pdproxy-fallback"] == "no decode instance"
        )
        assert h.backends["d1"].calls == [] and h.backends["p1"].calls[0]["body"]["max_tokens"] == 4
        assert response.text.endswith("data: [DONE]\n\n")


async def test_fail_fast_policies_answer_503_at_once():
    async with harness(no_prefill_policy="fail", no_decode_policy="fail") as h:
        down(h, "prefill")
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 503 and "prefill" in response.json()["error"]["message"]
    async with harness(no_decode_policy="fail") as h:
        down(h, "decode")
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 503 and h.backends["p1"].calls == []


async def test_a_prefill_pool_gone_since_the_last_check_serves_colocated_at_once():
    # Both P SIGKILLed between health checks: no request may see a 502 for it.
    async with harness(prefill=("p1", "p2"), decode=("d1",)) as h:
        await h.servers["p1"].stop()
        await h.servers["p2"].stop()
        for number in range(20):
            body = dict(COMPLETION, prompt=f"hello world {number}", stream=number % 2 == 1)
            response = await h.client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.headers["x-pdproxy-fallback"] == "no prefill instance"
            assert same_answer(response, await h.reference("/v1/completions", body))
        assert not any(i.available() for i in h.app.state.registry.prefill.instances)
        metrics = (await h.client.get("/metrics")).text
        assert 'pdproxy_backend_ejections_total{backend="%s"}' % h.url("p1") in metrics


async def test_a_decode_pool_gone_since_the_last_check_serves_on_the_prefill_instance():
    async with harness() as h:
        await h.servers["d1"].stop()
        for stream in (False, True):
            body = dict(COMPLETION, stream=stream)
            response = await h.client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert same_answer(response, await h.reference("/v1/completions", body))
        # P ran the whole answer from its own prompt, and its held KV was freed at once.
        decode_legs = [c["body"] for c in h.backends["p1"].calls if c["body"]["max_tokens"] != 1]
        assert decode_legs and all(
            "transfer_id" not in (b.get("kv_transfer_params") or {}) for b in decode_legs
        )
        await asyncio.sleep(0.1)
        assert len(h.releases) == 1  # the second request: the pool was known gone (colocated)


async def test_every_backend_gone_is_a_bounded_502_not_a_hang():
    async with harness(prefill=("p1", "p2"), decode=("d1",)) as h:
        for name in ("p1", "p2", "d1"):
            await h.servers[name].stop()
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 502 and "unreachable" in response.json()["error"]["message"]
    async with harness(no_prefill_policy="fail") as h:
        await h.servers["p1"].stop()  # the policy says fail: the request fails, as it says
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 502 and h.backends["d1"].calls == []


async def test_failures_eject_and_4xx_never_does():
    settings = Settings(
        prefill_urls=["http://p"],
        decode_urls=["http://d"],
        eject_after_failures=2,
        eject_seconds=30,
    )
    inst = Instance("http://p")
    record_failure(inst, "prefill", settings)
    assert inst.available()
    record_failure(inst, "prefill", settings)
    assert not inst.available()
    async with harness(prefill=("p1", "p2"), eject_after_failures=1) as h:
        h.backends["p1"].fail_status = 400
        for _ in range(4):
            assert (await h.client.post("/v1/completions", json=COMPLETION)).status_code in (
                200,
                400,
            )
        assert all(i.available() for i in h.app.state.registry.prefill.instances)  # 4xx: still in
        h.backends["p1"].fail_status = 500
        for _ in range(4):
            assert (await h.client.post("/v1/completions", json=COMPLETION)).status_code == 200
        p1 = h.instance("p1")
        assert not p1.available()  # ejected; p2 took the work
        metrics = (await h.client.get("/metrics")).text
        assert f'pdproxy_backend_ejections_total{{backend="{h.url("p1")}"}}' in metrics


async def test_active_checks_eject_and_readmit():
    # Real sockets: the checks use the legs' HTTP client.
    seen: list[str] = []
    d_health = {"status": 500}

    def p_handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/metrics":
            return httpx.Response(
                200,
                text='vllm:num_requests_running{engine="0"} 3.0\n'
                'vllm:num_requests_waiting{engine="0"} 2.0\n'
                'vllm:kv_cache_usage_perc{engine="0"} 0.25\n',
            )
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 2048}]})
        return httpx.Response(200)

    def d_handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/health":
            return httpx.Response(d_health["status"])
        if request.url.path == "/v1/completions":
            # A decode instance's connector is asked where it listens (a one-token prefill).
            params = {"remote_host": "127.0.0.1", "control_port": d.port, "transfer_id": "t"}
            return httpx.Response(200, json={"kv_transfer_params": params})
        if request.url.path == "/pd/release":
            return httpx.Response(200, json={"released": True})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": []})
        return httpx.Response(200, text="")

    p, d = await FakeServer("p", p_handler).start(), await FakeServer("d", d_handler).start()
    settings = Settings(prefill_urls=[p.url], decode_urls=[d.url])
    registry = Registry(settings)

    async def canary():
        return True

    monitor = HealthMonitor(settings, registry, canary)
    try:
        await monitor.check_all()
        p_inst, d_inst = registry.prefill.instances[0], registry.decode.instances[0]
        assert p_inst.healthy and not d_inst.healthy
        assert (p_inst.load.running, p_inst.load.waiting, p_inst.load.kv_usage) == (3.0, 2.0, 0.25)
        assert p_inst.max_model_len == {"m": 2048}
        d_inst.ejected_until = 1e18  # passively ejected too
        d_health["status"] = 200
        await monitor.check_all()
        assert d_inst.healthy and d_inst.available()  # recovered: re-admitted
        assert "/v1/completions" in seen and "/pd/release" in seen
        assert d_inst.connector == f"http://127.0.0.1:{d.port}"
        assert await monitor.run_canary() and monitor.ready
        await p.stop()  # gone: the next check finds it
        await monitor.check_all()
        assert not p_inst.healthy
    finally:
        await monitor.stop()
        await registry.aclose()
        await d.stop()


async def test_checks_are_spread_over_the_interval():
    starts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            starts.append(asyncio.get_running_loop().time())
        return httpx.Response(200, text="")

    servers = [await FakeServer(f"s{i}", handler).start() for i in range(4)]
    settings = Settings(prefill_urls=[s.url for s in servers[:2]],
                        decode_urls=[s.url for s in servers[2:]])  # fmt: skip
    registry = Registry(settings)
    for inst in registry.decode.instances:
        inst.connector = ""  # no probe
    monitor = HealthMonitor(settings, registry, lambda: asyncio.sleep(0, True))
    try:
        await monitor.check_all(spread=0.4)
        starts.sort()
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert len(starts) == 4 and min(gaps) > 0.05  # not one burst: about 0.1 s apart
    finally:
        await monitor.stop()
        await registry.aclose()
        for server in servers:
            await server.stop()


def test_parse_load_sums_engines():
    text = (
        b'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'
        b'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
        b"# HELP x\n"
        b'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
    )
    assert parse_load(text) == (3.0, 0.0, 0.5)


async def test_ready_needs_a_canary_that_went_pd():
    async with harness() as h:
        monitor = h.app.state.monitor
        assert (await h.client.get("/ready")).status_code == 503
        down(h, "decode")
        assert not await monitor.run_canary()  # colocated fallback does not count as ready
        assert (await h.client.get("/ready")).status_code == 503  # P/D never proven
        up(h, "decode")
        assert await monitor.run_canary()  # through the proxy itself, against the fakes
        assert (await h.client.get("/ready")).json() == {"ready": True}


async def test_a_pool_down_that_falls_back_to_colocated_stays_ready_and_says_so():
    # Readiness takes a proxy out of its Service: with a fallback still answering every
    # request, taking every proxy out would take the service down instead.
    async with harness() as h:
        monitor = h.app.state.monitor
        assert await monitor.run_canary()
        down(h, "decode")
        assert not await monitor.run_canary()
        response = await h.client.get("/ready")
        assert response.status_code == 200
        assert "no healthy decode instance" in response.json()["degraded"]
        down(h, "prefill")  # nothing left to serve with
        assert (await h.client.get("/ready")).status_code == 503


async def test_a_pool_down_whose_policy_fails_requests_is_not_ready():
    async with harness(no_decode_policy="fail") as h:
        monitor = h.app.state.monitor
        assert await monitor.run_canary()
        down(h, "decode")
        assert not await monitor.run_canary()
        body = (await h.client.get("/ready")).json()
        assert body["ready"] is False and "no healthy decode instance" in body["problems"]


@pytest.mark.parametrize(
    "policy",
    [
        {"api_keys": ["client-key"]},
        {"max_concurrent_requests": 1},
        {"min_prefill_tokens": 512},
        {"max_tokens_limit": 1},
    ],
    ids=["api keys", "concurrency limit reached", "short prompts colocated", "max tokens 1"],
)
async def test_the_canary_checks_p_d_whatever_the_client_policy(policy):
    # The canary is the proxy's own: a client key, a full concurrency limit or a policy
    # for clients' requests must not keep /ready false (or flap it under load).
    async with harness(**policy) as h:
        guard = h.app._guarded
        if "max_concurrent_requests" in policy:
            guard.in_flight = 1  # a client request holds the only slot
        monitor = h.app.state.monitor
        assert await monitor.run_canary(), monitor.canary_error
        headers = {"authorization": "Bearer client-key"}
        assert (await h.client.get("/ready", headers=headers)).json() == {"ready": True}


async def test_a_whole_answer_that_outlasts_the_request_is_not_retried_elsewhere():
    # The request's deadline, not the instance, ended the wait: another decode instance
    # would get a request with no time left, and this one a failure it did not earn.
    gate = asyncio.Event()
    timeouts = {"request_timeout": 0.6, "prefill_timeout": 0.3, "first_byte_timeout": 0.3}
    async with harness(decode=("d1", "d2"), **timeouts) as h:
        for name in ("d1", "d2"):
            backend = h.backends[name]

            async def hang(request, backend=backend):
                await gate.wait()
                return backend.generation(request)

            backend.override = hang
        body = {"model": "m", "prompt": "hello world", "max_tokens": 5}
        response = await h.client.post("/v1/completions", json=body)
        gate.set()
        assert response.status_code == 504
        assert "request took too long" in response.json()["error"]["message"]
        assert len(h.backends["d1"].calls) + len(h.backends["d2"].calls) == 1
        registry = h.app.state.gateway.registry
        assert all(inst.consecutive_failures == 0 for inst in registry.decode.instances)


async def test_a_prefill_answer_the_proxy_cannot_use_frees_its_kv():
    async with harness() as h:
        p1 = h.backends["p1"]

        def without_token_ids(request):
            answer = p1.generation(request).json()
            del answer["choices"][0]["token_ids"]
            return httpx.Response(200, json=answer)

        p1.override = without_token_ids
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 502
        assert "unexpected answer" in response.json()["error"]["message"]
        await asyncio.sleep(0.2)  # the release goes out in the background
        assert len(h.releases) == 1  # not left to P's lease
