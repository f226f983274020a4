"""LmcachedConnector driven by vLLM's real scheduler, with a stand-in for the model runner: each "forward pass"
writes a known KV for exactly the tokens vLLM scheduled, so whatever the connector loads can be checked
against what a recompute would have written. The lmcached instance is real (a hosted worker on a port)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from lmcached.client import KVClient  # noqa: E402
from lmcached.config import Config  # noqa: E402
from lmcached.integrations.hosted import HostedInstance  # noqa: E402
from lmcached.integrations.vllm import LmcachedConnector, LmcachedConnectorMetadata  # noqa: E402

# SmolLM2's head size and a block size of 32: on a CPU with AMX, vLLM then picks its AMX cache layout.
BLOCK = 32
CHUNK = 32
LAYERS, HEADS, HEAD_SIZE = 3, 2, 64
EOS = 2
SAMPLED = 7  # the token every fake forward pass "samples"


@pytest.fixture(scope="module")
def model_dir() -> str:
    from lmcached.engine.model import converted_dir, default_gguf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return str(converted_dir(default_gguf()))  # vLLM's ModelConfig reads a real config.json


@pytest.fixture
def instance() -> Iterator[HostedInstance]:
    hosted = HostedInstance(Config(lmcache_worker_port=0, enable_controller=False, chunk_size=CHUNK))
    hosted.start()
    yield hosted
    hosted.stop()


def known_kv(tokens: list[int], start: int, end: int) -> torch.Tensor:
    """The KV a forward pass "computes" for positions [start, end): exact small integers in bfloat16."""
    positions = torch.arange(start, end).view(1, 1, -1, 1)
    ids = torch.tensor(tokens[start:end]).view(1, 1, -1, 1)
    side = torch.arange(2).view(2, 1, 1, 1)
    layer = torch.arange(LAYERS).view(1, -1, 1, 1)
    channel = torch.arange(HEADS * HEAD_SIZE).view(1, 1, 1, -1)
    return ((ids * 7 + positions * 3 + layer * 11 + side * 5 + channel) % 251).to(torch.bfloat16)


class Engine:
    """vLLM's scheduler and the connector's two sides, stepped by hand over a fake paged cache."""

    def __init__(
        self,
        model_dir: str,
        address: str,
        num_blocks: int = 64,
        batch_tokens: int = 64,
        prefix_caching: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        model = ModelConfig(model=model_dir, dtype="bfloat16", seed=0, max_model_len=1024)
        scheduler = SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=batch_tokens, max_model_len=1024, enable_chunked_prefill=True, is_encoder_decoder=False
        )
        cache = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="auto", enable_prefix_caching=prefix_caching)
        transfer = KVTransferConfig(
            kv_connector="LmcachedConnector",
            kv_connector_module_path="lmcached.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"lmcached_worker": address, **(extra or {})},
        )
        self.config = VllmConfig(
            model_config=model,
            scheduler_config=scheduler,
            cache_config=cache,
            kv_transfer_config=transfer,
            device_config=DeviceConfig("cpu"),
        )
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
        kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layers"], spec)])
        self.config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=BLOCK,
            log_stats=True,
        )
        self.connector = self.scheduler.connector
        assert isinstance(self.connector, LmcachedConnector)
        self.worker = LmcachedConnector(self.config, KVConnectorRole.WORKER, kv_cache_config)
        caches = {
            f"model.layers.{i}.attn": torch.zeros(num_blocks, HEADS, BLOCK, 2 * HEAD_SIZE, dtype=torch.bfloat16) for i in range(LAYERS)
        }
        self.worker.register_kv_caches(caches)
        # The fake forward pass writes through the connector's own view of the cache (checked against vLLM's
        # cache-write op in test_the_learned_layout_matches_vllms_cache_writes).
        self.layout = self.worker._worker.layout
        self.requests: dict[str, Request] = {}
        self.metas: list[LmcachedConnectorMetadata] = []
        init_none_hash(sha256)

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 3, salt: str | None = None) -> Request:
        params = SamplingParams(max_tokens=max_tokens)
        params.update_from_generation_config({}, EOS)
        request = Request(req_id, tokens, params, None, cache_salt=salt, block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.scheduler.add_request(request)
        self.requests[req_id] = request
        return request

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def step(self, before_load: Any = None) -> Any:
        """One scheduler step and one fake forward pass; `before_load` runs between scheduling and loading."""
        output = self.scheduler.schedule()
        meta = output.kv_connector_metadata
        assert isinstance(meta, LmcachedConnectorMetadata)
        self.metas.append(meta)
        if before_load is not None:
            before_load()
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        # Where each request's tokens of this step begin (the scheduler has already moved its counters on).
        starts = {new.req_id: new.num_computed_tokens for new in output.scheduled_new_reqs}
        cached = output.scheduled_cached_reqs
        starts |= dict(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        sampled = {}
        for req_id, count in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            start = starts[req_id]
            tokens = request.all_token_ids
            self.layout.scatter(self.layout.slots(self.block_ids(req_id), start, start + count), known_kv(tokens, start, start + count))
            # A step that does not finish the prompt samples nothing.
            sampled[req_id] = [SAMPLED] if start + count >= request.num_prompt_tokens else []
        self.worker.wait_for_save()
        _, recving = self.worker.get_finished(set())  # in vLLM's order: finished loads, then the blocks that failed
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        ids = list(output.num_scheduled_tokens)
        runner = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[sampled[r] for r in ids],
            kv_connector_output=KVConnectorOutput(finished_recving=recving, invalid_block_ids=errors) if errors or recving else None,
        )
        self.scheduler.update_from_output(output, runner)
        return output

    def run(self, steps: int = 50) -> None:
        for _ in range(steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def loaded(self) -> None:
        self.worker._worker.loader.submit(lambda: None).result()  # the background loads queued so far are done

    def saved(self) -> None:
        self.worker._worker.saves.join()  # the background stores have landed

    def paged_kv(self, req_id: str, end: int) -> torch.Tensor:
        return self.layout.gather(self.layout.slots(self.block_ids(req_id), 0, end))

    def close(self) -> None:
        self.connector.shutdown()
        self.worker.shutdown()


@pytest.fixture
def engine(model_dir: str, instance: HostedInstance) -> Iterator[Engine]:
    assert instance.worker is not None
    running = Engine(model_dir, instance.worker.data_plane.address)
    yield running
    running.close()


def cached(instance: HostedInstance, tokens: list[int], salt: str | None = None) -> int:
    assert instance.worker is not None
    with KVClient(instance.worker.data_plane.address) as client:
        return client.lookup(tokens, salt)


PROMPT = list(range(1000, 1080))  # 80 tokens: two whole chunks and a partial one


def evict_everything(instance: HostedInstance) -> None:
    """Empty the instance's RAM tier (the tests call it between the scheduler's lookup and the worker's load)."""
    assert instance.worker is not None
    instance.call(instance.worker.storage.execute("clear", {"location": "LocalCPUBackend", "keys": None}))


