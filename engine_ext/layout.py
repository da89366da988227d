"""KV layouts: what a block is in memory, how two engines agree on it, how to move it.

vLLM's per-layer KV tensors differ by version and backend: ``(num_blocks, heads,
block_size, 2*dim)`` on CPU and FlashAttention in 0.26+, ``(num_blocks, 2, ...)`` or
``(2, num_blocks, ...)`` elsewhere. We never assume dimension 0 is the block: each
layer's block dimension is found from its shape and the engine's ``num_blocks``, and a
block is moved whole (``tensor.select(block_dim, b)``, K and V together).

Two engines can exchange blocks when every layer has the same logical shape (apart
from ``num_blocks``), block dimension and dtype, and both run the same TP size; the
bytes on the wire are each layer's selected blocks in logical (C) order, so the
physical stride order of either side does not matter.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------- signatures


def spec_signature(vllm_config: Any, kv_cache_config: Any) -> dict[str, Any]:
    """What the scheduler knows of the KV layout; travels in ``kv_transfer_params``.

    Compact on purpose (the proxy copies it on every request). The per-layer tensor
    shapes are known only to workers; they are compared worker to worker on every
    pull (:meth:`KVLayout.mismatch`).
    """
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec
    served = vllm_config.model_config.served_model_name
    return {
        "model": served[0] if isinstance(served, (list, tuple)) else str(served),
        "dtype": str(spec.dtype).removeprefix("torch."),
        "block_size": int(spec.block_size),
        "num_layers": sum(len(g.layer_names) for g in groups),
        "kv_heads": int(getattr(spec, "num_kv_heads", 0)),
        "head_size": int(getattr(spec, "head_size", 0)),
        "tp_size": int(vllm_config.parallel_config.tensor_parallel_size),
        "device": str(vllm_config.device_config.device_type),
    }


def spec_mismatch(local: dict[str, Any], remote: dict[str, Any]) -> str | None:
    """Why two scheduler-level signatures cannot exchange KV (None if they can).

    ``device`` is not compared: the host path moves bytes between any devices.
    """
    diffs = [
        f"{key}: local={local.get(key)!r} remote={remote.get(key)!r}"
        for key in (
            "model",
            "dtype",
            "block_size",
            "num_layers",
            "kv_heads",
            "head_size",
            "tp_size",
        )
        if local.get(key) != remote.get(key)
    ]
    return "; ".join(diffs) or None


def find_block_dim(shape: Sequence[int], num_blocks: int) -> int:
    """The dimension that indexes blocks: dim 0, else dim 1, else any, of size num_blocks."""
    for dim in (0, 1, *range(2, len(shape))):
        if dim < len(shape) and shape[dim] == num_blocks:
            return dim
    raise ValueError(f"no dimension of KV shape {tuple(shape)} has num_blocks={num_blocks}")


# ---------------------------------------------------------------- chunk plans


def plan_chunks(num_blocks: int, bytes_per_block: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Cut ``num_blocks`` into ``[start, end)`` runs of at most ``chunk_bytes`` (>= 1 block).

    Chunks are roughly equal so the last one is not a sliver.
    """
    if num_blocks <= 0:
        return []
    per_chunk = max(1, chunk_bytes // max(1, bytes_per_block))
    count = math.ceil(num_blocks / per_chunk)
    size = math.ceil(num_blocks / count)
    return [(start, min(start + size, num_blocks)) for start in range(0, num_blocks, size)]


def blocks_to_load(
    remote_block_ids: Sequence[int],
    local_block_ids: Sequence[int],
    first_token: int,
    end_token: int,
    block_size: int,
) -> tuple[list[int], list[int]]:
    """Remote and local block ids holding tokens ``[first_token, end_token)``.

    P's block i and D's block i hold the same token positions. ``first_token`` is D's
    block-aligned local prefix hit, so loading starts at a block boundary; the last
    block may be partial (its tail is garbage and D overwrites it as it computes).
    """
    if first_token % block_size:
        raise ValueError(f"first_token {first_token} not aligned to block_size {block_size}")
    first, end = first_token // block_size, math.ceil(end_token / block_size)
    if end > len(remote_block_ids) or end > len(local_block_ids):
        raise ValueError(
            f"tokens up to {end_token} need {end} blocks; remote has "
            f"{len(remote_block_ids)}, local {len(local_block_ids)}"
        )
    return list(remote_block_ids[first:end]), list(local_block_ids[first:end])


def runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce block ids into ``(position, first_id, length)`` runs of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    for pos, block in enumerate(block_ids):
        if out and out[-1][1] + out[-1][2] == block:
            p, first, length = out[-1]
            out[-1] = (p, first, length + 1)
        else:
            out.append((pos, block, 1))
    return out


# ---------------------------------------------------------------- layouts


@dataclass(frozen=True)
class LayerLayout:
    name: str
    shape: tuple[int, ...]  # logical shape, block dim included
    block_dim: int
    dtype: str
    itemsize: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.shape[: self.block_dim] + self.shape[self.block_dim + 1 :]

    @property
    def bytes_per_block(self) -> int:
        return math.prod(self.block_shape) * self.itemsize

    def describe(self) -> list[Any]:
        return [
            list(self.shape[: self.block_dim]) + [-1] + list(self.shape[self.block_dim + 1 :]),
            self.block_dim,
            self.dtype,
        ]


@dataclass(frozen=True)
class KVLayout:
    """Per-layer layout of one worker's KV cache, in a fixed (sorted-name) order."""

    layers: tuple[LayerLayout, ...]
    tp_size: int
    device_type: str

    @classmethod
    def from_caches(
        cls, caches: dict[str, torch.Tensor], num_blocks: int, tp_size: int
    ) -> KVLayout:
        layers = []
        for name in sorted(caches):
            t = caches[name]
            layers.append(
                LayerLayout(
                    name=name,
                    shape=tuple(t.shape),
                    block_dim=find_block_dim(t.shape, num_blocks),
                    dtype=str(t.dtype).removeprefix("torch."),
                    itemsize=t.element_size(),
                )
            )
        device = next(iter(caches.values())).device.type if caches else "cpu"
        return cls(tuple(layers), tp_size, device)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers: the unit that moves."""
        return sum(layer.bytes_per_block for layer in self.layers)

    def describe(self) -> dict[str, Any]:
        # Layer names are not compared: the same model yields the same order.
        return {"tp_size": self.tp_size, "layers": [layer.describe() for layer in self.layers]}

    def digest(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    @staticmethod
    def mismatch(local: dict[str, Any], remote: dict[str, Any]) -> str | None:
        """Human-readable reason why two described layouts differ (None if equal)."""
        if local == remote:
            return None
        if local.get("tp_size") != remote.get("tp_size"):
            return f"tp_size local={local.get('tp_size')} remote={remote.get('tp_size')}"
        ll, rl = local.get("layers", []), remote.get("layers", [])
        if len(ll) != len(rl):
            return f"num layers local={len(ll)} remote={len(rl)}"
        for i, (a, b) in enumerate(zip(ll, rl)):
            if a != b:
                return f"layer {i}: local [shape, block_dim, dtype]={a} remote={b}"
        return "layouts differ"


# ---------------------------------------------------------------- moving blocks


class BlockSource(Protocol):
    """What the host path needs of a worker's KV cache (:class:`BlockIO`; fakes in tests)."""

    def nbytes(self, num_blocks: int) -> int: ...
    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None: ...
    def scatter(self, block_ids: Sequence[int], src_buf: np.ndarray) -> None: ...


class BlockIO:
    """Gathers blocks of all layers into one contiguous byte buffer and back.

    Buffer layout: for each layer (sorted order), the selected blocks in the given
    order, each block in logical C order. Runs on transport threads, never on the
    engine thread: CPU caches are copied with numpy (single-threaded, releases the
    GIL, no OpenMP team next to the engine's pinned threads); CUDA caches on a
    dedicated stream that is synchronised before returning.
    """

    def __init__(self, caches: dict[str, torch.Tensor], layout: KVLayout):
        self.layout = layout
        self.tensors = [caches[layer.name] for layer in layout.layers]
        self.device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            # Created here, on the engine thread that owns the device; transport threads
            # only enqueue on it and synchronise it, never the engine's own streams.
            self.stream = self._stream = torch.cuda.Stream(device=self.device)
        else:
            self._arrays = [self._as_numpy(t) for t in self.tensors]

    @staticmethod
    def _as_numpy(t: torch.Tensor) -> np.ndarray:
        # numpy has no bf16/fp8: move the raw bits as integers of the same width.
        return t.detach().view(_INT_OF_SIZE[t.element_size()]).numpy()

    def nbytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def _views(self, buf: np.ndarray, n: int) -> list[np.ndarray]:
        """Per-layer views of ``buf`` shaped (n, *block_shape) in the layer's int dtype."""
        views, offset = [], 0
        for layer in self.layout.layers:
            size = n * layer.bytes_per_block
            raw = buf[offset : offset + size]
            views.append(raw.view(np.dtype(f"u{layer.itemsize}")).reshape((n, *layer.block_shape)))
            offset += size
        return views

    # --- host buffers (host transport; CUDA goes through a device staging copy)

    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Copy ``block_ids`` of every layer into ``out`` (uint8, exactly nbytes long)."""
        n = len(block_ids)
        if self.is_cuda:
            dev = self.gather_device(block_ids)
            host = torch.from_numpy(out[: dev.numel()])
            with torch.cuda.stream(self._stream):
                host.copy_(dev, non_blocking=False)
            return
        for arr, view, layer in zip(self._arrays, self._views(out, n), self.layout.layers):
            src = np.moveaxis(arr, layer.block_dim, 0)
            for pos, first, length in runs(block_ids):
                view[pos : pos + length] = src[first : first + length]

    def scatter(self, block_ids: Sequence[int], src_buf: np.ndarray) -> None:
        """Write ``src_buf`` (as produced by :meth:`gather` on the peer) into ``block_ids``."""
        n = len(block_ids)
        if self.is_cuda:
            stream = self._stream
            with torch.cuda.stream(stream):
                dev = torch.from_numpy(src_buf[: self.nbytes(n)]).to(
                    self.device, non_blocking=False
                )
            self.scatter_device(block_ids, dev)
            return
        for arr, view, layer in zip(self._arrays, self._views(src_buf, n), self.layout.layers):
            dst = np.moveaxis(arr, layer.block_dim, 0)
            for pos, first, length in runs(block_ids):
                dst[first : first + length] = view[pos : pos + length]

    # --- device buffers (CUDA only: the NCCL path and the host path's staging)

    def gather_device(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Contiguous uint8 device tensor with the blocks; the side stream is synchronised."""
        # Held blocks were written by forwards that finished before the request did
        # (its token was sampled), so no wait on the engine's streams is needed.
        stream = self._stream
        with torch.cuda.stream(stream):
            idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
            parts = [
                torch.index_select(t, layer.block_dim, idx)
                .movedim(layer.block_dim, 0)
                .contiguous()
                .view(torch.uint8)
                .reshape(-1)
                for t, layer in zip(self.tensors, self.layout.layers)
            ]
            out = torch.cat(parts) if len(parts) > 1 else parts[0]
        stream.synchronize()
        return out

    def alloc_device(self, num_blocks: int) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            return torch.empty(self.nbytes(num_blocks), dtype=torch.uint8, device=self.device)

    def scatter_device(self, block_ids: Sequence[int], src: torch.Tensor) -> None:
        """Write a device byte buffer (layout of :meth:`gather`) into ``block_ids``."""
        stream = self._stream
        n, offset = len(block_ids), 0
        with torch.cuda.stream(stream):
            idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
            for t, layer in zip(self.tensors, self.layout.layers):
                size = n * layer.bytes_per_block
                part = src[offset : offset + size].view(t.dtype).reshape((n, *layer.block_shape))
                t.index_copy_(layer.block_dim, idx, part.movedim(0, layer.block_dim))
                offset += size
        stream.synchronize()


def wait_event(event: torch.cuda.Event, deadline: float) -> bool:
    """Wait for a CUDA event without spinning a core and without blocking forever.

    Polls every 50 us for the first 2 ms (a pull's copy takes about that; a doubling
    backoff would notice its end up to twice as late), then backs off to 1 ms.
    """
    started = time.monotonic()
    while not event.query():
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(0.00005 if now - started < 0.002 else 0.001)
    return True
