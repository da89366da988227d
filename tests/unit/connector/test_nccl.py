"""The NCCL path's decisions, without a GPU: which path each end takes, the communicator's
set-up handshake, and what happens when it fails or a transfer misses its deadline.

The communicator itself (``NcclLink``: ``ncclCommInitRank``, ``ncclSend``/``ncclRecv`` on
a CUDA stream) needs two CUDA devices and is replaced here by a link that records what it
was asked; everything around it is the connector's own code.
"""

from __future__ import annotations

import base64
import types

import pytest
import torch

from engine_ext import transport_nccl
from engine_ext.transport_nccl import NcclClient, NcclServer

UID = bytes(range(128))


class FakeLink:
    made: list[FakeLink] = []

    def __init__(self, lib, device, uid_bytes: bytes, rank: int):
        self.uid_bytes, self.rank = uid_bytes, rank
        self.ready_ok, self.transfer_ok = True, True
        self.sent: list[torch.Tensor] = []
        self.aborted = False
        self.error: str | None = None
        FakeLink.made.append(self)

    def wait_ready(self, timeout: float) -> bool:
        return self.ready_ok

    def send(self, data, deadline: float) -> bool:
        self.sent.append(data)
        return self.transfer_ok

    def recv(self, out, deadline: float) -> bool:
        if self.transfer_ok:
            out.fill_(7)
        return self.transfer_ok

    def abort(self) -> None:
        self.aborted = True


class FakeLib:
    def ncclGetUniqueId(self):
        buffer = (transport_nccl.ctypes.c_byte * 128).from_buffer_copy(UID)
        return types.SimpleNamespace(internal=buffer)


class FakeBlockIO:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.scattered: list[tuple[list[int], torch.Tensor]] = []

    def gather_device(self, blocks):
        return torch.arange(len(blocks) * 4, dtype=torch.uint8)

    def alloc_device(self, count: int):
        return torch.zeros(count * 4, dtype=torch.uint8)

    def scatter_device(self, blocks, data) -> None:
        self.scattered.append((list(blocks), data.clone()))


@pytest.fixture(autouse=True)
def fake_links(monkeypatch):
    FakeLink.made = []
    monkeypatch.setattr(transport_nccl, "NcclLink", FakeLink)
    monkeypatch.setattr(transport_nccl, "device_id", lambda device: "host-a/GPU-0")


def settings(transport: str = "auto"):
    return types.SimpleNamespace(transport=transport, pull_timeout_seconds=5.0)


def chunk(server: NcclServer, dev: str) -> list[dict]:
    replies: list[dict] = []
    server.send_chunk({"dev": dev}, [3, 4, 5], replies.append)
    return replies


def test_p_sends_the_host_path_to_a_peer_on_its_own_device_or_none():
    server = NcclServer(FakeLib(), FakeBlockIO(), settings())
    assert chunk(server, "host-a/GPU-0") == [{"status": "use_host"}]
    assert chunk(server, "") == [{"status": "use_host"}]
    strict = NcclServer(FakeLib(), FakeBlockIO(), settings("nccl"))
    assert chunk(strict, "host-a/GPU-0")[0]["status"] == "error"  # nccl asked, not possible
    assert FakeLink.made == []


def test_first_chunk_sets_the_link_up_then_chunks_go_over_it():
    server = NcclServer(FakeLib(), FakeBlockIO(), settings())
    setup = chunk(server, "host-a/GPU-1")
    assert setup[0]["status"] == "nccl_setup"
    assert base64.b64decode(setup[0]["uid"]) == UID
    assert FakeLink.made[0].rank == 0  # P is rank 0, the sender
    ok = chunk(server, "host-a/GPU-1")
    assert ok == [{"status": "ok", "via": "nccl", "nbytes": 12}]
    assert len(FakeLink.made) == 1 and len(FakeLink.made[0].sent) == 1  # the link is kept


def test_a_link_that_never_came_up_is_dropped_and_the_host_path_used():
    server = NcclServer(FakeLib(), FakeBlockIO(), settings())
    chunk(server, "host-a/GPU-1")
    FakeLink.made[0].ready_ok = False
    assert chunk(server, "host-a/GPU-1") == [{"status": "use_host"}]
    assert FakeLink.made[0].aborted and server.links == {}


def test_a_send_past_its_deadline_drops_the_link():
    server = NcclServer(FakeLib(), FakeBlockIO(), settings())
    chunk(server, "host-a/GPU-1")
    FakeLink.made[0].transfer_ok = False
    assert chunk(server, "host-a/GPU-1")[0]["status"] == "ok"  # announced, then timed out
    assert FakeLink.made[0].aborted and server.links == {}  # the next chunk sets up anew


def test_d_chooses_nccl_only_towards_a_cuda_peer_that_did_not_ask_for_host():
    client = NcclClient(FakeLib(), FakeBlockIO(), settings())
    assert client.choose("tcp://p:1", {"device": "cuda"}) == "nccl"
    assert client.choose("tcp://p:2", {"device": "cpu"}) == "host"
    client.remember_host("tcp://p:1")
    assert client.choose("tcp://p:1", {"device": "cuda"}) == "host"
    strict = NcclClient(FakeLib(), FakeBlockIO(), settings("nccl"))
    assert strict.choose("tcp://p:2", {"device": "cpu"}) == "nccl"  # and fails loudly


def test_d_joins_as_rank_one_receives_and_scatters():
    io = FakeBlockIO()
    client = NcclClient(FakeLib(), io, settings())
    assert client.join("tcp://p:1", base64.b64encode(UID).decode())
    assert FakeLink.made[0].rank == 1 and FakeLink.made[0].uid_bytes == UID
    client.recv_chunk("tcp://p:1", {"nbytes": 8}, [9, 10], deadline=0.0)
    blocks, data = io.scattered[0]
    assert blocks == [9, 10] and data.tolist() == [7] * 8


def test_d_refuses_a_chunk_of_the_wrong_size_and_drops_a_link_that_times_out():
    client = NcclClient(FakeLib(), FakeBlockIO(), settings())
    client.join("tcp://p:1", base64.b64encode(UID).decode())
    with pytest.raises(ValueError):
        client.recv_chunk("tcp://p:1", {"nbytes": 99}, [9, 10], deadline=0.0)
    FakeLink.made[0].transfer_ok = False
    with pytest.raises(TimeoutError):
        client.recv_chunk("tcp://p:1", {"nbytes": 8}, [9, 10], deadline=0.0)
    assert FakeLink.made[0].aborted and client.links == {}
    with pytest.raises(RuntimeError):  # no link: the pull fails and D recomputes
        client.recv_chunk("tcp://p:1", {"nbytes": 8}, [9, 10], deadline=0.0)


def test_d_falls_back_when_the_link_does_not_come_up(monkeypatch):
    monkeypatch.setattr(FakeLink, "wait_ready", lambda self, timeout: False)
    client = NcclClient(FakeLib(), FakeBlockIO(), settings())
    assert not client.join("tcp://p:1", base64.b64encode(UID).decode())
    assert client.links == {}