def test_a_prompt_stored_by_one_request_is_loaded_into_the_next(engine: Engine, instance: HostedInstance) -> None:
    first = engine.add("a", PROMPT)
    engine.run()
    engine.saved()
    assert first.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert cached(instance, PROMPT) == 80
    assert [s.skip_tokens for m in engine.metas for s in m.saves] == [0]  # saved once, when the prefill finished

    engine.add("b", PROMPT)
    output = engine.step()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 79  # all but the last token came from lmcached
    (load,) = engine.metas[-1].loads
    assert (load.start, load.end) == (0, 79)
    assert torch.equal(engine.paged_kv("b", 80), known_kv(PROMPT, 0, 80))
    engine.run()
    assert [s for m in engine.metas[-3:] for s in m.saves] == []  # nothing new to store


def test_a_longer_prompt_reuses_the_chunks_it_shares_and_continues_the_partial_one(engine: Engine, instance: HostedInstance) -> None:
    """A chat's next round: the longer prompt shares chunks 0-1 and goes on past A's partial chunk 2 (tokens
    64-79), which is loaded too (KVClient.lookup's `continued`); one that differs inside it gets the whole
    chunks only."""
    engine.add("a", PROMPT)
    engine.run()
    engine.saved()
    longer = PROMPT + list(range(2000, 2060))
    engine.add("b", longer)
    output = engine.step()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 80
    (load,) = engine.metas[-1].loads
    assert (load.start, load.end, len(load.token_ids)) == (0, 80, 80)
    assert torch.equal(engine.paged_kv("b", 80), known_kv(longer, 0, 80))
    engine.run()
    engine.saved()
    assert [s.skip_tokens for m in engine.metas for s in m.saves] == [0, 80]  # only the new chunks were stored
    assert cached(instance, longer) == 140
    other = PROMPT[:70] + list(range(3000, 3060))  # differs from A's partial chunk at token 70
    engine.add("c", other)
    output = engine.step()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 64
    assert torch.equal(engine.paged_kv("c", 64), known_kv(other, 0, 64))
    engine.run()


