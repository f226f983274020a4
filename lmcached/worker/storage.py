"""A worker's storage role: its backends (RAM, disk written behind RAM, the shared remote tier written through
after RAM), what they hold, and the commands the controller runs on them (compress, decompress, pin, unpin,
clear, move). No sockets of its own: the data plane and the controller link (or an engine hosting an instance
in its own process) drive it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from lmcached.config import Config
from lmcached.errors import ConfigError, InvalidRequest, LmcachedError, MissingCodebook, NotFound, ProtocolError
from lmcached.wire.chunk import CPU, DISK, ITEMSIZE, REMOTE, Chunk, ChunkInfo, check_location
from lmcached.wire.kv_events import Lineage
from lmcached.wire.sockio import within
from lmcached.wire.usage import Usage
from lmcached.worker.arena import Arena
from lmcached.worker.backends import Backend, LocalCPUBackend, LocalDiskBackend, StoreFull
from lmcached.worker.codebooks import Codebooks
from lmcached.worker.commands import REMOTE_FLUSH_TIMEOUT_S, StorageCommands
from lmcached.worker.kv_events import KVEventPublisher
from lmcached.worker.lineage import ChunkSink, LineageBook
from lmcached.worker.memory import capacity_warning, machine_memory, prefault_bytes
from lmcached.worker.remote import RemoteBackend, RemoteError
from lmcached.worker.write_behind import WriteBehind

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Disk writes queued behind RAM are bounded to this many bytes; a store waits when they reach it.
WRITE_BEHIND_BYTES = 512 * 1024 * 1024
DISK_DRAIN_TIMEOUT_S = 30.0
#: How often the remote tier's evicted/expired notifications are passed on to the controller.
REMOTE_EVENTS_S = 0.25
#: Threads for remote-tier calls (write-through, scans, engines' lookups and retrieves).
REMOTE_THREADS = 4
#: A retrieve from the remote tier gets remote_timeout_s plus its bytes at this rate before it counts as a miss.
REMOTE_MIN_BYTES_PER_S = 100e6



class KeyedLocks:
    """An asyncio lock per key, made on first use and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def codec_device(setting: str) -> str:
    """The device a worker's codecs run on for the `codec_device` setting: "cuda" or "cpu"."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("codec_device is cuda, but torch sees no CUDA device (use auto or cpu)", "codec_device")
    return setting


def encode_chunk(
    chunk: Chunk, method: str, quality: int | None = None, codebooks: Codebooks | None = None, device: str = "cpu"
) -> Chunk:
    """Compress a raw chunk with a codec (runs in the executor); `quality` tunes cachegen (1 … 9); kvtc writes
    with the current codebook of the chunk's shape in `codebooks`. On `device` "cuda" the chunk is copied to the
    GPU and coded there (the same blob format)."""
    from lmcached.codecs import get_codec
    from lmcached.wire.tensors import from_bytes

    kv = from_bytes(chunk.data, chunk.shape, chunk.dtype)
    if device != "cpu":
        kv = kv.to(device)
    if method == "kvtc":
        book = codebooks.current(chunk.shape[1], chunk.shape[3]) if codebooks is not None else None
        if book is None or codebooks is None:
            raise InvalidRequest(f"no kvtc codebook for {chunk.shape[1]} layers × {chunk.shape[3]} channels (run lmcached calibrate)")
        codec = get_codec("kvtc", codebook=book, store=codebooks.store)
    else:
        codec = get_codec(method) if quality is None else get_codec(method, quality=quality)
    return replace(chunk, data=codec.encode(kv), method=method, lossy=lineage(chunk.lossy, method))


def lineage(lossy: str | None, method: str) -> str | None:
    """The lossy codecs a chunk's values have been through once `method` has encoded them."""
    from lmcached.codecs import LOSSY

    if method not in LOSSY:
        return lossy
    return method if lossy is None else f"{lossy}+{method}"


