"""Storage backends of a worker: chunks in RAM (LocalCPUBackend) and in a directory (LocalDiskBackend)."""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lmcached.errors import LmcachedError
from lmcached.wire.chunk import CPU, DISK, Chunk, ChunkInfo, MetaEntry

if TYPE_CHECKING:
    from lmcached.worker.arena import Arena

log = logging.getLogger(__name__)

class StoreFull(LmcachedError):
    """A chunk does not fit: the backend is full of pinned chunks, or the chunk exceeds the capacity."""

    http_status = 507


class Backend:
    """Shared bookkeeping: LRU order, pinning, capacity and the statistics the controller shows."""

    name: str = ""
    #: Whether the methods block on I/O (disk, network): the storage then calls them from its executor.
    blocking: bool = False

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        # key -> Chunk.entry; the order is least recently used first.
        self._meta: OrderedDict[int, MetaEntry] = OrderedDict()
        self._pinned: set[int] = set()
        self.used_bytes = 0
        self._lock = threading.RLock()

    def __contains__(self, key: int) -> bool:
        return key in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def keys(self) -> list[int]:
        with self._lock:
            return list(self._meta)

    def info(self, key: int) -> ChunkInfo | None:
        with self._lock:
            entry = self._meta.get(key)
            if entry is None:
                return None
            return ChunkInfo(key, entry[0], entry[1], entry[2], key in self._pinned, entry[3], entry[4])

    def infos(self) -> Iterator[ChunkInfo]:
        for key in self.keys():
            info = self.info(key)
            if info is not None:
                yield info

    def is_pinned(self, key: int) -> bool:
        return key in self._pinned

    def set_pinned(self, key: int, pinned: bool) -> bool:
        """Pin or unpin a stored chunk; False when the chunk is not here."""
        with self._lock:
            if key not in self._meta:
                return False
            if pinned:
                self._pinned.add(key)
            else:
                self._pinned.discard(key)
            return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            compressed = [m for m in self._meta.values() if m[2] is not None]
            return {
                "chunks": len(self._meta),
                "tokens": sum(m[0] for m in self._meta.values()),
                "bytes": self.used_bytes,
                "capacity_bytes": self.capacity_bytes,
                "compressed_chunks": len(compressed),
                "lossy_chunks": sum(1 for m in self._meta.values() if m[4] is not None),
                "pinned_chunks": len(self._pinned),
            }

    def _admit_meta(self, chunk: Chunk) -> list[int]:
        """Record a chunk, evicting least recently used unpinned chunks to fit; returns the evicted keys."""
        if chunk.nbytes > self.capacity_bytes:
            raise StoreFull(f"{self.name}: a {chunk.nbytes}-byte chunk exceeds the capacity of {self.capacity_bytes}")
        old = self._meta.pop(chunk.key, None)
        if old is not None:
            self.used_bytes -= old[1]
        evicted: list[int] = []
        victims = iter(list(self._meta))
        while self.used_bytes + chunk.nbytes > self.capacity_bytes:
            victim = next((k for k in victims if k not in self._pinned), None)
            if victim is None:
                if old is not None:  # put the previous version back untouched
                    self._meta[chunk.key] = old
                    self.used_bytes += old[1]
                raise StoreFull(f"{self.name} is full of pinned chunks ({self.used_bytes} of {self.capacity_bytes} bytes)")
            self._drop(victim)
            evicted.append(victim)
        self._meta[chunk.key] = chunk.entry
        self.used_bytes += chunk.nbytes
        return evicted

    def _forget_meta(self, key: int) -> bool:
        entry = self._meta.pop(key, None)
        if entry is None:
            return False
        self.used_bytes -= entry[1]
        self._pinned.discard(key)
        return True

    def _touch(self, key: int) -> None:
        if key in self._meta:
            self._meta.move_to_end(key)

    # Subclass hooks ---------------------------------------------------------------------------------
    def _drop(self, key: int) -> None:
        """Evict one chunk (metadata and data)."""
        raise NotImplementedError

    def put(self, chunk: Chunk) -> list[int]:
        raise NotImplementedError

    def get(self, key: int) -> Chunk | None:
        raise NotImplementedError

    def remove(self, key: int) -> bool:
        raise NotImplementedError


