"""Copy KV blocks between two engines' caches on one device, in one kernel launch.

The same-host transport (:mod:`engine_ext.transport_ipc`) maps P's KV tensors into
D's process and moves the blocks device to device. Gathering and scattering with
torch's index ops costs a launch and an intermediate buffer per layer and moves
every byte twice (156-319 GB/s on an H200 for random 256 KiB blocks); a block of one
layer, though, is one or a few contiguous runs of bytes at the same place in both
caches, so the whole transfer is a list of (source, destination) runs that a single
kernel copies in place. :func:`tables` describes, once per pair of caches, where each
layer's blocks and their runs lie (from both sides' strides, so caches of different
``num_blocks``, permuted or K/V-outer layouts work); a pull then sends only its block
ids to the device, and a small Triton kernel computes every run's addresses and
copies it. Where the two physical layouts differ, or Triton is missing, index ops
move the blocks per layer instead.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger("vllm.pd.copy")

WORD = 8  # bytes the kernel moves per element (int64)
_kernel_cache: dict[bool, object] = {}


@dataclass(frozen=True)
class BlockRuns:
    """Where one block of one layer lives: byte offsets of its runs, relative to the
    block's first byte, in logical order, and the length of each run."""

    offsets: tuple[int, ...]
    run_bytes: int


def block_runs(t: torch.Tensor, block_dim: int) -> tuple[BlockRuns, tuple[int, ...]] | None:
    """The runs of one block of ``t``, and which dimensions each run spans (innermost
    first).

    A block is ``t.select(block_dim, b)``. Its innermost dimensions (by stride) that
    are densely packed form one run; its other dimensions enumerate the runs, in
    logical order, so two tensors of the same logical shape enumerate the same
    elements in the same order. None if a block's runs would overlap.
    """
    block = t.select(block_dim, 0)
    sizes, strides = list(block.shape), list(block.stride())
    order = sorted((d for d in range(len(sizes)) if sizes[d] > 1), key=lambda d: strides[d])
    run_elems, inner = 1, 0
    for d in order:
        if strides[d] != run_elems:
            break
        run_elems *= sizes[d]
        inner += 1
    offsets = [0]
    for d in range(len(sizes)):
        if sizes[d] > 1 and d not in order[:inner]:
            offsets = [o + i * strides[d] for o in offsets for i in range(sizes[d])]
    item = t.element_size()
    runs = BlockRuns(tuple(o * item for o in offsets), run_elems * item)
    ordered = sorted(runs.offsets)
    if any(b - a < runs.run_bytes for a, b in zip(ordered, ordered[1:])):
        return None
    return runs, tuple(order[:inner])


@dataclass
class LayerGroup:
    """Layers whose blocks are made of ``runs`` runs of ``run_bytes`` each.

    Per layer (on the copying device): base address and block stride, in bytes, of
    the source and of the destination, and each run's offset within a block.
    """

    run_bytes: int
    runs: int
    layers: int
    src_base: torch.Tensor
    dst_base: torch.Tensor
    src_stride: torch.Tensor
    dst_stride: torch.Tensor
    src_offsets: torch.Tensor  # [layers * runs]
    dst_offsets: torch.Tensor


@dataclass
class CopyTables:
    """Where every layer's blocks live in two caches: built once per pair of caches,
    so that a pull only sends its block ids to the device."""

    groups: list[LayerGroup]
    device: torch.device

    def nbytes(self, num_blocks: int) -> int:
        return sum(g.run_bytes * g.runs * g.layers for g in self.groups) * num_blocks


def tables(
    src_layers: Sequence[torch.Tensor],
    dst_layers: Sequence[torch.Tensor],
    block_dims: Sequence[int],
) -> CopyTables | None:
    """Tables to copy blocks between two caches (None when some layer's blocks are
    not laid out alike on both sides: then index ops, which follow any strides)."""
    rows: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for src, dst, dim in zip(src_layers, dst_layers, block_dims):
        if src.dtype != dst.dtype or src.select(dim, 0).shape != dst.select(dim, 0).shape:
            return None
        a, b = block_runs(src, dim), block_runs(dst, dim)
        if a is None or b is None or a[1] != b[1] or a[0].run_bytes != b[0].run_bytes:
            return None
        (src_runs, _), (dst_runs, _) = a, b
        if len(src_runs.offsets) != len(dst_runs.offsets) or src_runs.run_bytes % WORD:
            return None
        item = src.element_size()
        row = (
            src.data_ptr(),
            dst.data_ptr(),
            src.stride(dim) * item,
            dst.stride(dim) * item,
            *src_runs.offsets,
            *dst_runs.offsets,
        )
        if any(value % WORD for value in row):
            return None  # the kernel moves aligned 8-byte words
        rows.setdefault((src_runs.run_bytes, len(src_runs.offsets)), []).append(row)
    device = dst_layers[0].device if dst_layers else torch.device("cpu")
    groups = []
    for (run_bytes, runs), group in sorted(rows.items()):
        cols = torch.tensor(group, dtype=torch.int64).t().contiguous()
        on_device = cols.to(device)
        groups.append(
            LayerGroup(
                run_bytes,
                runs,
                len(group),
                *on_device[:4],
                on_device[4 : 4 + runs].t().contiguous().reshape(-1),
                on_device[4 + runs :].t().contiguous().reshape(-1),
            )
        )
    return CopyTables(groups, device)


