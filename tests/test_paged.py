"""Paged KV (as vLLM lays it out, both packings) to lmcached's [2, L, T, C] and back."""

from __future__ import annotations

import pytest
import torch

from lmcached.integrations.paged import LayoutError, PagedLayout


def reference_kv(layer: torch.Tensor, packing: str, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value of one token as the attention backend itself reads them ([heads, head_size] each)."""
    if packing == "interleaved":  # vLLM's flash_attn: kv_cache.transpose(1, 2).split(head_size, dim=-1)
        keys, values = layer.transpose(1, 2).split(layer.shape[3] // 2, dim=-1)
        return keys[block, offset], values[block, offset]
    blocks, heads, kernel_block, _ = layer.shape  # vLLM's cpu_attn: view [B, H, 2N, D], chunk(2, dim=2)
    keys, values = layer.view(blocks, heads, 2 * kernel_block, -1).chunk(2, dim=2)
    return keys[block, :, offset], values[block, :, offset]


@pytest.mark.parametrize("packing", ["interleaved", "halves"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_reads_what_the_backend_reads_and_scatter_writes_it_back(packing: str, dtype: torch.dtype) -> None:
    layers = tuple(torch.randn(6, 3, 4, 2 * 8).to(dtype) for _ in range(2))  # 6 kernel blocks of 4 tokens
    layout = PagedLayout(layers, packing, block_size=8)  # a scheduler block is two kernel blocks
    block_ids = [2, 0, 1]
    slots = layout.slots(block_ids, 3, 20)  # tokens 3..19: a partial first block, a partial last one
    kv = layout.gather(slots)
    assert kv.shape == (2, 2, 17, 3 * 8) and kv.dtype == dtype
    for t in range(3, 20):
        slot = block_ids[t // 8] * 8 + t % 8
        key, value = reference_kv(layers[1], packing, slot // 4, slot % 4)
        assert torch.equal(kv[0, 1, t - 3].view(3, 8), key) and torch.equal(kv[1, 1, t - 3].view(3, 8), value)

    fresh = tuple(torch.zeros_like(layer) for layer in layers)
    target = PagedLayout(fresh, packing, block_size=8)
    target.scatter(slots, kv.float())  # any float dtype comes in; the cache's goes in
    assert torch.equal(target.gather(slots), kv)
    untouched = target.slots(block_ids, 0, 3)
    assert not target.gather(untouched).any()  # tokens outside [3, 20) stay as they were


def test_layouts_that_cannot_be_read_are_refused() -> None:
    with pytest.raises(LayoutError, match="MLA"):
        PagedLayout((torch.zeros(2, 1, 4, 7),), "interleaved", 4)
    with pytest.raises(LayoutError, match="multiple"):
        PagedLayout((torch.zeros(2, 1, 4, 8),), "halves", 6)
    layout = PagedLayout((torch.zeros(2, 1, 4, 8),), "halves", 4)
    with pytest.raises(LayoutError, match="channels"):
        layout.scatter(layout.slots([0], 0, 2), torch.zeros(2, 1, 2, 5))
