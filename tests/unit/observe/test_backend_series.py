"""A backend that leaves a pool takes its per-backend gauge series with it."""

import subprocess
import sys
import textwrap

from prometheus_client import REGISTRY

from proxy.fleet.backends import DECODE, PREFILL, Occupied
from tests.support.proxy_harness import harness

ADMIN = {"authorization": "Bearer admin-secret"}


def series(name: str, url: str, role: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"backend": url, "role": role})


async def test_removed_instance_loses_its_gauges_and_a_late_exit_does_not_bring_them_back():
    async with harness(prefill=("p1",), decode=("d1", "d2"), admin_key="admin-secret") as h:
        gone = h.url("d2")
        await h.app.state.monitor.check_all()  # sets pdproxy_backend_healthy for all three
        assert series("pdproxy_backend_healthy", gone, DECODE) == 1
        occupied = Occupied(h.instance("d2"), DECODE, 10).__enter__()  # a request still on d2
        assert series("pdproxy_backend_in_flight", gone, DECODE) == 1

        response = await h.client.request(
            "DELETE", "/admin/instances", json={"role": DECODE, "url": gone}, headers=ADMIN
        )
        assert response.status_code == 200
        assert series("pdproxy_backend_healthy", gone, DECODE) is None
        assert series("pdproxy_backend_in_flight", gone, DECODE) is None
        occupied.__exit__(None, None, None)  # the request finishes after the removal
        assert series("pdproxy_backend_in_flight", gone, DECODE) is None
        # The others keep theirs.
        assert series("pdproxy_backend_healthy", h.url("d1"), DECODE) == 1
        assert series("pdproxy_backend_healthy", h.url("p1"), PREFILL) == 1


async def test_only_the_role_it_left_is_forgotten():
    async with harness(prefill=("a",), decode=("a",), admin_key="admin-secret") as h:
        await h.app.state.monitor.check_all()
        url = h.url("a")
        h.app.state.membership.remove(PREFILL, url)
        assert series("pdproxy_backend_healthy", url, PREFILL) is None
        assert series("pdproxy_backend_healthy", url, DECODE) == 1


def test_with_several_workers_a_removed_backend_stops_counting_as_healthy(tmp_path):
    # prometheus-client cannot remove a series from its per-process files: a backend that
    # left must not stay "healthy" there (an alert on max(healthy) would never fire).
    script = textwrap.dedent(
        """
        from proxy.observe.metrics import HEALTHY, forget_backend, render
        HEALTHY.labels("http://gone:1", "decode").set(1)
        forget_backend("http://gone:1", "decode")
        print(render().decode())
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    line = 'pdproxy_backend_healthy{backend="http://gone:1",role="decode"}'
    assert f"{line} 0.0" in out, out
