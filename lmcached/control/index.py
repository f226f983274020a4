"""The controller's chunk index: which worker of which instance holds which chunk, where.

The remote tier is shared: every worker whose hello names the same `remote_tier` reaches the same Redis, so
its chunks are held once, under the tier (holder ("", tier id, RemoteBackend)), for every instance that has a
worker there; a worker that leaves takes none of them along."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcached.errors import InvalidRequest, NotFound, ProtocolError
from lmcached.wire.chunk import REMOTE, ChunkInfo
from lmcached.wire.chunks import ChunkSpan, shards

WorkerKey = tuple[str, str]  # (instance_id, worker_id)
SUMMED = ("chunks", "tokens", "bytes", "raw_bytes", "compressed_chunks", "lossy_chunks", "pinned_chunks")
Holder = tuple[str, str, str]  # (instance_id, worker_id, location)


@dataclass
class WorkerRecord:
    """A registered worker as the controller sees it."""

    instance_id: str
    worker_id: str
    data_address: str
    #: The locations the worker has (from its hello); None for a worker that did not say.
    backends: tuple[str, ...] | None = None
    #: The worker's rank within its instance: LMCache's integer worker id (0 for a lone worker).
    rank: int = 0
    #: The instance's tensor-parallel size when each rank's worker holds its part of every chunk (chunks.Shard).
    world_size: int = 1
    #: The identity of the shared remote tier the worker reaches (None: no remote tier).
    remote_tier: str | None = None
    #: The lmcached version the worker runs (from its hello; None for a worker too old to say).
    version: str | None = None
    connected_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_heartbeat_wall: float = field(default_factory=time.time)
    #: location -> key -> what the worker reported
    locations: dict[str, dict[int, ChunkInfo]] = field(default_factory=lambda: defaultdict(dict))
    #: location -> the worker's own statistics from its last heartbeat (capacity, bytes)
    heartbeat_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What engines asked of the worker and what it did, cumulative (`usage.Usage.snapshot`, last heartbeat).
    usage: dict[str, Any] = field(default_factory=dict)
    #: "lmcached", or "lmcache" for an LMCache engine's worker (control/lmcache_port.py): indexed under LMCache's
    #: chunk keys, and not operated on.
    protocol: str = "lmcached"

    def touch(self) -> None:
        """The worker was heard from now."""
        self.last_heartbeat, self.last_heartbeat_wall = time.monotonic(), time.time()

    @property
    def key(self) -> WorkerKey:
        return (self.instance_id, self.worker_id)

    def location_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for location in sorted(set(self.locations) | set(self.heartbeat_stats)):
            infos = self.locations.get(location, {}).values()
            out[location] = {
                "chunks": len(infos),
                "tokens": sum(i.num_tokens for i in infos),
                "bytes": sum(i.nbytes for i in infos),
                "compressed_chunks": sum(1 for i in infos if i.method is not None),
                # chunks whose values went through a lossy codec: compressed with one, or decompressed from one
                "lossy_chunks": sum(1 for i in infos if i.lossy is not None),
                "raw_bytes": sum(i.raw_nbytes for i in infos),
                "pinned_chunks": sum(1 for i in infos if i.pinned),
                "capacity_bytes": self.heartbeat_stats.get(location, {}).get("capacity_bytes"),
            }
            if location == REMOTE:  # whether the worker reaches its Redis right now, and how it goes
                beat = self.heartbeat_stats.get(location, {})
                out[location] |= {k: beat.get(k) for k in ("up", "hits", "misses", "url", "write_queue_bytes", "write_queue_dropped")}
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "data_address": self.data_address,
            "version": self.version,
            "connected_at": self.connected_at,
            "last_heartbeat": self.last_heartbeat_wall,
            "seconds_since_heartbeat": round(time.monotonic() - self.last_heartbeat, 3),
            "alive": True,
            "locations": self.location_stats(),
            "protocol": self.protocol,
        } | ({"tensor_parallel": {"rank": self.rank, "world_size": self.world_size}} if self.world_size > 1 else {})

    def lmcache_info(self) -> dict[str, Any]:
        """The worker as LMCache's /query_worker_info shows it (its `worker_id` is the integer rank), with
        lmcached's own description beside it (`worker_name` is lmcached's string id)."""
        host, _, port = self.data_address.rpartition(":")
        return self.describe() | {
            "worker_id": self.rank,
            "worker_name": self.worker_id,
            "ip": host,
            "port": int(port) if port.isdigit() else None,
            "peer_init_url": None,  # lmcached moves chunks through the data plane, not a P2P channel
            "registration_time": self.connected_at,
            "last_heartbeat_time": self.last_heartbeat_wall,
            "key_count": self.key_count,
        }

    @property
    def key_count(self) -> int:
        """Chunks held, counted once per location (LMCache's key_count)."""
        return sum(len(chunks) for chunks in self.locations.values())

    def has_location(self, location: str) -> bool:
        return self.backends is None or location in self.backends


#: Nobody holds it (the holder set of a chunk not in the index).
NOBODY: frozenset[Holder] = frozenset()
#: Distinct holder sets kept for sharing before the table starts afresh.
MAX_INTERNED = 100_000


class ChunkIndex:
    """Workers and the chunks they report; answers prefix questions in O(chunks of the prompt)."""

    def __init__(self) -> None:
        self.workers: dict[WorkerKey, WorkerRecord] = {}
        #: key -> who holds it. The sets are frozen and interned: a million chunks held by the same few workers
        #: share a few sets (a set each cost ~200 bytes), and a lookup maps each set to its (instance, location)
        #: pairs through `_present`, once per set rather than once per chunk.
        self._holders: dict[int, frozenset[Holder]] = {}
        self._interned: dict[frozenset[Holder], frozenset[Holder]] = {}
        self._present: dict[frozenset[Holder], frozenset[tuple[str, str]]] = {}
        #: tier id -> key -> chunk: each shared remote tier's chunks, once (workers' records share these dicts)
        self.tiers: dict[str, dict[int, ChunkInfo]] = {}

    # -- membership
    def add_worker(self, record: WorkerRecord, wanted_rank: int | None = None) -> None:
        """Register a worker and give it a rank: the one it had before a reconnect, else the one it asked
        for if free, else the lowest free rank of its instance."""
        old = self.workers.get(record.key)
        if old is not None:
            self.remove_worker(record.key)
        taken = {r.rank for (inst, _), r in self.workers.items() if inst == record.instance_id}
        if old is not None and old.rank not in taken:
            record.rank = old.rank
        elif wanted_rank is not None and wanted_rank >= 0 and wanted_rank not in taken:
            record.rank = wanted_rank
        else:
            record.rank = next(r for r in range(len(taken) + 1) if r not in taken)
        if record.remote_tier is not None:
            record.locations[REMOTE] = self.tiers.setdefault(record.remote_tier, {})
        self.workers[record.key] = record
        self._present.clear()  # who reaches a shared tier changed

    def check_shard(self, record: WorkerRecord, rank: int | None) -> None:
        """ProtocolError unless a tensor-parallel worker fits its instance: the same world size as the ranks
        there already, and a rank no other live worker of the instance has (a reconnect may take its own)."""
        others = [r for (inst, wid), r in self.workers.items() if inst == record.instance_id and wid != record.worker_id]
        if any(r.world_size != record.world_size for r in others):
            sizes = sorted({r.world_size for r in others})
            raise ProtocolError(
                f"instance {record.instance_id!r} has tensor-parallel size {sizes[0]}; this worker says {record.world_size}"
            )
        if record.world_size > 1:
            holder = next((r for r in others if r.rank == rank), None)
            if holder is not None:
                raise ProtocolError(f"rank {rank} of instance {record.instance_id!r} is held by worker {holder.worker_id}")

    def workers_protocol(self, instance_id: str) -> str | None:
        """The protocol an instance's workers speak (None: no such instance)."""
        return next((r.protocol for (inst, _), r in self.workers.items() if inst == instance_id), None)

    def world_size(self, instance_id: str) -> int:
        """How many ranks' parts make a chunk of this instance (1: a chunk is whole on one worker)."""
        return max((r.world_size for (inst, _), r in self.workers.items() if inst == instance_id), default=1)

    def remove_worker(self, key: WorkerKey) -> WorkerRecord | None:
        record = self.workers.pop(key, None)
        if record is None:
            return None
        self._present.clear()
        for location, chunks in record.locations.items():
            if location == REMOTE:
                continue  # the tier's chunks stay reachable by every other worker of the tier
            holder = (*key, location)
            for chunk_key in chunks:
                self._unhold(chunk_key, holder)
        return record

    def _holder(self, record: WorkerRecord, location: str) -> Holder:
        if location == REMOTE and record.remote_tier is not None:
            return ("", record.remote_tier, REMOTE)
        return (*record.key, location)

    def _tier_worker(self, instance_id: str, tier: str) -> WorkerKey | None:
        """The worker an instance acts through on a shared tier (the lowest rank that reaches it)."""
        reaching = [r for (inst, _), r in self.workers.items() if inst == instance_id and r.remote_tier == tier]
        return min(reaching, key=lambda r: r.rank).key if reaching else None

    def _instances_of(self, holder: Holder) -> list[str]:
        inst, wid, loc = holder
        if inst:
            return [inst]
        return sorted({i for (i, _), r in self.workers.items() if r.remote_tier == wid})

    def instance_ids(self) -> list[str]:
        return sorted({inst for inst, _ in self.workers})

    def instance_workers(self, instance_id: str) -> list[WorkerRecord]:
        """The workers of an instance; NotFound when it has none (it never registered, or all were lost)."""
        workers = [r for (inst, _), r in self.workers.items() if inst == instance_id]
        if not workers:
            known = ", ".join(self.instance_ids()) or "none"
            raise NotFound(f"unknown instance {instance_id!r} (registered: {known})")
        return workers

    def check_location(self, instance_id: str, location: str) -> None:
        """NotFound unless some worker of the instance has `location` (known up front, so a request for a
        tier the instance lacks fails at once instead of as a failed event later)."""
        workers = self.instance_workers(instance_id)
        if workers[0].protocol != "lmcached":
            raise InvalidRequest(
                f"instance {instance_id!r} is an {workers[0].protocol.upper()} engine's: this controller indexes its chunks but "
                "operates only on lmcached workers (use its own controller for it)",
                "instance_id",
                409,
            )
        if not any(r.has_location(location) for r in workers):
            have = sorted({loc for r in workers for loc in (r.backends or ())})
            hint = " (start it with --local-disk DIR, or local_disk in the config)" if location == "LocalDiskBackend" else ""
            raise NotFound(f"instance {instance_id!r} has no {location}{hint}; it has: {', '.join(have) or 'nothing'}")

    # -- reports
    def apply_report(
        self, record: WorkerRecord, admitted: Iterable[Sequence[Any]], evicted: Iterable[Sequence[Any]], full: bool
    ) -> tuple[int, int, int]:
        """Apply a worker's batch; a full report replaces everything it had. Returns how many chunks were
        admitted (new at their location), updated (replaced in place: compressed, pinned...) and evicted."""
        if full:  # (a worker's view of a shared tier is the whole tier: it replaces the tier's chunks too)
            for location, chunks in record.locations.items():
                holder = self._holder(record, location)
                for chunk_key in chunks:
                    self._unhold(chunk_key, holder)
                chunks.clear()
        n_admitted = n_updated = n_evicted = 0
        for location, key, num_tokens, nbytes, method, pinned, raw_nbytes, *lineage in admitted:
            held = record.locations[location]
            if key in held:
                n_updated += 1
            else:
                n_admitted += 1
            # (a worker before lineage sends no `lossy`: its chunks count as the engine's own values)
            held[key] = ChunkInfo(key, num_tokens, nbytes, method, bool(pinned), raw_nbytes, lineage[0] if lineage else None)
            self._hold(key, self._holder(record, location))
        for location, key in evicted:
            if record.locations.get(location, {}).pop(key, None) is not None:
                self._unhold(key, self._holder(record, location))
                n_evicted += 1
        return n_admitted, n_updated, n_evicted

    def _hold(self, key: int, holder: Holder) -> None:
        holders = self._holders.get(key, NOBODY)
        if holder not in holders:
            self._holders[key] = self._intern(holders | {holder})

    def _unhold(self, key: int, holder: Holder) -> None:
        holders = self._holders.get(key)
        if holders is not None and holder in holders:
            rest = holders - {holder}
            if rest:
                self._holders[key] = self._intern(rest)
            else:
                del self._holders[key]

    def _intern(self, holders: frozenset[Holder]) -> frozenset[Holder]:
        if len(self._interned) > MAX_INTERNED:  # combinations no chunk uses any more: start afresh (sharing is
            self._interned.clear()  # only a saving; an equal set not shared works the same)
            self._present.clear()
        return self._interned.setdefault(holders, holders)

    def _present_of(self, holders: frozenset[Holder]) -> frozenset[tuple[str, str]]:
        """The (instance, location) pairs a holder set means: a shared tier's chunk is held by every instance
        that reaches the tier. Cached per set; the cache is dropped whenever a worker comes or goes."""
        present = self._present.get(holders)
        if present is None:
            present = self._present[holders] = frozenset((inst, h[2]) for h in holders for inst in self._instances_of(h))
        return present

    @property
    def total_chunks(self) -> int:
        return len(self._holders)

    # -- questions
    def lookup(self, spans: Sequence[ChunkSpan]) -> dict[str, tuple[str, int]]:
        """For each instance holding a prefix of `spans`: (location with the longest prefix, its length). An
        instance of tensor-parallel workers holds a chunk only where every rank holds its part."""
        matched = {where: spans[chunks - 1].end for where, chunks in self._walk([s.key for s in spans]).items()}
        for inst in self._sharded_instances():
            for location, length in self._sharded_prefixes(inst, spans).items():
                matched[(inst, location)] = length
        return _longest(matched)

    def lookup_keys(self, keys: Sequence[int], chunk_size: int) -> dict[str, tuple[str, int, int]]:
        """lookup() for a prompt given as its chunk keys (a router hashed it): instance -> (location, tokens,
        chunks). Every chunk but a prompt's last is whole; the last matched one counts the tokens its holder
        reported (a partial chunk counts what it holds)."""
        found = self._walk(keys)
        sharded = self._sharded_instances()
        if sharded:
            spans = [ChunkSpan(key, i * chunk_size, (i + 1) * chunk_size) for i, key in enumerate(keys)]
            for inst in sharded:
                for location, length in self._sharded_prefixes(inst, spans).items():
                    found[(inst, location)] = length // chunk_size
        out: dict[str, tuple[str, int, int]] = {}
        for inst, (location, chunks) in _longest(found).items():
            out[inst] = (location, (chunks - 1) * chunk_size + self._tokens_of(keys[chunks - 1], inst, location, chunk_size), chunks)
        return out

    def _walk(self, keys: Sequence[int]) -> dict[tuple[str, str], int]:
        """(instance, location) -> how many of `keys`, from the first, it holds there (tensor-parallel
        instances aside: their parts have keys of their own). A router asks this per request: it costs two dict
        lookups and a subset test per key, and records a match only when a candidate drops out."""
        matched: dict[tuple[str, str], int] = {}
        candidates: frozenset[tuple[str, str]] = frozenset()
        holders_of = self._holders.get
        present_of = self._present.get
        reached = 0
        for key in keys:
            holders = holders_of(key)
            if not holders:
                break
            present = present_of(holders) or self._present_of(holders)
            if reached == 0:
                candidates = present
            elif not candidates <= present:
                for gone in candidates - present:
                    matched[gone] = reached
                candidates &= present
                if not candidates:
                    break
            reached += 1
        for candidate in candidates:
            matched[candidate] = reached
        return matched

    def _tokens_of(self, key: int, instance_id: str, location: str, default: int) -> int:
        """How many tokens chunk `key` holds, as the worker through which the instance reaches it reported."""
        for inst, wid, loc in self._holders.get(key, ()):
            if loc == location and inst in (instance_id, ""):
                record = self.workers.get((inst, wid)) if inst else None
                chunks = record.locations.get(location, {}) if record is not None else self.tiers.get(wid, {})
                info = chunks.get(key)
                if info is not None:
                    return info.num_tokens
        return default

    def _sharded_instances(self) -> list[str]:
        return sorted({inst for (inst, _), r in self.workers.items() if r.world_size > 1})

    def _sharded_prefixes(self, instance_id: str, spans: Sequence[ChunkSpan]) -> dict[str, int]:
        """location -> the prefix of `spans` whose every rank's part the instance holds there."""
        matched: dict[str, int] = {}
        candidates: set[str] | None = None
        ranks = shards(self.world_size(instance_id))
        for span in spans:
            for shard in ranks:
                holders = self._holders.get(shard.key(span.key), ())
                present = {h[2] for h in holders if instance_id in self._instances_of(h)}
                candidates = present if candidates is None else candidates & present
                if not candidates:
                    return matched
            for location in candidates or ():
                matched[location] = span.end
        return matched

    def _holding_worker(self, instance_id: str, location: str, key: int) -> WorkerKey | None:
        """The worker through which the instance reaches chunk `key` at `location`, if it does."""
        holders = self._holders.get(key, ())
        holder = next(((inst, wid) for inst, wid, loc in holders if inst == instance_id and loc == location), None)
        if holder is None and location == REMOTE:
            tiers = [wid for inst, wid, loc in holders if not inst]
            holder = next((w for w in (self._tier_worker(instance_id, t) for t in tiers) if w is not None), None)
        return holder

    def prefix(self, instance_id: str, location: str, spans: Sequence[ChunkSpan]) -> tuple[int, dict[WorkerKey, list[int]]]:
        """The prefix of `spans` held at (instance, location): its token count and which worker holds which key
        (of a tensor-parallel instance: every rank's part of each chunk, and only chunks whose parts all are)."""
        by_worker: dict[WorkerKey, list[int]] = {}
        num_tokens = 0
        ranks = shards(self.world_size(instance_id))
        for span in spans:
            part_keys = [shard.key(span.key) for shard in ranks]
            parts = [(key, self._holding_worker(instance_id, location, key)) for key in part_keys]
            if any(holder is None for _, holder in parts):
                break
            for key, holder in parts:
                by_worker.setdefault(holder, []).append(key)  # type: ignore[arg-type]
            num_tokens = span.end
        return num_tokens, by_worker

    def all_at(self, instance_id: str, location: str) -> tuple[int, dict[WorkerKey, list[int]]]:
        """Every chunk of an instance at a location (for a clear without tokens)."""
        by_worker: dict[WorkerKey, list[int]] = {}
        tokens = 0
        for record in self.instance_workers(instance_id):
            chunks = record.locations.get(location, {})
            if location == REMOTE and record.remote_tier is not None and self._tier_worker(instance_id, record.remote_tier) != record.key:
                continue  # a shared tier is acted on once, through one worker
            if chunks:
                by_worker[record.key] = list(chunks)
                tokens += sum(i.num_tokens for i in chunks.values())
        return tokens, by_worker

    def describe_instances(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for inst in self.instance_ids():
            workers = [r.describe() for r in self.instance_workers(inst)]
            totals: dict[str, dict[str, Any]] = {}
            tiers_counted: set[str] = set()
            for record, worker in zip(self.instance_workers(inst), workers, strict=True):
                if record.remote_tier is not None and record.remote_tier in tiers_counted:  # the tier's chunks once
                    worker = worker | {"locations": {k: v for k, v in worker["locations"].items() if k != REMOTE}}
                if record.remote_tier is not None:
                    tiers_counted.add(record.remote_tier)
                for location, stats in worker["locations"].items():
                    agg = totals.setdefault(location, dict.fromkeys(SUMMED, 0) | {"capacity_bytes": 0})
                    for field_name in SUMMED:
                        agg[field_name] += stats[field_name]
                    agg["capacity_bytes"] += stats["capacity_bytes"] or 0
                    if location == REMOTE:  # the shared tier as this instance reaches it: down if any worker can't
                        agg["up"] = agg.get("up", True) and bool(stats.get("up"))
                        agg["url"] = stats.get("url")
                        for field_name in ("hits", "misses", "write_queue_bytes", "write_queue_dropped"):
                            agg[field_name] = agg.get(field_name, 0) + (stats.get(field_name) or 0)
            out[inst] = {"workers": workers, "locations": totals}
        return out


def _longest(matched: dict[tuple[str, str], int]) -> dict[str, tuple[str, int]]:
    """instance -> (the location with the longest match, its length); ties go to the first location by name."""
    best: dict[str, tuple[str, int]] = {}
    for (inst, loc), length in sorted(matched.items()):
        if inst not in best or length > best[inst][1]:
            best[inst] = (loc, length)
    return best
