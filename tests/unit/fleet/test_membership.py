"""Live membership: DNS discovery, the admin API, draining."""

import asyncio

from proxy.fleet.backends import PREFILL, Registry
from proxy.fleet.membership import Membership, with_host
from proxy.settings import Settings
from tests.support.proxy_harness import harness

COMPLETION = {"model": "m", "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def settings(**kw):
    return Settings(
        prefill_urls=["http://prefill.svc:8000"],
        decode_urls=["http://10.0.0.9:8000"],
        discovery_interval=1,
        **kw,
    )


async def test_discovery_expands_names_and_keeps_last_good_on_failure():
    answers = {"prefill.svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(host, port):
        if host not in answers:
            raise OSError("NXDOMAIN")
        return answers[host]

    registry = Registry(settings())
    membership = Membership(settings(), registry, resolver)
    await membership.refresh()
    assert [i.url for i in registry.prefill.instances] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
    ]
    assert [i.url for i in registry.decode.instances] == [
        "http://10.0.0.9:8000"
    ]  # IPs are kept as they are
    answers["prefill.svc"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
    await membership.refresh()
    assert [i.url for i in registry.prefill.instances] == [
        "http://10.0.0.2:8000",
        "http://10.0.0.3:8000",
    ]
    del answers["prefill.svc"]  # DNS hiccup: keep what we had
    await membership.refresh()
    assert len(registry.prefill.instances) == 2
    await registry.aclose()


async def test_removed_instance_keeps_its_in_flight_work():
    registry = Registry(settings())
    membership = Membership(settings(), registry, lambda h, p: asyncio.sleep(0, ["10.0.0.1"]))
    await membership.refresh()
    inst = registry.prefill.instances[0]
    inst.acquire(10)
    assert membership.remove(PREFILL, inst.url)
    assert registry.prefill.instances == []
    assert inst.in_flight == 1  # the request on it goes on; it just gets nothing new
    await registry.aclose()


def test_with_host_handles_ipv6():
    assert with_host("http://svc:8000", "fd00::1") == "http://[fd00::1]:8000"


async def test_admin_api_is_off_without_a_key():
    async with harness() as h:
        assert (await h.client.get("/admin/instances")).status_code == 404


async def test_admin_api_adds_drains_and_removes():
    async with harness(decode=("d1", "d2"), admin_key="sekret", api_keys="client-key") as h:
        auth = {"authorization": "Bearer sekret"}
        assert (
            await h.client.get("/admin/instances", headers={"authorization": "Bearer client-key"})
        ).status_code == 401
        listing = (await h.client.get("/admin/instances", headers=auth)).json()
        d1, d2 = h.url("d1"), h.url("d2")
        assert {i["url"] for i in listing["decode"]} == {d1, d2}
        # Drain d2: everything goes to d1.
        r = await h.client.post(
            "/admin/instances/drain", json={"role": "decode", "url": d2}, headers=auth
        )
        assert r.status_code == 200
        client_auth = {"authorization": "Bearer client-key"}
        for _ in range(4):
            assert (
                await h.client.post("/v1/completions", json=COMPLETION, headers=client_auth)
            ).status_code == 200
        assert h.backends["d2"].calls == []
        # Remove d1 and add d3 (not mocked: unreachable): the request can only fail over to d3.
        r = await h.client.request(
            "DELETE", "/admin/instances", json={"role": "decode", "url": d1}, headers=auth
        )
        assert r.status_code == 200
        r = await h.client.post(
            "/admin/instances", json={"role": "decode", "url": "http://d3:9"}, headers=auth
        )
        assert r.status_code == 200
        listing = (await h.client.get("/admin/instances", headers=auth)).json()
        assert [i["url"] for i in listing["decode"]] == [d2, "http://d3:9"]
        for url in ("ftp://x", "http://d4:80x", "http://d4:70000"):
            bad = await h.client.post(
                "/admin/instances", json={"role": "decode", "url": url}, headers=auth
            )
            assert bad.status_code == 400, url
