"""Pool-down policies, passive ejection and re-admission, against fake backends."""

import respx

from proxy.fleet.backends import Instance, Registry
from proxy.fleet.health import HealthMonitor, parse_load, record_failure
from proxy.settings import Settings
from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def down(h, role):
    for inst in h.app.state.registry.pool(role).instances:
        inst.healthy = False


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


async def test_every_instance_dead_is_a_bounded_error_not_a_hang():
    async with harness(prefill=("p1", "p2"), decode=("d1",)) as h:
        await h.servers["p1"].stop()
        await h.servers["p2"].stop()
        response = await h.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 502


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
    settings = Settings(prefill_urls=["http://p"], decode_urls=["http://d"])
    registry = Registry(settings)

    async def canary():
        return True

    monitor = HealthMonitor(settings, registry, canary)
    with respx.mock(assert_all_called=False) as mock:
        mock.get("http://p/health").respond(200)
        health_d = mock.get("http://d/health")
        health_d.respond(500)
        mock.get("http://p/metrics").respond(
            200,
            text='vllm:num_requests_running{engine="0"} 3.0\n'
            'vllm:num_requests_waiting{engine="0"} 2.0\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.25\n',
        )
        mock.get("http://d/metrics").respond(200, text="")
        mock.get("http://p/v1/models").respond(json={"data": [{"id": "m", "max_model_len": 2048}]})
        mock.get("http://d/v1/models").respond(json={"data": []})
        await monitor.check_all()
        p, d = registry.prefill.instances[0], registry.decode.instances[0]
        assert p.healthy and not d.healthy
        assert (p.load.running, p.load.waiting, p.load.kv_usage) == (3.0, 2.0, 0.25)
        assert p.max_model_len == {"m": 2048}
        d.ejected_until = 1e18  # passively ejected too
        health_d.respond(200)
        await monitor.check_all()
        assert d.healthy and d.available()  # recovered: re-admitted
        assert await monitor.run_canary() and monitor.ready
    await monitor.stop()
    await registry.aclose()


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
        assert await monitor.run_canary()  # through the proxy itself, against the fakes
        assert (await h.client.get("/ready")).json() == {"ready": True}
        down(h, "decode")
        assert not await monitor.run_canary()  # colocated fallback does not count as ready
        body = (await h.client.get("/ready")).json()
        assert body["ready"] is False and "no healthy decode instance" in body["problems"]
