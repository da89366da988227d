"""The same-host (CUDA IPC) data path's protocol, on CPU: real ZMQ server and client
threads, real pins, leases and copies; only the mapping of a peer's memory is played
by an in-process table (CUDA IPC itself runs in bench/gpu on the GPU machine)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import pytest
import torch
import zmq

from devkit.servers import free_port
from engine_ext.metadata import SendSpec
from engine_ext.transport_ipc import IpcServer, IpcUnavailable
from tests.unit.connector.test_transport import Side, loopback_settings, pull, wait_results

EXPORTED: dict[str, list[torch.Tensor]] = {}  # epoch -> the "exported" tensors


def exporter(side_caches: dict[str, torch.Tensor]) -> IpcServer:
    epoch = uuid.uuid4().hex
    EXPORTED[epoch] = [side_caches[name] for name in sorted(side_caches)]
    return IpcServer({"epoch": epoch, "boot_id": "test"})


def opener(description, _device):
    try:
        return EXPORTED[description["epoch"]]
    except KeyError:
        raise IpcUnavailable("not exported in this process") from None


def refusing_opener(_description, _device):
    raise IpcUnavailable("another host")


@pytest.fixture
def settings():
    return loopback_settings(pull_timeout_seconds=2)


def make_pair(settings, d_opener=opener, p_ipc=True, engine_id="p-1"):
    p = Side(settings, seed=1, port=settings.zmq_port, engine_id=engine_id)
    if p_ipc:  # export P's tensors, then restart its server with them
        p.server.stop()
        p.ipc_server = exporter(p.caches)
        p.start_server()
    d = Side(settings, seed=None, port=free_port(), ipc_opener=d_opener)
    return p, d


def finished(registry, timeout=5.0):
    deadline, out = time.monotonic() + timeout, set()
    while not out and time.monotonic() < deadline:
        out = registry.take_finished()
        time.sleep(0.01)
    return out


def same_blocks(p, d, remote, local):
    return all(
        torch.equal(p.caches[name][r], d.caches[name][lo])
        for name in p.caches
        for r, lo in zip(remote, local)
    )


def test_pull_is_copied_in_place_and_p_is_unpinned_after(settings):
    p, d = make_pair(settings)
    try:
        remote, local = [3, 4, 5, 10, 11, 20, 21], [1, 2, 9, 8, 7, 30, 31]
        p.registry.register(SendSpec("t1", "p-req", tuple(remote), consumers=1))
        d.client.submit(pull("t1", remote, local, settings.zmq_port, engine="p-1"))
        (result,) = wait_results(d.client)
        assert result.ok and same_blocks(p, d, remote, local)
        assert finished(p.registry) == {"p-req"}  # the done message unpinned them
        got = d.counters.take().data
        assert got["transfers_ipc"] == 1 and got["bytes_received"] == 7 * p.io.nbytes(1)
        assert d.client.ipc.methods  # one kernel or index copy, no chunks through ZMQ
        assert "chunks_sent" not in p.counters.take().data
        # A second pull reuses the mapping: no second setup round trip.
        p.registry.register(SendSpec("t2", "p-req2", (6, 7), consumers=1))
        d.client.submit(pull("t2", [6, 7], [12, 13], settings.zmq_port, key="d/2", engine="p-1"))
        (result,) = wait_results(d.client)
        assert result.ok and same_blocks(p, d, [6, 7], [12, 13])
    finally:
        p.stop()
        d.stop()


def test_a_released_lease_waits_for_the_copy_in_progress(settings):
    """Pinned blocks outlive a release: P frees them when D says it has copied."""
    p, d = make_pair(settings)
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        entry = p.registry.begin_read("t1")  # what a pin holds
        assert p.registry.release("t1")
        assert not p.registry.take_finished()  # still read
        p.registry.end_read(entry)
        assert p.registry.take_finished() == {"p-req"}
    finally:
        p.stop()
        d.stop()


def test_unmappable_peer_falls_back_to_the_host_path(settings):
    p, d = make_pair(settings, d_opener=refusing_opener)
    try:
        remote, local = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
        p.registry.register(SendSpec("t1", "p-req", tuple(remote), consumers=1))
        d.client.submit(pull("t1", remote, local, settings.zmq_port))
        (result,) = wait_results(d.client)
        assert result.ok and same_blocks(p, d, remote, local)
        got = d.counters.take().data
        assert got["transfers_host"] == 1 and "transfers_ipc" not in got
        assert finished(p.registry) == {"p-req"}
    finally:
        p.stop()
        d.stop()


def test_p_without_ipc_is_pulled_through_the_host(settings):
    p, d = make_pair(settings, p_ipc=False)
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port))
        (result,) = wait_results(d.client)
        assert result.ok and same_blocks(p, d, [1, 2], [3, 4])
        assert d.counters.take().data["transfers_host"] == 1
    finally:
        p.stop()
        d.stop()


def test_transport_ipc_fails_the_pull_rather_than_use_another_path(settings):
    strict = dataclasses.replace(settings, transport="ipc")
    p, d = make_pair(strict, d_opener=refusing_opener)
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], strict.zmq_port))
        (result,) = wait_results(d.client)
        assert not result.ok and "transport=ipc" in result.reason
        assert finished(p.registry) == {"p-req"}  # D's failure still counts as done
    finally:
        p.stop()
        d.stop()


def test_restarted_p_is_mapped_again(settings):
    """A new P process on the same port (even with the same engine id) has a new
    epoch: D never reads it through the dead process's map."""
    p, d = make_pair(settings)
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port, engine="p-1"))
        assert wait_results(d.client)[0].ok
        old_epoch = p.ipc_server.epoch
        p.server.stop()
        p.caches = {name: torch.randn_like(t) for name, t in p.caches.items()}
        p.io.tensors[:] = [p.caches[name] for name in sorted(p.caches)]
        p.io._arrays = [p.io._as_numpy(t) for t in p.io.tensors]
        p.ipc_server = exporter(p.caches)
        p.start_server()
        assert p.ipc_server.epoch != old_epoch
        p.registry.register(SendSpec("t2", "p-req2", (1, 2), consumers=1))
        d.client.submit(pull("t2", [1, 2], [5, 6], settings.zmq_port, key="d/2", engine="p-1"))
        (result,) = wait_results(d.client)
        assert result.ok and same_blocks(p, d, [1, 2], [5, 6])
    finally:
        p.stop()
        d.stop()


