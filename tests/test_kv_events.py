"""KV events for routers: a real daemon publishes its tiers over ZMQ and vLLM's own decoder follows them
(`vllm.distributed.kv_events.KVEventBatch`, the classes vLLM's publisher encodes and its subscriber example
decodes), through store, compress, clear, move, eviction and replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lmcached.client import AsyncKVClient
from lmcached.config import Config, load_config
from lmcached.errors import ConfigError
from lmcached.wire.chunks import chunk_spans
from lmcached.wire.kv_events import END_SEQ

from .conftest import CPU, DISK, INSTANCE, Running, make_kv, serving, test_config

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")
kv_events = pytest.importorskip("vllm.distributed.kv_events")

TOKENS = list(range(700, 740))  # 2 full chunks of 16 and a partial one of 8
OTHER = list(range(900, 932))  # 2 full chunks


class Subscriber:
    """A router's view of one publisher, built only from what vLLM's decoder makes of the messages:
    medium -> block hashes held there, and each block's parent and tokens."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None) -> None:
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint.replace("0.0.0.0", "127.0.0.1"))
        self.replay_endpoint = replay_endpoint.replace("0.0.0.0", "127.0.0.1") if replay_endpoint else None
        self.decoder = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch)
        self.view: dict[str, set[int]] = {}
        self.blocks: dict[int, Any] = {}
        self.events: list[Any] = []
        self.next_seq: int | None = None

    def close(self) -> None:
        self.sub.close(linger=0)
        self.context.term()

    def apply(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq < self.next_seq:
            return  # seen already (a replay overlapping what arrived live)
        self.next_seq = seq + 1
        batch = self.decoder.decode(payload)
        for event in batch.events:
            self.events.append(event)
            if isinstance(event, kv_events.BlockStored):
                self.view.setdefault(event.medium, set()).update(event.block_hashes)
                for key in event.block_hashes:
                    self.blocks[key] = event
            elif isinstance(event, kv_events.BlockRemoved):
                self.view.setdefault(event.medium, set()).difference_update(event.block_hashes)
            elif isinstance(event, kv_events.AllBlocksCleared):
                self.view.clear()

    def receive(self, timeout: float = 0.2) -> None:
        while self.sub.poll(int(timeout * 1000)):
            topic, seq, payload = self.sub.recv_multipart()
            self.apply(int.from_bytes(seq, "big"), payload)
            timeout = 0.05

    def replay(self, start: int = 0) -> None:
        """Ask the replay socket for every batch from `start` on (vLLM's protocol: a DEALER sends b"" + seq)."""
        assert self.replay_endpoint is not None
        dealer = self.context.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                assert dealer.poll(5000), "no answer from the replay socket"
                _, _topic, seq, payload = dealer.recv_multipart()
                if seq == END_SEQ:
                    return
                self.apply(int.from_bytes(seq, "big"), payload)
        finally:
            dealer.close(linger=0)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: the subscriber sees {self.view}"
            await asyncio.to_thread(self.receive)

    def held(self, medium: str) -> set[int]:
        return self.view.get(medium, set())


def keys(tokens: list[int], salt: str | None = None) -> set[int]:
    return {s.key for s in chunk_spans(tokens, 16, True, salt)}


def events_config(tmp_path: Path, **changes: Any) -> Config:
    return test_config(kv_events={"endpoint": "tcp://*:0", "replay_endpoint": "tcp://*:0"}, **changes)


@pytest.fixture
async def publishing(tmp_path: Path) -> AsyncIterator[tuple[Running, Subscriber]]:
    async with serving(events_config(tmp_path, local_disk=str(tmp_path / "disk"))) as run:
        worker = run.daemon.worker
        assert worker is not None and worker.storage.kv_events is not None
        publisher = worker.storage.kv_events
        subscriber = Subscriber(publisher.endpoint, publisher.replay_endpoint)
        await asyncio.sleep(0.3)  # ZMQ's slow joiner: a SUB socket misses what is sent before it is connected
        try:
            yield run, subscriber
        finally:
            subscriber.close()


async def chunks_per_tier(run: Running) -> dict[str, int]:
    """What the controller's index says each tier of the instance holds."""
    _, answer = await run.post("/query_worker_info", {"instance_id": INSTANCE})
    out: dict[str, int] = {}
    for info in answer["worker_infos"]:
        for location, stats in info["locations"].items():
            out[location] = out.get(location, 0) + stats.get("chunks", 0)
    return out


async def settled(run: Running, subscriber: Subscriber, expected: dict[str, set[int]]) -> None:
    """The subscriber's view of each tier is `expected`, and so is the controller's index (its counts)."""
    mediums = {CPU: "CPU", DISK: "DISK"}
    await subscriber.until(lambda: all(subscriber.held(mediums[loc]) == keys for loc, keys in expected.items()), f"expected {expected}")
    counts = await chunks_per_tier(run)
    assert {loc: counts.get(loc, 0) for loc in expected} == {loc: len(keys) for loc, keys in expected.items()}


async def test_a_prompt_is_followed_through_its_tiers_by_vllms_own_decoder(publishing: tuple[Running, Subscriber]) -> None:
    run, subscriber = publishing
    prompt = keys(TOKENS)
    await run.store(TOKENS, make_kv(len(TOKENS)))
    await settled(run, subscriber, {CPU: prompt, DISK: prompt})

    # Each block says what a router needs to rebuild keys at its own block size: tokens, parent, block size.
    ram = {key: subscriber.blocks[key] for key in prompt}
    first = next(e for e in ram.values() if e.parent_block_hash is None)
    chain, tokens = [first], list(first.token_ids)
    while len(chain) < len(ram):
        chain.append(next(e for e in ram.values() if e.parent_block_hash == chain[-1].block_hashes[0]))
        tokens += chain[-1].token_ids
    assert tokens == TOKENS and {e.block_size for e in chain} == {16}
    assert [e.block_hashes[0] for e in chain] == [s.key for s in chunk_spans(TOKENS, 16)]

    # A compress changes the bytes, not the blocks: nothing to tell a router.
    before = len(subscriber.events)
    _, answer = await run.post("/compress", {"instance_id": INSTANCE, "method": "lossless", "location": CPU, "tokens": TOKENS})
    assert (await run.wait_event(answer["event_id"]))["status"] == "finished"
    await asyncio.to_thread(subscriber.receive, 0.3)
    assert len(subscriber.events) == before

    # Cleared from RAM: removed from CPU only; the lookup now finds it on disk.
    _, answer = await run.post("/clear", {"instance_id": INSTANCE, "location": CPU, "tokens": TOKENS})
    await run.wait_event(answer["event_id"])
    await settled(run, subscriber, {CPU: set(), DISK: prompt})
    assert (await run.post("/lookup", {"tokens": TOKENS}))[1]["layout_info"] == {INSTANCE: [DISK, len(TOKENS)]}

    # Moved from disk to RAM: stored in CPU, removed from DISK.
    _, answer = await run.post("/move", {"old_position": [INSTANCE, DISK], "new_position": [INSTANCE, CPU], "tokens": TOKENS})
    assert (await run.wait_event(answer["event_id"]))["status"] == "finished"
    await settled(run, subscriber, {CPU: prompt, DISK: set()})
    assert (await run.post("/lookup", {"tokens": TOKENS}))[1]["layout_info"] == {INSTANCE: [CPU, len(TOKENS)]}

    # Everything cleared: nothing left anywhere.
    _, answer = await run.post("/clear", {"instance_id": INSTANCE, "location": CPU})
    await run.wait_event(answer["event_id"])
    await settled(run, subscriber, {CPU: set(), DISK: set()})
    removed = [e for e in subscriber.events if isinstance(e, kv_events.BlockRemoved)]
    assert {k for e in removed if e.medium == "CPU" for k in e.block_hashes} == prompt


async def test_a_late_subscriber_catches_up_through_replay(publishing: tuple[Running, Subscriber]) -> None:
    run, live = publishing
    await run.store(TOKENS, make_kv(len(TOKENS)))
    _, answer = await run.post("/clear", {"instance_id": INSTANCE, "location": DISK, "tokens": TOKENS})
    await run.wait_event(answer["event_id"])
    await run.store(OTHER, make_kv(len(OTHER), seed=1))
    expected = {CPU: keys(TOKENS) | keys(OTHER), DISK: keys(OTHER)}
    await settled(run, live, expected)

    publisher = run.daemon.worker.storage.kv_events  # type: ignore[union-attr]
    late = Subscriber(publisher.endpoint, publisher.replay_endpoint)
    try:
        late.replay(0)  # from the first batch: AllBlocksCleared, then everything since
        assert isinstance(late.events[0], kv_events.AllBlocksCleared)
        assert late.view == live.view and late.next_seq == live.next_seq
    finally:
        late.close()


async def test_lru_eviction_is_published_as_a_removal(tmp_path: Path) -> None:
    chunk_bytes = 2 * 4 * 16 * 64 * 2  # make_kv's [2, 4 layers, 16 tokens, 64 channels] in fp16
    config = events_config(tmp_path, max_local_cpu_size=3.5 * chunk_bytes / 1024**3)
    async with serving(config) as run:
        publisher = run.daemon.worker.storage.kv_events  # type: ignore[union-attr]
        subscriber = Subscriber(publisher.endpoint)
        await asyncio.sleep(0.3)
        try:
            async with AsyncKVClient(run.data) as client:
                await client.store(OTHER, make_kv(len(OTHER)))
                await subscriber.until(lambda: subscriber.held("CPU") == keys(OTHER), "the first prompt stored")
                await client.store(TOKENS[:32], make_kv(32, seed=2))  # two more chunks: only three fit
            await subscriber.until(lambda: len(subscriber.held("CPU")) == 3, "one chunk evicted")
            assert keys(TOKENS[:32]) <= subscriber.held("CPU")
            evicted = keys(OTHER) - subscriber.held("CPU")
            assert len(evicted) == 1
            removed = [e for e in subscriber.events if isinstance(e, kv_events.BlockRemoved)]
            assert [(e.medium, set(e.block_hashes)) for e in removed] == [("CPU", evicted)]
            await run.wait_cached(OTHER, 0)  # the controller agrees: the prompt's first chunk is gone
        finally:
            subscriber.close()


async def test_salted_chunks_carry_their_salt(publishing: tuple[Running, Subscriber]) -> None:
    run, subscriber = publishing
    async with AsyncKVClient(run.data) as client:
        await client.store(TOKENS, make_kv(len(TOKENS)), salt="tenant-a")
    await subscriber.until(lambda: subscriber.held("CPU") == keys(TOKENS, "tenant-a"), "salted prompt stored")
    assert {tuple(tuple(k) for k in subscriber.blocks[k].extra_keys) for k in keys(TOKENS, "tenant-a")} == {(("tenant-a",),)}


def test_kv_events_settings_are_vllms_fields_checked_at_start_up() -> None:
    assert Config().kv_events_settings is None
    assert Config(enable_kv_events=True).kv_events_settings.endpoint == "tcp://*:5557"  # type: ignore[union-attr]
    env = load_config(environ={"LMCACHE_KV_EVENTS": '{"endpoint": "tcp://*:6000", "topic": "kv", "max_queue_size": 5}'})
    assert env.kv_events_settings is not None and (env.kv_events_settings.endpoint, env.kv_events_settings.topic) == ("tcp://*:6000", "kv")
    assert Config(kv_events={"enable_kv_cache_events": False}).kv_events_settings is None
    for bad, needle in (
        ({"endpont": "tcp://*:1"}, "unknown field 'endpont'"),
        ({"endpoint": "localhost:1"}, "ZMQ address"),
        ({"publisher": "kafka"}, "publisher"),
        ({"hwm": 0}, "hwm"),
    ):
        with pytest.raises(ConfigError, match=needle):
            Config(kv_events=bad)
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(environ={"LMCACHE_KV_EVENTS": "endpoint=tcp://*:1"})


def test_each_tensor_parallel_rank_publishes_on_endpoints_of_its_own() -> None:
    settings = Config(kv_events={"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600"}).kv_events_settings
    assert settings is not None
    assert settings.for_rank(0) is settings
    assert (settings.for_rank(2).endpoint, settings.for_rank(2).replay_endpoint) == ("tcp://*:5559", "tcp://*:5602")
    any_port = Config(kv_events={"endpoint": "tcp://*:0", "replay_endpoint": "ipc:///tmp/kv-replay"}).kv_events_settings
    assert any_port is not None
    assert (any_port.for_rank(1).endpoint, any_port.for_rank(1).replay_endpoint) == ("tcp://*:0", "ipc:///tmp/kv-replay_rank1")


async def test_an_endpoint_that_cannot_be_bound_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    taken = zmq.Context.instance().socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://*")
    try:
        with pytest.raises(ConfigError, match=f"cannot open tcp://\\*:{port}"):
            async with serving(test_config(kv_events={"endpoint": f"tcp://*:{port}"})):
                pass
    finally:
        taken.close(linger=0)


async def test_the_shared_redis_tier_is_published_as_remote_storage_and_its_expiries_as_removals(tmp_path: Path) -> None:
    from lmcached.fleet.redis_servers import RedisServer, RedisUnavailable, free_port, redis_server_binary

    try:
        redis_server_binary()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    with RedisServer(free_port()) as redis:
        async with serving(events_config(tmp_path, remote_url=redis.url)) as run:
            worker = run.daemon.worker
            assert worker is not None and worker.storage.kv_events is not None
            subscriber = Subscriber(worker.storage.kv_events.endpoint)
            await asyncio.sleep(0.3)
            try:
                await run.store(TOKENS, make_kv(len(TOKENS)))
                await worker.storage.flush_behind()
                prompt = keys(TOKENS)
                await subscriber.until(
                    lambda: subscriber.held("STORAGE") == prompt and subscriber.held("CPU") == prompt, "in RAM and Redis"
                )
                stored = subscriber.blocks[next(iter(prompt))]
                assert (stored.locality, stored.ownership) == ("REMOTE", worker.storage.remote_tier)

                # Redis drops one on its own (an expiry, a DEL by an operator): its keyevent becomes a removal.
                gone = next(s.key for s in chunk_spans(TOKENS, 16))
                redis.cli("DEL", worker.backends["RemoteBackend"]._rkey(gone))  # type: ignore[attr-defined]
                await subscriber.until(lambda: subscriber.held("STORAGE") == prompt - {gone}, "the deleted key removed")
                assert subscriber.held("CPU") == prompt  # RAM still has it
                removed = [e for e in subscriber.events if isinstance(e, kv_events.BlockRemoved)]
                assert [(e.medium, e.block_hashes, e.locality) for e in removed] == [("STORAGE", [gone], "REMOTE")]
            finally:
                subscriber.close()
