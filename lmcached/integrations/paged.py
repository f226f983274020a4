"""Between an engine's paged KV cache and lmcached's [2, L, T, C] chunks, with plain torch indexing, so the
same code runs on CPU tensors and CUDA tensors (only the final copy to or from the host crosses devices).

vLLM hands each attention layer over as a view [blocks, kv_heads, block_size, 2 * head_size]: one tile per
block. That view need not be contiguous: vLLM's KV cache layout (`VLLM_KV_CACHE_LAYOUT`, resolved from what the
attention backends accept) orders the memory underneath — LBNHC, FlashAttention's default, puts a block's
tokens before its heads; BLHNC and the other block-outer layouts interleave all layers' pages block by block,
so one layer's view steps over the others'. Offsets here are in the view's own logical order, which
torch.take / put_ follow through any strides, so every layout reads the same way. Where a token's key and
value sit inside a tile depends on the attention backend, so a layout is described by two index tables — for
each (head, token in block, dim), the element's offset in the flattened tile:

- `interleaved` (FlashAttention and Triton on GPUs): per token and head, the key's head_size values, then the
  value's (`kv_cache.transpose(1, 2).split(head_size, dim=-1)` in vLLM);
- `halves`: the tile viewed as [kv_heads, 2 * block_size, head_size] holds all keys, then all values;
- `probed`: whatever vLLM's CPU backend does on this CPU (its AMX kernels, for one, interleave pairs for the
  matrix units): learned by letting vLLM's own cache-write op fill a scratch tile with known values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

#: Writes keys and values [tokens, heads, head_size] into the given [1, heads, block_size, 2*head_size] tile
#: at slots 0..tokens-1, exactly as the engine does.
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutError(ValueError):
    """The engine's KV cache is laid out in a way this module cannot read."""


