"""Fixtures that start real vLLM CPU servers (and the proxy) for end-to-end tests.

Servers are session-scoped and shared: a vLLM CPU server takes a minute or more to
start on a two-core machine, so each kind is started once. Two servers never share a
CPU core binding (BRIEF §5), and every connector gets its own ports.
"""

from __future__ import annotations

import os
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


def pd_server(name: str, model_dir: Path, log_dir: Path, **extra_config) -> servers.Process:
    """A vLLM CPU server with the PDConnector, on its own ports and core."""
    config = {"host": "127.0.0.1", "zmq_port": servers.free_port(), "control_port": servers.free_port()}
    config.update(extra_config)
    return servers.vllm_server(
        name,
        model_dir,
        log_dir,
        kv_transfer_config=servers.pd_connector_config(**config),
        cpu_core=next(_core),
    )


class Cluster:
    """The shared servers: a plain reference vLLM, two P/D-capable vLLMs of each role."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.ref = servers.vllm_server("ref", model_dir, log_dir, cpu_core=0)
        self.p1 = pd_server("p1", model_dir, log_dir)
        self.d1 = pd_server("d1", model_dir, log_dir)
        self.p2 = pd_server("p2", model_dir, log_dir)
        self.d2 = pd_server("d2", model_dir, log_dir)
        self.all = [self.ref, self.p1, self.d1, self.p2, self.d2]
        self.proxies: list[servers.Process] = []
        self.log_dir = log_dir

    def proxy(self, name: str, prefill: list[servers.Process], decode: list[servers.Process], **env: str) -> servers.Process:
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
    try:
        yield c
    finally:
        c.stop()
