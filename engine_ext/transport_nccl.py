"""NCCL data path for a P worker and a D worker on different CUDA devices.

The ZMQ protocol of :mod:`engine_ext.transport_host` stays in charge (requests, status,
deadlines); only the payload moves over NCCL. One 2-rank communicator per (P worker,
D worker) pair, P rank 0 and D rank 1, is created once from an ``ncclGetUniqueId``
that P sends in a ``nccl_setup`` reply, kept for later pulls, and dropped (aborted)
when an operation on it misses its deadline, i.e. when the peer died. Each link has
its own CUDA stream; chunks are gathered into a contiguous device buffer, sent in one
``ncclSend`` per chunk, and both sides wait for completion (polling a CUDA event with a
deadline, never blocking forever) before reporting.

Known limit: ``ncclCommInitRank`` cannot be interrupted; a peer that dies during the
handshake leaves one parked daemon thread behind (the pull itself fails on time and
falls back to recompute).

Uses vLLM's ctypes wrapper (``pynccl_wrapper``), present in 0.26 and 0.32.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine_ext.layout import wait_event

logger = logging.getLogger("vllm.pd.nccl")

INIT_TIMEOUT_SECONDS = 20.0


def device_id(device: torch.device) -> str:
    """Identity of a device across processes: host + GPU UUID (or 'cpu')."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{socket.gethostname()}/{getattr(props, 'uuid', device.index)}"


class NcclLink:
    """A 2-rank communicator with a dedicated stream; rank 0 sends, rank 1 receives."""

    def __init__(self, lib: Any, device: torch.device, uid_bytes: bytes, rank: int):
        self.lib, self.device, self.rank = lib, device, rank
        self.comm: Any = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.stream = torch.cuda.Stream(device=device)
        uid = lib.unique_id_from_bytes(uid_bytes)
        # Init blocks until both ranks join: run it aside and wait with a deadline.
        threading.Thread(target=self._init, args=(uid,), name="pd-nccl-init", daemon=True).start()

    def _init(self, uid: Any) -> None:
        try:
            with torch.cuda.device(self.device):
                self.comm = self.lib.ncclCommInitRank(2, uid, self.rank)
        except Exception as exc:  # noqa: BLE001 - reported to whoever waits for the link
            self.error = str(exc)
        self.ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout) and self.comm is not None

    def _dtype(self) -> int:
        from vllm.distributed.device_communicators.pynccl_wrapper import ncclDataTypeEnum

        return ncclDataTypeEnum.from_torch(torch.uint8)

    def send(self, data: torch.Tensor, deadline: float) -> bool:
        return self._transfer(self.lib.ncclSend, data, 1, deadline)

    def recv(self, out: torch.Tensor, deadline: float) -> bool:
        return self._transfer(self.lib.ncclRecv, out, 0, deadline)

    def _transfer(
        self, op: Callable[..., Any], tensor: torch.Tensor, peer: int, deadline: float
    ) -> bool:
        """One send or receive of ``tensor`` with ``peer`` (rank 1 is D, rank 0 is P) on
        our stream; False if it has not completed by ``deadline``."""
        from vllm.distributed.device_communicators.pynccl_wrapper import buffer_type, cudaStream_t

        with torch.cuda.stream(self.stream):
            op(
                buffer_type(tensor.data_ptr()),
                tensor.numel(),
                self._dtype(),
                peer,
                self.comm,
                cudaStream_t(self.stream.cuda_stream),
            )
            event = torch.cuda.Event()
            event.record(self.stream)
        return wait_event(event, deadline)

    def abort(self) -> None:
        if self.comm is not None:
            try:
                self.lib.ncclCommAbort(self.comm)
            except Exception:
                logger.exception("ncclCommAbort failed")
            self.comm = None


def load_library() -> Any | None:
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        return NCCLLibrary()
    except Exception as exc:  # noqa: BLE001 - any failure means: use the host path
        logger.warning("PDConnector: NCCL unavailable (%s); using the host path", exc)
        return None


