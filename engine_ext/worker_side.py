"""Worker side of the PDConnector (one per TP rank): owns the KV tensors' transports.

It applies each step's :class:`~engine_ext.metadata.PDConnectorMetadata` (register held
transfers, release them, start pulls, send skip notices) as soon as vLLM binds it, before
the step's forward pass (vLLM 0.32 calls ``start_load_kv`` only after the forward, which
on a CPU engine would hold every new pull and every new registration for a whole
step), and reports back through
vLLM's hooks: held transfers that are done as *finished sending*, pulls that ended as
*finished recving*, failed pulls' blocks as *load errors* (so that with
``kv_load_failure_policy: recompute`` vLLM recomputes them and the client still gets a
correct answer), and counter deltas as connector stats. The bytes themselves move on
the transport threads (:mod:`engine_ext.transport_host`), never on the engine thread;
when a transfer ends there, the scheduler process hears of it
(:mod:`engine_ext.wake`) so that an idle engine reports it at once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine_ext.config import PDSettings
from engine_ext.layout import BlockIO, KVLayout
from engine_ext.leases import SendRegistry
from engine_ext.metadata import PDConnectorMetadata
from engine_ext.stats import PDKVConnectorStats, WorkerCounters
from engine_ext.transport_host import HostServer
from engine_ext.transport_pull import HostClient, PullResult
from engine_ext.wake import RECV, SEND, Announcer

logger = logging.getLogger("vllm.pd.worker")


def _tp_rank_and_size(vllm_config: Any) -> tuple[int, int]:
    size = int(vllm_config.parallel_config.tensor_parallel_size)
    if size == 1:
        return 0, 1
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().rank_in_group, size


class PDWorker:
    def __init__(
        self, vllm_config: Any, kv_cache_config: Any, settings: PDSettings, engine_id: str = ""
    ):
        if int(vllm_config.parallel_config.pipeline_parallel_size) != 1:
            raise ValueError("PDConnector does not support pipeline parallelism")
        self.settings = settings
        self.engine_id = engine_id
        self.num_blocks = int(kv_cache_config.num_blocks)
        self.rank, self.tp_size = _tp_rank_and_size(vllm_config)
        self.registry = SendRegistry()
        self.counters = WorkerCounters()
        self.server: HostServer | None = None
        self.client: HostClient | None = None
        self.announcer = Announcer(engine_id, self.rank) if engine_id else None
        if self.announcer is not None:
            self.registry.on_finished.append(self._announce_sent)
        self._pulling: set[str] = set()
        self._load_errors: set[int] = set()
        self._applied: PDConnectorMetadata | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.shutdown()  # re-registration (new KV tensors) rebinds the same port
        layout = KVLayout.from_caches(kv_caches, self.num_blocks, self.tp_size)
        block_io = BlockIO(kv_caches, layout)
        transport = self.settings.transport
        if transport in ("nccl", "ipc") and not block_io.is_cuda:
            raise RuntimeError(
                f"PDConnector transport={transport} needs CUDA KV caches, not {block_io.device}"
            )
        ipc_server = ipc_client = None
        if block_io.is_cuda and transport in ("auto", "ipc"):
            from engine_ext.transport_ipc import IpcClient, IpcServer

            try:
                ipc_server = IpcServer.for_caches(block_io.tensors)
            except Exception as exc:  # noqa: BLE001 - then peers pull by another path
                if transport == "ipc":
                    raise RuntimeError(f"PDConnector transport=ipc: cannot export: {exc}") from exc
                logger.warning("PDConnector: KV cache not exported over CUDA IPC: %s", exc)
            ipc_client = IpcClient(block_io, self.settings, own=ipc_server)
            ipc_client.warm_up()
        nccl_server = nccl_client = None
        if block_io.is_cuda and transport in ("auto", "nccl"):
            from engine_ext import transport_nccl

            lib = transport_nccl.load_library()
            if lib is None and transport == "nccl":
                raise RuntimeError("PDConnector transport=nccl, but NCCL cannot be loaded")
            if lib is not None:
                nccl_server = transport_nccl.NcclServer(lib, block_io, self.settings)
                nccl_client = transport_nccl.NcclClient(lib, block_io, self.settings)
        desc, digest = layout.describe(), layout.digest()
        port = self.settings.zmq_port + self.rank if self.settings.zmq_port else 0
        self.server = HostServer(
            self.settings,
            port,
            self.registry,
            block_io,
            digest,
            desc,
            self.counters,
            nccl=nccl_server,
            engine_id=self.engine_id,
            ipc=ipc_server,
        ).start()
        self.client = HostClient(
            self.settings,
            self.rank,
            block_io,
            digest,
            desc,
            self.counters,
            nccl=nccl_client,
            on_result=self._announce_received,
            ipc=ipc_client,
        ).start()
        if self.announcer is not None:  # the scheduler advertises it to D
            self.announcer.port(self.rank, self.server.port)
        first = layout.layers[0] if layout.layers else None
        logger.info(
            "PDConnector worker rank %d/%d: %d layers, block dim %s, shape %s, %s, %d bytes/block, "
            "ZMQ %s:%d, layout %s, CUDA IPC %s, NCCL %s",
            self.rank,
            self.tp_size,
            len(layout.layers),
            first and first.block_dim,
            first and first.shape,
            first and first.dtype,
            layout.bytes_per_block,
            self.settings.bind_host,
            self.server.port,
            digest,
            "on" if ipc_server else "off",
            "on" if nccl_server else "off",
        )

    def _announce_sent(self, req_id: str) -> None:
        if self.announcer is not None:
            self.announcer(SEND, req_id)

    def _announce_received(self, result: PullResult) -> None:
        if self.announcer is not None:
            self.announcer(RECV, result.req_id)

    def start_load_kv(self, meta: PDConnectorMetadata | None) -> None:
        """Apply this step's decisions (once per metadata: at bind time, then again)."""
        if meta is None or meta is self._applied or meta.is_empty():
            return
        self._applied = meta
        if self.client is None:
            raise RuntimeError("PDConnector metadata before register_kv_caches")
        for spec in meta.sends:
            self.registry.register(spec)  # wakes the server for pulls parked on it
        for tid in meta.releases:
            self.registry.release(tid)
        for pull in meta.pulls:
            self._pulling.add(pull.req_id)
            self.client.submit(pull)
        for notice in meta.notices:
            self.client.notice(notice)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending = self.registry.take_finished()
        recving: set[str] = set()
        if self.client is not None:
            # A decode request that finished while its pull runs was aborted: cancel the
            # pull; vLLM frees its blocks once we report it as received.
            aborted = self._pulling & set(finished_req_ids or ())
            if aborted:
                self.client.cancel(aborted)
                self._pulling -= aborted  # its result still comes, once
            for result in self.client.take_results():
                self._pulling.discard(result.req_id)
                recving.add(result.req_id)
                if not result.ok and not result.cancelled:
                    self._load_errors.update(result.local_block_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        # vLLM reads this right after get_finished in the same step, so failed blocks
        # are reported no later than their request's "finished recving".
        out, self._load_errors = self._load_errors, set()
        return out

    def get_kv_connector_stats(self) -> PDKVConnectorStats | None:
        return self.counters.take()

    def shutdown(self) -> None:
        for part in (self.client, self.server):
            if part is not None:
                part.stop()
        self.client = self.server = None

    def close(self) -> None:
        self.shutdown()
        if self.announcer is not None:
            self.registry.on_finished.remove(self._announce_sent)
            self.announcer.close()
            self.announcer = None
