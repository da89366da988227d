"""CUDA IPC data path: D copies P's blocks device to device, on the same host.

When P and D run on one host (one GPU, or GPUs that can reach each other's memory),
no byte needs to leave the device. Each P worker exports CUDA IPC handles of its KV
tensors once (:func:`export_caches`); a D worker maps a peer's handles once, at its
first pull from that peer (:func:`open_caches`, about a millisecond per tensor), and
from then on moves blocks with one kernel launch per pull
(:mod:`engine_ext.block_copy`) on its own CUDA stream.

The ZMQ protocol of :mod:`engine_ext.transport_host` stays in charge of who may read
what and until when:

* D asks for a pull ``via: ipc`` with the ``epoch`` of the mapping it holds for that
  peer (empty if none). P answers ``ipc_setup`` with its description (handles, host,
  device, epoch) when D's epoch is not its own, ``use_host`` when it offers no IPC.
  A new epoch per P process means a restarted P is never read through a stale map.
* Otherwise P *pins* the transfer's blocks (they stay allocated even if the lease
  ends or the proxy releases them) and answers ``ok``. D copies, waits for the copy
  to complete, and only then sends ``done``, which unpins them. A pin that D never
  ends (D died) lapses after ``pull_timeout_seconds``; D counts a copy that completes
  past its own deadline (which falls before that) as failed, so a block P may have
  freed is never used.
* A peer that cannot be mapped (another host, a GPU this process cannot reach, no
  shared ``/dev/shm``) is remembered and served by the next path (NCCL, then host).

Handles and layouts travel as JSON, never pickles: a decode request's
``kv_transfer_params`` come from an HTTP body, so the peer they name is not trusted.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine_ext import block_copy
from engine_ext.layout import wait_event

logger = logging.getLogger("vllm.pd.ipc")

# A copy that has not completed at its deadline is waited for this much longer before
# its blocks are reported as failed: until then the kernel may still write them.
COPY_GRACE_SECONDS = 10.0


class IpcUnavailable(RuntimeError):
    """This process cannot map that peer's memory."""


def boot_id() -> str:
    """Identity of this host's running kernel (shared by containers on one host)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def export_caches(tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """JSON description of a worker's KV tensors that another process can map."""
    storages: list[dict[str, Any]] = []
    index: dict[int, int] = {}
    layers = []
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in index:
            (_, handle, size, offset, counter, counter_offset, event, event_sync) = (
                storage._share_cuda_()
            )
            index[storage.data_ptr()] = len(storages)
            storages.append(
                {
                    "handle": _b64(handle),
                    "size": int(size),
                    "offset": int(offset),
                    "ref_counter": _b64(counter),
                    "ref_counter_offset": int(counter_offset),
                    "event": _b64(event),
                    "event_sync": bool(event_sync),
                }
            )
        layers.append(
            {
                "storage": index[storage.data_ptr()],
                "offset": t.storage_offset(),
                "shape": list(t.shape),
                "stride": list(t.stride()),
                "dtype": str(t.dtype).removeprefix("torch."),
            }
        )
    return {
        "boot_id": boot_id(),
        "device": device_uuid(tensors[0].device) if tensors else "",
        "epoch": uuid.uuid4().hex,
        "storages": storages,
        "layers": layers,
    }


