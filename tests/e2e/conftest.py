"""Fixtures that start real vLLM CPU servers (and the proxy) for end-to-end tests.

Servers are session-scoped and shared: a vLLM CPU server takes a minute or more to
start on a two-core machine, so each kind is started once. Two servers never share a
CPU core binding (vLLM CPU binds to core 0 unless told otherwise), and every connector
gets its own ports.
"""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path

import pytest

from devkit import servers, tiny_model

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PDPROXY_TEST_CACHE", REPO / ".cache"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return tiny_model.build(CACHE / "tiny-llama")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("PDPROXY_TEST_LOGS", tmp_path_factory.mktemp("logs")))
    path.mkdir(parents=True, exist_ok=True)
    return path


_core = iter(range(10_000))


_handed_out: set[int] = set()


def connector_port() -> int:
    """A free port below the kernel's ephemeral range, for the connector's sockets.

    The worker binds its ZMQ port minutes after the test picks it; a port from the
    ephemeral range may meanwhile be taken by some outgoing connection (vLLM opens many),
    which made server starts fail with "address already in use".
    """
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        if port in _handed_out:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port


def pd_server(
    name: str, model_dir: Path, log_dir: Path, free_ports: bool = False, **extra_config
) -> servers.Process:
    """A vLLM CPU server with the PDConnector, on its own core; on ports the test picks,
    or (``free_ports``) with the connector's defaults, which pick free ones."""
    config = {"host": "127.0.0.1"}
    if not free_ports:
        config.update(zmq_port=connector_port(), control_port=connector_port())
    config.update(extra_config)
    proc = servers.vllm_server(
        name,
        model_dir,
        log_dir,
        kv_transfer_config=servers.pd_connector_config(**config),
        cpu_core=next(_core),
    )
    # The connector's own endpoints (GET /pd/stats, POST /pd/release) for tests; with free
    # ports, known once the server has started (connector_control_url).
    proc.pd_config = config
    proc.control_url = f"http://127.0.0.1:{config['control_port']}" if not free_ports else None
    return proc


def connector_control_url(proc: servers.Process) -> str:
    """The control plane of a started server whose connector picked a free port: the
    port it logs (the proxy learns it from P's kv_transfer_params instead)."""
    found = re.findall(r"PDConnector scheduler side: .*? control (\d+),", proc.log_path.read_text())
    assert found, f"{proc.name} logged no control port"
    return f"http://127.0.0.1:{found[-1]}"


class Cluster:
    """The shared servers: a plain reference vLLM, two P/D-capable vLLMs of each role."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        # vLLM's workers busy-poll for a second after every request; on two cores the
        # reference (called before every proxied request in the proxy tests) shares a
        # core with the prefill servers, not with the decode servers whose hand-off
        # latency the tests watch. (The victim P starts first, on core 0.)
        self.ref = servers.vllm_server("ref", model_dir, log_dir, cpu_core=1)
        self.p1 = pd_server("p1", model_dir, log_dir)
        self.d1 = pd_server("d1", model_dir, log_dir)
        # Started with no connector ports at all: several engines share this host on
        # the defaults (free ports, advertised in kv_transfer_params).
        self.p2 = pd_server("p2", model_dir, log_dir, free_ports=True)
        self.d2 = pd_server("d2", model_dir, log_dir, free_ports=True)
        self.all = [self.ref, self.p1, self.d1, self.p2, self.d2]
        self.proxies: list[servers.Process] = []
        self.log_dir = log_dir

    def proxy(
        self, name: str, prefill: list[servers.Process], decode: list[servers.Process], **env: str
    ) -> servers.Process:
        proc = servers.proxy_server(
            name,
            self.log_dir,
            prefill_urls=[p.url for p in prefill],
            decode_urls=[d.url for d in decode],
            extra_env={"PDPROXY_HEALTH_INTERVAL": "1", "PDPROXY_LOG_LEVEL": "info", **env},
        )
        proc.start().wait_ready(60)
        self.proxies.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.proxies + self.all:
            proc.stop()


@pytest.fixture(scope="session")
def cluster(model_dir: Path, log_dir: Path):
    c = Cluster(model_dir, log_dir)
    servers.start_all(c.all)
    for proc in (c.p2, c.d2):
        proc.control_url = connector_control_url(proc)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session", autouse=True)
def victim(model_dir: Path, log_dir: Path):
    """A P that tests kill (SIGKILL, as a crash). Autouse and session-scoped so that it is
    started (not waited for) before the shared cluster and boots alongside it; a test
    that finds it dead restarts it."""
    proc = pd_server("victim-p", model_dir, log_dir).start()
    yield proc
    proc.stop()
