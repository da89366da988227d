"""Block copies between two engines' caches: the per-layer tables against every KV
layout vLLM uses, run by the Triton kernel itself (in Triton's interpreter, on CPU
tensors), and index ops where the two layouts differ."""

from __future__ import annotations

import pytest
import torch

from engine_ext import block_copy

NB_P, NB_D = 12, 20  # P and D hold different numbers of blocks


def layouts(num_blocks: int):
    """Per-layer KV tensors as vLLM lays them out (logical shape, physical order)."""
    g = torch.Generator().manual_seed(num_blocks)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    return {
        # (blocks, heads, block_size, 2*dim): CPU and FlashAttention in vLLM 0.26+
        "blocks-first": rand(num_blocks, 2, 4, 16),
        # (blocks, 2, block_size, heads, dim) stored HND: a permuted physical order
        "permuted": rand(num_blocks, 2, 3, 4, 8)
        .permute(0, 1, 3, 2, 4)
        .contiguous()
        .permute(0, 1, 3, 2, 4),
        # (2, blocks, ...): K and V apart, a block is two runs
        "kv-outer": rand(2, num_blocks, 4, 8),
        # blocks of all layers interleaved in one allocation (a larger block stride)
        "packed": torch.as_strided(rand(num_blocks * 3 * 64), (num_blocks, 4, 16), (192, 16, 1)),
        "bf16": rand(num_blocks, 2, 4, 8, dtype=torch.bfloat16),
    }


BLOCK_DIMS = {"blocks-first": 0, "permuted": 0, "kv-outer": 1, "packed": 0, "bf16": 0}
NAMES = sorted(BLOCK_DIMS)


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel in Triton's interpreter: real kernel code, on host memory."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(block_copy, "_kernel_cache", {})


def check(src, dst, before, dim, src_ids, dst_ids):
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(src.select(dim, s), dst.select(dim, d)), (s, d)
    for b in range(dst.shape[dim]):  # nothing else written
        if b not in dst_ids:
            assert torch.equal(dst.select(dim, b), before.select(dim, b)), b


@pytest.mark.parametrize("name", NAMES)
def test_kernel_copies_exactly_the_blocks_of_every_layout(interpreted, name):
    src, dst = layouts(NB_P)[name], layouts(NB_D)[name]
    before, dim = dst.clone(), BLOCK_DIMS[name]
    copy_tables = block_copy.tables([src], [dst], [dim])
    assert copy_tables is not None
    assert [g.runs for g in copy_tables.groups] == [2 if name == "kv-outer" else 1]
    assert copy_tables.nbytes(1) == src.select(dim, 0).numel() * src.element_size()
    src_ids, dst_ids = [3, 4, 5, 11, 0], [19, 2, 3, 7, 10]
    assert block_copy.copy_blocks([src], [dst], [dim], src_ids, dst_ids, copy_tables) == "kernel"
    check(src, dst, before, dim, src_ids, dst_ids)


def test_one_launch_per_group_of_layers(interpreted):
    # A model's layers: three alike, one K/V-outer, plus every other layout.
    p = [layouts(NB_P + i)["blocks-first"][:NB_P] for i in range(3)]
    d = [layouts(NB_D + i)["blocks-first"][:NB_D] for i in range(3)]
    dims = [0, 0, 0]
    for n in NAMES:
        p.append(layouts(NB_P)[n])
        d.append(layouts(NB_D)[n])
        dims.append(BLOCK_DIMS[n])
    befores = [t.clone() for t in d]
    copy_tables = block_copy.tables(p, d, dims)
    assert sum(g.layers for g in copy_tables.groups) == len(p)
    assert len(copy_tables.groups) == len(NAMES)  # the three alike share a launch
    src_ids, dst_ids = [0, 7, 8, 11], [1, 3, 19, 0]
    block_copy.run_tables(copy_tables, src_ids, dst_ids)
    for src, dst, before, dim in zip(p, d, befores, dims):
        check(src, dst, before, dim, src_ids, dst_ids)


def test_layouts_that_differ_physically_get_no_tables_and_use_index_ops():
    src = torch.randn(NB_P, 2, 4, 8)
    dst = torch.randn(NB_D, 2, 8, 4).transpose(2, 3)  # same logical shape, other order
    before = dst.clone()
    assert block_copy.tables([src], [dst], [0]) is None
    assert block_copy.copy_blocks([src], [dst], [0], [1, 2], [2, 5]) == "index"
    check(src, dst, before, 0, [1, 2], [2, 5])


def test_runs_of_a_block_are_described_by_strides():
    t = torch.zeros(2, NB_D, 4, 8)
    runs, inner = block_copy.block_runs(t, 1)
    assert runs.run_bytes == 4 * 8 * 4 and inner == (2, 1)
    assert runs.offsets == (0, NB_D * 4 * 8 * 4)