def test_an_abort_mid_prefill_saves_nothing_and_leaves_no_state(model_dir: str, instance: HostedInstance) -> None:
    assert instance.worker is not None
    engine = Engine(model_dir, instance.worker.data_plane.address, batch_tokens=32)  # an 80-token prompt takes 3 steps
    try:
        engine.add("a", PROMPT)
        engine.step()
        engine.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
        assert not engine.scheduler.has_unfinished_requests()
        engine.saved()
        assert all(not m.saves for m in engine.metas)
        assert cached(instance, PROMPT) == 0
        assert engine.connector._scheduler.tracked == {} and engine.connector._scheduler.pending_loads == {}
    finally:
        engine.close()


def test_a_preempted_request_reloads_its_prompt_from_lmcached(model_dir: str, instance: HostedInstance) -> None:
    assert instance.worker is not None
    # Eight blocks (one is vLLM's null block): two 96-token prompts fill six, and decoding runs out.
    engine = Engine(model_dir, instance.worker.data_plane.address, num_blocks=8, batch_tokens=256)
    try:
        first = engine.add("a", list(range(3000, 3096)), max_tokens=40)
        second = engine.add("b", list(range(4000, 4096)), max_tokens=40)
        engine.run(200)
        engine.saved()
        assert second.num_preemptions >= 1 or first.num_preemptions >= 1
        preempted = "b" if second.num_preemptions else "a"
        reloads = [load for m in engine.metas for load in m.loads if load.req_id == preempted]
        assert reloads and reloads[0].start == 0 and reloads[0].end == 96  # its whole prompt, back from lmcached
        assert {r.status for r in engine.requests.values()} == {RequestStatus.FINISHED_LENGTH_CAPPED}
    finally:
        engine.close()


def test_a_load_that_fails_is_recomputed_never_served(engine: Engine, instance: HostedInstance) -> None:
    engine.add("a", PROMPT)
    engine.run()
    engine.saved()
    victim = engine.add("b", PROMPT)

    engine.step(before_load=lambda: evict_everything(instance))  # between the lookup and the load, lmcached loses the chunks
    assert engine.metas[-1].loads  # a load was planned...
    assert victim.num_computed_tokens < 79  # ...failed, and vLLM rolled the request back to recompute
    while victim.num_computed_tokens < 80:  # the recompute (a 64-token batch: two steps)
        engine.step()
    assert torch.equal(engine.paged_kv("b", 80), known_kv(PROMPT, 0, 80))
    engine.run()
    assert victim.status == RequestStatus.FINISHED_LENGTH_CAPPED  # recomputed, not failed


def test_cache_salts_keep_tenants_apart(engine: Engine, instance: HostedInstance) -> None:
    engine.add("a", PROMPT, salt="tenant-1")
    engine.run()
    engine.saved()
    assert cached(instance, PROMPT, "tenant-1") == 80 and cached(instance, PROMPT) == 0 and cached(instance, PROMPT, "tenant-2") == 0
    other = engine.add("b", PROMPT, salt="tenant-2")
    engine.step()
    assert other.num_computed_tokens == 64 and not engine.metas[-1].loads  # one batch computed, nothing loaded
    same = engine.add("c", PROMPT, salt="tenant-1")
    engine.step()
    assert engine.metas[-1].loads and engine.metas[-1].loads[0].req_id == "c" and same.num_computed_tokens >= 79