def _kernel(interpret: bool):
    """The Triton copy kernel (built on first use: importing Triton is slow)."""
    if interpret not in _kernel_cache:
        import triton
        import triton.language as tl

        # Block and run counts vary per pull: one build serves them all (Triton would
        # otherwise build a variant per count that is 1 or a multiple of 16).
        @triton.jit(do_not_specialize=["n_blocks", "n_runs"])
        def copy_block_runs(
            src_base,
            dst_base,
            src_stride,
            dst_stride,
            src_offsets,
            dst_offsets,
            ids,  # [2, n_blocks]: source block ids, then destination block ids
            n_blocks,
            n_runs,
            RUNS: tl.constexpr,
            RUN_WORDS: tl.constexpr,
            CHUNK: tl.constexpr,
        ):
            # Persistent programs: program p copies runs p, p + P, ... of the list
            # (layer, block, run) in that order, each whole, CHUNK words at a time.
            offs = tl.arange(0, CHUNK)
            run = tl.program_id(0)
            step = tl.num_programs(0)
            per_layer = n_blocks * RUNS
            while run < n_runs:
                layer = run // per_layer
                block = (run % per_layer) // RUNS
                part = layer * RUNS + run % RUNS
                src = (
                    tl.load(src_base + layer)
                    + tl.load(ids + block) * tl.load(src_stride + layer)
                    + tl.load(src_offsets + part)
                ).to(tl.pointer_type(tl.int64))
                dst = (
                    tl.load(dst_base + layer)
                    + tl.load(ids + n_blocks + block) * tl.load(dst_stride + layer)
                    + tl.load(dst_offsets + part)
                ).to(tl.pointer_type(tl.int64))
                for start in range(0, RUN_WORDS, CHUNK):
                    idx = start + offs
                    mask = idx < RUN_WORDS
                    tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)
                run += step

        _kernel_cache[interpret] = copy_block_runs
    return _kernel_cache[interpret]


def triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: use index ops
        return False
    return True


def run_tables(copy_tables: CopyTables, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """Copy blocks ``src_ids`` into ``dst_ids`` of every layer, on the current stream."""
    device = copy_tables.device
    kernel = _kernel(device.type != "cuda")
    ids = torch.tensor([list(src_ids), list(dst_ids)], dtype=torch.int64)
    if device.type == "cuda":
        ids = ids.pin_memory().to(device, non_blocking=True)
        programs = torch.cuda.get_device_properties(device).multi_processor_count * 8
    else:
        programs = 4
    n_blocks = len(src_ids)
    for g in copy_tables.groups:
        n_runs = g.layers * n_blocks * g.runs
        if not n_runs:
            continue
        words = g.run_bytes // WORD
        chunk = min(2048, 1 << max(0, math.ceil(math.log2(words))))
        kernel[(min(n_runs, programs),)](
            g.src_base,
            g.dst_base,
            g.src_stride,
            g.dst_stride,
            g.src_offsets,
            g.dst_offsets,
            ids,
            n_blocks,
            n_runs,
            RUNS=g.runs,
            RUN_WORDS=words,
            CHUNK=chunk,
            num_warps=8 if chunk >= 1024 else 4,
        )


def copy_with_index_ops(
    src_layers: Sequence[torch.Tensor],
    dst_layers: Sequence[torch.Tensor],
    block_dims: Sequence[int],
    src_ids: Sequence[int],
    dst_ids: Sequence[int],
) -> None:
    """Gather and scatter per layer: follows any strides (two launches per layer)."""
    device = dst_layers[0].device if dst_layers else torch.device("cpu")
    src_idx = torch.tensor(list(src_ids), dtype=torch.long, device=device)
    dst_idx = torch.tensor(list(dst_ids), dtype=torch.long, device=device)
    for src, dst, dim in zip(src_layers, dst_layers, block_dims):
        dst.index_copy_(dim, dst_idx, torch.index_select(src, dim, src_idx))


def copy_blocks(
    src_layers: Sequence[torch.Tensor],
    dst_layers: Sequence[torch.Tensor],
    block_dims: Sequence[int],
    src_ids: Sequence[int],
    dst_ids: Sequence[int],
    copy_tables: CopyTables | None = None,
) -> str:
    """Copy blocks of every layer on the current stream; returns the method used:
    'kernel' with ``copy_tables`` (see :func:`tables`), else 'index'."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destinations")
    if copy_tables is not None:
        run_tables(copy_tables, src_ids, dst_ids)
        return "kernel"
    copy_with_index_ops(src_layers, dst_layers, block_dims, src_ids, dst_ids)
    return "index"
