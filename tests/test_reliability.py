"""Faults caused for real (issue: reliability and security): fuzzed HTTP, garbage on the TCP ports, killed
workers and controllers, a compress killed half-way, readers racing writers, auth, and load."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcached.client import AsyncKVClient, KVClient
from lmcached.wire.frames import MAGIC, PREFIX, VERSION, Kind, encode_frame

from .codec_helpers import relative_error
from .conftest import (
    CPU,
    DISK,
    INSTANCE,
    SEED_TOKENS,
    Running,
    ServeProcess,
    make_kv,
    serving,
    start_process,
    start_serve,
    stop_serve,
    test_config,
)

pytestmark = pytest.mark.slow

ENDPOINTS = ["/lookup", "/compress", "/decompress", "/pin", "/unpin", "/clear", "/move", "/health", "/check_finish", "/query_worker_info"]
FIELDS = ["tokens", "instance_id", "location", "method", "event_id", "old_position", "new_position", "copy", "worker_ids"]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from([INSTANCE, CPU, DISK, "cachegen", "lossless", "all"]),
)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda d, cut: json.dumps(d).encode()[:cut], st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=4), st.integers(0, 60)
    ),
    st.integers(1, 400).map(lambda depth: b"[" * depth + b"]" * depth),
    st.just(b'{"tokens": [' + b",".join([b"7"] * 200_000) + b"]}"),
    st.just(b'{"tokens": "\xff\xfe"}'),
    st.just(b'{"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend", "tokens": [99999999999999999999999]}'),
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    running = start_serve()
    yield running
    conn = getattr(running, "_fuzz_conn", None)
    if conn is not None:
        conn.close()
    stop_serve(running)


class Counter:
    requests = 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.sampled_from(ENDPOINTS), bodies)
def test_fuzzed_http_gets_only_4xx_with_a_detail(server: ServeProcess, endpoint: str, body: bytes) -> None:
    conn = getattr(server, "_fuzz_conn", None) or http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=30)
    server._fuzz_conn = conn  # type: ignore[attr-defined]  # one keep-alive connection: a drop would show
    conn.request("POST", endpoint, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    Counter.requests += 1
    assert response.status < 500, (endpoint, body[:200], answer)
    if response.status >= 400:
        assert isinstance(answer.get("detail"), str) and answer["detail"]


def test_daemon_is_healthy_after_fuzzing(server: ServeProcess) -> None:
    assert Counter.requests >= 400 or Counter.requests == 0  # (0 when this test runs alone)
    assert post(server, "/health", {"instance_id": INSTANCE})[1]["error_codes"] != {}
    with KVClient(server.data) as client:
        client.store(SEED_TOKENS, make_kv(12))
        assert client.lookup(SEED_TOKENS) == 12


def test_oversize_body_is_413_and_memory_stays_bounded(server: ServeProcess) -> None:
    import psutil

    process = psutil.Process(server.proc.pid)
    before = process.memory_info().rss
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=30)
        conn.request("POST", "/lookup", body=b"[" + b"1," * (20 * 1024 * 1024) + b"1]")
        response = conn.getresponse()
        assert response.status == 413 and "limit" in json.loads(response.read())["detail"]
        conn.close()
    assert process.memory_info().rss - before < 200 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- TCP garbage
def closed_within(sock: socket.socket, seconds: float) -> float:
    started = time.monotonic()
    sock.settimeout(seconds)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except ConnectionResetError:
            return time.monotonic() - started


@pytest.mark.parametrize("port_name", ["monitor", "data"])
@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(256),
        b"XXXX" + bytes(14),
        PREFIX.pack(MAGIC, VERSION, int(Kind.HELLO), 2, 2**60) + b"{}",
        PREFIX.pack(MAGIC, VERSION, 1, 100, 0) + b'{"ro',
    ],
    ids=["random", "bad-magic", "oversize", "half-frame-then-silence"],
)
def test_garbage_on_tcp_ports_closes_only_that_connection(server: ServeProcess, port_name: str, garbage: bytes) -> None:
    with KVClient(server.data) as healthy:
        bad = socket.create_connection(("127.0.0.1", server.ports[port_name]))
        bad.sendall(garbage)
        assert closed_within(bad, 8.0) < 8.0
        bad.close()
        assert healthy.lookup([1, 2, 3]) == 0  # the well-behaved connection is untouched


def test_a_half_frame_after_hello_is_dropped_within_a_few_seconds(server: ServeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.ports["data"]))
    sock.sendall(encode_frame(Kind.HELLO, {"role": "client"}))
    sock.sendall(PREFIX.pack(MAGIC, VERSION, int(Kind.STORE), 10, 4096)[:9])  # half a prefix, then nothing
    assert closed_within(sock, 12.0) < 8.0
    sock.close()


# ---------------------------------------------------------------------------------------------- killed processes
def start_worker(monitor_port: int, instance: str, disk: Path, extra_env: dict[str, str] | None = None) -> ServeProcess:
    return start_process(
        [
            sys.executable,
            "-m",
            "lmcached",
            "worker",
            "--instance-id",
            instance,
            "--controller",
            f"127.0.0.1:{monitor_port}",
            "--port",
            "0",
            "--local-disk",
            str(disk),
        ],
        "lmcached worker ready ",
        env=extra_env,
    )


def post(server: ServeProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_sigkilled_worker_leaves_the_index_and_commands_fail_fast(tmp_path: Path) -> None:
    server = start_serve(env={"LMCACHE_HEARTBEAT_TIMEOUT": "3"})
    worker = start_worker(server.ports["monitor"], "doomed", tmp_path / "disk")
    try:
        with KVClient(f"127.0.0.1:{worker.ports['data']}") as client:
            client.store(SEED_TOKENS, make_kv(12))
        assert wait_for(lambda: post(server, "/lookup", {"tokens": SEED_TOKENS})[1]["layout_info"].get("doomed"), 10)
        worker.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: "doomed" not in post(server, "/lookup", {"tokens": SEED_TOKENS})[1]["layout_info"], 5)
        started = time.monotonic()
        status, body = post(server, "/compress", {"instance_id": "doomed", "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS})
        assert status == 404 and "unknown instance" in body["detail"]
        assert time.monotonic() - started < 5 and time.monotonic() - killed < 8
    finally:
        stop_serve(worker)
        stop_serve(server)


def test_worker_killed_mid_compress_restarts_with_every_chunk_whole(tmp_path: Path) -> None:
    server = start_serve()
    disk = tmp_path / "disk"
    worker = start_worker(server.ports["monitor"], "crashy", disk)
    tokens = list(range(96 * 256))
    kv = make_kv(len(tokens), layers=24, channels=128, dtype=torch.float16, seed=3)  # 96 chunks of 3 MB
    try:
        with KVClient(f"127.0.0.1:{worker.ports['data']}") as client:
            assert client.store(tokens, kv) == len(tokens)

        def on_disk() -> int:  # the disk copy is written behind RAM
            _, info = post(server, "/query_worker_info", {"instance_id": "crashy"})
            return info["worker_infos"][0]["locations"].get(DISK, {}).get("tokens", 0) if info.get("worker_infos") else 0

        assert wait_for(lambda: on_disk() == len(tokens), 60)
        _, answer = post(server, "/compress", {"instance_id": "crashy", "method": "cachegen", "location": DISK, "tokens": tokens})
        assert answer["num_tokens"] == len(tokens)

        raw_file_size = 2 * 24 * 256 * 128 * 2

        def compressed_on_disk() -> int:  # a compressed chunk's file is far smaller than a raw one's
            return sum(1 for f in disk.glob("*.kv") if f.stat().st_size < raw_file_size / 2)

        assert wait_for(lambda: compressed_on_disk() >= 1, 30)
        worker.proc.send_signal(signal.SIGKILL)  # mid-compress: some chunks done, some not, one maybe half-written
        worker.proc.wait(10)
        assert wait_for(lambda: post(server, "/check_finish", {"event_id": answer["event_id"]})[1]["status"] == "failed", 10)

        restarted = start_worker(server.ports["monitor"], "crashy", disk, {"LMCACHE_LOCAL_CPU": "false"})
        try:
            with KVClient(f"127.0.0.1:{restarted.ports['data']}") as client:
                out = client.retrieve(tokens)
            assert out is not None and out.shape == kv.shape  # nothing was lost
            forms = []
            for start in range(0, len(tokens), 256):
                got, want = out[:, :, start : start + 256], kv[:, :, start : start + 256]
                if torch.equal(got, want):
                    forms.append("raw")
                else:
                    assert relative_error(got, want) < 0.2
                    forms.append("compressed")
            print(f"after the kill: {forms.count('compressed')} compressed, {forms.count('raw')} raw chunks")
            assert 0 < forms.count("compressed") < len(forms)  # the kill really came mid-way
            assert not list(disk.glob("*.tmp"))  # no half-written file survives a restart
        finally:
            stop_serve(restarted)
    finally:
        stop_serve(worker)
        stop_serve(server)


# ---------------------------------------------------------------------------------------------- concurrency
async def test_readers_see_whole_tensors_while_chunks_change_underneath(tmp_path: Path) -> None:
    tokens = list(range(512))  # 8 chunks of 64
    kv = make_kv(len(tokens), layers=8, channels=128, seed=5)  # 128 KB a chunk
    config = test_config(local_disk=str(tmp_path / "disk"), chunk_size=64, max_local_cpu_size=24 * 2**20 / 2**30)
    async with serving(config) as run:
        daemon = run.daemon
        await run.store(tokens, kv)
        _, answer = await run.post("/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": tokens[:128]})
        await run.wait_event(answer["event_id"])
        stop = asyncio.Event()
        seen: list[int] = []

        async def reader() -> None:
            async with AsyncKVClient(run.data) as client:
                while not stop.is_set():
                    out = await client.retrieve(tokens)
                    n = 0 if out is None else out.shape[2]
                    seen.append(n)
                    if n:
                        assert relative_error(out, kv[:, :, :n]) < 0.2  # whole and right, raw or decoded

        async def writer() -> None:
            body = {"instance_id": INSTANCE, "tokens": tokens}
            for round_ in range(6):
                for path, extra in (
                    ("/compress", {"location": CPU, "method": "cachegen"}),
                    ("/decompress", {"location": CPU, "method": "cachegen"}),
                    ("/move", None),
                    ("/compress", {"location": DISK, "method": "lossless"}),
                    ("/clear", {"location": CPU}),
                ):
                    if extra is None:
                        request: dict[str, Any] = {
                            "old_position": [INSTANCE, DISK],
                            "new_position": [INSTANCE, CPU],
                            "tokens": tokens,
                            "copy": True,
                        }
                    else:
                        request = {**body, **extra}
                    _, answer = await run.post(path, request)
                    await run.wait_event(answer["event_id"])
                async with AsyncKVClient(run.data) as client:  # a store storm past the memory cap: evictions
                    for i in range(12):
                        await client.store(list(range(10_000 * (round_ + 1) + i * 512, 10_000 * (round_ + 1) + i * 512 + 512)), kv)
                    await client.store(tokens, kv, dedupe=False)  # back into RAM (the disk still holds them)
            stop.set()

        await asyncio.gather(writer(), *(reader() for _ in range(4)))
        assert len(seen) > 20 and max(seen) == len(tokens)
        worker = daemon.worker
        assert worker is not None
        cpu = worker.backends[CPU]
        assert cpu.used_bytes <= cpu.capacity_bytes
        assert all(cpu.info(s.key) is not None for s in (await _spans(run, tokens[:128])))  # pinned: never evicted


async def _spans(run: Running, tokens: list[int]) -> list[Any]:
    async with AsyncKVClient(run.data) as client:
        return client.spans(tokens)


# ---------------------------------------------------------------------------------------------- auth
def test_token_is_required_never_logged_and_open_binding_warns(tmp_path: Path) -> None:
    secret = "s3cret-token-value"
    server = start_serve("--auth-token", secret, "--host", "0.0.0.0")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=30)
        conn.request("POST", "/lookup", body=json.dumps({"tokens": [1]}))
        denied = conn.getresponse()
        assert denied.status == 401 and "Bearer" in json.loads(denied.read())["detail"]
        conn.request("POST", "/lookup", body=json.dumps({"tokens": [1]}), headers={"Authorization": f"Bearer {secret}"})
        allowed = conn.getresponse()
        assert allowed.status == 200 and json.loads(allowed.read())["layout_info"] == {}
        conn.close()
        sock = socket.create_connection(("127.0.0.1", server.ports["monitor"]))
        sock.sendall(encode_frame(Kind.HELLO, {"role": "monitor", "token": "wrong"}))
        assert closed_within(sock, 5) < 5
        sock.close()
    finally:
        stop_serve(server)
    log = "".join(server.output)
    assert secret not in log
    open_server = start_serve("--host", "0.0.0.0")
    stop_serve(open_server)
    assert "without --auth-token" in "".join(open_server.output)
    assert "without --auth-token" not in log


# ---------------------------------------------------------------------------------------------- load
async def test_1000_concurrent_http_requests_and_32_data_plane_clients(server: ServeProcess) -> None:
    base = f"http://127.0.0.1:{server.ports['http']}"
    with KVClient(server.data) as client:
        client.store(SEED_TOKENS, make_kv(12))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            path, body = [
                ("/lookup", {"tokens": SEED_TOKENS}),
                ("/health", {"instance_id": INSTANCE}),
                ("/pin", {"instance_id": INSTANCE, "location": CPU, "tokens": SEED_TOKENS}),
            ][i % 3]
            async with session.post(base + path, json=body) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
    assert statuses.count(200) == 1000

    kv = make_kv(64, layers=4, channels=64)

    async def data_client(i: int) -> None:
        async with AsyncKVClient(server.data) as client:
            tokens = list(range(i * 1000, i * 1000 + 64))
            for _ in range(5):
                assert await client.store(tokens, kv) == 64
                out = await client.retrieve(tokens)
                assert out is not None and torch.equal(out, kv)

    await asyncio.gather(*(data_client(i) for i in range(32)))
