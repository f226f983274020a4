"""The worker's disk write-behind: stores return once RAM holds the chunks, and the disk copy still lands."""

from __future__ import annotations

from pathlib import Path

from lmcached.backends import Chunk, LocalDiskBackend
from lmcached.client import AsyncKVClient
from lmcached.worker import Worker

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