class LocalCPUBackend(Backend):
    """Chunks in RAM, LRU-evicted past `max_local_cpu_size` except when pinned.

    With an `arena` (lmcached.worker.arena), chunk bytes live in its preallocated shared memory: a chunk received
    straight into an arena block (`reserve`) is kept as it is, any other is copied into one; blocks of chunks
    that leave go back to the arena once no reader holds them."""

    name = CPU

    def __init__(self, capacity_bytes: int, arena: Arena | None = None) -> None:
        super().__init__(capacity_bytes)
        self._data: dict[int, Chunk] = {}
        self.arena = arena

    def reserve(self, nbytes: int) -> tuple[Any | None, list[int]]:
        """An arena block for `nbytes` about to be stored, after evicting what the byte budget says must go
        (least recently used, unpinned); returns (block, evicted keys). The block is None when the arena has no
        free block that large — its free space is fragmented, or held by blocks still being read or written
        behind to disk: the chunk then lives in ordinary memory, which is slower to fill but never fails."""
        assert self.arena is not None
        evicted: list[int] = []
        with self._lock:
            while self.used_bytes + nbytes > self.capacity_bytes:
                victim = next((k for k in self._meta if k not in self._pinned), None)
                if victim is None:
                    break  # full of pinned chunks: _admit_meta says so when the chunk is stored
                self._drop(victim)
                evicted.append(victim)
            return self.arena.alloc(nbytes), evicted

    def put(self, chunk: Chunk) -> list[int]:
        with self._lock:
            evicted: list[int] = []
            if self.arena is not None and not self.arena.owns(chunk.data) and chunk.nbytes:
                # The block first (what it evicts may include this key's older version), then the metadata.
                block, evicted = self.reserve(chunk.nbytes)
                if block is not None:
                    block[:] = np.frombuffer(chunk.data, dtype=np.uint8)
                    chunk = replace(chunk, data=block)
            evicted += self._admit_meta(chunk)
            old = self._data.get(chunk.key)
            if old is not None and old.data is not chunk.data:
                self._release(old)
            self._data[chunk.key] = chunk
            return evicted

    def _release(self, chunk: Chunk) -> None:
        if self.arena is not None:
            self.arena.free(chunk.data)  # type: ignore[arg-type]

    def holds(self, chunk: Chunk) -> bool:
        """Whether this very chunk object is what the backend keeps under its key (its block adopted)."""
        with self._lock:
            return self._data.get(chunk.key) is chunk

    def get(self, key: int) -> Chunk | None:
        with self._lock:
            chunk = self._data.get(key)
            if chunk is not None:
                self._touch(key)
            return chunk

    def replace_if_same(self, old: Chunk, new: Chunk) -> bool:
        """Swap `old` for `new` unless the chunk changed or left meanwhile (compare-and-set for compress)."""
        with self._lock:
            if self._data.get(old.key) is not old:
                return False
            pinned = old.key in self._pinned
            self._forget_meta(old.key)
            self._data.pop(old.key, None)
            try:
                self.put(new)
            except StoreFull:
                self._data[old.key] = old  # put the old version back as it was (its block untouched)
                self._meta[old.key] = old.entry
                self.used_bytes += old.nbytes
                if pinned:
                    self._pinned.add(old.key)
                raise
            self._release(old)
            if pinned:
                self._pinned.add(new.key)
            return True

    def _drop(self, key: int) -> None:
        self._forget_meta(key)
        chunk = self._data.pop(key, None)
        if chunk is not None:
            self._release(chunk)

    def remove(self, key: int) -> bool:
        with self._lock:
            chunk = self._data.pop(key, None)
            if chunk is not None:
                self._release(chunk)
            return self._forget_meta(key)


_DISK_MAGIC = b"LMCDISK1"
_DISK_HEAD = struct.Struct("<8sI")
_CHECKSUM_BYTES = 16


class CorruptChunkFile(LmcachedError):
    """A chunk file on disk failed its checksum or could not be parsed; it is dropped, never served."""


