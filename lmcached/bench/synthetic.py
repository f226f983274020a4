"""KV with the shapes of real KV, made from a seed: for tests and benchmarks that need chunks without a model."""

from __future__ import annotations

import torch


def kv_like_real(layers: int, tokens: int, channels: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Keys with outlier channels and a per-channel bias, values per-token scaled: the shapes of real KV."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, tokens, channels, generator=gen) * torch.linspace(0.1, 4.0, channels) + torch.randn(
        1, 1, channels, generator=gen
    )
    v = torch.randn(layers, tokens, channels, generator=gen) * torch.rand(layers, tokens, 1, generator=gen).add(0.2)
    return torch.stack([k, v]).to(dtype)


#: vLLM's KV cache layouts (`vllm.v1.kv_cache_layout.KVCacheLayout`, chosen by VLLM_KV_CACHE_LAYOUT or the
#: attention backends): for each, the memory order of the logical axes [layers, blocks, heads, tokens, content].
#: LBNHC is the GPU default (FlashAttention and others declare no preference); vLLM's CPU backend takes LBHNC.
VLLM_KV_LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}


def paged_cache_like_vllm(
    layers: int,
    blocks: int,
    heads: int,
    block_size: int,
    width: int,
    layout: str,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[torch.Tensor]:
    """A paged cache as vLLM allocates one under `layout` (unpadded), filled from the seed: one allocation and,
    per layer, the [blocks, heads, block_size, width] view vLLM hands a connector (strided, for most layouts)."""
    order = VLLM_KV_LAYOUTS[layout]
    logical = (layers, blocks, heads, block_size, width)
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn([logical[axis] for axis in order], generator=gen).to(dtype).to(device)
    view = memory.permute([order.index(axis) for axis in range(5)])  # back to the logical axis order
    return [view[layer] for layer in range(layers)]