def local_index(device_uuid_: str) -> int | None:
    """This process's index of the GPU with that UUID (None if it cannot see it)."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", i)) == device_uuid_:
            return i
    return None


def open_caches(description: dict[str, Any], local: torch.device) -> list[torch.Tensor]:
    """Map a peer's KV tensors into this process (raises IpcUnavailable)."""
    if not description.get("boot_id") or description["boot_id"] != boot_id():
        raise IpcUnavailable("the peer runs on another host")
    index = local_index(str(description.get("device")))
    if index is None:
        raise IpcUnavailable(f"GPU {description.get('device')} is not visible here")
    if index != local.index and not torch.cuda.can_device_access_peer(local.index, index):
        raise IpcUnavailable(f"GPU {index} cannot be reached from GPU {local.index}")
    try:
        storages = [
            torch.UntypedStorage._new_shared_cuda(
                index,
                _unb64(s["handle"]),
                int(s["size"]),
                int(s["offset"]),
                _unb64(s["ref_counter"]),
                int(s["ref_counter_offset"]),
                _unb64(s["event"]),
                bool(s["event_sync"]),
            )
            for s in description["storages"]
        ]
        return [
            torch.empty(0, dtype=getattr(torch, layer["dtype"]), device=f"cuda:{index}").set_(
                storages[int(layer["storage"])],
                int(layer["offset"]),
                tuple(layer["shape"]),
                tuple(layer["stride"]),
            )
            for layer in description["layers"]
        ]
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IpcUnavailable(f"cannot map the peer's KV tensors: {exc}") from exc


class IpcServer:
    """P side: the description D needs to map this worker's KV tensors."""

    def __init__(self, description: dict[str, Any]):
        self.description = description

    @property
    def epoch(self) -> str:
        return self.description["epoch"]

    @classmethod
    def for_caches(cls, tensors: Sequence[torch.Tensor]) -> IpcServer:
        return cls(export_caches(tensors))


@dataclass
class _Mapping:
    engine: str
    epoch: str
    tensors: list[torch.Tensor]
    tables: block_copy.CopyTables | None  # None: copied with index ops


