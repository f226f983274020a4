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
    layout = PagedLayout.build(layers, 8, packing)  # a scheduler block is two kernel blocks
    block_ids = [2, 0, 1]
    slots = layout.slots(block_ids, 3, 20)  # tokens 3..19: a partial first block, a partial last one
    kv = layout.gather(slots)
    assert kv.shape == (2, 2, 17, 3 * 8) and kv.dtype == dtype
    for t in range(3, 20):
        slot = block_ids[t // 8] * 8 + t % 8
        key, value = reference_kv(layers[1], packing, slot // 4, slot % 4)
        assert torch.equal(kv[0, 1, t - 3].view(3, 8), key) and torch.equal(kv[1, 1, t - 3].view(3, 8), value)

    fresh = tuple(torch.zeros_like(layer) for layer in layers)
    target = PagedLayout.build(fresh, 8, packing)
    target.scatter(slots, kv.float())  # any float dtype comes in; the cache's goes in
    assert torch.equal(target.gather(slots), kv)
    untouched = target.slots(block_ids, 0, 3)
    assert not target.gather(untouched).any()  # tokens outside [3, 20) stay as they were


def test_a_probed_layout_reads_what_the_engines_own_writer_wrote() -> None:
    """A writer that pairs dims up the way AMX kernels do ([dim/2, token, 2] for keys, [token/2, dim, 2] for
    values): the layout is learned from the writer alone, and reads back exactly what the writer put in."""
    heads, block, size = 2, 4, 8

    def vnni_writer(keys: torch.Tensor, values: torch.Tensor, tile: torch.Tensor) -> None:
        key_tile, value_tile = tile.view(1, heads, 2 * block, size).chunk(2, dim=2)
        for t in range(keys.shape[0]):
            for h in range(heads):
                for d in range(size):
                    key_flat = key_tile[0, h].reshape(-1)
                    value_flat = value_tile[0, h].reshape(-1)
                    key_flat[(d // 2) * block * 2 + t * 2 + d % 2] = keys[t, h, d]
                    value_flat[(t // 2) * size * 2 + d * 2 + t % 2] = values[t, h, d]

    layers = (torch.zeros(3, heads, block, 2 * size, dtype=torch.bfloat16),)
    layout = PagedLayout.build(layers, block, "probed", vnni_writer)
    keys = torch.randn(block, heads, size).to(torch.bfloat16)
    values = torch.randn(block, heads, size).to(torch.bfloat16)
    vnni_writer(keys, values, layers[0][2:3])  # the engine fills block 2
    kv = layout.gather(layout.slots([2], 0, block))
    assert torch.equal(kv[0, 0], keys.reshape(block, -1)) and torch.equal(kv[1, 0], values.reshape(block, -1))


def test_layouts_that_cannot_be_read_are_refused() -> None:
    with pytest.raises(LayoutError, match="MLA"):
        PagedLayout.build((torch.zeros(2, 1, 4, 7),), 4, "interleaved")
    with pytest.raises(LayoutError, match="multiple"):
        PagedLayout.build((torch.zeros(2, 1, 4, 8),), 6, "halves")
    with pytest.raises(LayoutError, match="last dimension"):  # no vLLM layout splits a head's content
        PagedLayout.build((torch.zeros(2, 1, 8, 4).transpose(2, 3),), 4, "interleaved")
    with pytest.raises(LayoutError, match="writer"):
        PagedLayout.build((torch.zeros(2, 1, 4, 8),), 4, "probed")
    with pytest.raises(LayoutError, match="once"):  # a writer that drops values cannot be read back
        PagedLayout.build((torch.zeros(2, 1, 4, 8),), 4, "probed", lambda k, v, tile: None)
    layout = PagedLayout.build((torch.zeros(2, 1, 4, 8),), 4, "halves")
    with pytest.raises(LayoutError, match="channels"):
        layout.scatter(layout.slots([0], 0, 2), torch.zeros(2, 1, 2, 5))


def test_a_thread_pool_moves_inference_tensors_too() -> None:
    """vLLM's caches are inference tensors and its worker runs in inference mode: the pool's threads must be too."""
    from concurrent.futures import ThreadPoolExecutor

    with torch.inference_mode():
        layers = tuple(torch.zeros(4, 2, 4, 16) for _ in range(3))
    layout = PagedLayout.build(layers, 4, "halves")
    kv = torch.randn(2, 3, 6, 16)
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        slots = layout.slots([3, 1], 0, 6)
        layout.scatter(slots, kv, pool)
        assert torch.equal(layout.gather(slots, pool), kv)


@pytest.mark.parametrize("name", ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"])
def test_every_vllm_cache_layout_reads_and_writes_like_the_backend(name: str) -> None:
    """vLLM's own allocator code (create_kv_cache_views, as its GPU model runner calls it) lays the cache out
    under each KVCacheLayout; the GPU backends read it as `kv_cache.transpose(1, 2).split(head_size, dim=-1)`.
    Most layouts hand over strided views, and block-outer ones interleave the layers' pages."""
    kv_interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from lmcached.bench.synthetic import VLLM_KV_LAYOUTS, paged_cache_like_vllm

    layout = KVCacheLayout[name]
    assert VLLM_KV_LAYOUTS[name] == layout.stride_order  # the GPU check's hand-built caches follow vLLM's
    spec = kv_interface.FullAttentionSpec(block_size=4, num_kv_heads=3, head_size=8, dtype=torch.float16)
    blocks, names = 6, ["layer.0", "layer.1"]
    layer_stride, block_stride, *_ = kv_interface.compute_layout_strides(spec, blocks, len(names), layout)
    placement = kv_interface.KVCacheTensor(
        size=spec.page_size_bytes * blocks * len(names), layers=names, layer_stride=layer_stride, block_stride=block_stride
    )
    raw = torch.zeros(placement.size, dtype=torch.int8)
    views = kv_interface.create_kv_cache_views(raw, spec, blocks, layout, placement)
    ours = paged_cache_like_vllm(2, blocks, 3, 4, 16, name)
    assert [v.stride() for v in views] == [v.stride() for v in ours]
    raw.view(torch.float16).copy_(torch.randn(raw.numel() // 2))

    paged = PagedLayout.build(views, 4, "interleaved")
    slots = paged.slots([4, 1, 3], 2, 11)
    kv = paged.gather(slots)
    for number, view in enumerate(views):
        keys, values = view.transpose(1, 2).split(8, dim=-1)  # [blocks, tokens, heads, head_size]
        for t, slot in enumerate(slots.tolist()):
            assert torch.equal(kv[0, number, t].view(3, 8), keys[slot // 4, slot % 4])
            assert torch.equal(kv[1, number, t].view(3, 8), values[slot // 4, slot % 4])

    before = raw.clone()
    fresh = torch.randn_like(kv, dtype=torch.float32)
    paged.scatter(slots, fresh)
    assert torch.equal(paged.gather(slots), fresh.half())
    changed = (raw != before).view(-1, 2).any(dim=1).sum()  # float16 elements that changed
    assert changed <= kv.numel() and changed > kv.numel() * 0.99  # only the slots' own elements


def without(layout: PagedLayout, path: str) -> PagedLayout:
    """The same layout with one way of moving whole blocks forgotten (a cached property, set before first use):
    without "grids" every token moves through torch.take / put_ (the reference); without "compiled" the grids
    move as torch's strided copies."""
    twin = PagedLayout(layout.layers, layout.block_size, layout.key_index, layout.value_index, layout.stored)
    twin.__dict__[path] = None
    return twin


def element_by_element(layout: PagedLayout) -> PagedLayout:
    return without(layout, "grids")


def vnni_tables(heads: int, kernel_block: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AMX's pairing as index tables: keys [dim/2, token, 2], values [token/2, dim, 2] in each head's tile."""
    head = torch.arange(heads).view(-1, 1, 1) * 2 * kernel_block * size
    token, dim = torch.arange(kernel_block).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
    key = head + (dim // 2) * kernel_block * 2 + token * 2 + dim % 2
    value = head + kernel_block * size + (token // 2) * size * 2 + dim * 2 + token % 2
    return key, value


@pytest.mark.parametrize("packing", ["interleaved", "halves", "vnni"])
def test_whole_blocks_move_as_strided_grids_exactly_as_element_by_element(packing: str) -> None:
    """Whole kernel blocks move as one strided copy per layer and side; the partial blocks at either end of the
    range, element by element. Both must read and write exactly what the element-by-element path does."""
    heads, kernel_block, size = 3, 8, 16
    layers = tuple(torch.randn(10, heads, kernel_block, 2 * size).to(torch.bfloat16) for _ in range(3))
    if packing == "vnni":
        layout = PagedLayout(layers, 2 * kernel_block, *vnni_tables(heads, kernel_block, size))
    else:
        layout = PagedLayout.build(layers, 2 * kernel_block, packing)
    assert layout.grids is not None
    reference = element_by_element(layout)
    block_ids = [4, 0, 3, 1]  # scheduler blocks of two kernel blocks, not in order
    for start, end, whole in ((0, 64, 8), (5, 59, 6), (3, 12, 0), (9, 15, 0)):
        slots = layout.slots(block_ids, start, end)
        assert len(layout._whole_blocks(slots)[1]) == whole  # the kernel blocks that move as grids
        assert torch.equal(layout.gather(slots), reference.gather(slots))
        kv = torch.randn(2, 3, end - start, heads * size)
        before = tuple(layer.clone() for layer in layers)
        layout.scatter(slots, kv)
        written = tuple(layer.clone() for layer in layers)
        for layer, old in zip(layers, before, strict=True):
            layer.copy_(old)
        reference.scatter(slots, kv)
        assert all(torch.equal(a, b) for a, b in zip(written, layers, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(written, before, strict=True))


def test_a_layout_that_is_no_grid_still_moves_element_by_element() -> None:
    heads, kernel_block, size = 2, 4, 8
    scrambled = torch.randperm(heads * kernel_block * 2 * size)
    key, value = scrambled[: heads * kernel_block * size].view(heads, kernel_block, size), scrambled[heads * kernel_block * size :]
    layers = (torch.zeros(5, heads, kernel_block, 2 * size),)
    layout = PagedLayout(layers, kernel_block, key, value.view(heads, kernel_block, size))
    assert layout.grids is None
    slots = layout.slots([3, 1], 0, 8)
    kv = torch.randn(2, 1, 8, heads * size)
    layout.scatter(slots, kv)
    assert torch.equal(layout.gather(slots), kv)


def torch_strided(layout: PagedLayout) -> PagedLayout:
    return without(layout, "compiled")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("packing", ["interleaved", "halves", "vnni"])
def test_the_compiled_copy_moves_whole_blocks_exactly_as_torch_and_element_by_element(packing: str, dtype: torch.dtype) -> None:
    """grid_copy's loop (the CPU default) against torch's strided copies and the element path, for 1-, 2- and
    4-byte elements (fp8 caches are bytes): the same reads, the same writes, nothing else touched. AMX's dim
    pairs move as one wider integer."""
    heads, kernel_block, size = 3, 8, 16
    layers = tuple(torch.randint(0, 200, (10, heads, kernel_block, 2 * size)).to(dtype) for _ in range(2))
    if packing == "vnni":
        layout = PagedLayout(layers, 2 * kernel_block, *vnni_tables(heads, kernel_block, size))
    else:
        layout = PagedLayout.build(layers, 2 * kernel_block, packing)
    assert layout.compiled is not None
    if packing == "vnni":
        assert layout.compiled[0].widen == 2  # keys' dim pairs move as one integer
        assert layout.compiled[1].pack == 2  # values' token pairs are packed into one integer in the cache
    others = (torch_strided(layout), element_by_element(layout))
    slots = layout.slots([4, 0, 3], 3, 46)  # partial blocks at both ends, four whole kernel blocks between
    assert len(layout._whole_blocks(slots)[1]) == 4
    for other in others:
        assert torch.equal(layout.gather(slots), other.gather(slots))
    kv = torch.randint(0, 200, (2, 2, len(slots), heads * size)).to(dtype)
    before = tuple(layer.clone() for layer in layers)
    layout.scatter(slots, kv)
    written = tuple(layer.clone() for layer in layers)
    assert torch.equal(layout.gather(slots), kv)
    for other in others:
        for layer, old in zip(layers, before, strict=True):
            layer.copy_(old)
        other.scatter(slots, kv)
        assert all(torch.equal(a, b) for a, b in zip(written, layers, strict=True))


def test_warming_up_compiles_without_touching_the_cache() -> None:
    layers = tuple(torch.randn(4, 2, 4, 16).to(torch.bfloat16) for _ in range(2))
    before = tuple(layer.clone() for layer in layers)
    layout = PagedLayout.build(layers, 4, "halves")
    compiled = layout.compiled
    assert compiled is not None
    layout.warm()
    for plan in compiled:
        for kernel in plan.kernels.values():
            (signature,) = kernel.signatures  # compiled once, for this cache's integers
            assert str(signature[0].dtype) == f"uint{8 * plan.itemsize * plan.pack}"
    assert all(torch.equal(a, b) for a, b in zip(layers, before, strict=True))


@pytest.mark.parametrize("storage", ["own", "shared"])
@pytest.mark.parametrize("path", ["compiled", "torch", "element"])
def test_a_hit_in_several_buffers_lands_exactly_as_in_one(path: str, storage: str) -> None:
    """A hit arrives as chunks, each its own buffer or all slices of one (lmcached's arena, read in place):
    scatter_parts places them in one pass over the layers, exactly as one scatter of the joined KV — the first
    part cut to start mid-way, a part whose rows are not contiguous (copied first), partial blocks at the ends
    — on one thread and a pool. Slices of one storage go as one batch of blocks."""
    from concurrent.futures import ThreadPoolExecutor

    heads, kernel_block, size = 3, 8, 16
    layers = tuple(torch.randint(0, 200, (12, heads, kernel_block, 2 * size)).to(torch.bfloat16) for _ in range(2))
    layout = PagedLayout(layers, 2 * kernel_block, *vnni_tables(heads, kernel_block, size))
    layout = {"compiled": layout, "torch": torch_strided(layout), "element": element_by_element(layout)}[path]
    assert (layout.compiled is not None) == (path == "compiled")
    block_ids = [5, 0, 3, 1]
    kv = torch.randint(0, 200, (2, 2, 64, heads * size)).to(torch.bfloat16)
    if storage == "own":
        chunks = [kv[:, :, i : i + 16].clone() for i in range(0, 64, 16)]
        chunks[2] = kv[:, :, 32:48].transpose(2, 3).contiguous().transpose(2, 3)  # same values, rows not contiguous
    else:  # one buffer, the chunks in another order inside it, a gap between them
        arena = torch.zeros(5 * kv[:, :, :16].numel(), dtype=torch.bfloat16)
        chunks = []
        for slot, i in zip((3, 0, 4, 1), range(0, 64, 16), strict=True):
            chunk = arena[slot * kv[:, :, :16].numel() :][: kv[:, :, :16].numel()].view(2, 2, 16, heads * size)
            chunk.copy_(kv[:, :, i : i + 16])
            chunks.append(chunk)
    start, end = 8, 61
    parts = [
        (layout.slots(block_ids, max(lo, start), min(lo + 16, end)), chunk[:, :, max(lo, start) - lo : min(lo + 16, end) - lo])
        for lo, chunk in zip(range(0, 64, 16), chunks, strict=True)
    ]
    if path == "compiled":
        prepared = [layout._scatter_part(slots, part) for slots, part in parts]
        batches = layout.compiled[0].batches([(part, first, blocks) for part, first, blocks, _ in prepared])  # type: ignore[index]
        assert len(batches) == (1 if storage == "shared" else 4)
    untouched = layout.slots(block_ids, 0, start)
    outside = layout.gather(untouched)
    before = tuple(layer.clone() for layer in layers)
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            for layer, old in zip(layers, before, strict=True):
                layer.copy_(old)
            layout.scatter_parts(parts, executor)
            in_parts = tuple(layer.clone() for layer in layers)
            for layer, old in zip(layers, before, strict=True):
                layer.copy_(old)
            layout.scatter(layout.slots(block_ids, start, end), kv[:, :, start:end], executor)
            assert all(torch.equal(a, b) for a, b in zip(in_parts, layers, strict=True))
            assert torch.equal(layout.gather(layout.slots(block_ids, start, end), executor), kv[:, :, start:end])
    assert torch.equal(layout.gather(untouched), outside)


def test_layers_laid_out_unlike_the_first_move_element_by_element() -> None:
    """Grids (and the compiled plans) are found in the first layer's strides: when another layer has other
    strides, every layer goes element by element, and each still holds what its backend reads."""
    first = torch.zeros(6, 2, 4, 16, dtype=torch.bfloat16)
    other = torch.zeros(6, 4, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # same shape, heads and tokens swapped in memory
    layout = PagedLayout.build((first, other), 4, "interleaved")
    assert layout.grids is None and layout.compiled is None
    slots = layout.slots([3, 1], 0, 8)
    kv = torch.randn(2, 2, 8, 2 * 8).to(torch.bfloat16)
    layout.scatter(slots, kv)
    assert torch.equal(layout.gather(slots), kv)
    for t, slot in enumerate(slots.tolist()):
        key, value = reference_kv(other, "interleaved", slot // 4, slot % 4)
        assert torch.equal(key.reshape(-1), kv[0, 1, t]) and torch.equal(value.reshape(-1), kv[1, 1, t])
