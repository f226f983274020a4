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

Every one of these tables turns out to be a strided grid over the tile (`TileGrid`), so the whole kernel blocks
in the middle of a request's range move as one strided copy per layer and side — on a CPU cache through
grid_copy's compiled loop, on a GPU's through torch (`index_copy_` / `index_select` over the blocks); only the
partial blocks at either end go element by element through the tables.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from lmcached.integrations.grid_copy import BlockBatch, GridPlan

#: Writes keys and values [tokens, heads, head_size] into the given [1, heads, block_size, 2*head_size] tile
#: at slots 0..tokens-1, exactly as the engine does.
CacheWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class LayoutError(ValueError):
    """The engine's KV cache is laid out in a way this module cannot read."""


@dataclass(frozen=True)
class TileGrid:
    """One side (keys or values) of a tile as a strided grid: element [head, t_hi, t_lo, d_hi, d_lo] — token
    t = t_hi * t_lo-size + t_lo, dim d likewise — sits at `base` + the dot product with `strides`, in elements
    of the layer's storage from the start of its block. Every layout vLLM uses is such a grid (the CPU backend's
    keys are [head, dim, token], AMX's pair two elements up, the GPUs' are [token, head, dim]), which lets whole
    blocks move as strided copies instead of one scattered element at a time."""

    sizes: tuple[int, int, int, int, int]
    strides: tuple[int, int, int, int, int]
    base: int


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

    @cached_property
    def grids(self) -> tuple[TileGrid, TileGrid] | None:
        """Keys' and values' grids in a layer's storage, when both are strided grids (None: element by element)."""
        layer = self.layers[0]
        if any(other.shape != layer.shape or other.stride() != layer.stride() for other in self.layers[1:]):
            return None  # a grid is found in the first layer's strides: another layer laid out otherwise would not fit it
        _, _, kernel_block, width = layer.shape
        grids = []
        for index in (self.key_index, self.value_index):
            # The tables count in the view's logical order; a grid needs storage offsets (block-outer layouts
            # stride over other layers' pages between heads and tokens).
            head, rest = index // (kernel_block * width), index % (kernel_block * width)
            physical = head * layer.stride(1) + (rest // width) * layer.stride(2) + (rest % width) * layer.stride(3)
            grid = tile_grid(physical.cpu())
            if grid is None:
                return None
            grids.append(grid)
        return grids[0], grids[1]

    @cached_property
    def compiled(self) -> tuple[GridPlan, GridPlan] | None:
        """The grids as compiled copies (grid_copy), 3-4x faster than torch's strided copy on vLLM's CPU layouts;
        None where the grids are not (or the cache is not on the CPU): torch moves them."""
        grids = self.grids
        if grids is None:
            return None
        plans = [GridPlan.build(grid.sizes, grid.strides, grid.base, self.layers[0]) for grid in grids]
        if plans[0] is None or plans[1] is None:
            return None
        for layer in self.layers[1:]:  # every layer's storage must allow the same integers (grids: the same strides)
            if any(layer.storage_offset() % (plan.widen * plan.pack) for plan in plans):
                return None
        return plans[0], plans[1]

    @cached_property
    def storages(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each layer's storage as the compiled keys' and values' plans read it (made once: the caches stay put)."""
        assert self.compiled is not None
        return [(self.compiled[0].storage(layer), self.compiled[1].storage(layer)) for layer in self.layers]

    def warm(self) -> None:
        """Compile the block copies for this cache's element type (a second or two the first time; Numba caches
        it on disk after that), so that no model step waits for it."""
        compiled = self.compiled
        if compiled is not None:
            for plan in compiled:
                plan.warm(self.layers[0])

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
        first, blocks = self._whole_blocks(slots)
        whole = len(blocks) * self.layers[0].shape[2]
        rest = [(lo, hi) for lo, hi in ((0, first), (first + whole, tokens)) if lo < hi]
        wheres = [(lo, hi, [self._where(slots[lo:hi], index) for index in (self.key_index, self.value_index)]) for lo, hi in rest]
        grids = self.grids
        batches = self._batches([(out, first, blocks)])
        # (A batch copies KV whose rows it cannot address; `out` is fresh and contiguous, so it is written in place.)
        assert batches is None or all(batch.parts[0] is out for side in batches for batch in side)

        def one(number: int) -> None:
            layer = self.layers[number]
            if batches is not None:
                self._move_batches(batches, number, into_cache=False)
            elif whole:
                assert grids is not None
                for side, grid in enumerate(grids):
                    picked = _grid_view(layer, grid).index_select(0, blocks)  # [blocks, H, t_hi, t_lo, d_hi, d_lo]
                    _token_view(out[side, number, first : first + whole], grid).copy_(picked)
            for lo, hi, (key_where, value_where) in wheres:
                for side, where in ((0, key_where), (1, value_where)):
                    picked = torch.take(layer, where)  # [heads, T, head_size]
                    out[side, number, lo:hi].view(hi - lo, self.kv_heads, self.head_size).copy_(picked.transpose(0, 1))

        _each(one, len(self.layers), pool)
        return out.view(self.dtype)

    def scatter(self, slots: torch.Tensor, kv: torch.Tensor, pool: Executor | None = None) -> None:
        """Write [2, L, T, kv_heads * head_size] (any device and float dtype) into these slots. KV of the
        cache's own element type goes in bit for bit; other dtypes are converted (into an fp8 cache with a scale
        of 1, as vLLM's default k_scale / v_scale)."""
        self.scatter_parts([(slots, kv)], pool)

    def scatter_parts(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], pool: Executor | None = None) -> None:
        """`scatter` of several (slots, KV) parts — a hit's chunks — in one pass over the layers: one task per
        layer for all parts, and with the compiled copies one call per layer and side for all the parts that
        share a storage (lmcached's arena lends a hit as slices of one). Six 256-token chunks placed one scatter
        each took 4x as long as the same tokens in one; as one batch, as long (scripts/placement.py)."""
        prepared = [self._scatter_part(slots, kv) for slots, kv in parts]
        grids = self.grids
        batches = self._batches([(kv, first, blocks) for kv, first, blocks, _ in prepared])

        def one(number: int) -> None:
            layer = self.layers[number]
            if batches is not None:
                self._move_batches(batches, number, into_cache=True)
            for kv, first, blocks, wheres in prepared:
                whole = len(blocks) * layer.shape[2]
                if whole and batches is None:
                    assert grids is not None
                    for side, grid in enumerate(grids):
                        view = _token_view(kv[side, number, first : first + whole].contiguous(), grid)
                        _grid_view(layer, grid).index_copy_(0, blocks, view)
                for lo, hi, (key_where, value_where) in wheres:
                    for side, where in ((0, key_where), (1, value_where)):
                        values = kv[side, number, lo:hi].reshape(hi - lo, self.kv_heads, self.head_size).transpose(0, 1).contiguous()
                        layer.put_(where, values)

        _each(one, len(self.layers), pool)

    def _scatter_part(self, slots: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor, list]:
        """A part checked and on the cache's device as its element type, with its whole kernel blocks (first
        token, block ids) and the element offsets of the tokens before and after them."""
        if kv.ndim != 4 or kv.shape[0] != 2 or kv.shape[1] != len(self.layers) or kv.shape[2] != len(slots):
            raise LayoutError(f"KV of shape {list(kv.shape)} does not fit {len(self.layers)} layers and {len(slots)} slots")
        if kv.shape[3] != self.channels:
            raise LayoutError(f"KV has {kv.shape[3]} channels; this cache has {self.channels}")
        tokens = len(slots)
        kv = kv.to(device=self.layers[0].device, dtype=self.dtype).view(self.layers[0].dtype)
        first, blocks = self._whole_blocks(slots)
        whole = len(blocks) * self.layers[0].shape[2]
        rest = [(lo, hi) for lo, hi in ((0, first), (first + whole, tokens)) if lo < hi]
        wheres = [(lo, hi, [self._where(slots[lo:hi], index) for index in (self.key_index, self.value_index)]) for lo, hi in rest]
        return kv, first, blocks, wheres

    def _batches(self, parts: list[tuple[torch.Tensor, int, torch.Tensor]]) -> list[list[BlockBatch]] | None:
        """Keys' and values' batches (grid_copy) of these parts' whole blocks — (KV, first token of its whole
        blocks, their ids) — for the compiled copies; None where whole blocks move otherwise."""
        compiled = self.compiled
        return None if compiled is None else [plan.batches(parts) for plan in compiled]

    def _move_batches(self, batches: list[list[BlockBatch]], number: int, into_cache: bool) -> None:
        """Layer `number`'s part of every batch, keys and values, into its cache or out of it."""
        assert self.compiled is not None
        for side, plan in enumerate(self.compiled):
            for batch in batches[side]:
                plan.move(self.storages[number][side], batch, side, number, into_cache)

    def _whole_blocks(self, slots: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(first token, kernel block ids): the run of tokens from `first` that fills these kernel blocks whole,
        one after another — the middle of a request's range; the tokens before and after it (a partial block at
        either end) go element by element. No blocks when the layout is not a grid."""
        kernel_block = self.layers[0].shape[2]
        none = (0, torch.empty(0, dtype=torch.int64, device=slots.device))
        if self.grids is None or len(slots) < kernel_block:
            return none
        starts = (slots % kernel_block == 0).nonzero().flatten()
        if not len(starts):
            return none
        first = int(starts[0])
        count = (len(slots) - first) // kernel_block
        if not count:
            return none
        run = slots[first : first + count * kernel_block].view(count, kernel_block)
        # Consecutive slots inside each kernel block (a scheduler block holds whole kernel blocks, so they are).
        if not torch.equal(run - run[:, :1], torch.arange(kernel_block, device=slots.device).expand(count, -1)):
            return none
        return first, run[:, 0] // kernel_block


def tile_grid(offsets: torch.Tensor) -> TileGrid | None:
    """`offsets` [heads, kernel block, head_size] as a strided grid (TileGrid), splitting the token and dim axes
    into (hi, lo) pairs of up to 32; None when no such grid gives every offset."""
    heads, kernel_block, size = offsets.shape
    for t_lo, d_lo in itertools.product((1, 2, 4, 8, 16, 32), repeat=2):
        if kernel_block % t_lo or size % d_lo:
            continue
        view = offsets.reshape(heads, kernel_block // t_lo, t_lo, size // d_lo, d_lo)
        base = int(view[0, 0, 0, 0, 0])
        strides = tuple(int(view[tuple(1 if d == dim else 0 for d in range(5))]) - base if view.shape[dim] > 1 else 0 for dim in range(5))
        rebuilt = base + sum(
            torch.arange(view.shape[dim]).view([-1 if d == dim else 1 for d in range(5)]) * strides[dim] for dim in range(5)
        )
        if torch.equal(rebuilt, view):
            return TileGrid(tuple(view.shape), strides, base)  # type: ignore[arg-type]
    return None


def _grid_view(layer: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """A layer's keys or values as [blocks, heads, t_hi, t_lo, d_hi, d_lo], over its own storage."""
    return layer.as_strided((layer.shape[0], *grid.sizes), (layer.stride(0), *grid.strides), layer.storage_offset() + grid.base)


def _token_view(kv: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[n * kernel block, heads * head_size] KV of one side and layer as [n, heads, t_hi, t_lo, d_hi, d_lo]."""
    heads, t_hi, t_lo, d_hi, d_lo = grid.sizes
    return kv.view(-1, t_hi, t_lo, heads, d_hi, d_lo).permute(0, 3, 1, 2, 4, 5)


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
