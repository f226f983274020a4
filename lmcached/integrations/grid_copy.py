"""Whole kernel blocks between a CPU paged cache and lmcached's token-major KV, as one compiled loop (Numba).

A block's keys (or values) sit in the cache as a strided grid (paged.TileGrid); lmcached's KV holds the same
elements token by token ([tokens, heads * head_size]). torch's strided copy between the two runs at a few
GB/s on vLLM's CPU layouts, because their innermost runs are two elements long (AMX pairs two dims of a key or
two tokens of a value) and the other axis is a transpose. Here one compiled loop per plan walks the cache's
side of a block along its contiguous axis (so the cache is written, or read, in runs the compiler vectorises),
moving runs contiguous on both sides (AMX's dim pairs) as one wider integer, and packing runs contiguous in the
cache only (AMX's token pairs of a value) from their places on the token side into one integer. Each plan's
loop is compiled with its sizes and strides as constants (and cached on disk per plan): that let the compiler
unroll and vectorise it, and halved a hit's placement against the same loop reading them at run time
(scripts/placement.py). The kernels copy bits (the elements are viewed as unsigned integers), so bfloat16,
float16, fp8 bytes and float32 all go the same way; they release the GIL, so paged.PagedLayout spreads the
layers over its pool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numba import njit

#: Integer types of each width, for viewing elements (and runs of them) as bits: torch's to reinterpret a
#: tensor, numpy's unsigned ones for the compiled loops (packing shifts them without sign extension).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class GridPlan:
    """How one side (keys or values) of a block moves. The token-major side is read as integers of `widen`
    elements; the cache as integers of `pack` of those (a run contiguous in the cache whose elements lie
    `pack_stride` apart on the token side; 1: no packing). Five axes, the cache's contiguous one innermost and
    the others in the token-major side's memory order (leading axes of size 1 pad), each with its size, its
    stride in the cache (in the cache's integers) and in the token-major KV (in its own). `base` is where the
    grid starts in a block; `block_stride` the distance between blocks (both in the cache's integers)."""

    widen: int
    pack: int
    pack_stride: int
    sizes: np.ndarray
    cache_strides: np.ndarray
    token_strides: np.ndarray
    base: int
    block_stride: int
    itemsize: int
    kernels: dict[bool, Callable[..., None]] = field(compare=False, repr=False)

    @classmethod
    def build(cls, sizes: tuple[int, ...], strides: tuple[int, ...], base: int, layer: torch.Tensor) -> GridPlan | None:
        """The plan for a grid [head, t_hi, t_lo, d_hi, d_lo] (paged.TileGrid's sizes, strides and base) of this
        layer; None when the layer cannot be read as flat storage here (not on the CPU)."""
        if layer.device.type != "cpu" or layer.element_size() not in _BITS:
            return None
        heads, t_hi, t_lo, d_hi, d_lo = sizes
        head_size = d_hi * d_lo
        channels = heads * head_size
        token_strides = [head_size, t_lo * channels, channels, d_lo, 1]
        cache_strides = list(strides)
        sizes_ = list(sizes)
        inner = 4 if sizes_[4] > 1 else 3  # the dims' innermost axis: d_lo, or d_hi when d_lo is 1
        widen = _widest_run(inner, sizes_, cache_strides, token_strides, base, layer)
        if not _fits(layer, widen):
            widen = 1  # the layer's last integer would reach past its storage
        if widen > 1:
            sizes_[inner] //= widen
            cache_strides = [s // widen if a != inner else s for a, s in enumerate(cache_strides)]
            token_strides = [s // widen if a != inner else s for a, s in enumerate(token_strides)]
        base //= widen
        block_stride = layer.stride(0) // widen
        pack, pack_stride = 1, 0
        packed = _packable(sizes_, cache_strides, [base, block_stride, layer.storage_offset() // widen], widen * layer.element_size())
        if packed is not None and _fits(layer, widen * packed[1]):
            axis, pack = packed
            pack_stride = token_strides[axis]
            sizes_[axis] = 1
            cache_strides = [s // pack for s in cache_strides]
            base //= pack
            block_stride //= pack
        # The cache's contiguous axis innermost: its writes (a placement) and reads (a copy-out) are runs the
        # compiler vectorises; the other axes walk the token-major side in its memory order.
        contiguous = [a for a in range(5) if sizes_[a] > 1 and cache_strides[a] == 1]
        axes = sorted((a for a in range(5) if sizes_[a] > 1 and a not in contiguous[:1]), key=lambda a: -token_strides[a])
        axes += contiguous[:1]
        pad = 5 - len(axes)
        plan_sizes = tuple([1] * pad + [sizes_[a] for a in axes])
        plan_cache = tuple([0] * pad + [cache_strides[a] for a in axes])
        plan_token = tuple([0] * pad + [token_strides[a] for a in axes])
        itemsize = widen * layer.element_size()
        kernels = {into: _kernel(plan_sizes, plan_cache, plan_token, pack, pack_stride, itemsize, into) for into in (True, False)}
        return cls(
            widen,
            pack,
            pack_stride,
            np.array(plan_sizes, dtype=np.int64),
            np.array(plan_cache, dtype=np.int64),
            np.array(plan_token, dtype=np.int64),
            base,
            block_stride,
            itemsize,
            kernels,
        )

    def storage(self, layer: torch.Tensor) -> np.ndarray:
        """The layer's storage from its first element to its last, as the cache's integers (writes go through)."""
        elements = self.widen * self.pack
        span = -(-_span(layer) // elements) * elements
        flat = layer.view(_BITS[layer.element_size()]).as_strided((span,), (1,), layer.storage_offset())
        return flat.view(_BITS[layer.element_size() * elements]).numpy().view(_UNSIGNED[self.itemsize * self.pack])

    def starts(self, blocks: torch.Tensor) -> np.ndarray:
        """Where each of these blocks' grids starts in a layer's storage (the cache's integers)."""
        return (self.base + blocks.cpu().numpy().astype(np.int64) * self.block_stride).astype(np.uint64)

    def batches(self, parts: Sequence[tuple[torch.Tensor, int, torch.Tensor]]) -> list[BlockBatch]:
        """The whole blocks of these parts — (token-major KV [2, L, T, C], the first token of its whole blocks,
        their block ids) — as the loop moves them: one batch per storage among the parts (a hit read in place
        from lmcached's arena is one), each moved by one call per layer and side however many chunks it holds.
        KV whose token rows are not contiguous is copied first."""
        groups: dict[int, list[tuple[torch.Tensor, int, torch.Tensor]]] = {}
        for kv, first, blocks in parts:
            if len(blocks):
                kv = kv if self._rows_fit(kv) else kv.contiguous()
                groups.setdefault(kv.untyped_storage().data_ptr(), []).append((kv, first, blocks))
        per_block = int(self.sizes.prod()) * self.pack  # a block's integers of one side on the token side: its rows, one after another
        batches = []
        for group in groups.values():
            storage = group[0][0].untyped_storage()
            itemsize = group[0][0].element_size()
            flat = torch.empty(0, dtype=_BITS[itemsize]).set_(storage, 0, (storage.nbytes() // itemsize,))
            flat = flat[: flat.numel() // self.widen * self.widen].view(_BITS[itemsize * self.widen])
            origins, layer_steps, side_steps = [], [], []
            for kv, first, blocks in group:
                count = len(blocks)
                row = (kv.storage_offset() + first * kv.stride(2)) // self.widen
                origins.append(row + np.arange(count, dtype=np.uint64) * np.uint64(per_block))
                layer_steps.append(np.full(count, kv.stride(1) // self.widen, dtype=np.uint64))
                side_steps.append(np.full(count, kv.stride(0) // self.widen, dtype=np.uint64))
            batches.append(
                BlockBatch(
                    tuple(kv for kv, _, _ in group),
                    flat.numpy().view(_UNSIGNED[self.itemsize]),
                    np.concatenate([self.starts(blocks) for _, _, blocks in group]),
                    np.concatenate(origins),
                    np.concatenate(layer_steps),
                    np.concatenate(side_steps),
                )
            )
        return batches

    def _rows_fit(self, kv: torch.Tensor) -> bool:
        """Whether kv's token rows can be read where they are: each token's channels contiguous, the rows one
        after another, every offset a whole number of widened elements."""
        if kv.device.type != "cpu" or kv.stride(3) != 1 or kv.stride(2) != kv.shape[3]:
            return False
        return all(n % self.widen == 0 for n in (kv.storage_offset(), *kv.stride()[:3]))

    def move(self, cache: np.ndarray, batch: BlockBatch, side: int, layer: int, into_cache: bool) -> None:
        """Between a layer's `cache` (storage()) and the batch's token rows of this side and layer, all its
        blocks: into the cache or out of it."""
        self.kernels[into_cache](cache, batch.starts, batch.array, batch.sources(side, layer))

    def warm(self, layer: torch.Tensor) -> None:
        """Compile both directions for this layer by copying no blocks (a second or so per plan the first time;
        Numba caches them on disk after that)."""
        cache = self.storage(layer)
        none = np.empty(0, np.uint64)
        for kernel in self.kernels.values():
            kernel(cache, none, np.empty(0, _UNSIGNED[self.itemsize]), none)


@dataclass(frozen=True)
class BlockBatch:
    """Whole blocks of token-major KV [2, L, T, C] parts that share one storage, as grid_copy's loop moves
    them: `starts`, where each block's grid starts in a layer's cache storage; `array`, the parts' storage as
    flat widened integers; per block, where its first token's keys of layer 0 sit in `array` (`origins`) and
    how much further the same token's row is a layer on (`layer_steps`) and among the values (`side_steps`)."""

    parts: tuple[torch.Tensor, ...]  # keep the storage alive while `array` is read or written
    array: np.ndarray
    starts: np.ndarray
    origins: np.ndarray
    layer_steps: np.ndarray
    side_steps: np.ndarray

    def sources(self, side: int, layer: int) -> np.ndarray:
        """Where each block's rows of this side and layer start in `array`."""
        return self.origins + np.uint64(side) * self.side_steps + np.uint64(layer) * self.layer_steps


def _span(layer: torch.Tensor) -> int:
    """Elements from a layer's first to its last, in its storage."""
    return 1 + sum((size - 1) * stride for size, stride in zip(layer.shape, layer.stride(), strict=True))


def _widest_run(inner: int, sizes: list[int], cache_strides: list[int], token_strides: list[int], base: int, layer: torch.Tensor) -> int:
    """How many elements (a power of two, at most 8 bytes' worth) of the dims' innermost axis `inner`, when it is
    contiguous on both sides, can move as one integer: every other stride, the base, the block stride and the
    layer's offset must be multiples."""
    if cache_strides[inner] != 1 or token_strides[inner] != 1:
        return 1
    widen = 1
    while widen * 2 * layer.element_size() <= 8 and sizes[inner] % (widen * 2) == 0:
        candidate = widen * 2
        others = [s for a, s in enumerate(cache_strides + token_strides) if a % 5 != inner and sizes[a % 5] > 1]
        if any(s % candidate for s in [*others, base, layer.stride(0), layer.storage_offset()]):
            break
        widen = candidate
    return widen


def _fits(layer: torch.Tensor, elements: int) -> bool:
    """Whether the layer's storage, read as integers of this many elements, ends inside its storage."""
    span = _span(layer)
    return span % elements == 0 or layer.storage_offset() + span + elements <= layer.untyped_storage().nbytes() // layer.element_size()


def _packable(sizes: list[int], cache_strides: list[int], offsets: list[int], itemsize: int) -> tuple[int, int] | None:
    """(the cache's contiguous axis, its size): how many integers of `itemsize` bytes that axis packs into one
    (its whole size, a power of two up to 8 bytes' worth), when the cache has one such axis: every other stride
    and `offsets` (the base, the block stride, the layer's offset) must be multiples. None: no packing."""
    contiguous = [a for a in range(5) if sizes[a] > 1 and cache_strides[a] == 1]
    if len(contiguous) != 1:
        return None
    axis = contiguous[0]
    run = sizes[axis]
    if run & (run - 1) or run * itemsize > 8:
        return None
    others = [s for a, s in enumerate(cache_strides) if sizes[a] > 1 and a != axis]
    return None if any(s % run for s in [*others, *offsets]) else (axis, run)


@functools.cache
def _kernel(
    sizes: tuple[int, ...],
    cache_strides: tuple[int, ...],
    token_strides: tuple[int, ...],
    pack: int,
    pack_stride: int,
    itemsize: int,
    into_cache: bool,
) -> Callable[..., None]:
    """One plan's loop in one direction — `kernel(cache, starts, tokens, sources)`: for each block, its grid
    from starts[block] in the cache and sources[block] on the token side — compiled with the plan's sizes and
    strides as constants (Numba freezes a closure's variables; its disk cache keys on them, so a plan compiles
    once per machine)."""
    n0, n1, n2, n3, n4 = sizes
    c0, c1, c2, c3, c4 = (np.uint64(s) for s in cache_strides)
    t0, t1, t2, t3, t4 = (np.uint64(s) for s in token_strides)
    wide = _UNSIGNED[itemsize * pack]
    narrow = _UNSIGNED[itemsize]
    step = np.uint64(pack_stride)
    bits = itemsize * 8
    mask = wide((1 << bits) - 1)

    # Offsets are unsigned: with signed ones Numba checks each index for Python's negative wrap-around, which
    # doubled the loop's time.
    @njit(nogil=True, cache=True)
    def kernel(cache, starts, tokens, sources):  # pragma: no cover - compiled
        for block in range(starts.shape[0]):
            o0 = starts[block]
            s0 = sources[block]
            for x0 in range(n0):
                o1, s1 = o0 + np.uint64(x0) * c0, s0 + np.uint64(x0) * t0
                for x1 in range(n1):
                    o2, s2 = o1 + np.uint64(x1) * c1, s1 + np.uint64(x1) * t1
                    for x2 in range(n2):
                        o3, s3 = o2 + np.uint64(x2) * c2, s2 + np.uint64(x2) * t2
                        for x3 in range(n3):
                            o4, s4 = o3 + np.uint64(x3) * c3, s3 + np.uint64(x3) * t3
                            if pack == 1:
                                for x4 in range(n4):
                                    if into_cache:
                                        cache[o4 + np.uint64(x4) * c4] = tokens[s4 + np.uint64(x4) * t4]
                                    else:
                                        tokens[s4 + np.uint64(x4) * t4] = cache[o4 + np.uint64(x4) * c4]
                            elif into_cache:
                                for x4 in range(n4):
                                    s = s4 + np.uint64(x4) * t4
                                    packed = wide(0)
                                    for j in range(pack):
                                        packed |= wide(tokens[s + np.uint64(j) * step]) << wide(j * bits)
                                    cache[o4 + np.uint64(x4) * c4] = packed
                            else:
                                # One pass per packed element: each pass writes a run the compiler vectorises.
                                for j in range(pack):
                                    for x4 in range(n4):
                                        value = (cache[o4 + np.uint64(x4) * c4] >> wide(j * bits)) & mask
                                        tokens[s4 + np.uint64(j) * step + np.uint64(x4) * t4] = narrow(value)

    return kernel
