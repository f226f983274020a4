"""Scripts written against LMCache's controller work unchanged: LMCache-shaped requests, LMCache's fields and types."""

from __future__ import annotations

from typing import Any

from .conftest import CPU, DISK, INSTANCE, SEED_TOKENS, Running, make_kv

#: Each LMCache field of an answer (or of one item of it) and the type LMCache gives it.
WORKER_INFO_FIELDS: dict[str, Any] = {
    "instance_id": str,
    "worker_id": int,
    "ip": str,
    "port": int,
    "peer_init_url": (str, type(None)),
    "registration_time": float,
    "last_heartbeat_time": float,
}


def has_fields(item: dict[str, Any], fields: dict[str, Any]) -> None:
    for name, kind in fields.items():
        assert name in item, f"missing LMCache field {name!r} in {item}"
        assert isinstance(item[name], kind) and not isinstance(item[name], bool), f"{name!r} is {item[name]!r}, expected {kind}"


async def test_lmcache_shaped_requests_get_lmcache_shaped_answers(running: Running) -> None:
    await running.store(SEED_TOKENS, make_kv(12))

    status, answer = await running.post("/query_worker_info", {"event_id": "e1", "instance_id": INSTANCE, "worker_ids": [0]})
    assert status == 200 and isinstance(answer["event_id"], str) and len(answer["worker_infos"]) == 1
    info = answer["worker_infos"][0]
    has_fields(info, WORKER_INFO_FIELDS)
    assert info["worker_id"] == 0 and info["instance_id"] == INSTANCE
    assert f"{info['ip']}:{info['port']}" == running.data
    # lmcached's richer fields stay beside LMCache's.
    assert {"worker_name", "data_address", "locations"} <= set(info)

    status, answer = await running.post("/health", {"instance_id": INSTANCE})
    assert status == 200 and answer["error_codes"] == {"0": 0}

    status, answer = await running.post("/query_instance", {"event_id": "q1", "ip": info["ip"]})
    assert status == 200 and answer == {"event_id": "q1", "res": INSTANCE, "instances": [INSTANCE]}
    status, answer = await running.post("/query_instance", {"event_id": "q2", "ip": "10.9.9.9"})
    assert status == 404 and "10.9.9.9" in answer["detail"]

    status, answer = await running.get(f"/controller/workers?instance_id={INSTANCE}&worker_id=0")
    assert status == 200 and answer["total_count"] == 1 and isinstance(answer["total_count"], int)
    worker = answer["workers"][0]
    has_fields(worker, WORKER_INFO_FIELDS | {"key_count": int})
    assert worker["key_count"] == 2  # the chunk in RAM and its disk copy
    status, answer = await running.get("/controller/workers")
    assert status == 200 and answer["total_count"] == 1
    status, answer = await running.get("/controller/workers?instance_id=nope")
    assert status == 404

    status, answer = await running.get("/controller/key-stats")
    assert status == 200
    has_fields(answer, {"total_key_count": int, "total_instance_count": int, "total_worker_count": int, "instances": list})
    assert answer["total_key_count"] == 2 and answer["total_instance_count"] == 1 and answer["total_worker_count"] == 1
    has_fields(answer["instances"][0], {"instance_id": str, "key_count": int, "worker_count": int})

    # LMCache's /move body names the copy flag `should_copy`.
    body = {"old_position": [INSTANCE, CPU], "new_position": [INSTANCE, DISK], "tokens": SEED_TOKENS, "should_copy": True}
    status, answer = await running.post("/move", body)
    assert status == 200 and (await running.wait_event(answer["event_id"]))["status"] == "finished"
    _, layout = await running.post("/lookup", {"tokens": SEED_TOKENS})
    assert layout["layout_info"] == {INSTANCE: [CPU, 12]}  # the source stayed


async def test_worker_ids_must_be_ranks_or_names(running: Running) -> None:
    status, answer = await running.post("/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [0.5]})
    assert status == 422 and answer["field"] == "worker_ids"
    status, answer = await running.post("/query_worker_info", {"instance_id": INSTANCE, "worker_ids": [7]})
    assert status == 200 and answer["worker_infos"] == []


def test_ranks_are_stable_and_the_lowest_free_one_is_given() -> None:
    from lmcached.control.index import ChunkIndex, WorkerRecord

    index = ChunkIndex()
    a, b = WorkerRecord("i", "a", "h:1"), WorkerRecord("i", "b", "h:2")
    index.add_worker(a)
    index.add_worker(b)
    other = WorkerRecord("j", "c", "h:3")
    index.add_worker(other)
    assert (a.rank, b.rank, other.rank) == (0, 1, 0)
    index.remove_worker(a.key)
    again = WorkerRecord("i", "b", "h:2")  # b reconnects: keeps its rank
    index.add_worker(again)
    assert again.rank == 1
    asked = WorkerRecord("i", "d", "h:4")
    index.add_worker(asked, wanted_rank=5)
    assert asked.rank == 5
    index.add_worker(late := WorkerRecord("i", "e", "h:5"), wanted_rank=1)  # taken: the lowest free rank instead
    assert late.rank == 0


async def test_cache_salt_keys_a_tenants_chunks_apart(running: Running) -> None:
    """vLLM's per-request cache_salt: the client stores under it, /lookup and the operations find it only with it."""
    from lmcached.client import AsyncKVClient

    async with AsyncKVClient(running.data) as client:
        assert await client.store(SEED_TOKENS, make_kv(12), salt="tenant-a") == 12
        assert await client.lookup(SEED_TOKENS, salt="tenant-a") == 12
        assert await client.lookup(SEED_TOKENS) == 0 and await client.lookup(SEED_TOKENS, salt="tenant-b") == 0
    await running.daemon.worker.flush_reports()  # type: ignore[union-attr]
    _, plain = await running.post("/lookup", {"tokens": SEED_TOKENS})
    assert plain["layout_info"] == {}
    _, salted = await running.post("/lookup", {"tokens": SEED_TOKENS, "cache_salt": "tenant-a"})
    assert salted["layout_info"] == {INSTANCE: [CPU, 12]}
    status, answer = await running.post("/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": SEED_TOKENS, "cache_salt": "tenant-a"})
    assert status == 200 and answer["num_tokens"] == 12
    status, answer = await running.post("/lookup", {"tokens": SEED_TOKENS, "cache_salt": 5})
    assert status == 422 and answer["field"] == "cache_salt"