@pytest.mark.parametrize(
    ("block", "dtype", "cache_dtype"),
    [
        (32, torch.bfloat16, "auto"),
        (32, torch.float32, "auto"),
        (16, torch.bfloat16, "auto"),
        (32, torch.bfloat16, "fp8"),
        (32, torch.float16, "fp8_e4m3"),
        (32, torch.bfloat16, "fp8_e5m2"),
    ],
)
def test_the_learned_layout_matches_vllms_cache_writes(
    model_dir: str, instance: HostedInstance, block: int, dtype: torch.dtype, cache_dtype: str
) -> None:
    """vLLM's own CPU cache-write op (AMX, vec or vec16 kernels, whichever this CPU and shape select) fills
    a cache; the connector's layout must read back exactly the keys and values it was given — for an fp8
    cache (uint8 bytes), the fp8 values the op wrote, byte for byte, and written back the same bytes."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from lmcached.integrations.paged import PagedLayout
    from lmcached.integrations.vllm import cpu_cache_writer, stored_dtype

    engine = Engine(model_dir, instance.worker.data_plane.address)  # type: ignore[union-attr]
    try:
        stored = stored_dtype(cache_dtype)
        cache = torch.zeros(6, HEADS, block, 2 * HEAD_SIZE, dtype=dtype if stored is None else torch.uint8)
        writer = cpu_cache_writer(cache_dtype, dtype, cache)
        layout = PagedLayout.build([cache], block, "probed", writer, stored, dtype)
        keys = torch.randn(3 * block, HEADS, HEAD_SIZE).to(dtype)
        values = torch.randn(3 * block, HEADS, HEAD_SIZE).to(dtype)
        slots = layout.slots([4, 1, 3], 0, 3 * block)
        key_cache, value_cache = cache.view(6, HEADS, 2 * block, HEAD_SIZE).chunk(2, dim=2)
        isa = _get_attn_isa(dtype, block, HEAD_SIZE, cache_dtype)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, 1.0, 1.0, cache_dtype)
        kv = layout.gather(slots)
        if stored is None:
            assert torch.equal(kv[0, 0], keys.reshape(3 * block, -1)) and torch.equal(kv[1, 0], values.reshape(3 * block, -1)), isa
        else:
            assert kv.dtype == stored
            # The op's own fp8 conversion (scale 1; it truncates): within one fp8 step of what was written.
            tolerance = 0.13 if stored == torch.float8_e4m3fn else 0.26
            assert torch.allclose(kv[0, 0].float(), keys.reshape(3 * block, -1).float(), rtol=tolerance, atol=2e-2), isa
            assert torch.allclose(kv[1, 0].float(), values.reshape(3 * block, -1).float(), rtol=tolerance, atol=2e-2), isa
            fresh = torch.zeros_like(cache)
            PagedLayout.build([fresh], block, "probed", writer, stored, dtype).scatter(slots, kv)
            assert torch.equal(fresh, cache)  # the same bytes, back where the op put them
    finally:
        engine.close()


def test_with_vllms_own_prefix_cache_only_the_rest_is_loaded(model_dir: str, instance: HostedInstance) -> None:
    """vLLM's prefix cache holds whole blocks of a repeated prompt; lmcached supplies only what comes after them."""
    engine = Engine(model_dir, instance.worker.data_plane.address, prefix_caching=True)  # type: ignore[union-attr]
    try:
        engine.add("a", PROMPT)
        engine.run()
        engine.saved()
        engine.add("b", PROMPT)
        output = engine.step()
        (load,) = engine.metas[-1].loads
        assert (load.start, load.end) == (64, 79)  # blocks 0-1 from vLLM's own cache, tokens 64-78 from lmcached
        assert output.scheduled_new_reqs[0].num_computed_tokens == 79
        assert torch.equal(engine.paged_kv("b", 80), known_kv(PROMPT, 0, 80))
    finally:
        engine.close()


def test_an_async_load_keeps_the_request_waiting_until_its_kv_has_arrived(model_dir: str, instance: HostedInstance) -> None:
    """lmcached_load_async: vLLM parks the request (WAITING_FOR_REMOTE_KVS) while a thread of the connector loads
    its KV, and schedules it once get_finished says so: the step that admits it never waits for the load."""
    assert instance.worker is not None
    engine = Engine(model_dir, instance.worker.data_plane.address, extra={"lmcached_load_async": True})
    try:
        engine.add("a", PROMPT)
        engine.run()
        engine.saved()
        second = engine.add("b", PROMPT)
        output = engine.step()
        assert output.scheduled_new_reqs == [] and second.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        (load,) = engine.metas[-1].loads
        assert load.background and (load.req_id, load.start, load.end) == ("b", 0, 79)
        engine.loaded()
        output = engine.step()  # this step's end reports the load finished (a step's end is when vLLM asks)...
        assert output.scheduled_new_reqs == []
        output = engine.step()  # ...and the next one schedules the request, its prompt all but computed
        assert [r.req_id for r in output.scheduled_new_reqs] == ["b"]
        assert output.scheduled_new_reqs[0].num_computed_tokens == 79 and output.num_scheduled_tokens["b"] == 1
        assert torch.equal(engine.paged_kv("b", 80), known_kv(PROMPT, 0, 80))
        engine.run()
        assert second.status == RequestStatus.FINISHED_LENGTH_CAPPED
    finally:
        engine.close()


