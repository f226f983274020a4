"""Upgrades keep data: chunk files and Redis values written in the formats of today (disk `LMCDISK1`, Redis
value version 1; docs/reliability.md) are kept as golden files, and every later lmcached must read them back
as the same chunks. A change that cannot read them is a format change: bump the version and keep a reader."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcached.wire.chunk import Chunk
from lmcached.worker.backends import LocalDiskBackend
from lmcached.worker.remote import pack_value, unpack_value

GOLDEN = Path(__file__).parent / "golden"
SHAPE = (2, 2, 16, 8)  # [2, layers, tokens, channels]: 1 KB of fp16, enough to hold every field


def raw_chunk(key: int) -> Chunk:
    values = (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 97 / 13 - 3).astype(np.float16)
    return Chunk(key, SHAPE[2], SHAPE, "float16", values.tobytes())


def expected() -> dict[str, Chunk]:
    """The chunks the golden files hold: raw, compressed with cachegen, and raw again after a lossy codec."""
    from lmcached.worker.storage import decode_chunk, encode_chunk

    raw = raw_chunk(0x1111)
    compressed = encode_chunk(raw_chunk(0x2222), "cachegen")
    decompressed = replace(decode_chunk(encode_chunk(raw_chunk(0x3333), "cachegen")), data=raw_chunk(0x3333).data)
    return {"raw": raw, "cachegen": compressed, "lossy-raw": decompressed}


def disk_name(chunk: Chunk) -> str:
    return f"{chunk.key:016x}{LocalDiskBackend.SUFFIX}"


def write_golden() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, chunk in expected().items():
        scratch = GOLDEN / "scratch"
        LocalDiskBackend(scratch, 1 << 20).put(chunk)
        shutil.move(scratch / disk_name(chunk), GOLDEN / f"disk-LMCDISK1-{name}{LocalDiskBackend.SUFFIX}")
        shutil.rmtree(scratch)
        (GOLDEN / f"redis-v1-{name}.bin").write_bytes(pack_value(chunk))


if os.environ.get("LMCACHED_WRITE_GOLDEN"):  # only when a format version is bumped on purpose
    write_golden()


@pytest.mark.parametrize("name", ["raw", "cachegen", "lossy-raw"])
def test_chunk_files_of_today_read_back(name: str, tmp_path: Path) -> None:
    chunk = expected()[name] if name != "cachegen" else None
    golden = GOLDEN / f"disk-LMCDISK1-{name}{LocalDiskBackend.SUFFIX}"
    key = {"raw": 0x1111, "cachegen": 0x2222, "lossy-raw": 0x3333}[name]
    shutil.copy(golden, tmp_path / f"{key:016x}{LocalDiskBackend.SUFFIX}")
    backend = LocalDiskBackend(tmp_path, 1 << 20)
    assert backend.keys() == [key]  # not dropped as unreadable
    read = backend.get(key)
    assert read is not None
    check(name, read, chunk)


@pytest.mark.parametrize("name", ["raw", "cachegen", "lossy-raw"])
def test_redis_values_of_today_read_back(name: str) -> None:
    key = {"raw": 0x1111, "cachegen": 0x2222, "lossy-raw": 0x3333}[name]
    read = unpack_value((GOLDEN / f"redis-v1-{name}.bin").read_bytes(), key)
    check(name, read, expected()[name] if name != "cachegen" else None)


def check(name: str, read: Chunk, chunk: Chunk | None) -> None:
    if chunk is not None:  # raw values: bit for bit, lineage included
        assert bytes(read.data) == bytes(chunk.data) and replace(read, data=b"") == replace(chunk, data=b"")
        return
    # A cachegen blob decodes (whatever the codec's encoder does today) close to the values it was made from.
    from lmcached.wire.tensors import from_bytes
    from lmcached.worker.storage import decode_chunk

    assert (read.method, read.lossy, read.shape, read.dtype) == ("cachegen", "cachegen", SHAPE, "float16")
    values = from_bytes(decode_chunk(read).data, SHAPE, "float16").float()
    original = torch.from_numpy(np.frombuffer(raw_chunk(0x2222).data, dtype=np.float16).reshape(SHAPE).astype(np.float32))
    assert float((values - original).norm() / original.norm()) < 0.2
