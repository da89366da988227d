"""What the scheduler side tells the worker side each step: the only type they share.

The scheduler process owns decisions (which blocks a prefill holds, when a lease ends,
which blocks a decode pulls); workers own the KV tensors and the sockets. Each engine
step the scheduler hands its decisions to every worker in one
:class:`PDConnectorMetadata`; workers answer through vLLM's own channels
(``get_finished`` and ``get_kv_connector_stats``). Everything here must pickle: with a
multiprocess executor the metadata crosses a process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class SendSpec:
    """P side: a finished prefill whose blocks are held until pulled or released."""

    transfer_id: str
    req_id: str
    block_ids: tuple[int, ...]
    consumers: int


@dataclass(frozen=True)
class PullSpec:
    """D side: pull ``remote_block_ids`` of ``transfer_id`` into ``local_block_ids``.

    The two lists are aligned by position (P's block i of the prompt lands in D's block
    i); blocks D already had from its prefix cache are not in either list.
    """

    req_id: str
    transfer_id: str
    host: str
    port: int  # ZMQ port of P's rank 0; rank r adds r
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]
    remote_layout: dict[str, Any]
    consumer_key: str  # unique per pulling request: lets P count consumers idempotently
    remote_engine_id: str = ""  # P's engine: a restarted P refuses at once, not after a wait
    ports: tuple[int, ...] = ()  # P's ZMQ port per TP rank (empty: port + rank)


@dataclass(frozen=True)
class Notice:
    """D side: tell P that one consumer of ``transfer_id`` will not pull."""

    transfer_id: str
    host: str
    port: int
    consumer_key: str
    ports: tuple[int, ...] = ()


@dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    sends: list[SendSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # transfer ids (release or lease expiry)
    pulls: list[PullSpec] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.sends or self.releases or self.pulls or self.notices)
