"""KV layouts: block-dimension detection, signatures, chunk plans, block mapping, block IO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_ext.layout import (
    BlockIO,
    KVLayout,
    blocks_to_load,
    find_block_dim,
    plan_chunks,
    runs,
    spec_mismatch,
)


def test_find_block_dim_prefers_dim0_then_dim1():
    assert find_block_dim((100, 2, 16, 8, 64), 100) == 0  # (blocks, 2, ...)
    assert find_block_dim((2, 100, 16, 8, 64), 100) == 1  # (2, blocks, ...)
    assert find_block_dim((100, 4, 100, 128), 100) == 0  # ambiguous: dim 0 wins
    assert find_block_dim((4, 2, 100), 100) == 2
    with pytest.raises(ValueError, match="num_blocks=7"):
        find_block_dim((100, 2, 16), 7)


def test_plan_chunks_bounds_and_covers():
    assert plan_chunks(0, 10, 100) == []
    assert plan_chunks(5, 10, 1000) == [(0, 5)]
    chunks = plan_chunks(10, 100, 300)  # 3 blocks per chunk at most
    assert chunks[0][0] == 0 and chunks[-1][1] == 10
    assert all(b - a <= 3 for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
    # A block larger than a chunk still moves, one per message.
    assert plan_chunks(3, 1000, 10) == [(0, 1), (1, 2), (2, 3)]
    # Balanced: no sliver at the end.
    assert [b - a for a, b in plan_chunks(9, 1, 4)] == [3, 3, 3]


def test_blocks_to_load_maps_by_position_beyond_local_hit():
    remote = [11, 12, 13, 14]
    local = [5, 6, 7, 8, 9]  # D allocated one more block (for the next token)
    # No local hit, 300 tokens of 128-token blocks -> 3 blocks.
    assert blocks_to_load(remote, local, 0, 300, 128) == ([11, 12, 13], [5, 6, 7])
    # One block already cached locally: load positions 1.. only.
    assert blocks_to_load(remote, local, 128, 300, 128) == ([12, 13], [6, 7])
    # Exactly block-aligned end.
    assert blocks_to_load(remote, local, 0, 256, 128) == ([11, 12], [5, 6])
    with pytest.raises(ValueError, match="aligned"):
        blocks_to_load(remote, local, 100, 300, 128)
    with pytest.raises(ValueError, match="blocks"):
        blocks_to_load(remote[:2], local, 0, 300, 128)


def test_runs_coalesce_consecutive_ids():
    assert runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert runs([]) == []


def _layout(shape, num_blocks, dtype=torch.float32, tp=1):
    return KVLayout.from_caches({"l0": torch.zeros(shape, dtype=dtype)}, num_blocks, tp)


def test_layout_signature_ignores_num_blocks_but_not_shape_dtype_tp():
    a = _layout((10, 2, 16, 8), 10)
    b = _layout((20, 2, 16, 8), 20)  # another engine with more blocks
    assert a.digest() == b.digest() and KVLayout.mismatch(a.describe(), b.describe()) is None
    assert a.bytes_per_block == 2 * 16 * 8 * 4
    c = _layout((10, 2, 16, 8), 10, dtype=torch.bfloat16)
    assert a.digest() != c.digest()
    assert "layer 0" in KVLayout.mismatch(a.describe(), c.describe())
    d = _layout((2, 10, 16, 8), 10)  # block dim 1
    assert a.digest() != d.digest()
    e = _layout((10, 2, 16, 8), 10, tp=2)
    assert "tp_size" in KVLayout.mismatch(a.describe(), e.describe())


def test_spec_mismatch_names_the_difference():
    base = {
        "model": "m",
        "dtype": "float32",
        "block_size": 16,
        "num_layers": 2,
        "kv_heads": 2,
        "head_size": 64,
        "tp_size": 1,
        "device": "cpu",
    }
    assert spec_mismatch(base, dict(base, device="cuda")) is None  # host path bridges devices
    reason = spec_mismatch(base, dict(base, block_size=32, dtype="bfloat16"))
    assert "block_size" in reason and "dtype" in reason


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((12, 2, 16, 8), torch.float32),  # CPU/FlashAttention-like, block dim 0
        ((2, 12, 16, 4, 8), torch.bfloat16),  # (2, blocks, ...): K and V apart
        ((12, 2, 16, 4, 8), torch.float16),
    ],
)
def test_block_io_round_trip_between_engines(shape, dtype):
    """Blocks gathered on P land in different block ids on D, bit for bit."""
    num_blocks = 12
    g = torch.Generator().manual_seed(0)
    src = {f"layer{i}": torch.randn(shape, generator=g).to(dtype) for i in range(3)}
    dst = {name: torch.zeros_like(t) for name, t in src.items()}
    lay_src = KVLayout.from_caches(src, num_blocks, 1)
    lay_dst = KVLayout.from_caches(dst, num_blocks, 1)
    assert lay_src.digest() == lay_dst.digest()
    io_src, io_dst = BlockIO(src, lay_src), BlockIO(dst, lay_dst)
    p_blocks, d_blocks = [3, 4, 5, 9], [1, 7, 8, 2]
    buf = np.zeros(io_src.nbytes(len(p_blocks)), np.uint8)
    io_src.gather(p_blocks, buf)
    io_dst.scatter(d_blocks, buf)
    bd = lay_src.layers[0].block_dim
    for name, tensor in src.items():
        for p, d in zip(p_blocks, d_blocks):
            assert torch.equal(tensor.select(bd, p), dst[name].select(bd, d))
        untouched = [b for b in range(num_blocks) if b not in d_blocks]
        assert not dst[name].index_select(bd, torch.tensor(untouched)).any()


def test_block_io_handles_permuted_physical_layout():
    """A logical (B, H, N, D) view over (B, N, H, D) memory, as vLLM's stride orders make."""
    physical_src = torch.randn(6, 16, 2, 8)
    src = {"l": physical_src.permute(0, 2, 1, 3)}
    dst = {"l": torch.zeros(6, 2, 16, 8)}  # D stores it contiguously: same logical layout
    io_src = BlockIO(src, KVLayout.from_caches(src, 6, 1))
    io_dst = BlockIO(dst, KVLayout.from_caches(dst, 6, 1))
    buf = np.zeros(io_src.nbytes(2), np.uint8)
    io_src.gather([1, 4], buf)
    io_dst.scatter([0, 5], buf)
    assert torch.equal(dst["l"][0], src["l"][1]) and torch.equal(dst["l"][5], src["l"][4])


def test_versions_outside_the_tested_ones_are_warned_about():
    from engine_ext.connector import check_vllm_version

    assert check_vllm_version("0.26.0") is None
    assert check_vllm_version("0.32.0") is None
    warning = check_vllm_version("0.33.1")
    assert "0.33.1" in warning and "0.26" in warning and "untested" in warning
