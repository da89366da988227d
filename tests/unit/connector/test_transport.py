"""Host transport: real ZMQ server and client threads on loopback, fake CPU KV caches."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from devkit.servers import free_port
from engine_ext.config import PDSettings
from engine_ext.layout import BlockIO, KVLayout
from engine_ext.leases import SendRegistry
from engine_ext.metadata import Notice, PullSpec, SendSpec
from engine_ext.stats import WorkerCounters
from engine_ext.transport_host import HostServer, StagingPool
from engine_ext.transport_ipc import IpcClient
from engine_ext.transport_pull import HostClient

NUM_BLOCKS = 32
SHAPE = (NUM_BLOCKS, 2, 16, 64)  # 8 KiB per block per layer, 16 KiB per block


def make_caches(seed: int | None):
    g = torch.Generator().manual_seed(seed or 0)
    make = (
        (lambda: torch.randn(SHAPE, generator=g))
        if seed is not None
        else (lambda: torch.zeros(SHAPE))
    )
    return {"layers.0": make(), "layers.1": make()}


class Side:
    """One worker's transport pieces around its own KV caches."""

    def __init__(
        self,
        settings: PDSettings,
        seed: int | None,
        port: int,
        shape=SHAPE,
        engine_id="",
        ipc_server=None,
        ipc_opener=None,
    ):
        self.settings, self.port, self.engine_id = settings, port, engine_id
        self.ipc_server = ipc_server
        self.caches = make_caches(seed) if shape == SHAPE else {"layers.0": torch.zeros(shape)}
        self.layout = KVLayout.from_caches(self.caches, NUM_BLOCKS, 1)
        self.io = BlockIO(self.caches, self.layout)
        self.registry = SendRegistry()
        self.counters = WorkerCounters()
        self.results = threading.Event()  # set by the client whenever a result is ready
        self.start_server()
        self.client = HostClient(
            settings,
            0,
            self.io,
            self.layout.digest(),
            self.layout.describe(),
            self.counters,
            on_result=lambda _result: self.results.set(),
            ipc=IpcClient(self.io, settings, opener=ipc_opener) if ipc_opener else None,
        ).start()

    def start_server(self):
        self.server = HostServer(
            self.settings,
            self.port,
            self.registry,
            self.io,
            self.layout.digest(),
            self.layout.describe(),
            self.counters,
            engine_id=self.engine_id,
            ipc=self.ipc_server,
        ).start()

    def stop(self):
        self.client.stop()
        self.server.stop()


def loopback_settings(**overrides) -> PDSettings:
    # Small chunks so that a pull of a few blocks takes several messages.
    values = dict(
        host="127.0.0.1",
        bind_host="127.0.0.1",
        zmq_port=free_port(),
        control_port=0,
        chunk_bytes=40 * 1024,
        max_inflight_bytes=80 * 1024,
        pull_timeout_seconds=4,
        connect_timeout_seconds=1,
        unknown_wait_seconds=1,
    )
    return PDSettings(**{**values, **overrides})


@pytest.fixture
def settings():
    return loopback_settings()


@pytest.fixture
def pair(settings):
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port())
    yield p, d
    p.stop()
    d.stop()


def pull(tid, remote, local, port, key="d/req-1", req="req-1", layout=None, engine=""):
    return PullSpec(
        req_id=req,
        transfer_id=tid,
        host="127.0.0.1",
        port=port,
        remote_block_ids=tuple(remote),
        local_block_ids=tuple(local),
        remote_layout=layout or {"device": "cpu"},
        consumer_key=key,
        remote_engine_id=engine,
    )


