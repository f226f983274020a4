"""The shared remote tier: chunks in Redis (standalone or Redis Cluster), reachable by every worker that points
at the same Redis.

One Redis string per chunk, `<namespace>:kv:<key hex>`, holding a small header and the payload (values.py), so a
chunk costs one round trip and a prompt's N chunks one pipelined MGET (cluster: one batch per node). A reader checks the checksum (and the payload's length against the meta) before anything is returned, so a
corrupted value is a clean miss (and is deleted), never garbage KV. CRC-32 because it runs at ~5 GB/s
here against blake2b's ~1 GB/s, which halved the tier's throughput beside plain redis-py; it guards against
damage, not against someone who can write to the Redis (they could write any value).

Unpinned chunks carry a TTL (`remote_ttl_s`) and the documented Redis policy is `volatile-lru`: Redis evicts
only unpinned chunks; a pin PERSISTs the key, an unpin restores the TTL.

The backend keeps a mirror of what the tier holds (key -> size, method, pinned) so the controller's index can be
told; the mirror follows this worker's own writes, Redis's keyspace notifications for evicted and expired keys,
and a periodic reconciliation scan that also finds other workers' writes. Every method here blocks on the
network: call them from the worker's executor, never from the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmcached.wire.chunk import REMOTE, Chunk, ChunkInfo, MetaEntry
from lmcached.wire.redis_url import RemoteURL
from lmcached.worker.backends import Backend
from lmcached.worker.remote.connection import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, connect, is_down
from lmcached.worker.remote.errors import CorruptRemoteValue, RemoteError
from lmcached.worker.remote.evictions import EvictionListener
from lmcached.worker.remote.scripts import DELETE_IF_SAME, SWAP_IF_SAME
from lmcached.worker.remote.values import HEADER_PEEK, entry_from_head, pack_value, set_command, unpack_or_error, value_parts

log = logging.getLogger(__name__)

#: While the tier is down, calls fail at once; one of them is let through this often to see if it is back.
_PROBE_S = 1.0
#: Threads that check values' checksums after a multi-chunk read.
_VERIFY_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="lmcached-verify")


class RemoteBackend(Backend):
    """Chunks in a shared Redis. Capacity is Redis's own (`maxmemory`); it evicts, not this class."""

    name = REMOTE
    blocking = True

    def __init__(self, url: RemoteURL, namespace: str = "lmcached", ttl_s: float = 86400.0) -> None:
        super().__init__(capacity_bytes=0)
        self.url = url
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.client = connect(url)
        self.up = True
        self._last_probe = 0.0
        self._probing = False
        self._probe_lock = threading.Lock()
        self.hits = self.misses = 0
        self.dropped_corrupt: list[int] = []
        # Keys whose state this worker learned other than by its own writes, for the storage to report: gone
        # (evicted, expired, deleted by someone) or found (another worker's chunk, met on a read or a lookup).
        self._changed: set[int] = set()
        self._changed_lock = threading.Lock()
        self._swap = self.client.register_script(SWAP_IF_SAME)
        self._delete_if_same = self.client.register_script(DELETE_IF_SAME)
        self._prefix = f"{namespace}:kv:"
        self.tier_id = self._tier_identity()
        self.capacity_bytes = self._maxmemory()
        self._evictions = EvictionListener(url, self._primaries, self._gone)
        # What this worker changed in the mirror, and when (a counter): a scan that began before a change saw
        # the tier as it was then, so it must not undo the change (an unpin re-pinned by a stale scan, a chunk
        # written during the scan forgotten as gone).
        self._epoch = 0
        self._touched: dict[int, int] = {}

    # ---------------------------------------------------------------- identity and set-up
    def _tier_identity(self) -> str:
        """Every worker that reaches this Redis and namespace reads the same id (first one to ask creates it),
        however it spells the address: the controller's index holds the tier's chunks once under it."""
        key = f"{self.namespace}:tier-id"
        self.client.set(key, uuid.uuid4().hex, nx=True)
        value = self.client.get(key)
        return f"{self.namespace}@{value.decode() if isinstance(value, bytes) else value}"

    def _primaries(self) -> list[Any]:
        """Plain clients for each primary (one for standalone Redis): scans and notifications are per node."""
        import redis

        if not self.url.cluster:
            return [self.client]
        common = {"username": self.url.username, "password": self.url.password, **self.url.tls_options}
        return [
            redis.Redis(host=n.host, port=n.port, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S, **common)
            for n in self.client.get_primaries()
        ]

    def _maxmemory(self) -> int:
        total = 0
        try:
            for node in self._primaries():
                total += int(node.config_get("maxmemory").get("maxmemory", 0))
        except Exception as exc:  # managed Redis often refuses CONFIG: capacity is then unknown (0)
            log.info("remote tier %s: cannot read maxmemory (%s)", self.url.display, exc)
        return total

    def _rkey(self, key: int) -> str:
        return f"{self._prefix}{key:016x}"

    def _key_of(self, rkey: bytes | str) -> int | None:
        text = rkey.decode() if isinstance(rkey, bytes) else rkey
        if not text.startswith(self._prefix):
            return None
        try:
            return int(text[len(self._prefix) :], 16)
        except ValueError:
            return None

    def mark_down(self, why: str) -> None:
        """Count the tier as down (a caller gave up waiting): calls fail fast until a probe finds it back."""
        if self.up:
            log.warning("remote tier %s is down: %s", self.url.display, why)
        self._last_probe = time.monotonic()
        self.up = False

    def _mark(self, ok: bool) -> None:
        if ok != self.up:
            log.warning("remote tier %s is %s", self.url.display, "back up" if ok else "down")
        self.up = ok

    def _call(self, fn: Any, *args: Any, probe: bool = True, **kwargs: Any) -> Any:
        """Run one Redis call, tracking whether the tier is up; RemoteError when it is not reachable.

        While the tier is down, calls fail at once: a retrieve or lookup (`probe=False`, an engine is waiting)
        is a quick clean miss, and of the background calls (write-through, scans) one at a time, at most every
        _PROBE_S, goes through to see whether the tier is back."""
        import redis
        from redis.exceptions import RedisClusterException

        probing = False
        if not self.up:
            with self._probe_lock:
                now = time.monotonic()
                if not probe or self._probing or now - self._last_probe < _PROBE_S:
                    raise RemoteError(f"remote tier {self.url.display} is down")
                self._probing = probing = True
                self._last_probe = now
        try:
            if probing and self.url.cluster:
                self.client.nodes_manager.initialize()  # learn the topology anew: a replica may have taken over
            result = fn(*args, **kwargs)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            if is_down(exc):
                self._last_probe = time.monotonic()
                self._mark(False)
                raise RemoteError(f"remote tier {self.url.display} is down: {exc}") from None
            raise RemoteError(f"remote tier {self.url.display}: {exc}") from None
        finally:
            if probing:
                self._probing = False
        self._mark(True)
        return result

    # ---------------------------------------------------------------- kvtc codebooks
    def _codebook_key(self, digest: str) -> str:
        return f"{self.namespace}:codebook:{digest}"

    def put_codebook(self, digest: str, data: Callable[[], bytes]) -> None:
        """Keep a codebook that kvtc chunks written here name, beside them, for every worker that reads them.
        `data` (the bytes) is only called when the tier lacks it. No TTL: chunks written later may still need
        it when the first ones have expired. (Under an allkeys-* eviction policy Redis may still evict it; a
        chunk whose codebook is gone from everywhere then fails to decode, which counts as a miss.)"""
        key = self._codebook_key(digest)
        if not self._call(self.client.exists, key):
            self._call(self.client.set, key, data(), nx=True)

    def get_codebook(self, digest: str) -> bytes | None:
        """A codebook kept here by `put_codebook`, or None."""
        value = self._call(self.client.get, self._codebook_key(digest), probe=False)
        return bytes(value) if value is not None else None

    # ---------------------------------------------------------------- the Backend interface
    def _touch_locked(self, key: int) -> None:
        self._epoch += 1
        self._touched[key] = self._epoch

    def _remember(self, key: int, entry: MetaEntry, pinned: bool) -> None:
        """Record in the mirror that the tier holds `key` (its Chunk.entry)."""
        with self._lock:
            self._touch_locked(key)
            old = self._meta.pop(key, None)
            if old is not None:
                self.used_bytes -= old[1]
            self._meta[key] = entry
            self.used_bytes += entry[1]
            (self._pinned.add if pinned else self._pinned.discard)(key)

    def put(self, chunk: Chunk) -> list[int]:
        self.put_many([chunk])
        return []  # Redis evicts by itself; the index hears of it through notifications and scans

    def put_many(self, chunks: list[Chunk]) -> None:
        """Store several chunks: their checksums computed in parallel, then (standalone Redis) every SET written
        on one connection before any reply is read: one round trip for the lot."""
        if not chunks:
            return
        parts = list(_VERIFY_POOL.map(value_parts, chunks)) if len(chunks) > 1 else [value_parts(chunks[0])]
        pinned = [self.is_pinned(c.key) for c in chunks]
        ttls = [None if p or self.ttl_s <= 0 else max(1, int(self.ttl_s)) for p in pinned]
        if self.url.cluster:  # keys live on different nodes: one SET each (the cluster client knows where)
            for chunk, (header, payload), ttl in zip(chunks, parts, ttls, strict=True):
                self._call(self._set_on_node, self._rkey(chunk.key), header, payload, ttl)
        else:
            commands = [set_command(self._rkey(c.key), h, p, t) for c, (h, p), t in zip(chunks, parts, ttls, strict=True)]
            self._call(self._send_all, self.client, commands)
        for chunk, pin in zip(chunks, pinned, strict=True):
            self._remember(chunk.key, chunk.entry, pin)

    def _send_all(self, client: Any, commands: list[list[Any]]) -> None:
        """Write framed commands (`set_command`) on one of `client`'s pooled connections, then read every reply.

        redis-py (with hiredis) copies every argument into one new buffer before sending it: for multi-MB values
        that copy, faulting fresh pages in, cost more than the network (SET 1.8 GB/s with it, 2.5 without,
        measured). So the commands are framed here and written piece by piece, payloads from their own buffers."""
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([piece for command in commands for piece in command])
            errors = []
            for _ in commands:
                try:
                    conn.read_response()
                except Exception as exc:  # read every reply, so the connection stays in step
                    errors.append(exc)
            if errors:
                raise errors[0]
        except BaseException:
            conn.disconnect()  # a half-sent or failed batch must not be followed by another on this connection
            raise
        finally:
            pool.release(conn)

    def _set_on_node(self, rkey: str, header: bytes, payload: bytes | bytearray | memoryview, ttl: int | None) -> None:
        """In a cluster: SET straight on the key's node; a redirection (the slot moved) falls back to redis-py's
        SET, which follows it."""
        import redis

        node = self.client.get_node_from_key(rkey).redis_connection
        try:
            if node is None:
                raise redis.ResponseError("no connection to the key's node yet")
            self._send_all(node, [set_command(rkey, header, payload, ttl)])
        except redis.ResponseError:
            self.client.set(rkey, header + bytes(payload), ex=ttl)

    def _accept(self, key: int, value: bytes | None, unpacked: Chunk | CorruptRemoteValue | None) -> Chunk | None:
        """What a read found for `key`: the chunk, or None for a miss (the mirror forgets it) or a corrupt value
        (deleted unless someone rewrote it meanwhile)."""
        if value is None or unpacked is None:
            self.misses += 1
            if self._forget_meta_locked(key):
                self._mark_changed(key)
            return None
        if isinstance(unpacked, CorruptRemoteValue):
            log.error("chunk %016x in the remote tier is unreadable, deleting it: %s", key, unpacked)
            self.dropped_corrupt.append(key)
            self._forget_meta_locked(key)
            self._mark_changed(key)
            try:
                self._call(self._delete_if_same, keys=[self._rkey(key)], args=[value])
            except RemoteError:
                pass
            return None
        self.hits += 1
        if key not in self:  # another worker's chunk, read through: the controller must hear of it too
            self._remember(key, unpacked.entry, pinned=False)
            self._mark_changed(key)
        return unpacked

    def get(self, key: int) -> Chunk | None:
        value = self._call(self.client.get, self._rkey(key), probe=False)
        return self._accept(key, value, unpack_or_error(value, key))

    def get_many(self, keys: list[int]) -> list[Chunk | None]:
        """Values for `keys` in one round trip (MGET; in a cluster, one pipelined batch per node)."""
        if not keys:
            return []
        names = [self._rkey(k) for k in keys]
        fetch = self.client.mget_nonatomic if self.url.cluster else self.client.mget
        values = self._call(fetch, names, probe=False)
        # Checksums in parallel (zlib lets go of the GIL): on values fresh off the socket one thread ran at
        # 2.1 GB/s, which made a retrieve 0.8 GB/s beside MGET's 1.25; two threads: 1.0 GB/s. (Pipelined GETs
        # with each value checked while the next arrived measured slower: 0.82 GB/s.)
        unpacked = list(_VERIFY_POOL.map(unpack_or_error, values, keys)) if len(keys) > 1 else [unpack_or_error(values[0], keys[0])]
        return [self._accept(k, v, u) for k, v, u in zip(keys, values, unpacked, strict=True)]

    def peek_many(self, keys: list[int]) -> list[ChunkInfo | None]:
        """Which of `keys` Redis holds and what they are (size, method, pinned), from their headers alone, in one
        pipelined round trip; the mirror learns what it did not know (another worker's writes)."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.getrange(self._rkey(key), 0, HEADER_PEEK - 1)
            pipe.ttl(self._rkey(key))
        replies = self._call(pipe.execute, probe=False)
        infos: list[ChunkInfo | None] = []
        for key, head, ttl in zip(keys, replies[0::2], replies[1::2], strict=True):
            entry = entry_from_head(head) if head else None
            if entry is None:
                if self._forget_meta_locked(key):
                    self._mark_changed(key)
                infos.append(None)
                continue
            found = key not in self  # another worker's chunk: the controller must hear of it too
            self._remember(key, entry, pinned=ttl == -1)
            if found:
                self._mark_changed(key)
            infos.append(self.info(key))
        return infos

    def replace_if_same(self, old: Chunk, new: Chunk) -> bool:
        swapped = self._call(self._swap, keys=[self._rkey(old.key)], args=[value_parts(old)[0], pack_value(new)])
        if swapped:
            self._remember(new.key, new.entry, self.is_pinned(old.key))
        return bool(swapped)

    def set_pinned(self, key: int, pinned: bool) -> bool:
        rkey = self._rkey(key)
        if pinned or self.ttl_s <= 0:
            done = self._call(self.client.persist, rkey) or self._call(self.client.exists, rkey)
        else:
            done = self._call(self.client.expire, rkey, max(1, int(self.ttl_s)))
        if not done:
            if self._forget_meta_locked(key):
                self._mark_changed(key)
            return False
        with self._lock:
            if key not in self._meta:
                return False  # there, but not yet in the mirror: the next scan brings it with its pin state
            self._touch_locked(key)
            (self._pinned.add if pinned else self._pinned.discard)(key)
        return True

    def remove(self, key: int) -> bool:
        deleted = self._call(self.client.delete, self._rkey(key))
        forgotten = self._forget_meta_locked(key)  # (the listener may have forgotten it first, on our own DEL)
        return bool(deleted) or forgotten

    def _forget_meta_locked(self, key: int) -> bool:
        with self._lock:
            return self._forget_meta(key)

    def _drop(self, key: int) -> None:  # never called: Redis evicts, not _admit_meta
        self.remove(key)

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"up": self.up, "hits": self.hits, "misses": self.misses, "url": self.url.display}

    # ---------------------------------------------------------------- what Redis did on its own
    def _mark_changed(self, key: int) -> None:
        """For the storage to report: `key` left the tier, or this worker found it there (see take_changed)."""
        with self._changed_lock:
            self._changed.add(key)

    def take_changed(self) -> set[int]:
        """Keys that left the tier (evicted, expired, deleted by someone) or that this worker found there (written
        by another worker, met on a read-through or a lookup) since the last call."""
        with self._changed_lock:
            changed, self._changed = self._changed, set()
        return changed

    def reconcile(self) -> tuple[set[int], set[int]]:
        """Scan the tier and bring the mirror in line: (keys added or changed, keys gone). Finds other workers'
        writes and anything the notifications missed. Raises RemoteError when the tier is down."""
        present: dict[int, int] = {}  # key -> TTL (-1: pinned)
        names: list[bytes] = []
        with self._lock:
            started = self._epoch  # changes this worker makes from now on are newer than what the scan sees
        for node in self._primaries():
            for rkey in self._call(lambda n=node: list(n.scan_iter(match=f"{self._prefix}*", count=1000))):
                if self._key_of(rkey) is not None:
                    names.append(rkey)
        ttl_pipe = self.client.pipeline(transaction=False)
        for rkey in names:
            ttl_pipe.ttl(rkey)
        ttls = self._call(ttl_pipe.execute) if names else []
        for rkey, ttl in zip(names, ttls, strict=True):
            if ttl != -2:  # -2: gone since the scan
                present[self._key_of(rkey)] = ttl  # type: ignore[index]
        with self._lock:
            known = set(self._meta)
        new = [k for k in present if k not in known]
        added = {key for key, info in zip(new, self.peek_many(new), strict=True) if info is not None}
        with self._lock:
            since = {k for k, at in self._touched.items() if at > started}  # changed here during the scan
            for key in (known & set(present)) - since:
                pinned = present[key] == -1
                if pinned != (key in self._pinned):
                    (self._pinned.add if pinned else self._pinned.discard)(key)
                    added.add(key)
            gone = {k for k in known if k not in present and k not in since and k in self._meta}
            for key in gone:
                self._forget_meta(key)
            self._touched = {k: at for k, at in self._touched.items() if at > started}
        return added, gone

    def start_listener(self) -> None:
        """Follow Redis's evicted/expired/del keyevents in a thread (see EvictionListener); the periodic
        reconcile() covers whatever it misses."""
        self._evictions.start()

    def stop_listener(self) -> None:
        self._evictions.stop()

    def _gone(self, rkey: bytes) -> None:
        """A keyevent: the key left the tier (evicted, expired, deleted by someone)."""
        key = self._key_of(rkey)
        if key is not None and self._forget_meta_locked(key):
            self._mark_changed(key)

    def close(self) -> None:
        self.stop_listener()
        try:
            self.client.close()
        except Exception:
            pass