class LocalDiskBackend(Backend):
    """Chunks as files in a directory: atomic writes (temp, fsync, rename) with a checksum verified on read.

    The directory survives restarts: on start the backend re-reads every file's metadata. Call its methods
    from the worker's executor, never from the event loop: they do disk I/O.
    """

    name = DISK
    blocking = True
    SUFFIX = ".kv"

    def __init__(self, directory: Path, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.directory = directory
        # KV reveals the prompts it was computed from: a directory made here is the owner's alone (0700), and so
        # is every chunk file (0600). A directory that already exists keeps the mode its operator gave it.
        if not directory.exists():
            directory.mkdir(parents=True)
            directory.chmod(0o700)
        self.dropped_corrupt: list[int] = []
        self._scan()

    def _path(self, key: int) -> Path:
        return self.directory / f"{key:016x}{self.SUFFIX}"

    def _scan(self) -> None:
        for tmp in self.directory.glob("*.tmp"):  # a write that died before its rename
            tmp.unlink(missing_ok=True)
        files = sorted(self.directory.glob(f"*{self.SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                meta = self._read_meta(path)
                key, entry = int(meta["key"]), Chunk.entry_from_meta(meta)
                if key != int(path.stem, 16):
                    raise CorruptChunkFile(f"{path.name}: key in file does not match its name")
                self._meta[key] = entry
                self.used_bytes += entry[1]
                if meta.get("pinned"):
                    self._pinned.add(key)
            except (CorruptChunkFile, OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable chunk file %s: %s", path, exc)
                path.unlink(missing_ok=True)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        with path.open("rb") as f:
            head = f.read(_DISK_HEAD.size)
            if len(head) < _DISK_HEAD.size:
                raise CorruptChunkFile(f"{path.name}: truncated header")
            magic, meta_len = _DISK_HEAD.unpack(head)
            if magic != _DISK_MAGIC or meta_len > 1 << 20:
                raise CorruptChunkFile(f"{path.name}: not an lmcached chunk file")
            meta = orjson.loads(f.read(meta_len))
        if not isinstance(meta, dict):
            raise CorruptChunkFile(f"{path.name}: metadata is not an object")
        return meta

    def _write(self, chunk: Chunk, pinned: bool) -> None:
        meta = orjson.dumps({**chunk.meta(), "pinned": pinned})
        checksum = hashlib.blake2b(meta, digest_size=_CHECKSUM_BYTES)
        checksum.update(chunk.data)
        path = self._path(chunk.key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(_DISK_HEAD.pack(_DISK_MAGIC, len(meta)))
            f.write(meta)
            f.write(chunk.data)
            f.write(checksum.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put(self, chunk: Chunk) -> list[int]:
        with self._lock:
            pinned = chunk.key in self._pinned
            evicted = self._admit_meta(chunk)
            try:
                self._write(chunk, pinned)
            except OSError:
                self._forget_meta(chunk.key)
                raise
            return evicted

    def get(self, key: int) -> Chunk | None:
        with self._lock:
            if key not in self._meta:
                return None
            path = self._path(key)
            try:
                raw = path.read_bytes()
                chunk = self._parse(raw, path.name)
            except (OSError, CorruptChunkFile) as exc:
                log.error("chunk %016x on disk is unreadable, dropping it: %s", key, exc)
                self.dropped_corrupt.append(key)
                self._forget_meta(key)
                path.unlink(missing_ok=True)
                return None
            self._touch(key)
            return chunk

    @staticmethod
    def _parse(raw: bytes, name: str) -> Chunk:
        if len(raw) < _DISK_HEAD.size + _CHECKSUM_BYTES:
            raise CorruptChunkFile(f"{name}: truncated")
        magic, meta_len = _DISK_HEAD.unpack_from(raw)
        body_end = len(raw) - _CHECKSUM_BYTES
        meta_end = _DISK_HEAD.size + meta_len
        if magic != _DISK_MAGIC or meta_end > body_end:
            raise CorruptChunkFile(f"{name}: bad header")
        view = memoryview(raw)
        checksum = hashlib.blake2b(view[_DISK_HEAD.size : meta_end], digest_size=_CHECKSUM_BYTES)
        checksum.update(view[meta_end:body_end])
        if checksum.digest() != raw[body_end:]:
            raise CorruptChunkFile(f"{name}: checksum mismatch")
        try:
            meta = orjson.loads(view[_DISK_HEAD.size : meta_end])
            return Chunk.from_meta(meta, bytes(view[meta_end:body_end]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptChunkFile(f"{name}: bad metadata ({exc})") from None

    def set_pinned(self, key: int, pinned: bool) -> bool:
        with self._lock:
            if not super().set_pinned(key, pinned):
                return False
            # Pinning survives a restart: rewrite the file with the new flag.
            chunk = self.get(key)
            if chunk is not None:
                self._write(chunk, pinned)
            return chunk is not None

    def replace_if_same(self, old: Chunk, new: Chunk) -> bool:
        """Swap in a new version unless the chunk changed on disk meanwhile; the file swap is atomic."""
        with self._lock:
            current = self._meta.get(old.key)
            if current is None or current[1:3] != (old.nbytes, old.method):
                return False
            pinned = old.key in self._pinned
            self._forget_meta(old.key)
            if pinned:
                self._pinned.add(old.key)
            try:
                self.put(new)
            except (StoreFull, OSError):
                self._meta[old.key] = old.entry
                self.used_bytes += old.nbytes
                raise
            return True

    def _drop(self, key: int) -> None:
        self._forget_meta(key)
        self._path(key).unlink(missing_ok=True)

    def remove(self, key: int) -> bool:
        with self._lock:
            if not self._forget_meta(key):
                return False
            self._path(key).unlink(missing_ok=True)
            return True
