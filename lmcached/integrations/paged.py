"""Between an engine's paged KV cache and lmcached's [2, L, T, C] chunks, with plain torch indexing, so the
same code runs on CPU tensors and CUDA tensors (only the final copy to or from the host crosses devices).

vLLM keeps each attention layer as a logical [blocks, kv_heads, block_size, 2 * head_size] tensor. What the
last dimension holds depends on the attention backend:

- `interleaved` (FlashAttention, Triton on GPUs): per token and head, the key's head_size values, then the
  value's (`kv_cache.transpose(1, 2).split(head_size, dim=-1)` in vLLM);
- `halves` (vLLM's CPU backend): the block's memory viewed as [blocks, kv_heads, 2 * block_size, head_size]
  holds the keys of all its tokens, then their values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PACKINGS = ("interleaved", "halves")


class LayoutError(ValueError):
    """The engine's KV cache is laid out in a way this module does not know."""


@dataclass(frozen=True)
class PagedLayout:
    """One engine's paged cache: its layers (in model order) and how each packs keys and values."""

    layers: tuple[torch.Tensor, ...]
    packing: str
    #: Tokens per block as the scheduler counts them (block ids refer to these); a kernel block (the
    #: tensor's dim 2) may be smaller, with a scheduler block made of consecutive kernel blocks.
    block_size: int

    def __post_init__(self) -> None:
        if self.packing not in PACKINGS:
            raise LayoutError(f"unknown KV packing {self.packing!r}")
        if not self.layers:
            raise LayoutError("no KV cache layers")
        first = self.layers[0]
        for layer in self.layers:
            if layer.ndim != 4 or layer.shape != first.shape or layer.dtype != first.dtype:
                raise LayoutError(f"layers must all be [blocks, kv_heads, block_size, 2*head_size]; got {list(layer.shape)}")
        if first.shape[3] % 2:
            raise LayoutError(f"the last dimension ({first.shape[3]}) must hold a key and a value (MLA caches are not supported)")
        if self.block_size % first.shape[2]:
            raise LayoutError(f"block size {self.block_size} is not a multiple of the kernel block size {first.shape[2]}")

    @property
    def kv_heads(self) -> int:
        return self.layers[0].shape[1]

    @property
    def head_size(self) -> int:
        return self.layers[0].shape[3] // 2

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """The cache slot of each token in [start, end), given the request's block ids."""
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.layers[0].device)

    def _index(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        kernel_block = self.layers[0].shape[2]
        return slots // kernel_block, slots % kernel_block, kernel_block

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The KV of these slots as [2, L, T, kv_heads * head_size], on the cache's device."""
        blocks, offsets, kernel_block = self._index(slots)
        tokens, heads, size = len(slots), self.kv_heads, self.head_size
        out = torch.empty((2, len(self.layers), tokens, heads * size), dtype=self.dtype, device=self.layers[0].device)
        for index, layer in enumerate(self.layers):
            if self.packing == "interleaved":
                picked = layer[blocks, :, offsets]  # [T, heads, 2 * size]
                out[0, index].view(tokens, heads, size).copy_(picked[..., :size])
                out[1, index].view(tokens, heads, size).copy_(picked[..., size:])
            else:
                halves = layer.view(layer.shape[0], heads, 2 * kernel_block, size)
                out[0, index].view(tokens, heads, size).copy_(halves[blocks, :, offsets])
                out[1, index].view(tokens, heads, size).copy_(halves[blocks, :, kernel_block + offsets])
        return out

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write [2, L, T, kv_heads * head_size] (any device and float dtype) into these slots."""
        if kv.ndim != 4 or kv.shape[0] != 2 or kv.shape[1] != len(self.layers) or kv.shape[2] != len(slots):
            raise LayoutError(f"KV of shape {list(kv.shape)} does not fit {len(self.layers)} layers and {len(slots)} slots")
        if kv.shape[3] != self.channels:
            raise LayoutError(f"KV has {kv.shape[3]} channels; this cache has {self.channels}")
        blocks, offsets, kernel_block = self._index(slots)
        tokens, heads, size = len(slots), self.kv_heads, self.head_size
        kv = kv.to(device=self.layers[0].device, dtype=self.dtype)
        for index, layer in enumerate(self.layers):
            keys = kv[0, index].reshape(tokens, heads, size)
            values = kv[1, index].reshape(tokens, heads, size)
            if self.packing == "interleaved":
                layer[blocks, :, offsets, :size] = keys
                layer[blocks, :, offsets, size:] = values
            else:
                halves = layer.view(layer.shape[0], heads, 2 * kernel_block, size)
                halves[blocks, :, offsets] = keys
                halves[blocks, :, kernel_block + offsets] = values
