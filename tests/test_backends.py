from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from lmcached.wire.chunk import Chunk
from lmcached.worker.backends import LocalCPUBackend, LocalDiskBackend, StoreFull


def chunk(key: int, nbytes: int = 100, method: str | None = None) -> Chunk:
    return Chunk(key, 4, (2, 1, 4, nbytes // 16), "float16", bytes([key % 256]) * nbytes, method)


def test_cpu_lru_eviction_skips_pinned() -> None:
    backend = LocalCPUBackend(300)
    for key in (1, 2, 3):
        backend.put(chunk(key))
    backend.set_pinned(1, True)
    backend.get(2)  # 2 is now more recent than 3
    assert backend.put(chunk(4)) == [3]
    assert sorted(backend.keys()) == [1, 2, 4]
    assert backend.used_bytes == 300


def test_cpu_full_of_pinned_refuses_and_keeps_everything() -> None:
    backend = LocalCPUBackend(200)
    for key in (1, 2):
        backend.put(chunk(key))
        backend.set_pinned(key, True)
    with pytest.raises(StoreFull, match="pinned"):
        backend.put(chunk(3))
    assert sorted(backend.keys()) == [1, 2]
    assert backend.get(1) == chunk(1)


def test_cpu_chunk_larger_than_capacity_is_refused() -> None:
    with pytest.raises(StoreFull, match="exceeds"):
        LocalCPUBackend(50).put(chunk(1))


def test_cpu_replace_if_same_is_compare_and_set() -> None:
    backend = LocalCPUBackend(1000)
    old = chunk(1)
    backend.put(old)
    backend.set_pinned(1, True)
    assert backend.replace_if_same(old, chunk(1, 32, "cachegen"))
    assert backend.get(1).method == "cachegen" and backend.is_pinned(1)  # type: ignore[union-attr]
    assert not backend.replace_if_same(old, chunk(1, 48, "cachegen"))  # stale: someone changed it
    assert backend.used_bytes == 32


def test_disk_survives_restart_with_pins(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path, 10_000)
    backend.put(chunk(7))
    backend.put(chunk(8, method="cachegen"))
    backend.set_pinned(7, True)
    again = LocalDiskBackend(tmp_path, 10_000)
    assert sorted(again.keys()) == [7, 8]
    assert again.is_pinned(7) and not again.is_pinned(8)
    assert again.get(8) == chunk(8, method="cachegen")
    assert again.used_bytes == 200


def test_disk_corrupt_file_is_dropped_not_served(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path, 10_000)
    backend.put(chunk(5))
    path = next(tmp_path.glob("*.kv"))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    assert backend.get(5) is None
    assert 5 in backend.dropped_corrupt and 5 not in backend
    assert not path.exists()


def test_disk_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "00000000000000ff.kv.123.tmp").write_bytes(b"half a write")
    (tmp_path / "00000000000000fe.kv").write_bytes(b"garbage")
    backend = LocalDiskBackend(tmp_path, 10_000)
    assert len(backend) == 0
    assert list(tmp_path.iterdir()) == []


def test_disk_eviction_removes_files(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path, 250)
    backend.put(chunk(1))
    backend.put(chunk(2))
    assert backend.put(chunk(3)) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{2:016x}.kv", f"{3:016x}.kv"]


def test_the_disk_tier_is_the_owners_alone_unless_its_directory_says_otherwise(tmp_path: Path) -> None:
    # KV reveals the prompts: a directory the backend makes is 0700 and its chunk files 0600, whatever the umask.
    old_umask = os.umask(0o022)
    try:
        made = LocalDiskBackend(tmp_path / "made" / "disk", 10_000)
        made.put(chunk(1))
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o750)
        shared.chmod(0o750)
        LocalDiskBackend(shared, 10_000).put(chunk(2))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "made" / "disk").stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "made" / "disk").iterdir()] == [0o600]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750  # the operator's choice stands
    assert [stat.S_IMODE(p.stat().st_mode) for p in shared.iterdir()] == [0o600]


def test_a_chunks_lineage_survives_the_disk_and_reaches_its_index_entry(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path, 10_000)
    backend.put(replace(chunk(3), lossy="cachegen"))
    backend.put(chunk(4))
    again = LocalDiskBackend(tmp_path, 10_000)
    assert again.get(3).lossy == "cachegen" and again.info(3).lossy == "cachegen"
    assert again.get(4).lossy is None and again.stats()["lossy_chunks"] == 1
    assert "lossy" not in chunk(4).meta()  # the engine's own values: the same metadata as before lineage existed