class IpcClient:
    """D side: maps peers once, then copies pulled blocks device to device.

    ``opener`` maps a description into tensors of this process (tests substitute it);
    ``own`` is this worker's own IpcServer, whose tensors are used directly when a
    peer turns out to be this very worker.
    """

    def __init__(
        self,
        block_io: Any,
        settings: Any,
        own: IpcServer | None = None,
        opener: Callable[[dict[str, Any], torch.device], list[torch.Tensor]] = open_caches,
    ):
        self.block_io = block_io
        self.settings = settings
        self.own = own
        self._opener = opener
        self._maps: dict[str, _Mapping] = {}  # endpoint -> mapping
        self._unusable: dict[str, str] = {}  # endpoint -> why
        self._block_dims = [layer.block_dim for layer in block_io.layout.layers]
        self.methods: dict[str, int] = {}  # copy method -> count (kernel / index)
        self.kernel = True  # False once the kernel failed here: index ops then

    def warm_up(self) -> None:
        """Build and try the copy kernel now (engine start), not in the first pull.

        Copies block 0 (vLLM's null block, never read) onto itself; a kernel that
        fails here is never used (index ops move the blocks instead).
        """
        io = self.block_io
        if not io.is_cuda or not io.tensors:
            return
        try:
            tables = self._tables(io.tensors)
            with torch.cuda.device(io.device), torch.cuda.stream(io.stream):
                method = block_copy.copy_blocks(
                    io.tensors, io.tensors, self._block_dims, [0], [0], tables
                )
            io.stream.synchronize()
            logger.info("PD IPC: block copies by %s", method)
        except Exception:  # noqa: BLE001 - a broken kernel must not break transfers
            logger.exception("PD IPC: the copy kernel failed; copying with index ops")
            self.kernel = False

    def _tables(self, remote: list[torch.Tensor]) -> block_copy.CopyTables | None:
        io = self.block_io
        if not self.kernel or not block_copy.triton_usable(io.device):
            return None
        if io.is_cuda:
            with torch.cuda.device(io.device), torch.cuda.stream(io.stream):
                return block_copy.tables(remote, io.tensors, self._block_dims)
        return block_copy.tables(remote, io.tensors, self._block_dims)

    def usable(self, endpoint: str, remote_layout: dict[str, Any]) -> bool:
        same_kind = remote_layout.get("device") == self.block_io.device.type
        return same_kind and endpoint not in self._unusable

    def mapped(self, endpoint: str) -> bool:
        return endpoint in self._maps

    def epoch(self, endpoint: str, engine: str) -> str:
        """The epoch of our mapping of that peer ('' if none, or another engine's)."""
        mapping = self._maps.get(endpoint)
        if mapping is None or (engine and mapping.engine != engine):
            return ""
        return mapping.epoch

    def map(self, endpoint: str, engine: str, description: dict[str, Any]) -> bool:
        """Map a peer's description; False (remembered) if this process cannot."""
        self.unmap(endpoint)
        try:
            tensors = self._open(description)
            self._check(tensors)
        except IpcUnavailable as exc:
            self.refuse(endpoint, str(exc))
            logger.info("PD IPC: not mapping %s (%s); using another path", endpoint, exc)
            return False
        tables = self._tables(tensors)
        self._maps[endpoint] = _Mapping(engine, str(description.get("epoch")), tensors, tables)
        logger.info("PD IPC: mapped %d KV tensors of %s", len(tensors), endpoint)
        return True

    def _open(self, description: dict[str, Any]) -> list[torch.Tensor]:
        if self.own is not None and description.get("epoch") == self.own.epoch:
            return list(self.block_io.tensors)  # a pull from ourselves
        return self._opener(description, self.block_io.device)

    def _check(self, tensors: list[torch.Tensor]) -> None:
        ours = self.block_io.tensors
        if len(tensors) != len(ours):
            raise IpcUnavailable(f"{len(tensors)} KV tensors there, {len(ours)} here")
        for theirs, mine, dim in zip(tensors, ours, self._block_dims):
            if theirs.dtype != mine.dtype or (
                theirs.select(dim, 0).shape != mine.select(dim, 0).shape
            ):
                raise IpcUnavailable(
                    f"KV tensor {tuple(theirs.shape)} {theirs.dtype} there, "
                    f"{tuple(mine.shape)} {mine.dtype} here"
                )

    def refuse(self, endpoint: str, reason: str) -> None:
        """Serve that peer by another path from now on."""
        self._unusable[endpoint] = reason

    def _copy(self, args: tuple) -> str:
        try:
            return block_copy.copy_blocks(*args)
        except Exception:  # noqa: BLE001 - never again; index ops follow any layout
            if args[-1] is None:
                raise
            logger.exception("PD IPC: the copy kernel failed; copying with index ops")
            self.kernel = False
            return block_copy.copy_blocks(*args[:-1], None)

    def unmap(self, endpoint: str) -> None:
        """Drop a peer's mapping (it died or restarted): its memory can be freed."""
        self._maps.pop(endpoint, None)

    def forget(self, endpoint: str) -> None:
        """Try IPC with that peer again (after it restarted, say)."""
        self._unusable.pop(endpoint, None)

    def copy(
        self,
        endpoint: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        deadline: float,
    ) -> int:
        """Copy blocks from the mapped peer into ours; returns the bytes moved.

        Raises if there is no mapping, or if the copy did not complete by
        ``deadline`` (P may have let go of its blocks by then).
        """
        mapping = self._maps.get(endpoint)
        if mapping is None:
            raise RuntimeError(f"no IPC mapping of {endpoint}")
        io = self.block_io
        args = (
            mapping.tensors,
            io.tensors,
            self._block_dims,
            remote_block_ids,
            local_block_ids,
            mapping.tables if self.kernel else None,
        )
        if not io.is_cuda:  # tests: CPU tensors, a synchronous copy
            method = self._copy(args)
            done_in_time = time.monotonic() < deadline
        else:
            with torch.cuda.device(io.device), torch.cuda.stream(io.stream):
                method = self._copy(args)
                done = torch.cuda.Event()
                done.record(io.stream)
            done_in_time = wait_event(done, deadline)
            if not done_in_time:
                # The kernel may still be writing our blocks: never report them (for a
                # recompute) while it might.
                wait_event(done, time.monotonic() + COPY_GRACE_SECONDS)
        self.methods[method] = self.methods.get(method, 0) + 1
        if not done_in_time:
            raise TimeoutError("IPC copy did not complete before the pull's deadline")
        return io.nbytes(len(local_block_ids))