def test_a_pin_that_d_never_ends_lapses(settings):
    """D asked, P pinned, D vanished without a word: P unpins after the pull timeout
    and its lease can free the blocks."""
    p, d = make_pair(settings)
    d.stop()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{settings.zmq_port}")
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        request = {
            "op": "chunk",
            "tid": "t1",
            "key": "gone/1",
            "seq": 0,
            "blocks": [1, 2],
            "layout": p.layout.digest(),
            "engine": "p-1",
            "via": "ipc",
            "epoch": p.ipc_server.epoch,
        }
        sock.send(json.dumps(request).encode())
        assert sock.poll(2000)
        assert json.loads(sock.recv())["status"] == "ok"
        assert p.registry.release("t1")  # the lease ends...
        time.sleep(0.5)
        assert not p.registry.take_finished()  # ... but the pin holds the blocks
        assert finished(p.registry, timeout=5) == {"p-req"}  # until it lapses
        assert p.counters.take().data["pins_lapsed"] == 1
    finally:
        sock.close()
        ctx.term()
        p.stop()


def test_copy_past_the_deadline_is_a_failed_pull(settings, monkeypatch):
    p, d = make_pair(settings)
    try:
        real_copy = d.client.ipc.copy

        def slow_copy(endpoint, remote, local, deadline):
            time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
            return real_copy(endpoint, remote, local, deadline)

        monkeypatch.setattr(d.client.ipc, "copy", slow_copy)
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port))
        (result,) = wait_results(d.client)
        assert not result.ok and "deadline" in result.reason
        assert finished(p.registry) == {"p-req"}
    finally:
        p.stop()
        d.stop()


def test_a_dead_peers_memory_is_let_go(settings):
    """A mapping keeps the peer's memory allocated (even after it died): D drops the
    map of a P that stays unreachable, pull or no pull."""
    p, d = make_pair(settings)
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port, engine="p-1"))
        assert wait_results(d.client)[0].ok
        endpoint = d.client.endpoint("127.0.0.1", settings.zmq_port)
        assert d.client.ipc.mapped(endpoint)
        p.server.stop()  # P's process is gone
        deadline = time.monotonic() + 10 * settings.connect_timeout_seconds
        while d.client.ipc.mapped(endpoint):
            assert time.monotonic() < deadline, "the dead peer's memory is still mapped"
            time.sleep(0.05)
    finally:
        p.stop()
        d.stop()
