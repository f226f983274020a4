"""The shared remote tier on real redis-server processes (standalone and a 6-node Redis Cluster), each test
starting its own on free ports: write-through, read-through in one round trip, the seed's operations in place,
pins Redis respects, evictions the index hears of, corruption, outages, and start-up errors."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from lmcached.client import AsyncKVClient
from lmcached.errors import ConfigError
from lmcached.fleet.redis_servers import RedisClusterProcs, RedisServer, RedisUnavailable, free_port, redis_server_binary
from lmcached.wire.chunk import REMOTE, Chunk
from lmcached.wire.redis_url import parse_remote_url
from lmcached.worker.instance import Worker
from lmcached.worker.remote import RemoteBackend, RemoteError, pack_value, unpack_value

from .codec_helpers import kv_like_real
from .conftest import CPU, INSTANCE, make_kv, serving, test_config

try:
    redis_server_binary()
except RedisUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs(masters=3, replicas=1) as procs:
        yield procs


def cmdstat(server: RedisServer, command: str) -> int:
    """How many times `server` ran `command` (INFO commandstats)."""
    for line in server.cli("INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def remote_worker(url: str, **config: object) -> Worker:
    worker = Worker(test_config(**{"remote_url": url, "enable_controller": False, "remote_scan_interval": 0.2, **config}))
    await worker.start(connect=False)
    return worker


@pytest.fixture
async def two_workers(redis: RedisServer) -> AsyncIterator[tuple[Worker, Worker]]:
    a, b = await remote_worker(redis.url), await remote_worker(redis.url)
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def fetch(client: AsyncKVClient, tokens: list[int]) -> tuple[torch.Tensor | None, int]:
    """The retrieved KV and how many tokens it covers."""
    got = await client.retrieve(tokens)
    return got, 0 if got is None else got.shape[2]


async def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- URL and values
@pytest.mark.parametrize(
    ("url", "cluster", "nodes", "db", "password"),
    [
        ("redis://localhost:6380/2", False, (("localhost", 6380),), 2, None),
        ("redis://:s3cret@10.0.0.1:6379", False, (("10.0.0.1", 6379),), 0, "s3cret"),
        ("rediss://user:pw@h:7000", False, (("h", 7000),), 0, "pw"),
        ("redis-cluster://a:7000,b:7001,c:7002", True, (("a", 7000), ("b", 7001), ("c", 7002)), 0, None),
        ("redis://h", False, (("h", 6379),), 0, None),
    ],
)
def test_remote_urls_parse(url: str, cluster: bool, nodes: tuple, db: int, password: str | None) -> None:
    parsed = parse_remote_url(url, {})
    assert (parsed.cluster, parsed.nodes, parsed.db, parsed.password) == (cluster, nodes, db, password)
    assert "pw" not in parsed.display and "s3cret" not in parsed.display


def test_the_password_can_come_from_the_environment() -> None:
    assert parse_remote_url("redis://h:1", {"LMCACHED_REMOTE_PASSWORD": "x"}).password == "x"


@pytest.mark.parametrize(
    "url", ["localhost:6379", "http://h:1", "redis://h:notaport", "redis://a:1,b:2", "redis-cluster://a:1/3", "redis://h:1/db", "redis://"]
)
def test_malformed_remote_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="remote_url"):
        test_config(remote_url=url)


def test_a_value_carries_its_chunk_and_any_damage_is_detected() -> None:
    chunk = Chunk(0xABC, 16, (2, 4, 16, 64), "float16", bytes(make_kv(16).numpy().tobytes()))
    value = pack_value(chunk)
    assert unpack_value(value, 0xABC) == chunk
    from lmcached.worker.remote import CorruptRemoteValue

    for damaged in (value[:-1], value[:10], b"x" + value[1:], value[:-5] + b"\0\0\0\0\0"):
        with pytest.raises(CorruptRemoteValue):
            unpack_value(damaged, 0xABC)
    with pytest.raises(CorruptRemoteValue, match="holds chunk"):
        unpack_value(value, 0xABD)
    decompressed = Chunk(0xABC, 16, (2, 4, 16, 64), "float16", chunk.data, lossy="cachegen")  # its lineage travels too
    assert unpack_value(pack_value(decompressed), 0xABC).lossy == "cachegen"
    from lmcached.worker.remote.values import entry_from_head as _entry_from_head

    assert _entry_from_head(pack_value(decompressed)[:4096]) == decompressed.entry


# ---------------------------------------------------------------------------------------------- one Redis
async def test_write_through_then_another_worker_reads_it_in_one_round_trip(redis: RedisServer, two_workers: tuple[Worker, Worker]) -> None:
    a, b = two_workers
    tokens = list(range(16 * 8))
    kv = make_kv(len(tokens))
    async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
        assert await client.store(tokens, kv) == len(tokens)
    await a.storage.flush_behind()
    assert len(a.backends[REMOTE]) == 8
    assert redis.cli("DBSIZE").strip() == "9"  # 8 chunks + the tier id
    mget_before = cmdstat(redis, "mget")
    async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
        assert await client.lookup(tokens) == len(tokens)  # B never saw the chunks: one pipelined peek
        got, n = await fetch(client, tokens)
    assert n == len(tokens) and torch.equal(got, kv)
    assert cmdstat(redis, "mget") - mget_before == 1  # 8 chunks, one MGET
    assert len(b.backends[CPU]) == 8  # read-through kept a RAM copy
    async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
        got, n = await fetch(client, tokens)
    assert cmdstat(redis, "mget") - mget_before == 1 and torch.equal(got, kv)  # served from RAM


async def test_cachegen_at_rest_cuts_the_bytes_in_redis(redis: RedisServer) -> None:
    worker = await remote_worker(redis.url, remote_serde="cachegen", chunk_size=256)
    try:
        tokens = list(range(256 * 2))
        kv = kv_like_real(30, len(tokens), 192, torch.float16)
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            await client.store(tokens, kv)
        await worker.storage.flush_behind()
        remote = worker.backends[REMOTE]
        stats = remote.stats()
        raw = kv.numel() * 2
        assert stats["compressed_chunks"] == 2
        # (4.6× on real SmolLM2 KV; this synthetic KV, with 40× spread between key channels, gives ~4.5×)
        assert raw / stats["bytes"] >= 4.0, raw / stats["bytes"]
        used = int(redis.cli("MEMORY", "USAGE", remote._rkey(next(iter(remote.keys())))))
        assert raw / 2 / used >= 3.5  # Redis's own memory for the value (jemalloc size classes round 1.3 MB up to 1.5)
        worker.backends[CPU].remove(next(iter(remote.keys())))  # force the first chunk to come from Redis
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            got, n = await fetch(client, tokens)
        from lmcached.codecs import get_codec

        codec = get_codec("cachegen")
        first = kv[:, :, :256].contiguous()
        assert n == len(tokens) and torch.equal(got[:, :, :256], codec.decode(codec.encode(first)))  # what cachegen keeps
        assert torch.equal(got[:, :, 256:], kv[:, :, 256:])  # the RAM copy is the raw KV
    finally:
        await worker.stop()


async def test_compress_pin_unpin_and_clear_act_in_redis(redis: RedisServer, two_workers: tuple[Worker, Worker]) -> None:
    a, _ = two_workers
    tokens = list(range(16 * 4))
    kv = make_kv(len(tokens))
    async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
        await client.store(tokens, kv)
        keys = [s.key for s in client.spans(tokens)]
    await a.storage.flush_behind()
    remote = a.backends[REMOTE]
    name = remote._rkey(keys[0])
    assert 0 < int(redis.cli("TTL", name)) <= 86400  # unpinned chunks expire
    result = await a.execute("compress", {"location": REMOTE, "keys": keys, "method": "cachegen"})
    assert result["chunks"] == 4 and result["bytes_after"] < result["bytes_before"]
    assert 0 < int(redis.cli("TTL", name))  # the swap kept the TTL
    assert unpack_value(redis_bytes(redis, name), keys[0]).method == "cachegen"
    await a.execute("pin", {"location": REMOTE, "keys": keys[:2]})
    assert int(redis.cli("TTL", name)) == -1 and remote.info(keys[0]).pinned
    await a.execute("unpin", {"location": REMOTE, "keys": keys[:1]})
    assert int(redis.cli("TTL", name)) > 0 and not remote.info(keys[0]).pinned
    result = await a.execute("decompress", {"location": REMOTE, "keys": keys})
    assert result["chunks"] == 4 and unpack_value(redis_bytes(redis, name), keys[0]).method is None
    a.backends[CPU].remove(keys[0])
    a.backends[CPU].remove(keys[1])
    async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
        got, _ = await fetch(client, tokens)
    from lmcached.codecs import get_codec

    codec = get_codec("cachegen")
    for i in (0, 1):  # from Redis: what cachegen kept of each chunk (it went there and back)
        part = kv[:, :, 16 * i : 16 * (i + 1)].contiguous()
        assert torch.equal(got[:, :, 16 * i : 16 * (i + 1)], codec.decode(codec.encode(part)))
    assert torch.equal(got[:, :, 32:], kv[:, :, 32:])
    result = await a.execute("clear", {"location": REMOTE, "keys": None})
    assert result["num_tokens"] == len(tokens) and redis.cli("DBSIZE").strip() == "1"


def redis_bytes(redis: RedisServer, name: str) -> bytes:
    import redis as redis_py

    return redis_py.Redis(port=redis.port).get(name)  # type: ignore[return-value]


async def test_a_compress_racing_a_rewrite_never_tears_a_value(redis: RedisServer, two_workers: tuple[Worker, Worker]) -> None:
    a, b = two_workers
    tokens = list(range(16))
    async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
        await client.store(tokens, make_kv(16, seed=1))
        key = client.spans(tokens)[0].key
    await a.storage.flush_behind()
    remote = a.backends[REMOTE]
    old = remote.get(key)
    newer = Chunk(key, 16, old.shape, old.dtype, bytes(make_kv(16, seed=2).numpy().tobytes()))
    await b.storage.store([newer], REMOTE)  # someone rewrote it after A read it
    assert not remote.replace_if_same(old, Chunk(key, 16, old.shape, old.dtype, b"garbage", "cachegen"))
    assert unpack_value(redis_bytes(redis, remote._rkey(key)), key) == newer


async def test_redis_evicts_only_unpinned_chunks_and_the_index_hears_of_it(redis: RedisServer) -> None:
    redis.cli("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    async with serving(test_config(remote_url=redis.url, remote_scan_interval=0.3, local_cpu=True)) as run:
        worker = run.daemon.worker
        assert worker is not None
        pinned_tokens = list(range(16 * 4))
        async with AsyncKVClient(run.data) as client:
            await client.store(pinned_tokens, make_kv(len(pinned_tokens), channels=512))
            keys = [s.key for s in client.spans(pinned_tokens)]
        await worker.storage.flush_behind()
        await worker.flush_reports()
        tier = run.daemon.controller.index.tiers[worker.storage.remote_tier]
        await wait_until(lambda: len(tier) == 4)
        status, body = await run.post("/pin", {"tokens": pinned_tokens, "instance_id": "lmcache_default_instance", "location": REMOTE})
        assert status == 200 and (await run.wait_event(body["event_id"]))["status"] == "finished"
        assert all(info.pinned for info in worker.backends[REMOTE].infos())
        used = int(redis.cli("INFO", "memory").split("used_memory:")[1].split()[0])
        redis.cli("CONFIG", "SET", "maxmemory", str(used + 600_000))
        later = list(range(10_000, 10_000 + 16 * 40))
        async with AsyncKVClient(run.data) as client:
            await client.store(later, make_kv(len(later), channels=512, seed=3))  # ~2.6 MB: far past maxmemory
        await worker.storage.flush_behind()
        assert int(redis.cli("INFO", "stats").split("evicted_keys:")[1].split()[0]) > 0
        remote = worker.backends[REMOTE]
        assert all(redis.cli("EXISTS", remote._rkey(k)).strip() == "1" for k in keys)  # pins held
        in_redis = {k for k in remote.keys() if redis.cli("EXISTS", remote._rkey(k)).strip() == "1"}
        await wait_until(lambda: set(remote.keys()) == in_redis)  # the mirror dropped what Redis evicted
        await worker.flush_reports()
        await wait_until(lambda: set(tier) == set(remote.keys()))


async def test_a_corrupted_value_is_a_clean_miss_and_is_deleted(redis: RedisServer, two_workers: tuple[Worker, Worker]) -> None:
    a, b = two_workers
    tokens = list(range(16 * 3))
    async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
        await client.store(tokens, make_kv(len(tokens)))
        keys = [s.key for s in client.spans(tokens)]
    await a.storage.flush_behind()
    import redis as redis_py

    raw = redis_py.Redis(port=redis.port)
    name = a.backends[REMOTE]._rkey(keys[1])
    value = bytearray(raw.get(name))  # type: ignore[arg-type]
    value[-3] ^= 0xFF
    raw.set(name, bytes(value))
    async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
        got, n = await fetch(client, tokens)
    assert n == 16  # chunk 0 only: chunk 1 failed its checksum, so the prefix stops there
    assert raw.exists(name) == 0


async def test_an_outage_queues_writes_serves_ram_then_catches_up(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    worker = await remote_worker(redis.url)
    try:
        remote = worker.backends[REMOTE]
        caplog.set_level(logging.INFO, logger="lmcached.worker.remote")
        redis.stop()
        tokens = list(range(16 * 6))
        kv = make_kv(len(tokens))
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            assert await client.store(tokens, kv) == len(tokens)  # RAM takes it, the remote copy waits
            got, n = await fetch(client, tokens)
            assert n == len(tokens) and torch.equal(got, kv)
            assert await client.lookup(list(range(50_000, 50_064))) == 0  # a miss is a clean miss while down
        await wait_until(lambda: not remote.up)
        assert worker.storage.stats()[REMOTE]["write_queue_bytes"] > 0
        await asyncio.sleep(5)  # the event listener retries twice or more meanwhile: one log line per cause, not per retry
        remote_lines = [r for r in caplog.records if r.name == "lmcached.worker.remote.evictions" and "notifications unavailable" in r.getMessage()]
        assert len(remote_lines) <= 1, [r.getMessage() for r in remote_lines]
        back = RedisServer(redis.port).start()
        try:
            assert await worker.storage.flush_behind(15)
            assert remote.up and back.cli("DBSIZE").strip() == "6"  # the tier id was lost with the old process
        finally:
            back.stop()
    finally:
        await worker.stop()


async def test_the_index_holds_a_shared_tier_once_and_moves_go_through_it(redis: RedisServer, tmp_path: Path) -> None:
    async with serving(test_config(remote_url=redis.url)) as run:
        other = Worker(
            test_config(remote_url=redis.url, controller_url=f"127.0.0.1:{run.daemon.ports.monitor}", lmcache_instance_id="other")
        )
        await other.start()
        try:
            await asyncio.wait_for(other.connected.wait(), 10)
            tokens = list(range(16 * 5))
            await run.store(tokens, make_kv(len(tokens)))
            worker = run.daemon.worker
            await worker.storage.flush_behind()
            await worker.flush_reports()
            index = run.daemon.controller.index
            await wait_until(lambda: len(index.tiers[worker.storage.remote_tier]) == 5)
            assert index.total_chunks == 5  # RAM and the shared tier hold the same 5 keys
            status, metrics = await run.get("/metrics")
            tier_lines = [line for line in metrics.splitlines() if line.startswith("lmcached_remote_tier_chunks{")]
            assert tier_lines == [f'lmcached_remote_tier_chunks{{tier="{worker.storage.remote_tier}"}} 5.0']  # once, for two workers
            assert 'lmcached_remote_up{instance_id="other"' in metrics
            status, body = await run.post("/lookup", {"tokens": tokens})
            assert body["layout_info"]["other"] == [REMOTE, len(tokens)]  # reachable through the shared tier
            assert body["layout_info"]["lmcache_default_instance"][0] == CPU
            # instance -> instance through the tier: the other instance pulls it into its own RAM
            status, body = await run.post(
                "/move", {"old_position": ["other", REMOTE], "new_position": ["other", CPU], "tokens": tokens, "copy": True}
            )
            assert status == 200, body
            assert (await run.wait_event(body["event_id"]))["status"] == "finished"
            assert len(other.backends[CPU]) == 5
            status, body = await run.get("/instances")
            remote_stats = body["other"]["locations"][REMOTE]
            assert remote_stats["chunks"] == 5
            # remote -> local move (not a copy) empties the tier for everyone
            status, body = await run.post(
                "/move", {"old_position": ["other", REMOTE], "new_position": ["other", CPU], "tokens": tokens, "copy": False}
            )
            assert (await run.wait_event(body["event_id"]))["status"] == "finished"
            await wait_until(lambda: len(index.tiers[worker.storage.remote_tier]) == 0)
        finally:
            await other.stop()


async def test_a_host_controller_learns_the_redis_chunks_its_own_engine_meets(redis: RedisServer) -> None:
    """Two hosts, each with its own controller, one Redis (the README's fleet): what host C's worker meets in
    Redis on a lookup or a read-through reaches C's controller at once, not only after a restart. The scans are
    an hour apart here, so only that path can tell it."""
    config = test_config(remote_url=redis.url, remote_scan_interval=3600.0)
    async with serving(config) as host_b, serving(config) as host_c:
        tokens = list(range(16 * 5))
        kv = make_kv(len(tokens))
        await host_b.store(tokens, kv)
        await host_b.daemon.worker.storage.flush_behind()
        index_c = host_c.daemon.controller.index
        tier = host_c.daemon.worker.storage.remote_tier
        assert len(index_c.tiers.get(tier, ())) == 0

        async with AsyncKVClient(host_c.data) as client:
            assert await client.lookup(tokens[:48]) == 48  # a lookup's peek finds 3 chunks written by B
        await wait_until(lambda: len(index_c.tiers.get(tier, ())) == 3, timeout=5)
        async with AsyncKVClient(host_c.data) as client:
            got, n = await fetch(client, tokens)  # a read-through of all 5
        assert n == len(tokens) and torch.equal(got, kv)
        await wait_until(lambda: len(index_c.tiers.get(tier, ())) == 5, timeout=5)

        status, body = await host_c.post("/lookup", {"tokens": tokens})
        assert body["layout_info"][INSTANCE] == [CPU, len(tokens)]  # read-through kept RAM copies on C
        status, body = await host_c.post("/compress", {"instance_id": INSTANCE, "location": REMOTE, "method": "cachegen", "tokens": tokens})
        assert status == 200 and body["num_tokens"] == len(tokens)
        result = (await host_c.wait_event(body["event_id"]))["result"]
        assert result["num_tokens"] == len(tokens) and result["chunks"] == 5


# ---------------------------------------------------------------------------------------------- Redis Cluster
async def test_a_cluster_serves_a_prompt_across_slots_and_survives_a_failover(cluster: RedisClusterProcs) -> None:
    a, b = await remote_worker(cluster.url), await remote_worker(cluster.url, remote_keep_local=False)
    try:
        tokens = list(range(16 * 12))
        kv = make_kv(len(tokens))
        async with AsyncKVClient(f"127.0.0.1:{a.data_port}") as client:
            await client.store(tokens, kv)
        await a.storage.flush_behind()
        async with AsyncKVClient(f"127.0.0.1:{b.data_port}") as client:
            got, n = await fetch(client, tokens)
            assert n == len(tokens) and torch.equal(got, kv)
            victim = cluster.primaries()[0]
            victim.kill()
            # During the failover every answer is either the right KV or a clean (shorter) miss, never an error.
            deadline = time.monotonic() + 20
            full_again = False
            while time.monotonic() < deadline:
                got, n = await fetch(client, tokens)
                assert n % 16 == 0 and (n == 0 or torch.equal(got, kv[:, :, :n]))
                if n == len(tokens):
                    full_again = True
                    break
                await asyncio.sleep(0.1)
            assert full_again, "the replicas never took over"
    finally:
        await a.stop()
        await b.stop()


# ---------------------------------------------------------------------------------------------- start-up errors
def serve_with_remote(url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lmcached", "serve", "--port", "0", "--monitor-port", "0", "--worker-port", "0"]
    import os

    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "LMCACHE_REMOTE_URL": url, **(env or {})})


def test_startup_refuses_a_malformed_url_with_one_line() -> None:
    done = serve_with_remote("redis://localhost:notaport")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "remote_url" in done.stderr


def test_startup_refuses_a_wrong_password_with_one_line() -> None:
    with RedisServer(free_port(), args=["--requirepass", "right"]) as server:
        done = serve_with_remote(f"redis://:wrong@127.0.0.1:{server.port}")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "authentication failed" in done.stderr and done.stderr.strip().count("\n") == 0
        ok = serve_with_remote(f"redis://127.0.0.1:{server.port}", {"LMCACHED_REMOTE_PASSWORD": "wrong"})
        assert ok.returncode == 2 and "authentication failed" in ok.stderr


def test_startup_refuses_something_that_is_not_redis() -> None:
    import http.server
    import threading

    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        done = serve_with_remote(f"redis://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "Redis" in done.stderr and done.stderr.strip().count("\n") == 0
    nobody = serve_with_remote(f"redis://127.0.0.1:{free_port()}")
    assert nobody.returncode == 2 and "unreachable" in nobody.stderr


async def test_no_remote_url_means_no_remote_tier(tmp_path: Path) -> None:
    worker = Worker(test_config(enable_controller=False))
    await worker.start(connect=False)
    try:
        assert REMOTE not in worker.backends and worker.storage.remote_tier is None
    finally:
        await worker.stop()


def test_remote_backend_reports_its_url_without_the_password(redis: RedisServer) -> None:
    backend = RemoteBackend(parse_remote_url(redis.url))
    try:
        stats = backend.stats()
        assert stats["up"] is True and stats["url"] == f"redis://127.0.0.1:{redis.port}"
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [("remote_serde", "zstd", "remote_serde"), ("remote_ttl_s", -1.0, "remote_ttl_s"), ("remote_namespace", "a:b", "remote_namespace")],
)
def test_remote_settings_are_checked(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        test_config(**{key: value})


async def test_a_scan_never_undoes_a_newer_pin_or_unpin(redis: RedisServer) -> None:
    """The reconciliation scan reads pin states (TTLs), then applies them; a pin or unpin made in between is
    newer than what it read and must stand (on a slow CI machine a stale scan re-pinned an unpinned chunk), and
    a chunk written in between is not "gone"."""
    worker = await remote_worker(redis.url, remote_scan_interval=3600.0)  # no scan but the ones below
    try:
        tokens = list(range(16 * 2))
        async with AsyncKVClient(f"127.0.0.1:{worker.data_port}") as client:
            await client.store(tokens, make_kv(len(tokens)))
            first, second = [s.key for s in client.spans(tokens)]
        await worker.storage.flush_behind()
        remote = worker.backends[REMOTE]
        assert remote.set_pinned(first, True)
        late = Chunk(0xFEED, 16, (2, 4, 16, 64), "float16", bytes(make_kv(16).numpy().tobytes()))
        scan_read = remote.peek_many  # reconcile calls it between reading the tier and applying what it read

        def meanwhile(keys: list[int]) -> list[object]:
            remote.set_pinned(first, False)  # an unpin lands while the scan is half done…
            remote.set_pinned(second, True)  # …and a pin
            remote.put_many([late])  # …and a new chunk
            return scan_read(keys)

        remote.peek_many = meanwhile  # type: ignore[method-assign]
        remote.reconcile()
        assert not remote.info(first).pinned and remote.info(second).pinned and 0xFEED in remote
        assert int(redis.cli("TTL", remote._rkey(first))) > 0 and int(redis.cli("TTL", remote._rkey(second))) == -1
        remote.peek_many = scan_read  # type: ignore[method-assign]
        remote.reconcile()  # a later scan agrees with Redis
        assert not remote.info(first).pinned and remote.info(second).pinned and 0xFEED in remote
    finally:
        await worker.stop()


def test_rediss_stores_and_retrieves_over_real_tls(tmp_path: Path) -> None:
    """rediss:// against a redis-server that speaks only TLS (a private CA, client certificates required, as
    Redis' default asks): with the CA and a client certificate, chunks go in and out; without the CA the
    server's certificate is refused, and a plain redis:// to the TLS port fails — each with one clear line."""
    from .conftest import make_certificates

    certs = make_certificates(tmp_path / "certs")
    with RedisServer(free_port(), tls=certs) as server:
        assert server.url.startswith("rediss://")
        config = test_config(
            remote_url=server.url,
            remote_tls_ca=certs["ca"],
            remote_tls_cert=certs["client_cert"],
            remote_tls_key=certs["client_key"],
            enable_controller=False,
        )
        kv = make_kv(32)

        async def round_trip() -> None:
            worker = Worker(config.replace(local_cpu=False))
            await worker.start(connect=False)
            try:
                async with AsyncKVClient(worker.data_plane.address) as client:
                    assert await client.store(list(range(32)), kv) == 32
                    assert torch.equal(await client.retrieve(list(range(32))), kv)
            finally:
                await worker.stop()

        asyncio.run(round_trip())
        assert int(server.cli("DBSIZE").strip()) >= 2  # the chunks are in this Redis, over TLS
        with pytest.raises(RemoteError, match="unreachable.*(certificate|CERTIFICATE)"):
            RemoteBackend(config.replace(remote_tls_ca=None).remote)  # type: ignore[arg-type]
        with pytest.raises(RemoteError):
            RemoteBackend(config.replace(remote_url=server.url.replace("rediss", "redis")).remote)  # type: ignore[arg-type]
