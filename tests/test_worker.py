"""The worker's disk write-behind: stores return once RAM holds the chunks, and the disk copy still lands."""

from __future__ import annotations

from pathlib import Path

from lmcached.client import AsyncKVClient
from lmcached.wire.chunk import Chunk
from lmcached.worker.backends import LocalDiskBackend
from lmcached.worker.instance import Worker

from .conftest import CPU, DISK, make_kv, test_config


async def test_stop_drains_queued_disk_writes(tmp_path: Path) -> None:
    worker = Worker(test_config(local_disk=str(tmp_path / "disk"), enable_controller=False))
    await worker.start(connect=False)
    tokens = list(range(16 * 20))
    async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
        assert await client.store(tokens, make_kv(len(tokens))) == len(tokens)
    await worker.stop()  # right away: the writes still queued must land first
    assert len(LocalDiskBackend(tmp_path / "disk", 1 << 30)) == 20


async def test_a_disk_clear_is_not_overtaken_by_queued_writes(tmp_path: Path) -> None:
    worker = Worker(test_config(local_disk=str(tmp_path / "disk"), enable_controller=False))
    await worker.start(connect=False)
    try:
        tokens = list(range(16 * 20))
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            await client.store(tokens, make_kv(len(tokens)))
        keys = [s.key for s in client.spans(tokens)]
        result = await worker.execute("clear", {"location": DISK, "keys": None})
        assert result["num_tokens"] == len(tokens)  # the queued writes landed first, then all were cleared
        await worker.flush_disk()
        assert len(worker.backends[DISK]) == 0 and len(worker.backends[CPU]) == 20
        assert all(k in worker.backends[CPU] for k in keys)
    finally:
        await worker.stop()


async def test_explicit_disk_stores_are_synchronous(tmp_path: Path) -> None:
    worker = Worker(test_config(local_disk=str(tmp_path / "disk"), enable_controller=False))
    await worker.start(connect=False)
    try:
        chunk = Chunk(7, 4, (2, 1, 4, 8), "float16", bytes(128))
        await worker.store([chunk], DISK)  # a move to disk: done when it returns
        assert 7 in worker.backends[DISK] and 7 not in worker.backends[CPU]
    finally:
        await worker.stop()


async def test_fp8_chunks_are_kept_bit_exact_and_only_lossless_compresses_them(tmp_path: Path) -> None:
    """An fp8 KV (vLLM's --kv-cache-dtype fp8) goes in and out byte for byte, to disk too; a cachegen compress
    skips its chunks and says why; lossless compresses and decompresses them exactly."""
    import torch

    kv = make_kv(48).to(torch.float8_e4m3fn)
    tokens = list(range(48))
    worker = Worker(test_config(local_disk=str(tmp_path / "disk"), enable_controller=False))
    await worker.start(connect=False)
    try:
        async with AsyncKVClient(worker.data_plane.address) as client:
            assert await client.store(tokens, kv) == 48
            keys = [s.key for s in client.spans(tokens)]
            got = await client.retrieve(tokens)
            assert got is not None and got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
            refused = await worker.execute("compress", {"location": CPU, "keys": keys, "method": "cachegen"})
            assert refused["chunks"] == 0 and any("8-bit already" in reason for reason in refused["skipped"])
            done = await worker.execute("compress", {"location": CPU, "keys": keys, "method": "lossless"})
            assert done["chunks"] == len(keys)
            again = await client.retrieve(tokens)
            assert again is not None and torch.equal(again.view(torch.uint8), kv.view(torch.uint8))
            await worker.flush_disk()
            on_disk = worker.backends[DISK].get(keys[0])
            assert on_disk is not None and on_disk.dtype == "float8_e4m3fn"
    finally:
        await worker.stop()


async def test_without_a_controller_no_change_records_pile_up() -> None:
    """The admit/evict records wait for a controller link to send them; a worker without one (a vLLM-hosted
    instance with enable_controller off) must not keep one for every chunk it ever held."""
    worker = Worker(test_config(enable_controller=False, max_local_cpu_size=0.0001))  # ~100 KB: LRU evicts
    await worker.start(connect=False)
    try:
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            for prompt in range(20):
                tokens = list(range(prompt * 1000, prompt * 1000 + 64))
                assert await client.store(tokens, make_kv(len(tokens))) == 64
        assert 0 < len(worker.backends[CPU]) < 80  # stored, and most evicted again
        assert worker.storage.changes == {} and not worker.storage.changed.is_set()
    finally:
        await worker.stop()