@dataclass(frozen=True)
class PagedLayout:
    """One engine's paged cache: its layers (in model order) and where keys and values sit in a block's tile."""

    layers: tuple[torch.Tensor, ...]
    #: Tokens per block as the scheduler counts them (block ids refer to these); a kernel block (the
    #: tensor's dim 2) may be smaller, with a scheduler block made of consecutive kernel blocks.
    block_size: int
    key_index: torch.Tensor  # [heads, kernel block, head_size] -> offset in the flattened tile
    value_index: torch.Tensor
    #: What the cache's elements are when its tensor says otherwise: vLLM allocates fp8 caches as uint8, and
    #: their KV leaves (and comes back) as the fp8 type, byte for byte. None: the tensor's own dtype.
    stored: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise LayoutError("no KV cache layers")
        first = self.layers[0]
        for layer in self.layers:
            if layer.ndim != 4 or layer.shape != first.shape or layer.dtype != first.dtype:
                raise LayoutError(f"layers must all be [blocks, kv_heads, block_size, 2*head_size]; got {list(layer.shape)}")
            if layer.stride(-1) != 1:
                # Every vLLM layout keeps a head's content contiguous; a cache that does not is not vLLM's.
                raise LayoutError(f"a layer's last dimension must be contiguous; its strides are {layer.stride()}")
        if self.block_size % first.shape[2]:
            raise LayoutError(f"block size {self.block_size} is not a multiple of the kernel block size {first.shape[2]}")
        expected = (first.shape[1], first.shape[2], first.shape[3] // 2)
        if tuple(self.key_index.shape) != expected or tuple(self.value_index.shape) != expected:
            raise LayoutError("the index tables do not match the cache's shape")
        if self.stored is not None and self.stored.itemsize != first.dtype.itemsize:
            raise LayoutError(f"a {first.dtype} cache cannot hold {self.stored} elements")

    # -- the known layouts
    @classmethod
    def build(
        cls,
        layers: Sequence[torch.Tensor],
        block_size: int,
        packing: str,
        writer: CacheWriter | None = None,
        stored: torch.dtype | None = None,
        engine_dtype: torch.dtype | None = None,
    ) -> PagedLayout:
        """`stored`: the element type of a cache whose tensor is raw bytes (fp8 in uint8); `engine_dtype`: what the
        engine's writer takes (its model dtype; default the cache's)."""
        first = layers[0] if layers else None
        if first is None or first.ndim != 4:
            raise LayoutError("KV cache layers must be [blocks, kv_heads, block_size, 2*head_size]")
        heads, kernel_block, width = first.shape[1:]
        if width % 2:
            raise LayoutError(f"the last dimension ({width}) must hold a key and a value (MLA caches are not supported)")
        size = width // 2
        head = torch.arange(heads).view(-1, 1, 1)
        token = torch.arange(kernel_block).view(1, -1, 1)
        dim = torch.arange(size).view(1, 1, -1)
        if packing == "interleaved":
            key = (head * kernel_block + token) * width + dim
            value = key + size
        elif packing == "halves":
            key = (head * 2 * kernel_block + token) * size + dim
            value = key + kernel_block * size
        elif packing == "probed":
            if writer is None:
                raise LayoutError("a probed layout needs the engine's cache writer")
            key, value = probe(writer, heads, kernel_block, size, first.dtype, engine_dtype or first.dtype, stored)
        else:
            raise LayoutError(f"unknown KV packing {packing!r}")
        device = first.device
        return cls(tuple(layers), block_size, key.to(device), value.to(device), stored)

    # -- geometry
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
        """The KV's element type (an fp8 type for an fp8 cache, whatever its tensor's dtype)."""
        return self.stored or self.layers[0].dtype

    @property
    def bytes_per_token(self) -> int:
        """A token's keys and values over all layers."""
        return 2 * len(self.layers) * self.channels * self.dtype.itemsize

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """The cache slot of each token in [start, end), given the request's block ids."""
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.layers[0].device)

    def _where(self, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The offset in a layer's flattened cache of every [head, token, dim] of these slots. One flat index
        and torch.take / put_ move 1,500 SmolLM2 tokens 2-2.5x faster than indexing blocks and tiles apart."""
        _, heads, kernel_block, width = self.layers[0].shape
        blocks, offsets = slots // kernel_block, slots % kernel_block
        return blocks.view(1, -1, 1) * (heads * kernel_block * width) + index[:, offsets, :]

    # -- moving KV
    def gather(self, slots: torch.Tensor, pool: Executor | None = None) -> torch.Tensor:
        """The KV of these slots as [2, L, T, kv_heads * head_size], on the cache's device. With a `pool`, the
        layers are spread over its threads (torch releases the GIL inside each op)."""
        tokens = len(slots)
        out = torch.empty((2, len(self.layers), tokens, self.channels), dtype=self.layers[0].dtype, device=self.layers[0].device)
        wheres = [self._where(slots, index) for index in (self.key_index, self.value_index)]

        def one(number: int) -> None:
            layer = self.layers[number]
            for side, where in enumerate(wheres):
                picked = torch.take(layer, where)  # [heads, T, head_size]
                out[side, number].view(tokens, self.kv_heads, self.head_size).copy_(picked.transpose(0, 1))

        _each(one, len(self.layers), pool)
        return out.view(self.dtype)

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor, pool: Executor | None = None) -> None:
        """Write [2, L, T, kv_heads * head_size] (any device and float dtype) into these slots. KV of the
        cache's own element type goes in bit for bit; other dtypes are converted (into an fp8 cache with a scale
        of 1, as vLLM's default k_scale / v_scale)."""
        if kv.ndim != 4 or kv.shape[0] != 2 or kv.shape[1] != len(self.layers) or kv.shape[2] != len(slots):
            raise LayoutError(f"KV of shape {list(kv.shape)} does not fit {len(self.layers)} layers and {len(slots)} slots")
        if kv.shape[3] != self.channels:
            raise LayoutError(f"KV has {kv.shape[3]} channels; this cache has {self.channels}")
        tokens = len(slots)
        kv = kv.to(device=self.layers[0].device, dtype=self.dtype).view(self.layers[0].dtype)
        wheres = [self._where(slots, index) for index in (self.key_index, self.value_index)]

        def one(number: int) -> None:
            for side, where in enumerate(wheres):
                values = kv[side, number].reshape(tokens, self.kv_heads, self.head_size).transpose(0, 1).contiguous()
                self.layers[number].put_(where, values)

        _each(one, len(self.layers), pool)


def _each(fn: Callable[[int], None], count: int, pool: Executor | None) -> None:
    if pool is None:
        for number in range(count):
            fn(number)
        return
    # The caller's inference mode goes along to the pool's threads: vLLM's caches are inference tensors,
    # which only code inside inference mode may update in place.
    inference = torch.is_inference_mode_enabled()

    def run(number: int) -> None:
        with torch.inference_mode(inference):
            fn(number)

    for future in [pool.submit(run, number) for number in range(count)]:
        future.result()  # re-raises the first failure


def probe(
    writer: CacheWriter,
    heads: int,
    kernel_block: int,
    size: int,
    dtype: torch.dtype,
    engine_dtype: torch.dtype | None = None,
    stored: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn where the engine's writer puts each (head, token, dim) of a key and of a value in a tile of
    `dtype`, one bit plane at a time: for every bit of the token number, then of the head, then of the dim,
    write 1 where the bit is 0 and 2 where it is 1 (exact in every float type, fp8 included) and read back
    which element got which. `engine_dtype` is what the writer takes; `stored` what a byte tile holds."""
    tile = torch.zeros(1, heads, kernel_block, 2 * size, dtype=dtype)
    grid = torch.meshgrid(torch.arange(kernel_block), torch.arange(heads), torch.arange(size), indexing="ij")  # [T, H, D] each
    marks_dtype = engine_dtype or dtype
    tables = []
    for side in (0, 1):
        coords = []
        for axis in grid:
            coord = torch.zeros(tile.numel(), dtype=torch.int64)
            written = torch.ones(tile.numel(), dtype=torch.bool)
            for bit in range(max(1, int(axis.max()).bit_length())):
                tile.zero_()
                marks = (((axis >> bit) & 1) + 1).to(marks_dtype)
                blank = torch.zeros_like(marks)
                writer(marks if side == 0 else blank, blank if side == 0 else marks, tile)
                read = (tile.view(stored) if stored is not None else tile).flatten().float()
                written &= read > 0
                coord |= (read == 2).to(torch.int64) << bit
            coords.append(torch.where(written, coord, -1))
        token, head, dim = coords
        written = (token >= 0).nonzero().flatten()
        if len(written) != heads * kernel_block * size or (head[written] < 0).any() or (dim[written] < 0).any():
            raise LayoutError("the engine's cache writer does not place every element once")
        index = torch.full((heads, kernel_block, size), -1, dtype=torch.int64)
        index[head[written], token[written], dim[written]] = written
        if (index < 0).any():
            raise LayoutError("the engine's cache writer leaves elements out")
        tables.append(index)
    return tables[0], tables[1]