def wait_results(client, count=1, timeout=15.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        out += client.take_results()
        time.sleep(0.01)
    assert len(out) == count, f"got {out}"
    return out


def test_pull_moves_blocks_in_chunks_and_releases_p(pair, settings):
    p, d = pair
    remote, local = [3, 4, 5, 10, 11, 20, 21], [1, 2, 9, 8, 7, 30, 31]
    p.registry.register(SendSpec("t1", "p-req", tuple(remote) + (22,), consumers=1))
    d.client.submit(pull("t1", remote, local, settings.zmq_port))
    (result,) = wait_results(d.client)
    assert result.ok and not result.cancelled and result.local_block_ids == tuple(local)
    for name in p.caches:
        for r, lo in zip(remote, local):
            assert torch.equal(p.caches[name][r], d.caches[name][lo])
    # The one consumer is done: P may free the blocks now.
    deadline = time.monotonic() + 5
    finished = set()
    while not finished and time.monotonic() < deadline:
        finished = p.registry.take_finished()
        time.sleep(0.01)
    assert finished == {"p-req"}
    sent, got = p.counters.take().data, d.counters.take().data
    assert sent["bytes_sent"] == got["bytes_received"] == len(remote) * p.io.nbytes(1)
    assert sent["chunks_sent"] >= 3  # 7 blocks of 16 KiB in 40 KiB chunks
    assert got["transfers_ok"] == 1 and sent["pulls_served"] == 1


def test_pull_waits_for_late_registration(pair, settings):
    p, d = pair
    d.client.submit(pull("late", [1, 2], [5, 6], settings.zmq_port))
    time.sleep(0.3)  # P's worker learns of the transfer one engine step later
    registered = time.monotonic()
    p.registry.register(SendSpec("late", "p-req", (1, 2), consumers=1))
    assert d.results.wait(2)
    # Registration wakes the server: the parked pull is served now, not at a poll.
    assert time.monotonic() - registered < 0.25
    (result,) = wait_results(d.client)
    assert result.ok
    assert torch.equal(p.caches["layers.0"][2], d.caches["layers.0"][6])


def test_pull_latency_on_an_idle_pair(pair, settings):
    """A small pull on loopback takes milliseconds (regression guard, generous bound)."""
    p, d = pair
    for i in range(5):
        p.registry.register(SendSpec(f"t{i}", f"p{i}", (1, 2, 3), consumers=1))
        start = time.monotonic()
        d.client.submit(pull(f"t{i}", [1, 2, 3], [4, 5, 6], settings.zmq_port, key=f"d/{i}"))
        assert d.results.wait(2)
        d.results.clear()
        elapsed = time.monotonic() - start
        (result,) = wait_results(d.client)
        assert result.ok and elapsed < 0.25, elapsed


def test_restarted_p_refuses_its_former_transfers_at_once(settings):
    p = Side(settings, seed=1, port=settings.zmq_port, engine_id="p-new")
    d = Side(settings, seed=None, port=free_port())
    try:
        start = time.monotonic()
        d.client.submit(pull("old", [1], [2], settings.zmq_port, engine="p-old"))
        (result,) = wait_results(d.client)
        assert not result.ok and "unknown" in result.reason and "p-old" in result.reason
        assert time.monotonic() - start < settings.unknown_wait_seconds / 2
    finally:
        p.stop()
        d.stop()


def test_busy_p_still_completes_a_pull(settings):
    """P's data-plane thread stalls past the connect timeout (a busy engine): its ZMQ
    I/O thread keeps answering heartbeats, so D waits for it instead of failing."""
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port())
    gather, stalled = p.io.gather, []

    def slow_gather(blocks, out):
        if not stalled:
            stalled.append(True)
            time.sleep(2 * settings.connect_timeout_seconds)
        gather(blocks, out)

    p.server.block_io.gather = slow_gather
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port))
        (result,) = wait_results(d.client)
        assert result.ok, result.reason
        assert torch.equal(p.caches["layers.1"][2], d.caches["layers.1"][4])
    finally:
        p.stop()
        d.stop()


def test_p_killed_mid_pull_fails_within_the_connect_timeout(settings):
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port())
    try:
        d.client.submit(pull("t1", [1], [2], settings.zmq_port))  # parked on P
        time.sleep(0.3)
        p.server.stop()  # its sockets close, as in a crash: the connection drops
        died = time.monotonic()
        (result,) = wait_results(d.client)
        assert not result.ok and "unreachable" in result.reason
        assert time.monotonic() - died < settings.connect_timeout_seconds + 0.3
    finally:
        p.client.stop()
        d.stop()


def test_pull_survives_a_dropped_connection(settings):
    """P's socket goes away and comes back (same transfer table): D asks again."""
    settings = PDSettings(**{**settings.__dict__, "connect_timeout_seconds": 2.0})
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port())
    try:
        d.client.submit(pull("t1", [1, 2], [3, 4], settings.zmq_port))  # parked on P
        time.sleep(0.3)
        p.server.stop()  # the parked request is lost with the connection
        time.sleep(0.2)
        p.start_server()
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        (result,) = wait_results(d.client)
        assert result.ok, result.reason
        assert torch.equal(p.caches["layers.0"][1], d.caches["layers.0"][3])
    finally:
        p.stop()
        d.stop()