def test_an_async_load_that_fails_is_recomputed_never_served(model_dir: str, instance: HostedInstance) -> None:
    assert instance.worker is not None
    engine = Engine(model_dir, instance.worker.data_plane.address, extra={"lmcached_load_async": True})
    try:
        engine.add("a", PROMPT)
        engine.run()
        engine.saved()
        victim = engine.add("b", PROMPT)

        engine.step(before_load=lambda: evict_everything(instance))
        engine.loaded()
        for _ in range(4):  # reported finished with its blocks marked failed: vLLM recomputes the prompt
            engine.step()
            if victim.num_computed_tokens >= 80:
                break
        assert victim.num_computed_tokens >= 80
        assert torch.equal(engine.paged_kv("b", 80), known_kv(PROMPT, 0, 80))
        engine.run()
        assert victim.status == RequestStatus.FINISHED_LENGTH_CAPPED
    finally:
        engine.close()


def test_a_hosted_instance_on_port_0_is_refused_with_the_reason(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Port 0 would give the instance a port in vLLM's worker process that the scheduler, elsewhere, never learns:
    every lookup would fail and every prompt be recomputed, silently (found by `lmcached bench workload`)."""
    monkeypatch.setenv("LMCACHE_LMCACHE_WORKER_PORT", "0")
    model = ModelConfig(model=model_dir, dtype="bfloat16", seed=0, max_model_len=1024)
    transfer = KVTransferConfig(kv_connector="LmcachedConnector", kv_connector_module_path="lmcached.integrations.vllm", kv_role="kv_both")
    config = VllmConfig(model_config=model, kv_transfer_config=transfer, device_config=DeviceConfig("cpu"))
    with pytest.raises(ValueError, match="fixed lmcache_worker_port"):
        LmcachedConnector(config, KVConnectorRole.SCHEDULER)


def test_a_hosted_hit_is_read_in_place_and_its_blocks_kept_until_placed(instance: HostedInstance) -> None:
    """The hosted instance lends a hit straight from its RAM tier's arena (copying it cost more than placing
    it), all chunks slices of one storage (one batch to place); a clear and new stores while it is being read
    write elsewhere, and its blocks are reused once the reader is done."""
    from lmcached.integrations.vllm import _InProcessKV
    from lmcached.wire.chunk import CPU
    from lmcached.wire.chunks import WHOLE

    worker = instance.worker
    assert worker is not None and worker.storage.arena is not None
    access = _InProcessKV(instance.config, instance, WHOLE)
    tokens = list(range(3 * CHUNK))
    kv = known_kv(tokens, 0, len(tokens))
    assert access.store(tokens, kv, 0, None) == len(tokens)
    arena = worker.storage.arena
    with access.hit(tokens, None) as pieces:
        assert [first for first, _ in pieces] == [0, CHUNK, 2 * CHUNK]
        storages = {piece.untyped_storage().data_ptr() for _, piece in pieces}
        assert storages == {arena.array.ctypes.data}  # the arena itself, one storage for all
        lent = {arena.offset_of(chunk.data) for chunk in worker.storage.backends[CPU]._data.values()}
        instance.call(worker.execute("clear", {"location": CPU, "keys": None}))
        for n in range(1, 6):  # new chunks, which must not land in the lent blocks
            other = list(range(10_000 * n, 10_000 * n + 3 * CHUNK))
            access.store(other, known_kv(other, 0, len(other)), 0, None)
        assert torch.equal(torch.cat([piece for _, piece in pieces], dim=2), kv)
    reused = {arena.offset_of(chunk.data) for chunk in worker.storage.backends[CPU]._data.values()}
    assert not lent & reused
    newest = list(range(90_000, 90_000 + 3 * CHUNK))
    access.store(newest, known_kv(newest, 0, len(newest)), 0, None)
    assert lent & {arena.offset_of(chunk.data) for chunk in worker.storage.backends[CPU]._data.values()}  # free again