class NcclServer:
    """P side: answers ``via: nccl`` chunk requests of :class:`HostServer`."""

    def __init__(self, lib: Any, block_io: Any, settings: Any):
        self.lib, self.block_io, self.settings = lib, block_io, settings
        self.device_id = device_id(block_io.device)
        self.links: dict[str, NcclLink] = {}

    def send_chunk(
        self, h: dict[str, Any], blocks: Sequence[int], reply: Callable[[dict], None]
    ) -> None:
        peer = h.get("dev") or ""
        if not peer or peer == self.device_id:
            if self.settings.transport == "nccl":
                reply(
                    {
                        "status": "error",
                        "detail": "transport=nccl, but the peer is not on another CUDA device",
                    }
                )
            else:
                reply({"status": "use_host"})
            return
        link = self.links.get(peer)
        if link is None:
            uid = self.lib.ncclGetUniqueId()
            uid_bytes = ctypes.string_at(ctypes.addressof(uid.internal), 128)
            self.links[peer] = NcclLink(self.lib, self.block_io.device, uid_bytes, rank=0)
            reply({"status": "nccl_setup", "uid": base64.b64encode(uid_bytes).decode()})
            return
        if not link.wait_ready(INIT_TIMEOUT_SECONDS):
            logger.warning(
                "PDConnector: NCCL link to %s failed to initialise (%s)", peer, link.error
            )
            self.drop(peer)
            reply({"status": "use_host"})
            return
        data = self.block_io.gather_device(blocks)
        reply({"status": "ok", "via": "nccl", "nbytes": data.numel()})
        if not link.send(data, time.monotonic() + self.settings.pull_timeout_seconds):
            logger.warning("PDConnector: NCCL send to %s timed out; dropping the link", peer)
            self.drop(peer)

    def drop(self, peer: str) -> None:
        link = self.links.pop(peer, None)
        if link is not None:
            link.abort()


class NcclClient:
    """D side: picks the data path per peer and receives NCCL chunks for HostClient."""

    def __init__(self, lib: Any, block_io: Any, settings: Any):
        self.lib, self.block_io, self.settings = lib, block_io, settings
        self.device_id = device_id(block_io.device)
        self.links: dict[str, NcclLink] = {}
        self._host_peers: set[str] = set()

    def choose(self, endpoint: str, remote_layout: dict[str, Any]) -> str:
        """'nccl' when both ends are CUDA and P has not asked for the host path.

        Only built when this worker's own setting is 'auto' or 'nccl' on CUDA; with
        'nccl' a peer that cannot do NCCL makes the pull fail (and D recompute).
        """
        if self.settings.transport == "nccl":
            return "nccl"
        if remote_layout.get("device") != "cuda" or endpoint in self._host_peers:
            return "host"
        return "nccl"

    def remember_host(self, endpoint: str) -> None:
        self._host_peers.add(endpoint)

    def join(self, endpoint: str, uid_b64: str) -> bool:
        """P created a communicator for us: join it as rank 1 (bounded wait)."""
        self.drop(endpoint)
        link = NcclLink(self.lib, self.block_io.device, base64.b64decode(uid_b64), rank=1)
        if not link.wait_ready(INIT_TIMEOUT_SECONDS):
            logger.warning(
                "PDConnector: NCCL link to %s failed (%s); using the host path",
                endpoint,
                link.error or "timeout",
            )
            return False
        self.links[endpoint] = link
        return True

    def recv_chunk(
        self, endpoint: str, header: dict[str, Any], local_blocks: Sequence[int], deadline: float
    ) -> None:
        link = self.links.get(endpoint)
        if link is None:
            raise RuntimeError(f"no NCCL link to {endpoint}")
        out = self.block_io.alloc_device(len(local_blocks))
        if out.numel() != int(header.get("nbytes", -1)):
            raise ValueError(f"NCCL chunk size {header.get('nbytes')} != expected {out.numel()}")
        if not link.recv(out, deadline):
            self.drop(endpoint)
            raise TimeoutError(f"NCCL receive from {endpoint} timed out")
        self.block_io.scatter_device(local_blocks, out)

    def drop(self, endpoint: str) -> None:
        link = self.links.pop(endpoint, None)
        if link is not None:
            link.abort()
