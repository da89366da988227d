"""The admin API with several worker processes: every worker follows every change."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from devkit.servers import free_port
from proxy.fleet.backends import DECODE, Registry
from proxy.fleet.journal import AdminJournal
from proxy.fleet.membership import Membership
from proxy.settings import Settings

D1, D2 = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


def worker(tmp_path) -> tuple[Membership, Registry, list[str]]:
    """One worker's membership, sharing the admin state in ``tmp_path``; the URLs whose
    streams it was asked to move."""
    settings = Settings(prefill_urls=["http://10.0.0.9:8000"], decode_urls=[D1])
    registry = Registry(settings)
    membership = Membership(settings, registry, journal=AdminJournal(tmp_path))
    membership.apply()
    moved: list[str] = []
    membership.on_drain = lambda url: moved.append(url) or 3
    return membership, registry, moved


def decode_urls(registry: Registry) -> list[str]:
    return [inst.url for inst in registry.decode.instances]


async def test_a_change_in_one_worker_reaches_the_others(tmp_path):
    (a, ra, moved_a), (b, rb, moved_b) = worker(tmp_path), worker(tmp_path)
    a.add(DECODE, D2)
    assert decode_urls(ra) == [D1, D2] and decode_urls(rb) == [D1]
    b.follow()
    assert decode_urls(rb) == [D1, D2]
    assert b.drain(D1) == 3 and moved_b == [D1]  # b's own streams, at once
    a.follow()
    assert moved_a == [D1]  # a moves its streams on D1 when it sees the drain
    assert [i.draining for i in ra.decode.instances] == [True, False]
    a.follow()
    assert moved_a == [D1]  # once
    assert b.remove(DECODE, D2) and b.drain(D1, draining=False) == 0
    a.follow()
    assert decode_urls(ra) == [D1] and not ra.decode.instances[0].draining
    late, rl, _ = worker(tmp_path)  # a worker that (re)starts takes the state as it is
    late.follow()
    assert decode_urls(rl) == [D1]
    for registry in (ra, rb, rl):
        await registry.aclose()


def test_two_workers_list_what_either_was_told():
    # The real launcher: each admin call lands on whichever worker takes the connection.
    port, key = free_port(), "admin-key"
    env = {
        **os.environ,
        "PDPROXY_PREFILL_URLS": "http://127.0.0.1:9",
        "PDPROXY_DECODE_URLS": "http://127.0.0.1:10",
        "PDPROXY_WORKERS": "2",
        "PDPROXY_ADMIN_KEY": key,
        "PDPROXY_HOST": "127.0.0.1",
        "PDPROXY_PORT": str(port),
        "PDPROXY_LOG_LEVEL": "warning",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base, auth = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {key}"}
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:  # both workers up
            try:
                pids.add(httpx.get(base + "/status.json", timeout=2).json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.2)
        assert len(pids) == 2, "two workers never answered"
        added = {"role": "decode", "url": "http://127.0.0.1:11"}
        assert httpx.post(base + "/admin/instances", json=added, headers=auth).status_code == 200
        time.sleep(1)  # the other worker follows within a quarter of a second
        seen: dict[int, list[str]] = {}
        for _ in range(40):  # a new connection each time: both workers answer
            pid = httpx.get(base + "/status.json", timeout=2).json()["pid"]
            listing = httpx.get(base + "/admin/instances", headers=auth, timeout=2).json()
            seen.setdefault(pid, [i["url"] for i in listing["decode"]])
            listing = httpx.get(base + "/admin/instances", headers=auth, timeout=2).json()
            assert [i["url"] for i in listing["decode"]] == [
                "http://127.0.0.1:10",
                "http://127.0.0.1:11",
            ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_a_worker_that_changes_the_state_also_takes_the_others_changes(tmp_path):
    # b drains D1, then a adds D2 before its next look: a's change is made on b's state,
    # and a still moves its streams off D1.
    (a, ra, moved_a), (b, rb, _) = worker(tmp_path), worker(tmp_path)
    b.drain(D1)
    a.add(DECODE, D2)
    assert moved_a == [D1] and [i.draining for i in ra.decode.instances] == [True, False]
    for registry in (ra, rb):
        await registry.aclose()
