"""How fast a hit is placed into vLLM's paged cache (and a prompt copied out of it), beside a memcpy of the same
bytes (issue 24's placement target): SmolLM2's shape (30 layers, 3 KV heads of 64, bfloat16), 1,536 tokens in
12 scattered blocks of 128, the layout learned from vLLM's own CPU cache-write op on this CPU. Each figure the
median of eight after a warm-up, with the range; the element-by-element path, whole blocks as torch's strided
copies, and whole blocks by grid_copy's compiled loop (the CPU default), on one thread and on a pool of two.
memcpy is measured twice: into a warm buffer, and into one of eight in turn (a cold destination, as the cache is).
Last, a hit as lmcached lends it to the connector: 256-token chunks, slices of one buffer (its arena).

    .venv/bin/python scripts/placement.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from lmcached.integrations.paged import PagedLayout
from lmcached.integrations.vllm import cpu_cache_writer

LAYERS, HEADS, BLOCK, HEAD_SIZE, TOKENS = 30, 3, 128, 64, 1536
CHUNK = 256  # lmcached's chunk size in the workload bench


def timed(fn: Callable[[], object], repeats: int = 9) -> tuple[float, float, float]:
    """(median, min, max) in ms of `repeats` - 1 runs after a warm-up."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    kept = sorted(times[1:])
    return statistics.median(kept), kept[0], kept[-1]


def main() -> None:
    layers = [torch.zeros(80, HEADS, BLOCK, 2 * HEAD_SIZE, dtype=torch.bfloat16) for _ in range(LAYERS)]
    writer = cpu_cache_writer("auto", torch.bfloat16, layers[0])
    grid = PagedLayout.build(layers, BLOCK, "probed", writer, None, torch.bfloat16)
    element = PagedLayout(grid.layers, BLOCK, grid.key_index, grid.value_index)
    element.__dict__["grids"] = None  # the same layout, element by element
    strided = PagedLayout(grid.layers, BLOCK, grid.key_index, grid.value_index)
    strided.__dict__["compiled"] = None  # the same grids, as torch's strided copies
    slots = grid.slots(list(range(5, 5 + 2 * TOKENS // BLOCK, 2)), 0, TOKENS)
    kv = torch.randn(2, LAYERS, TOKENS, HEADS * HEAD_SIZE).to(torch.bfloat16)
    copy = torch.empty_like(kv)
    memcpy = timed(lambda: copy.copy_(kv))
    # A paged cache is far larger than the caches of the CPU: a memcpy into a destination not touched lately
    # (one of eight buffers in turn, 280 MB) is the other baseline.
    fresh = [torch.zeros_like(kv) for _ in range(8)]
    turn = iter(range(10**9))
    cold = timed(lambda: fresh[next(turn) % 8].copy_(kv), 17)
    print(
        f"{kv.numel() * kv.element_size() / 1e6:.1f} MB; memcpy {memcpy[0]:.1f} ms ({memcpy[1]:.1f}-{memcpy[2]:.1f}), "
        f"into a cold destination {cold[0]:.1f} ms ({cold[1]:.1f}-{cold[2]:.1f}); torch's threads: {torch.get_num_threads()}"
    )
    with ThreadPoolExecutor(2) as pool:
        layouts = (("element by element", element), ("whole blocks as torch strided grids", strided), ("whole blocks, compiled", grid))
        for name, layout in layouts:
            for threads, executor in (("1 thread", None), ("2 threads", pool)):
                place = timed(lambda: layout.scatter(slots, kv, executor))  # noqa: B023
                copy_out = timed(lambda: layout.gather(slots, executor))  # noqa: B023
                print(
                    f"{name}, {threads}: place {place[0]:.1f} ms ({place[1]:.1f}-{place[2]:.1f}) = "
                    f"{memcpy[0] / place[0]:.0%} of memcpy ({cold[0] / place[0]:.0%} of a cold one); "
                    f"copy out {copy_out[0]:.1f} ms ({copy_out[1]:.1f}-{copy_out[2]:.1f}) = "
                    f"{memcpy[0] / copy_out[0]:.0%}"
                )
        # A hit as lmcached lends it: 256-token chunks, slices of one buffer (its arena), in another order there.
        arena = torch.empty(2 * kv.numel(), dtype=kv.dtype)
        chunk = kv[:, :, :CHUNK].numel()
        parts = []
        for number, first in enumerate(range(0, TOKENS, CHUNK)):
            piece = arena[(2 * number + 1) % (2 * TOKENS // CHUNK) * chunk :][:chunk].view(2, LAYERS, CHUNK, -1)
            piece.copy_(kv[:, :, first : first + CHUNK])
            parts.append((slots[first : first + CHUNK], piece))
        for threads, executor in (("1 thread", None), ("2 threads", pool)):
            place = timed(lambda: grid.scatter_parts(parts, executor))  # noqa: B023
            name = f"a hit as {len(parts)} chunks of {CHUNK} in one buffer, compiled, {threads}"
            print(f"{name}: place {place[0]:.1f} ms ({place[1]:.1f}-{place[2]:.1f}) = {memcpy[0] / place[0]:.0%} of memcpy")


if __name__ == "__main__":
    main()
