"""Faults caused for real: garbage on the TCP ports, a worker that stops answering, a worker that dies."""

from __future__ import annotations

import asyncio
import time

from lmcached.client import AsyncKVClient
from lmcached.serve import Daemon
from lmcached.wire.chunks import chunk_spans
from lmcached.wire.frames import Kind, encode_frame, read_frame, write_frame

from .conftest import CPU, SEED_TOKENS, Running, make_kv, serving, test_config


async def assert_closed_by_peer(reader: asyncio.StreamReader, within: float = 5.0) -> None:
    data = await asyncio.wait_for(reader.read(), within)  # EOF arrives (after an optional error frame)
    assert reader.at_eof(), data


async def test_garbage_closes_only_that_connection(running: Running) -> None:
    hub_port = running.daemon.controller.hub.port
    host, data_port = running.data.split(":")
    async with AsyncKVClient(running.data) as healthy:
        await healthy.store(SEED_TOKENS, make_kv(12))
        for port in (hub_port, int(data_port)):
            for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"LMKV\x09\x01" + bytes(12), b"\x00" * 64):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(garbage)
                await writer.drain()
                await assert_closed_by_peer(reader)
                writer.close()
        assert await healthy.lookup(SEED_TOKENS) == 12  # the other connection never noticed
    status, _ = await running.post("/health", {"instance_id": "lmcache_default_instance"})
    assert status == 200


async def test_oversize_declared_length_is_refused_before_reading(running: Running) -> None:
    from lmcached.wire.frames import MAGIC, PREFIX, VERSION

    reader, writer = await asyncio.open_connection(*running.data.split(":"))
    writer.write(encode_frame(Kind.HELLO, {"role": "client"}))
    assert (await read_frame(reader)).kind == Kind.WELCOME  # type: ignore[union-attr]
    writer.write(PREFIX.pack(MAGIC, VERSION, int(Kind.STORE), 2, 2**62) + b"{}")
    error = await read_frame(reader)
    assert error is not None and error.kind == Kind.ERROR and "exceeds the limit" in error.header["detail"]
    await assert_closed_by_peer(reader)
    writer.close()


async def fake_worker(port: int, instance_id: str, key: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A real TCP peer that registers a chunk, heartbeats, and never answers a command."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await write_frame(
        writer,
        Kind.HELLO,
        {"role": "worker", "instance_id": instance_id, "worker_id": "mute", "data_address": "127.0.0.1:1", "chunk_size": 16},
    )
    assert (await read_frame(reader)).kind == Kind.WELCOME  # type: ignore[union-attr]
    await write_frame(writer, Kind.REPORT, {"full": True, "admitted": [[CPU, key, 12, 100, None, False, 100]], "evicted": []})
    return reader, writer


