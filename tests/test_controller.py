"""The HTTP API against a real daemon on port 0: every endpoint, its answers and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmcached.client import AsyncKVClient
from lmcached.config import Config
from lmcached.worker.instance import Worker

from .conftest import CPU, DISK, INSTANCE, SEED_TOKENS, Running, make_kv, prometheus_samples, serving, test_config

TOKENS = list(range(500, 560))  # 3 full chunks of 16 and a partial one of 12


def body(**kw: object) -> dict[str, object]:
    return {"instance_id": INSTANCE, "location": CPU, "tokens": TOKENS, **kw}


async def test_seed_flow_lookup_compress_check_finish_decompress(running: Running) -> None:
    kv = make_kv(len(SEED_TOKENS))
    await running.store(SEED_TOKENS, kv)
    status, answer = await running.post("/lookup", {"tokens": SEED_TOKENS})
    assert status == 200 and answer["layout_info"] == {INSTANCE: [CPU, 12]} and answer["event_id"]

    status, answer = await running.post(
        "/compress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS}
    )
    assert status == 200 and answer["num_tokens"] == 12
    event = await running.wait_event(answer["event_id"])
    assert event["status"] == "finished" and event["result"]["num_tokens"] == 12
    assert event["result"]["bytes_after"] < event["result"]["bytes_before"]

    _, instances = await running.get("/instances")
    cpu = instances[INSTANCE]["locations"][CPU]
    assert cpu["compressed_chunks"] == 1 and cpu["bytes"] == event["result"]["bytes_after"]

    async with AsyncKVClient(running.data) as client:
        out = await client.retrieve(SEED_TOKENS)
    assert out is not None and out.shape == kv.shape and not torch.equal(out, kv)  # lossy, decoded transparently
    assert (out.float() - kv.float()).norm() / kv.float().norm() < 0.2

    status, answer = await running.post(
        "/decompress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS}
    )
    assert status == 200 and answer["num_tokens"] == 12
    assert (await running.wait_event(answer["event_id"]))["status"] == "finished"
    _, instances = await running.get("/instances")
    assert instances[INSTANCE]["locations"][CPU]["compressed_chunks"] == 0


async def test_lossless_compress_round_trips_bit_exact(running: Running) -> None:
    kv = make_kv(len(TOKENS), dtype=torch.bfloat16)
    await running.store(TOKENS, kv)
    await running.post("/clear", body(location=DISK))  # only the compressed RAM copy remains
    _, answer = await running.post("/compress", body(method="lossless"))
    assert (await running.wait_event(answer["event_id"]))["status"] == "finished"
    await running.wait_cached(TOKENS, len(TOKENS))
    async with AsyncKVClient(running.data) as client:
        out = await client.retrieve(TOKENS)
    assert out is not None and torch.equal(out, kv)


async def test_nothing_cached_is_200_with_zero_tokens(running: Running) -> None:
    for path, extra in (("/compress", {"method": "cachegen"}), ("/pin", {}), ("/unpin", {}), ("/clear", {})):
        status, answer = await running.post(path, body(tokens=[1, 2, 3], **extra))
        assert (status, answer["num_tokens"]) == (200, 0), path
        assert (await running.wait_event(answer["event_id"]))["status"] == "finished"


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/compress", b"{not json", 400, "not valid JSON"),
        ("/compress", b"", 400, "empty"),
        ("/compress", b"[1, 2]", 400, "JSON object"),
        ("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": [1]}, 422, "method"),
        ("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": [1], "method": "zip"}, 400, "unknown method"),
        ("/compress", {"instance_id": "nope", "location": CPU, "tokens": [1], "method": "cachegen"}, 404, "unknown instance"),
        ("/compress", {"instance_id": INSTANCE, "location": "GPU", "tokens": [1], "method": "cachegen"}, 400, "unknown location"),
        ("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": "1,2", "method": "cachegen"}, 422, "tokens"),
        ("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": [1, True], "method": "cachegen"}, 422, "integers"),
        ("/compress", {"instance_id": INSTANCE, "location": CPU, "tokens": [-4], "method": "cachegen"}, 422, "token ids"),
        ("/compress", {"instance_id": 7, "location": CPU, "tokens": [1], "method": "cachegen"}, 422, "instance_id"),
        ("/lookup", {}, 422, "tokens"),
        ("/pin", {"instance_id": INSTANCE, "tokens": [1]}, 422, "location"),
        ("/move", {"old_position": [INSTANCE], "new_position": [INSTANCE, DISK], "tokens": [1]}, 422, "old_position"),
        ("/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, CPU], "tokens": [1]}, 400, "same"),
        ("/move", {"old_position": [INSTANCE, CPU], "new_position": ["ghost", CPU], "tokens": [1]}, 404, "ghost"),
        ("/check_finish", {"event_id": "no-such-event"}, 404, "unknown event_id"),
        ("/health", {"instance_id": "nope"}, 404, "unknown instance"),
        ("/query_worker_info", {"instance_id": "nope"}, 404, "unknown instance"),
    ],
)
async def test_bad_requests_get_4xx_with_detail(running: Running, path: str, payload: object, status: int, needle: str) -> None:
    got, answer = await running.post(path, payload)
    assert got == status, answer
    assert needle in answer["detail"]


async def test_unknown_path_is_json_404(running: Running) -> None:
    got, answer = await running.post("/compres", {})
    assert got == 404 and "detail" in answer
    got, answer = await running.get("/compress")
    assert got == 405


async def test_oversize_body_is_413(tmp_path: Path) -> None:
    from lmcached.serve import Daemon

    daemon = Daemon(test_config(max_request_bytes=1000))
    ports = await daemon.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{ports.http}/lookup", data=b"[" + b"1," * 2000 + b"1]") as resp:
                assert resp.status == 413
                assert "limit of 1000 bytes" in (await resp.json())["detail"]
    finally:
        await daemon.stop()


async def test_pin_protects_from_eviction_and_unpin_releases(tmp_path: Path) -> None:

    kv = make_kv(16, layers=2, channels=16)  # 2 KB per chunk
    async with serving(test_config(max_local_cpu_size=5000 / 1024**3)) as run:
        first = list(range(16))
        await run.store(first, kv)
        _, answer = await run.post("/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": first})
        assert answer["num_tokens"] == 16
        await run.wait_event(answer["event_id"])
        for i in range(1, 5):  # a store storm: only unpinned chunks may go
            async with AsyncKVClient(run.data) as client:
                await client.store(list(range(100 * i, 100 * i + 16)), kv)
        await asyncio.sleep(0.2)
        assert (await run.post("/lookup", {"tokens": first}))[1]["layout_info"] == {INSTANCE: [CPU, 16]}
        _, instances = await run.get("/instances")
        assert instances[INSTANCE]["locations"][CPU]["pinned_chunks"] == 1
        assert instances[INSTANCE]["locations"][CPU]["bytes"] <= 5000
        _, answer = await run.post("/unpin", {"instance_id": INSTANCE, "location": CPU, "tokens": first})
        assert answer["num_tokens"] == 16
        await run.wait_event(answer["event_id"])
        _, instances = await run.get("/instances")
        assert instances[INSTANCE]["locations"][CPU]["pinned_chunks"] == 0


async def test_clear_with_and_without_tokens(running: Running) -> None:
    await running.store(TOKENS, make_kv(len(TOKENS)))
    await running.store(SEED_TOKENS, make_kv(len(SEED_TOKENS)))
    _, answer = await running.post("/clear", body())
    assert answer["num_tokens"] == 60
    await running.wait_event(answer["event_id"])
    _, answer = await running.post("/lookup", {"tokens": TOKENS})
    assert answer["layout_info"] == {INSTANCE: [DISK, 60]}  # the disk copy is still there
    _, answer = await running.post("/clear", {"instance_id": INSTANCE, "location": DISK})
    assert answer["num_tokens"] == 72
    await running.wait_event(answer["event_id"])
    await running.wait_cached(SEED_TOKENS, 12)  # RAM copy of the seed prompt remains
    await running.wait_cached(TOKENS, 0)


async def test_move_between_locations_and_copy(running: Running) -> None:
    kv = make_kv(len(TOKENS))
    await running.store(TOKENS, kv)
    await running.post("/clear", body(location=DISK))
    await asyncio.sleep(0.1)
    _, answer = await running.post(
        "/move", {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK], "tokens": TOKENS, "copy": True}
    )
    assert answer["num_tokens"] == 60
    assert (await running.wait_event(answer["event_id"]))["status"] == "finished"
    _, instances = await running.get("/instances")
    assert instances[INSTANCE]["locations"][CPU]["tokens"] == 60 and instances[INSTANCE]["locations"][DISK]["tokens"] == 60
    _, answer = await running.post("/move", {"old_position": [INSTANCE, DISK], "new_position": [INSTANCE, CPU], "tokens": TOKENS})
    await running.wait_event(answer["event_id"])
    _, instances = await running.get("/instances")
    assert instances[INSTANCE]["locations"][DISK]["tokens"] == 0


async def test_move_to_another_worker_over_the_data_plane(running: Running, tmp_path: Path) -> None:
    hub_port = running.daemon.controller.hub.port
    other = Worker(Config(**{**test_config().__dict__, "controller_url": f"127.0.0.1:{hub_port}", "lmcache_instance_id": "second"}))
    await other.start()
    try:
        await asyncio.wait_for(other.connected.wait(), 5)
        kv = make_kv(len(TOKENS))
        await running.store(TOKENS, kv)
        _, answer = await running.post("/move", {"old_position": [INSTANCE, CPU], "new_position": ["second", CPU], "tokens": TOKENS})
        assert answer["num_tokens"] == 60
        event = await running.wait_event(answer["event_id"])
        assert event["status"] == "finished", event
        async with AsyncKVClient(f"127.0.0.1:{other.data_port}") as client:
            out = await client.retrieve(TOKENS)
        assert out is not None and torch.equal(out, kv)
        _, answer = await running.post("/lookup", {"tokens": TOKENS})
        assert answer["layout_info"]["second"] == [CPU, 60]
        assert answer["layout_info"][INSTANCE] == [DISK, 60]  # moved out of RAM; the disk copy stays
    finally:
        await other.stop()


async def test_health_query_worker_info_and_metrics(running: Running) -> None:
    status, answer = await running.post("/health", {"instance_id": INSTANCE})
    assert status == 200 and list(answer["error_codes"].values()) == [0]
    assert list(answer["error_codes"]) == ["0"]  # keyed by rank, as LMCache keys it
    name = answer["workers"]["0"]
    status, answer = await running.post("/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [0]})
    assert status == 200 and answer["worker_infos"][0]["worker_id"] == 0 and answer["worker_infos"][0]["worker_name"] == name
    status, answer = await running.post("/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [name]})
    assert status == 200 and answer["worker_infos"][0]["worker_id"] == 0
    _, answer = await running.post("/query_worker_info", {"instance_id": "all"})
    assert len(answer["worker_infos"]) == 1
    await running.store(SEED_TOKENS, make_kv(12))
    status, text = await running.get("/metrics")
    assert status == 200
    assert f'lmcached_tokens{{instance_id="{INSTANCE}",location="{CPU}",worker_id="{name}"}} 12.0' in text
    assert 'lmcached_http_requests_total{endpoint="/health",status="200"} 1.0' in text


async def test_check_finish_reports_a_failed_operation(running: Running) -> None:
    await running.store(SEED_TOKENS, make_kv(12))
    # Make the worker's codec fail for real: a NaN in the stored KV cannot be quantised.
    worker = running.daemon.worker
    assert worker is not None
    backend = worker.backends[CPU]
    chunk = backend.get(next(iter(backend.keys())))
    assert chunk is not None
    bad = torch.full((2, 4, 12, 64), float("nan"), dtype=torch.float16)
    from dataclasses import replace

    from lmcached.wire.tensors import byte_view

    backend.put(replace(chunk, data=bytes(byte_view(bad))))
    _, answer = await running.post("/compress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS})
    event = await running.wait_event(answer["event_id"])
    assert event["status"] == "failed" and "NaN" in event["error"]
    async with AsyncKVClient(running.data) as client:  # nothing was lost: the raw chunk is still served
        out = await client.retrieve(SEED_TOKENS)
    assert out is not None and torch.isnan(out).all()


async def test_auth_token_guards_http_and_tcp(tmp_path: Path) -> None:
    import aiohttp

    from lmcached.errors import Unauthorized
    from lmcached.serve import Daemon

    daemon = Daemon(test_config(auth_token="s3cret"))
    ports = await daemon.start()  # the embedded worker itself must pass the TCP hello with the token
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{ports.http}/lookup"
            async with http.post(url, json={"tokens": [1]}) as resp:
                assert resp.status == 401
            async with http.post(url, json={"tokens": [1]}, headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            async with http.post(url, json={"tokens": [1]}, headers={"Authorization": "Bearer s3cret"}) as resp:
                assert resp.status == 200
        with pytest.raises(Unauthorized):
            async with AsyncKVClient(f"127.0.0.1:{ports.data}") as client:
                await client.lookup([1])
        async with AsyncKVClient(f"127.0.0.1:{ports.data}", auth_token="s3cret") as client:
            assert await client.lookup([1]) == 0
    finally:
        await daemon.stop()


async def test_compress_takes_an_optional_quality(running: Running) -> None:
    tokens = list(range(5000, 5000 + 32))
    await running.store(tokens, make_kv(len(tokens), seed=11))
    base = {"instance_id": INSTANCE, "location": CPU, "tokens": tokens, "method": "cachegen"}
    for bad, status in ((0, 422), (10, 422), ("x", 422)):
        got, body = await running.post("/compress", {**base, "quality": bad})
        assert got == status and "quality" in body["detail"]
    got, body = await running.post("/compress", {**base, "method": "lossless", "quality": 3})
    assert got == 400 and "cachegen" in body["detail"]
    got, body = await running.post("/compress", {**base, "quality": 1})
    assert got == 200
    small = (await running.wait_event(body["event_id"]))["result"]["bytes_after"]
    got, body = await running.post("/decompress", {**base})
    await running.wait_event(body["event_id"])
    # (the values are quality 1's now: re-encoding them is stacking a lossy codec, so it must be asked for)
    got, body = await running.post("/compress", {**base, "quality": 9, "allow_lossy_again": True})
    large = (await running.wait_event(body["event_id"]))["result"]["bytes_after"]
    assert small < large


@pytest.mark.parametrize("path", ["/lookup", "/compress", "/decompress", "/pin", "/unpin", "/clear"])
async def test_an_empty_token_list_is_refused_not_a_silent_no_op(running: Running, path: str) -> None:
    status, answer = await running.post(path, body(tokens=[], method="cachegen"))
    assert status == 422 and answer["field"] == "tokens" and "empty" in answer["detail"]


async def test_an_operation_that_matched_nothing_says_so(running: Running) -> None:
    status, answer = await running.post("/compress", body(tokens=[7, 7, 7], method="cachegen"))
    assert status == 200 and answer["num_tokens"] == 0
    result = (await running.wait_event(answer["event_id"]))["result"]
    assert result["matched"] is False and result["num_tokens"] == 0
    assert result["message"] == f"nothing matched: no chunk of these tokens is at {CPU} of {INSTANCE}, so nothing was done"


async def test_two_compresses_of_the_same_chunks_at_once_account_for_every_chunk(running: Running) -> None:
    await running.store(TOKENS, make_kv(len(TOKENS)))
    await running.post("/clear", body(location=DISK))  # RAM only, so the counts below are one tier's
    twice = body(method="cachegen")
    first, second = await asyncio.gather(running.post("/compress", twice), running.post("/compress", twice))
    results = [(await running.wait_event(answer["event_id"]))["result"] for _, answer in (first, second)]
    # Each chunk compressed once; the other request says why it did not, never an unexplained zero.
    assert sum(r["num_tokens"] for r in results) == len(TOKENS)
    assert sum(r["chunks"] for r in results) == 4
    for result in results:
        if result["chunks"] < 4:
            assert result["skipped"] == {"already compressed with cachegen": 4 - result["chunks"]}
            assert "already compressed with cachegen" in result["message"]


async def test_decompress_is_not_an_undo_the_chunk_says_what_it_lost(running: Running) -> None:
    """cachegen -> decompress leaves raw KV of the compressed values: the chunks say so (lineage), and a second
    lossy compression of them is refused chunk by chunk unless asked for; a lossless one keeps the lineage."""
    await running.store(TOKENS, make_kv(len(TOKENS)))
    await running.post("/clear", body(location=DISK))

    async def run(path: str, **extra: object) -> dict[str, object]:
        status, answer = await running.post(path, body(**extra))
        assert status == 200, answer
        return (await running.wait_event(answer["event_id"]))["result"]

    def cpu_stats(instances: dict[str, object]) -> dict[str, object]:
        return instances[INSTANCE]["locations"][CPU]  # type: ignore[index]

    assert (await run("/compress", method="cachegen"))["chunks"] == 4
    assert (await run("/decompress", method="cachegen"))["chunks"] == 4
    _, instances = await running.get("/instances")
    assert cpu_stats(instances)["compressed_chunks"] == 0 and cpu_stats(instances)["lossy_chunks"] == 4
    worker = running.daemon.worker
    assert {worker.backends[CPU].info(k).lossy for k in worker.backends[CPU].keys()} == {"cachegen"}

    again = await run("/compress", method="cachegen")
    assert again["chunks"] == 0 and again["num_tokens"] == 0
    [reason] = again["skipped"]
    assert again["skipped"][reason] == 4 and reason.startswith("values already lossy (cachegen)")

    assert (await run("/compress", method="lossless"))["chunks"] == 4  # bit-exact: the lineage is unchanged
    assert {worker.backends[CPU].info(k).lossy for k in worker.backends[CPU].keys()} == {"cachegen"}
    assert (await run("/decompress", method="lossless"))["chunks"] == 4

    forced = await run("/compress", method="cachegen", allow_lossy_again=True)
    assert forced["chunks"] == 4 and "skipped" not in forced
    assert {worker.backends[CPU].info(k).lossy for k in worker.backends[CPU].keys()} == {"cachegen+cachegen"}


async def test_every_part_says_its_version_so_a_mixed_fleet_shows(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """The controller's and each worker's version: in /health, /instances and /metrics (build_info, read with
    Prometheus' own parser); a worker of another version is logged when it registers."""
    from prometheus_client.parser import text_string_to_metric_families

    from lmcached import __version__
    from lmcached.wire.frames import Kind, read_frame, write_frame

    status, answer = await running.post("/health", {"instance_id": INSTANCE})
    assert answer["version"] == __version__ and answer["worker_versions"] == {"0": __version__}
    # An older worker joins (a real TCP hello, as lmcached 0.0.9 would send it).
    reader, writer = await asyncio.open_connection("127.0.0.1", running.daemon.ports.monitor)
    hello = {"role": "worker", "instance_id": "old", "worker_id": "w-old", "data_address": "127.0.0.1:1", "chunk_size": 16, "version": "0.0.9"}
    await write_frame(writer, Kind.HELLO, hello)
    assert (await read_frame(reader)).kind == Kind.WELCOME
    try:
        _, instances = await running.get("/instances")
        assert instances["old"]["workers"][0]["version"] == "0.0.9"
        assert instances[INSTANCE]["workers"][0]["version"] == __version__
        _, text = await running.get("/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert [s.labels for s in families["lmcached_build_info"].samples] == [{"version": __version__}]
        versions = {s.labels["instance_id"]: s.labels["version"] for s in families["lmcached_worker_build_info"].samples}
        assert versions == {INSTANCE: __version__, "old": "0.0.9"}
        assert any("runs lmcached 0.0.9; this controller runs" in r.getMessage() for r in caplog.records)
    finally:
        writer.close()


async def _scrape(run: Running, until: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
    """/metrics read with Prometheus' own parser (`prometheus_samples`); scraped again until `until` holds
    (usage arrives with the next heartbeat)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        _, text = await run.get("/metrics")
        samples = prometheus_samples(text)
        if until(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.1)


def _total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for key, v in samples.get(name, {}).items() if all((k, labels[k]) in key for k in labels))


async def test_metrics_say_whether_the_cache_helps(tmp_path: Path) -> None:
    """Lookups and retrieves (chunks asked vs found, per tier), stores, bytes, latency histograms, codec time and
    evictions, per worker, counted from what engines really did: a store's own dedupe check is not a lookup."""
    kv = make_kv(60, layers=2, channels=16)  # 4 chunks of 2 KB (the last 1.5 KB)
    async with serving(test_config(max_local_cpu_size=20000 / 1024**3)) as run:
        async with AsyncKVClient(run.data) as client:
            assert await client.store(TOKENS, kv) == 60
            assert await client.store(TOKENS, kv) == 60  # held already: a dedupe check, no chunk sent
            assert await client.lookup(TOKENS) == 60
            assert await client.lookup(list(range(9000, 9040))) == 0  # 3 chunks asked, none found
            assert torch.equal(await client.retrieve(TOKENS), kv)
        _, answer = await run.post("/compress", {**body(), "method": "cachegen"})
        await run.wait_event(answer["event_id"])
        async with AsyncKVClient(run.data) as client:
            assert (await client.retrieve(TOKENS)).shape == kv.shape  # decoded on the way out
            for i in range(8):  # 8 more prompts of 2 KB chunks into a 20 KB RAM tier: something must go
                await client.store(list(range(1000 * (i + 1), 1000 * (i + 1) + 32)), make_kv(32, layers=2, channels=16, seed=i))
        samples = await _scrape(run, lambda s: _total(s, "lmcached_stores_total") == 9)
        assert _total(samples, "lmcached_lookups_total") == 2
        assert _total(samples, "lmcached_lookup_chunks_asked_total") == 4 + 3
        assert _total(samples, "lmcached_lookup_chunks_found_total") == 4
        assert _total(samples, "lmcached_lookup_tokens_found_total") == 60
        assert _total(samples, "lmcached_lookup_seconds_count") == 2
        assert _total(samples, "lmcached_retrieves_total") == 2
        assert _total(samples, "lmcached_retrieve_chunks_asked_total") == 8
        assert _total(samples, "lmcached_retrieve_chunks_found_total", tier=CPU) == 8
        assert _total(samples, "lmcached_retrieve_tokens_found_total") == 120
        assert _total(samples, "lmcached_retrieve_bytes_total") == 2 * kv.numel() * 2
        assert _total(samples, "lmcached_retrieve_seconds_count") == 2
        assert _total(samples, "lmcached_retrieve_seconds_bucket", le="+Inf") == 2
        assert _total(samples, "lmcached_store_chunks_total") == 4 + 8 * 2  # the second store of TOKENS sent nothing
        assert _total(samples, "lmcached_store_bytes_total") == kv.numel() * 2 + 8 * 32 * 2 * 2 * 16 * 2
        assert _total(samples, "lmcached_evictions_total", tier=CPU) > 0
        assert _total(samples, "lmcached_codec_seconds_total", method="cachegen", direction="encode") > 0
        assert _total(samples, "lmcached_codec_bytes_total", method="cachegen", direction="encode") == kv.numel() * 2
        assert _total(samples, "lmcached_codec_bytes_total", method="cachegen", direction="decode") == kv.numel() * 2


async def test_a_continued_lookup_counts_as_one_and_its_prefix_once(running: Running) -> None:
    """KVClient.lookup's `continued` asks twice (the prefix, then the partial chunk that may follow it): the
    metrics still see one lookup, the prefix's chunks and tokens once, plus the partial chunk it found."""
    from lmcached.client import KVClient

    kv = make_kv(60, layers=2, channels=16)

    def go() -> int:
        with KVClient(running.data) as client:
            client.store(TOKENS, kv)
            return client.lookup(TOKENS + list(range(9000, 9010)), continued=True)  # 4 whole chunks + 6 tokens asked

    assert await asyncio.to_thread(go) == 60  # 3 whole chunks, then TOKENS' partial one of 12
    samples = await _scrape(running, lambda s: _total(s, "lmcached_lookup_tails_found_total") == 1)
    assert _total(samples, "lmcached_lookups_total") == 1
    assert _total(samples, "lmcached_lookup_chunks_asked_total") == 5 + 1
    assert _total(samples, "lmcached_lookup_chunks_found_total") == 3 + 1
    assert _total(samples, "lmcached_lookup_tokens_found_total") == 60