def decode_chunk(chunk: Chunk, codebooks: Codebooks | None = None, device: str = "cpu") -> Chunk:
    """Turn a compressed chunk back into raw bytes (runs in the executor); kvtc blobs find their codebook in
    `codebooks`. On `device` "cuda" the blob is decoded on the GPU and the values copied back."""
    from lmcached.codecs import get_codec
    from lmcached.wire.tensors import byte_view, dtype_name

    assert chunk.method is not None
    codec = get_codec("kvtc", store=codebooks.store) if chunk.method == "kvtc" and codebooks is not None else get_codec(chunk.method)
    kv = codec.decode(chunk.data, device=None if device == "cpu" else device).cpu()
    if tuple(kv.shape) != chunk.shape or dtype_name(kv.dtype) != chunk.dtype:
        raise LmcachedError(f"chunk {chunk.key:016x} decoded to {list(kv.shape)} {kv.dtype}, expected {chunk.shape}")
    return replace(chunk, data=bytes(byte_view(kv)), method=None)


def raw_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is None:
        raise ProtocolError(f"unsupported KV dtype {dtype!r}")
    return math.prod(shape) * itemsize


class Storage(StorageCommands):
    """The chunks of one instance, in its backends, and every change to them (for whoever reports them); the
    controller's commands on them are StorageCommands'."""

    def __init__(self, config: Config, instance_id: str, executor: Executor | None = None) -> None:
        self.config = config
        self.instance_id = instance_id
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="lmcached")
        self.backends: dict[str, Backend] = {}
        #: The RAM tier's preallocated shared memory (None without a RAM tier).
        self.arena: Arena | None = None
        if config.local_cpu:
            self.arena = Arena(config.max_local_cpu_bytes) if config.max_local_cpu_bytes > 0 else None
            self.backends[CPU] = LocalCPUBackend(config.max_local_cpu_bytes, self.arena)
        #: (location, key) -> the chunk's state there now, None when it left; drained by the controller link, and
        #: kept only while there is one (`report_changes`): without a controller nothing drains it, and a daemon
        #: storing ever new prompts would keep an entry for every chunk it ever held.
        self.changes: dict[tuple[str, int], ChunkInfo | None] = {}
        self.report_changes = False
        self.changed = asyncio.Event()
        #: Awaited after each store, so the controller sees chunks as soon as they land (the link sets it).
        self.after_store: Callable[[], Awaitable[None]] | None = None
        # Tiers written behind RAM: a store returns once RAM holds the chunks and the disk copy follows in order
        # (an fsync per chunk made stores 5x slower: 0.33 vs 1.6 GB/s, measured); so does the remote copy.
        self._behind: dict[str, WriteBehind] = {}
        self._remote_task: asyncio.Task[None] | None = None
        self._remote_pool: ThreadPoolExecutor | None = None
        # kvtc codebooks live as long as the chunks that name them: beside the disk tier's files, else in RAM.
        disk = config.local_disk_path
        self.codebooks = Codebooks(disk / "codebooks" if disk is not None else None)
        self._learning = asyncio.Lock()  # one codebook learned at a time (two compresses of a new shape: one fit)
        self._transforming = KeyedLocks()  # (location, key) of chunks being compressed or decompressed
        #: stage id -> (location, [(chunk, its re-encoding)]) kept for a commit (see _transform).
        self._staged: dict[str, tuple[str, list[tuple[Chunk, Chunk]]]] = {}
        #: Where compress and decompress run ("cuda" or "cpu"), settled when the storage opens.
        self.codec_device = "cpu"
        #: What engines asked of this instance and what it did for them (sent with every heartbeat).
        self.usage = Usage()
        #: The tiers' KV events for routers (kv_events in the config), started when the storage opens.
        self.kv_events_settings = config.kv_events_settings
        self.kv_events: KVEventPublisher | None = None
        #: Each chunk's tokens, for whoever names chunks by them (the KV events, an LMCache controller): None
        #: when nobody does, and clients are not asked to send them.
        self.lineage: LineageBook | None = None

    # ---------------------------------------------------------------- lifecycle
    async def open(self) -> None:
        """Open the disk backend and the remote tier (when configured) and start writing behind RAM.
        RemoteError when the remote tier is configured but unusable (unreachable, wrong password, not Redis)."""
        config = self.config
        self.codec_device = codec_device(config.codec_device)
        memory = machine_memory()
        if CPU in self.backends and (warning := capacity_warning(config.max_local_cpu_bytes, memory)):
            log.warning("%s", warning)
        if self.arena is not None:  # like LMCache's pinned allocator: the RAM tier is there before we say ready
            await self.run(self.arena.prefault, prefault_bytes(config.max_local_cpu_bytes, config.local_cpu_prefault, memory))
        disk = config.local_disk_path
        if disk is not None:
            self.backends[DISK] = await self.run(LocalDiskBackend, disk, config.max_local_disk_bytes)
        if config.remote is not None:
            # The remote tier's calls get threads of their own: a Redis that stops answering must not take the
            # threads the disk and the codecs need.
            self._remote_pool = ThreadPoolExecutor(max_workers=REMOTE_THREADS, thread_name_prefix="lmcached-remote")
            remote = await self.run_remote(RemoteBackend, config.remote, config.remote_namespace, config.remote_ttl_s)
            self.backends[REMOTE] = remote
            self.codebooks.fetch = remote.get_codebook  # a kvtc blob from another worker names its codebook
            await self.run_remote(remote.reconcile)  # what the tier already holds (other workers, earlier runs)
            remote.start_listener()
            self._remote_task = asyncio.create_task(self._follow_remote(remote), name="remote-tier-events")
        if not self.backends:
            raise InvalidRequest("the worker has no storage: enable local_cpu or set local_disk")
        settings = self.kv_events_settings
        if settings is not None:
            self.kv_events = KVEventPublisher(settings, config.chunk_size, self.remote_tier)
            await self.run(self.kv_events.start)
            self.add_sink(self.kv_events)
        if CPU in self.backends:
            if DISK in self.backends:
                self._behind[DISK] = WriteBehind(DISK, self._put_disk_batch, WRITE_BEHIND_BYTES)
            if REMOTE in self.backends:
                self._behind[REMOTE] = WriteBehind(
                    REMOTE,
                    self._put_remote,
                    int(config.remote_write_queue_size * 1024**3),
                    when_full="drop",
                    is_outage=lambda exc: isinstance(exc, RemoteError),
                )
            for queue in self._behind.values():
                queue.start()

    async def close(self) -> None:
        for tier, queue in self._behind.items():  # what RAM already holds reaches the other tiers before we go
            await queue.close(DISK_DRAIN_TIMEOUT_S if tier == DISK else REMOTE_FLUSH_TIMEOUT_S)
        if self._remote_task is not None:
            self._remote_task.cancel()
            await asyncio.gather(self._remote_task, return_exceptions=True)
        remote = self.backends.get(REMOTE)
        if isinstance(remote, RemoteBackend):
            await self.run_remote(remote.close)
        if self._remote_pool is not None:
            self._remote_pool.shutdown(wait=False, cancel_futures=True)
        if self.kv_events is not None:
            await self.run(self.kv_events.close)
        if self._own_executor:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.arena is not None:
            self.arena.close()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking work (disk, network, codecs) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_remote(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """A remote-tier call on the remote tier's threads. With a `deadline` (an engine is waiting), no answer in
        time is a RemoteError and the tier counts as down until a background call finds it back."""
        assert self._remote_pool is not None
        future = asyncio.get_running_loop().run_in_executor(self._remote_pool, fn, *args)
        if deadline is None:
            return await future
        try:
            return await within(asyncio.shield(future), deadline)
        except asyncio.TimeoutError:
            remote = self.backends.get(REMOTE)
            if isinstance(remote, RemoteBackend):
                remote.mark_down(f"no answer within {deadline:g} s")
            raise RemoteError(f"the remote tier did not answer within {deadline:g} s") from None

    async def _call(self, backend: Backend, fn: Callable[..., T], *args: Any) -> T:
        """A backend method: on the remote tier's threads, in the executor when the backend blocks (disk), else
        right here."""
        if isinstance(backend, RemoteBackend):
            return await self.run_remote(fn, *args)
        return await self.run(fn, *args) if backend.blocking else fn(*args)

    async def _follow_remote(self, remote: RemoteBackend) -> None:
        """Tell the controller what the remote tier did on its own: keys Redis evicted or expired (from its
        notifications, at once), other workers' chunks this worker met on a read-through or a lookup (at once)
        and, every remote_scan_interval, what a full scan finds (other workers' writes, pins, anything missed)."""
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self.config.remote_scan_interval
        while True:
            await asyncio.sleep(REMOTE_EVENTS_S)
            changed = remote.take_changed()
            if loop.time() >= next_scan:
                next_scan = loop.time() + self.config.remote_scan_interval
                try:
                    added, gone = await self.run_remote(remote.reconcile)
                    changed |= added | gone
                except RemoteError:
                    pass  # shown as down in the stats; retried at the next scan
                except Exception:
                    log.exception("remote tier scan failed")
            for key in changed:
                self._note(REMOTE, key)

    # ---------------------------------------------------------------- storage
    def _note(self, location: str, key: int) -> None:
        """Record a chunk's current state at `location` (None when it left), for the next report."""
        info = self.backends[location].info(key)
        if self.report_changes:
            self.changes[(location, key)] = info
            self.changed.set()
        if self.lineage is not None:
            self.lineage.note(location, key, info is not None)

    def add_sink(self, sink: ChunkSink) -> None:
        """Tell `sink` of every chunk stored from now on, with its tokens, and of every one that leaves a tier."""
        if self.lineage is None:
            self.lineage = LineageBook([sink])
        else:
            self.lineage.sinks.append(sink)

    def learn_lineage(self, metas: list[dict[str, Any]]) -> None:
        """The tokens and parents a client sent with chunks it stores, for their KV events."""
        if self.lineage is None:
            return
        for meta in metas:
            lineage = Lineage.from_meta(meta)
            if lineage is not None:
                self.lineage.learn(meta["key"], lineage)

    def learn_lineages(self, lineages: dict[int, Lineage]) -> None:
        """learn_lineage for an engine in this process (no metadata on the way: it calls store() directly)."""
        if self.lineage is not None:
            for key, lineage in lineages.items():
                self.lineage.learn(key, lineage)

    @property
    def remote_tier(self) -> str | None:
        remote = self.backends.get(REMOTE)
        return remote.tier_id if isinstance(remote, RemoteBackend) else None

    def backend(self, location: str) -> Backend:
        check_location(location)
        try:
            return self.backends[location]
        except KeyError:
            raise NotFound(f"instance {self.instance_id} has no {location} (enable it in the config)") from None

    async def _put_disk_batch(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            await self._put(DISK, chunk)

    async def _put_remote(self, chunks: list[Chunk]) -> None:
        """Chunks into the remote tier together (encoded first with remote_serde: compressed at rest and on the wire)."""
        remote = self.backends[REMOTE]
        assert isinstance(remote, RemoteBackend)
        serde = self.config.remote_serde
        if serde != "naive":
            chunks = list(await asyncio.gather(*(self.run(self.encode, c, serde) if c.method is None else _done(c) for c in chunks)))
        await self._codebooks_to_remote(remote, chunks)
        await self.run_remote(remote.put_many, chunks)
        for chunk in chunks:
            self._note(REMOTE, chunk.key)

    async def _kvtc_codebooks(self, chunks: list[Chunk]) -> list[str]:
        return await self.run(kvtc_codebooks, chunks) if any(c.method == "kvtc" for c in chunks) else []

    async def _codebooks_to_remote(self, remote: RemoteBackend, chunks: list[Chunk]) -> None:
        """The codebooks of the kvtc chunks among `chunks` into the remote tier (before the chunks: a worker that
        reads one there finds its codebook beside it)."""
        for digest in await self._kvtc_codebooks(chunks):
            await self.run_remote(remote.put_codebook, digest, lambda d=digest: self._codebook_bytes(d))

    def _codebook_bytes(self, digest: str) -> bytes:
        """A codebook's bytes, to send (blocking: it may be read from disk and is megabytes)."""
        return self.codebooks.get(digest).to_bytes()

    async def _put(self, location: str, chunk: Chunk) -> None:
        if location == REMOTE:
            await self._put_remote([chunk])
            return
        backend = self.backends[location]
        evicted = await self._call(backend, backend.put, chunk)
        self._evicted(location, evicted)
        self._note(location, chunk.key)

    def _evicted(self, location: str, keys: list[int]) -> None:
        for key in keys:
            self._note(location, key)
        if keys:
            self.usage.add("evictions", len(keys), tier=location)

    async def store(self, chunks: list[Chunk], location: str | None = None) -> int:
        """Admit chunks; with no location, to RAM, then (written behind RAM, in order) disk and the remote tier,
        as LMCache does. Returns tokens stored."""
        with self.usage.timed("store"):
            stored = await self._store(chunks, location)
        self.usage.add("stores")
        self.usage.add("store_chunks", len(chunks))
        self.usage.add("store_tokens", stored)
        self.usage.add("store_bytes", sum(len(c.data) for c in chunks))
        return stored

    async def _store(self, chunks: list[Chunk], location: str | None) -> int:
        locations = [location] if location else list(self.backends)
        for loc in locations:
            self.backend(loc)
        for digest in await self._kvtc_codebooks(chunks):
            # A blob this worker could not decode is never stored: its codebook comes first (a /move sends it).
            if await self.run(self.codebooks.find, digest) is None:
                raise InvalidRequest(f"kvtc chunks need codebook {digest}, which this worker does not have: send it first")
        if location == REMOTE:  # straight into the remote tier (a move, a bench): one batch
            await self._put_remote(chunks)
            locations = []
        stored = 0
        for chunk in chunks:
            for loc in locations:
                queue = self._behind.get(loc) if location is None else None
                if queue is not None:
                    await queue.submit(chunk)
                else:
                    await self._put(loc, chunk)
            stored += chunk.num_tokens
        if self.after_store is not None:
            await self.after_store()
        return stored

    def reserve(self, nbytes: int) -> Any | None:
        """An arena block to receive a chunk for the RAM tier into (evictions it needed are reported), or None
        without an arena. The caller frees it (`release_unkept`) if the chunk is not stored after all."""
        cpu = self.backends.get(CPU)
        if not isinstance(cpu, LocalCPUBackend) or cpu.arena is None:
            return None
        block, evicted = cpu.reserve(nbytes)
        self._evicted(CPU, evicted)
        return block

    def release_unkept(self, chunks: list[Chunk]) -> None:
        """Give back the arena blocks of received chunks the RAM tier did not keep (a failed or disk-only store)."""
        cpu = self.backends.get(CPU)
        if isinstance(cpu, LocalCPUBackend) and cpu.arena is not None:
            for chunk in chunks:
                if cpu.arena.owns(chunk.data) and not cpu.holds(chunk):
                    cpu.arena.free(chunk.data)  # type: ignore[arg-type]

    async def flush_disk(self) -> None:
        """Wait until every queued disk write has landed (before any command touches the disk)."""
        if DISK in self._behind:
            await self._behind[DISK].drain()

    async def flush_behind(self, timeout: float | None = None) -> bool:
        """Wait until queued disk and remote writes have landed; False if `timeout` passed first."""
        results = [await queue.drain(timeout) for queue in self._behind.values()]
        return all(results)

    async def _get(self, location: str, key: int) -> Chunk | None:
        backend = self.backends[location]
        try:
            chunk = await self._call(backend, backend.get, key)
        except RemoteError:
            return None  # the tier is down: a clean miss
        if chunk is None and key in getattr(backend, "dropped_corrupt", ()):
            self._note(location, key)
        return chunk

    async def _remote_fetch(self, keys: list[int]) -> dict[int, Chunk]:
        """The remote tier's chunks among `keys`, in one round trip; nothing when it is down."""
        remote = self.backends[REMOTE]
        assert isinstance(remote, RemoteBackend)
        # The deadline grows with what the mirror says the values weigh: a big prompt is not a slow tier.
        expected = sum(info.nbytes for info in map(remote.info, keys) if info is not None)
        deadline = self.config.remote_timeout_s + expected / REMOTE_MIN_BYTES_PER_S
        try:
            chunks = await self.run_remote(remote.get_many, keys, deadline=deadline)
        except RemoteError:
            return {}
        return {c.key: c for c in chunks if c is not None}

    async def prefix(self, keys: list[int]) -> list[tuple[str, Chunk]]:
        """The stored chunks of the longest cached prefix of `keys`, each with the tier it came from: RAM first,
        then disk, then the remote tier (the keys no local tier holds, fetched together; with remote_keep_local,
        kept in RAM too)."""
        local = [(loc, b) for loc, b in self.backends.items() if loc != REMOTE]
        found: list[tuple[str, Chunk]] = []
        from_remote: dict[int, Chunk] | None = None
        for i, key in enumerate(keys):
            chunk = None
            for location, backend in local:
                if key in backend:
                    chunk = await self._get(location, key)
                    if chunk is not None:
                        break
            if chunk is None and REMOTE in self.backends:
                if from_remote is None:
                    from_remote = await self._remote_fetch(keys[i:])
                chunk, location = from_remote.get(key), REMOTE
                if chunk is not None and CPU in self.backends and self.config.remote_keep_local:
                    await self._keep_in_ram(chunk)
            if chunk is None:
                break
            found.append((location, chunk))
        return found

    async def _keep_in_ram(self, chunk: Chunk) -> None:
        for digest in await self._kvtc_codebooks([chunk]):
            if await self.run(self.codebooks.find, digest) is None:
                return  # undecodable here (its codebook is gone): not kept, and the retrieve ends at it
        try:
            await self._put(CPU, chunk)
        except StoreFull:
            pass  # RAM is full of pinned chunks: serve it without keeping a copy

    async def lookup(self, keys: list[int], engine: bool = True, then: list[int] | None = None) -> int:
        """Tokens of the longest prefix of `keys` held here: local tiers first, then one batched existence
        check in the remote tier for the rest. `engine` False for a store's own check of what is held already,
        which is not counted as a lookup. `then`: where all of `keys` are held, keys that may follow them, best
        first (wire.chunks.continuation_spans: a shorter prompt's partial last chunk); the first one held in a
        local tier extends the prefix (the remote tier is not asked: one round trip per candidate). `then`
        without `keys` carries on a lookup already made and counted (KVClient.lookup's `continued`): only what
        it asks and finds is counted."""
        with self.usage.timed("lookup") if engine else contextlib.nullcontext():
            infos = await self._held(keys)
            if then and len(infos) == len(keys):
                tail = next((info for key in then if (info := self._local_info(key)) is not None), None)
                if tail is not None:
                    infos.append(tail)
                    if engine:
                        self.usage.add("lookup_tails_found")
        tokens = sum(i.num_tokens for i in infos)
        if engine:
            if keys or not then:
                self.usage.add("lookups")
            self.usage.add("lookup_chunks_asked", len(keys) + (1 if then else 0))
            self.usage.add("lookup_chunks_found", len(infos))
            self.usage.add("lookup_tokens_found", tokens)
        return tokens

    def _local_info(self, key: int) -> ChunkInfo | None:
        return next((b.info(key) for loc, b in self.backends.items() if loc != REMOTE and key in b), None)

    async def _held(self, keys: list[int]) -> list[ChunkInfo]:
        """What is known of the chunks of the longest prefix of `keys` held here."""
        held: list[ChunkInfo] = []
        for i, key in enumerate(keys):
            info = self._local_info(key)
            if info is None:
                return held + await self._remote_held(keys[i:])
            held.append(info)
        return held

    async def _remote_held(self, keys: list[int]) -> list[ChunkInfo]:
        remote = self.backends.get(REMOTE)
        if not isinstance(remote, RemoteBackend) or not keys:
            return []
        try:
            infos = await self.run_remote(remote.peek_many, keys, deadline=self.config.remote_timeout_s)
        except RemoteError:
            return []
        held: list[ChunkInfo] = []
        for info in infos:
            if info is None:
                break
            held.append(info)
        return held

    async def retrieve(self, keys: list[int]) -> list[Chunk]:
        """The cached prefix as raw chunks, decoding compressed ones off the event loop. A kvtc chunk whose
        codebook is nowhere to be found (evicted from Redis, say) ends the prefix there: a miss, not an error."""
        with self.usage.timed("retrieve"):
            located = await self.prefix(keys)
            decoded = await asyncio.gather(*(self.run(self.decode, c) if c.method else _done(c) for _, c in located), return_exceptions=True)
        out: list[Chunk] = []
        for (location, chunk), result in zip(located, decoded, strict=True):
            if isinstance(result, MissingCodebook):
                log.warning("chunk %016x cannot be decoded (%s): served as a miss from there", chunk.key, result)
                break
            if isinstance(result, BaseException):
                raise result
            out.append(result)
            self.usage.add("retrieve_chunks_found", tier=location)
        self.usage.add("retrieves")
        self.usage.add("retrieve_chunks_asked", len(keys))
        self.usage.add("retrieve_tokens_found", sum(c.num_tokens for c in out))
        self.usage.add("retrieve_bytes", sum(len(c.data) for c in out))
        return out

    def encode(self, chunk: Chunk, method: str, quality: int | None = None) -> Chunk:
        """`encode_chunk` with this worker's codebooks and device, its time counted (runs in the executor)."""
        started = time.perf_counter()
        encoded = encode_chunk(chunk, method, quality, self.codebooks, self.codec_device)
        self.usage.codec(method, "encode", time.perf_counter() - started, len(chunk.data))
        return encoded

    def decode(self, chunk: Chunk) -> Chunk:
        """`decode_chunk` with this worker's codebooks and device, its time counted (runs in the executor)."""
        assert chunk.method is not None
        started = time.perf_counter()
        decoded = decode_chunk(chunk, self.codebooks, self.codec_device)
        self.usage.codec(chunk.method, "decode", time.perf_counter() - started, len(decoded.data))
        return decoded

    def stats(self) -> dict[str, dict[str, Any]]:
        out = {name: b.stats() for name, b in self.backends.items()}
        for tier, queue in self._behind.items():
            out[tier] |= {"write_queue_bytes": queue.pending_bytes, "write_queue_dropped": queue.dropped}
        return out


async def _done(value: T) -> T:
    return value


def kvtc_codebooks(chunks: list[Chunk]) -> list[str]:
    """The codebooks the kvtc chunks among `chunks` name (each blob is verified on the way: blocking)."""
    from lmcached.codecs.kvtc import codebook_of

    return sorted({codebook_of(c.data) for c in chunks if c.method == "kvtc"})