def test_staging_wait_does_not_stall_the_server(pair, settings):
    """A chunk waiting for a staging buffer queues; the loop keeps serving others."""
    p, d = pair
    free = threading.Event()
    acquire = p.server.pool.try_acquire
    p.server.pool.try_acquire = lambda n: acquire(n) if free.is_set() else None
    p.registry.register(SendSpec("t1", "p-a", (1, 2), consumers=1))
    p.registry.register(SendSpec("t2", "p-b", (3,), consumers=1))
    d.client.submit(pull("t1", [1, 2], [5, 6], settings.zmq_port))
    time.sleep(0.2)
    d.client.notice(Notice("t2", "127.0.0.1", settings.zmq_port, "d/other"))
    deadline, finished = time.monotonic() + 1, set()
    while "p-b" not in finished and time.monotonic() < deadline:
        finished |= p.registry.take_finished()
        time.sleep(0.01)
    assert "p-b" in finished  # served while t1's chunk waited for staging
    free.set()
    (result,) = wait_results(d.client)
    assert result.ok


def test_a_stalled_p_does_not_hold_up_pulls_from_another(settings):
    import zmq

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts chunk requests, never answers
    silent_port = silent.bind_to_random_port("tcp://127.0.0.1")
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port())
    try:
        p.registry.register(SendSpec("t1", "p-req", (1, 2, 3), consumers=1))
        # Both pulls need more than the whole in-flight budget.
        d.client.submit(pull("stuck", list(range(7)), list(range(7)), silent_port, key="d/s"))
        d.client.submit(pull("t1", [1, 2, 3], [9, 10, 11], settings.zmq_port, key="d/t"))
        start = time.monotonic()
        while not d.results.wait(0.05):
            assert time.monotonic() - start < 1.5, "the pull from the live P was held up"
        (result,) = d.client.take_results()
        assert result.ok and result.req_id == "req-1" and time.monotonic() - start < 1.5
    finally:
        d.stop()
        p.stop()
        ctx.destroy(linger=0)


def test_unknown_transfer_fails_after_bounded_wait(pair, settings):
    _, d = pair
    start = time.monotonic()
    d.client.submit(pull("never", [1], [2], settings.zmq_port))
    (result,) = wait_results(d.client)
    assert not result.ok and "unknown" in result.reason
    assert settings.unknown_wait_seconds <= time.monotonic() - start < settings.pull_timeout_seconds
    assert d.counters.take().data["transfers_failed"] == 1


def test_released_transfer_is_refused_at_once(pair, settings):
    p, d = pair
    p.registry.register(SendSpec("t1", "p-req", (1,), consumers=1))
    p.registry.release("t1")
    start = time.monotonic()
    d.client.submit(pull("t1", [1], [2], settings.zmq_port))
    (result,) = wait_results(d.client)
    assert not result.ok and time.monotonic() - start < settings.unknown_wait_seconds


def test_dead_peer_fails_fast(settings):
    d = Side(settings, seed=None, port=free_port())
    try:
        start = time.monotonic()
        d.client.submit(pull("t1", [1], [2], free_port()))  # nobody listens there
        (result,) = wait_results(d.client, timeout=settings.pull_timeout_seconds + 5)
        assert not result.ok and "unreachable" in result.reason
        elapsed = time.monotonic() - start
        assert settings.connect_timeout_seconds - 0.1 <= elapsed < settings.pull_timeout_seconds
    finally:
        d.stop()