async def test_a_worker_that_stops_answering_fails_its_commands_in_time() -> None:
    async with serving(test_config(command_timeout=1.0, heartbeat_timeout=30.0)) as run:
        key = chunk_spans(SEED_TOKENS, 16)[0].key
        reader, writer = await fake_worker(run.daemon.controller.hub.port, "mute-instance", key)
        try:
            await run.wait_cached(SEED_TOKENS, 12)
            started = time.monotonic()
            _, answer = await run.post(
                "/compress", {"instance_id": "mute-instance", "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS}
            )
            assert answer["num_tokens"] == 12
            # The controller keeps serving meanwhile.
            status, _ = await run.post("/lookup", {"tokens": SEED_TOKENS})
            assert status == 200
            event = await run.wait_event(answer["event_id"])
            assert event["status"] == "failed" and "did not answer" in event["error"]
            assert time.monotonic() - started < 5.0
            _, health = await run.post("/health", {"instance_id": "mute-instance"})
            assert health["error_codes"] == {"0": 1} and health["workers"] == {"0": "mute"}
        finally:
            writer.close()


async def test_a_worker_reporting_progress_may_work_longer_than_the_command_timeout() -> None:
    """The deadline is for silence, not for work: a worker that sends PROGRESS frames keeps its command alive
    past command_timeout, and the event shows how far it got while it runs."""
    async with serving(test_config(command_timeout=1.0, heartbeat_timeout=30.0)) as run:
        key = chunk_spans(SEED_TOKENS, 16)[0].key
        reader, writer = await fake_worker(run.daemon.controller.hub.port, "slow-instance", key)
        try:
            await run.wait_cached(SEED_TOKENS, 12)
            _, answer = await run.post("/compress", {"instance_id": "slow-instance", "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS})
            command = await read_frame(reader)
            assert command is not None and command.kind == Kind.COMMAND
            assert 0 < command.header["progress_every"] <= command.header["timeout"] / 3
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # well past the 1.5 s the command would get otherwise
                await write_frame(writer, Kind.PROGRESS, {"req_id": command.header["req_id"], "done": 0, "total": 1})
                await asyncio.sleep(0.25)
            _, event = await run.post("/check_finish", {"event_id": answer["event_id"]})
            assert event["status"] == "running" and event["progress"] == {"done": 0, "total": 1}
            result = {"num_tokens": 12, "chunks": 1, "bytes_before": 100, "bytes_after": 40, "skipped": {}}
            await write_frame(writer, Kind.REPLY, {"req_id": command.header["req_id"], "ok": True, "result": result})
            event = await run.wait_event(answer["event_id"], timeout=5)
            assert event["status"] == "finished" and event["result"]["chunks"] == 1 and "progress" not in event
        finally:
            writer.close()


async def test_a_slow_compress_on_a_real_worker_finishes_and_says_how_far_it_got() -> None:
    """The embedded worker with a codec slower than command_timeout (as its first, compiling call is on a cold
    machine): its link reports progress, so the compress finishes instead of failing at the deadline."""
    async with serving(test_config(command_timeout=0.5, heartbeat_timeout=30.0)) as run:
        storage = run.daemon.worker.storage  # type: ignore[union-attr]
        encode = storage.encode

        def slow_encode(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(2.5)  # in the codec's thread, as a compile would be
            return encode(*args, **kwargs)

        storage.encode = slow_encode
        tokens = list(range(1, 33))  # two chunks: a deadline of 0.5 + 2 x 0.5 s without progress
        async with AsyncKVClient(run.data) as client:
            await client.store(tokens, make_kv(32))
        await run.wait_cached(tokens, 32)
        _, answer = await run.post("/compress", {"instance_id": "lmcache_default_instance", "method": "cachegen", "location": CPU, "tokens": tokens})
        seen = None
        for _ in range(100):
            _, event = await run.post("/check_finish", {"event_id": answer["event_id"]})
            seen = event.get("progress") or seen
            if event["status"] != "running":
                break
            await asyncio.sleep(0.1)
        event = await run.wait_event(answer["event_id"])
        assert event["status"] == "finished", event
        assert event["result"]["chunks"] == 2
        assert seen is not None and seen["total"] == 2


async def test_a_dead_worker_fails_pending_commands_and_leaves_the_index() -> None:
    async with serving(test_config(command_timeout=30.0, heartbeat_timeout=30.0)) as run:
        key = chunk_spans(SEED_TOKENS, 16)[0].key
        reader, writer = await fake_worker(run.daemon.controller.hub.port, "doomed", key)
        await run.wait_cached(SEED_TOKENS, 12)
        _, answer = await run.post("/pin", {"instance_id": "doomed", "location": CPU, "tokens": SEED_TOKENS})
        await asyncio.sleep(0.1)
        writer.transport.abort()  # the worker dies mid-command
        event = await run.wait_event(answer["event_id"], timeout=5)
        assert event["status"] == "failed" and "lost" in event["error"]
        status, body = await run.post("/pin", {"instance_id": "doomed", "location": CPU, "tokens": SEED_TOKENS})
        assert status == 404 and "unknown instance" in body["detail"]


async def test_a_silent_worker_is_dropped_after_the_heartbeat_timeout() -> None:
    daemon = Daemon(test_config(heartbeat_timeout=0.5))
    ports = await daemon.start()
    reader, writer = await fake_worker(ports.monitor, "silent", 1234)
    try:
        deadline = time.monotonic() + 5
        while "silent" in daemon.controller.index.instance_ids():
            assert time.monotonic() < deadline, "silent worker was never dropped"
            await asyncio.sleep(0.05)
        assert "lmcache_default_instance" in daemon.controller.index.instance_ids()  # the heartbeating one stays
    finally:
        writer.close()
        await daemon.stop()


async def test_a_stalled_controller_loop_does_not_drop_its_workers() -> None:
    """A blocked loop (a slow start on a loaded machine) silences every worker too, the embedded one first: the
    watchdog does not count that silence against them. A worker silent while the loop runs is still dropped."""
    daemon = Daemon(test_config(heartbeat_timeout=0.5))
    await daemon.start()
    try:
        sessions = dict(daemon.controller.hub.sessions)
        time.sleep(1.5)  # the loop cannot run: no heartbeat can arrive, three timeouts long
        await asyncio.sleep(0.5)
        assert daemon.controller.hub.sessions == sessions  # the same sessions: nobody was dropped (and came back)
    finally:
        await daemon.stop()


async def test_a_monitor_that_never_reads_cannot_hold_the_daemon_back(running: Running) -> None:
    """Bounded queues: a stalled monitor loses events (and gets a fresh snapshot later), the daemon goes on."""
    hub = running.daemon.controller.hub
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    await write_frame(writer, Kind.HELLO, {"role": "monitor"})
    await asyncio.sleep(0.1)
    (monitor,) = hub.monitors
    writer.transport.pause_reading()  # never read again: the daemon's writes to it back up
    started = time.monotonic()
    for i in range(2500):  # far more events than a monitor's queue holds
        hub.publish("chunks_reported", instance_id="x", worker_id="w", admitted=1, evicted=0, full=False, padding="p" * 40_000)
        if i % 500 == 0:
            status, _ = await running.post("/health", {"instance_id": "lmcache_default_instance"})
            assert status == 200
    assert time.monotonic() - started < 10
    assert monitor.queue.qsize() <= 1000
    assert monitor.needs_snapshot.is_set()  # 100 MB of events overflowed its queue: it will get a snapshot instead
    writer.close()