def test_frozen_peer_fails_fast(settings):
    """TCP accepts (a dying or frozen process's socket) but ZMQ never handshakes."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))  # never accept()ed
    d = Side(settings, seed=None, port=free_port())
    try:
        start = time.monotonic()
        d.client.submit(pull("t1", [1], [2], listener.getsockname()[1]))
        (result,) = wait_results(d.client, timeout=settings.pull_timeout_seconds + 5)
        assert not result.ok and "unreachable" in result.reason
        assert time.monotonic() - start < settings.pull_timeout_seconds
    finally:
        d.stop()
        listener.close()


def test_silent_peer_times_out(settings):
    """A P that accepts the connection but never answers: the pull deadline ends it."""
    import zmq

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    d = Side(settings, seed=None, port=free_port())
    try:
        start = time.monotonic()
        d.client.submit(pull("t1", [1], [2], port))
        (result,) = wait_results(d.client, timeout=settings.pull_timeout_seconds + 5)
        assert not result.ok and "timed out" in result.reason
        assert time.monotonic() - start >= settings.pull_timeout_seconds - 0.1
    finally:
        d.stop()
        ctx.destroy(linger=0)


def test_layout_mismatch_is_refused_with_reason(settings):
    p = Side(settings, seed=1, port=settings.zmq_port)
    d = Side(settings, seed=None, port=free_port(), shape=(NUM_BLOCKS, 2, 16, 32))
    try:
        p.registry.register(SendSpec("t1", "p-req", (1,), consumers=1))
        d.client.submit(pull("t1", [1], [2], settings.zmq_port))
        (result,) = wait_results(d.client)
        assert not result.ok and "layout mismatch" in result.reason and "layer" in result.reason
        assert not d.caches["layers.0"].any()
    finally:
        p.stop()
        d.stop()


def test_cancel_reports_once_and_releases_consumer(pair, settings):
    _, d = pair
    # Never registered on P: the pull would wait; the abort ends it at once.
    d.client.submit(pull("t1", [1], [2], settings.zmq_port, req="req-9"))
    time.sleep(0.1)
    d.client.cancel({"req-9"})
    (result,) = wait_results(d.client)
    assert result.cancelled and not result.ok
    assert d.counters.take().data["transfers_cancelled"] == 1


def test_malformed_pull_fails_at_once(pair, settings):
    _, d = pair
    d.client.submit(pull("t1", [], [4, 5], settings.zmq_port))
    (result,) = wait_results(d.client, timeout=2)
    assert not result.ok and not result.cancelled and result.local_block_ids == (4, 5)


def test_an_address_no_socket_takes_fails_its_pull_and_no_other(pair, settings):
    # P's params are the decode request's (a client may send them): a host that ZeroMQ
    # cannot connect to fails that pull at once; the pulls after it still run.
    p, d = pair
    p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
    bad = dataclasses.replace(
        pull("t0", [1, 2], [3, 4], settings.zmq_port, key="d/bad"), host="a b"
    )
    d.client.notice(Notice("t9", "a b", settings.zmq_port, "d/n"))  # nobody to tell: ignored
    d.client.submit(bad)
    d.client.submit(pull("t1", [1, 2], [5, 6], settings.zmq_port, key="d/good", req="req-2"))
    results = {r.req_id: r for r in wait_results(d.client, count=2, timeout=5)}
    assert not results["req-1"].ok and "cannot connect" in results["req-1"].reason
    assert results["req-2"].ok


def test_notice_counts_a_consumer(pair, settings):
    p, d = pair
    p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=2))
    d.client.notice(Notice("t1", "127.0.0.1", settings.zmq_port, "d/a"))
    d.client.notice(Notice("t1", "127.0.0.1", settings.zmq_port, "d/b"))
    deadline, finished = time.monotonic() + 5, set()
    while not finished and time.monotonic() < deadline:
        finished = p.registry.take_finished()
        time.sleep(0.01)
    assert finished == {"p-req"}


def test_concurrent_pulls_from_two_consumers(pair, settings):
    p, d = pair
    p.registry.register(SendSpec("t1", "p-req", (1, 2, 3), consumers=2))
    d.client.submit(pull("t1", [1, 2, 3], [4, 5, 6], settings.zmq_port, key="d/a", req="a"))
    d.client.submit(pull("t1", [1, 2, 3], [7, 8, 9], settings.zmq_port, key="d/b", req="b"))
    results = wait_results(d.client, count=2)
    assert all(r.ok for r in results)
    assert torch.equal(d.caches["layers.1"][5], d.caches["layers.1"][8])
    assert torch.equal(d.caches["layers.1"][5], p.caches["layers.1"][2])


def test_staging_pool_is_bounded():
    import zmq

    pool = StagingPool(buf_bytes=1024, max_bytes=2048)

    class Tracker:
        def __init__(self):
            self.done = False

        def wait(self, timeout):
            raise zmq.NotDone

    t1, t2 = Tracker(), Tracker()
    b1 = pool.acquire(1000, timeout=0.1)
    pool.track(b1, t1)
    b2 = pool.acquire(1000, timeout=0.1)
    pool.track(b2, t2)
    assert pool.acquire(1000, timeout=0.05) is None  # both on the wire
    t1.done = True
    b3 = pool.acquire(1000, timeout=0.05)
    assert b3 is b1  # reused, not reallocated


def test_a_server_on_a_free_port_is_reached_through_its_advertised_ports(settings):
    free = dataclasses.replace(settings, zmq_port=0)
    p = Side(free, seed=1, port=0)
    d = Side(free, seed=None, port=0)
    try:
        assert p.server.port > 0 and d.server.port not in (0, p.server.port)
        p.registry.register(SendSpec("t1", "p-req", (1, 2), consumers=1))
        spec = dataclasses.replace(pull("t1", [1, 2], [3, 4], 0), ports=(p.server.port,))
        d.client.submit(spec)
        (result,) = wait_results(d.client)
        assert result.ok and torch.equal(p.caches["layers.0"][2], d.caches["layers.0"][4])
    finally:
        p.stop()
        d.stop()
