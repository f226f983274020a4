"""Data-plane throughput: store and retrieve through KVClient against a real `lmcached serve`, beside a plain
loopback socket moving the same bytes and an in-memory copy."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from lmcached.bench.report import Report

SHAPES = {"SmolLM2-135M": (30, 192), "Llama-3.1-8B": (32, 1024)}
CHUNK_TOKENS = 256


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for one run (for first-time, cold figures that a repeat would not see again)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` runs (the least disturbed by a noisy neighbour)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def start_daemon(
    extra_env: dict[str, str] | None = None, *extra_args: str, engine: bool = False
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`lmcached serve` on port 0 in a subprocess; returns it and its ready line's ports. With `engine`, it
    also serves the engine and waits for that too, whose ports come back under the key "engine"."""
    import json
    import os

    env = {**os.environ, "LMCACHE_MAX_LOCAL_CPU_SIZE": "12", **(extra_env or {})}
    cmd = [sys.executable, "-m", "lmcached", "serve", "--port", "0", "--monitor-port", "0", "--worker-port", "0", *extra_args]
    if engine:
        cmd += ["--engine", "--engine-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    ports: dict[str, Any] = {}
    for line in proc.stdout:
        if line.startswith("lmcached ready "):
            ports.update(json.loads(line[len("lmcached ready ") :]))
        elif line.startswith("lmcached engine ready "):
            ports["engine"] = json.loads(line[len("lmcached engine ready ") :])
        if ports and (not engine or "engine" in ports):
            return proc, ports
    raise RuntimeError(f"{' '.join(cmd[2:])} did not start")


def start_loopback() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "lmcached.bench.loopback"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def run(report: Report, quick: bool = False) -> None:
    from lmcached.bench.loopback import LoopbackClient
    from lmcached.bench.report import progress
    from lmcached.client import KVClient, byte_view_writable
    from lmcached.tensors import byte_view

    daemon, ports = start_daemon()
    loop_proc, loop_port = start_loopback()
    repeats = 2 if quick else 4
    plans = [("SmolLM2-135M", 16 if quick else 64), ("Llama-3.1-8B", 4 if quick else 12)]
    try:
        client = KVClient(f"127.0.0.1:{ports['data']}")
        client.connect()
        loop = LoopbackClient(loop_port)
        with progress() as bar:
            task = bar.add_task("dataplane", total=len(plans))
            for number, (model, chunks) in enumerate(plans):
                layers, channels = SHAPES[model]
                # Tokens of their own per model: the same ids would be the same chunk keys, already stored.
                tokens = list(range(number * 1_000_000, number * 1_000_000 + chunks * CHUNK_TOKENS))
                kv = torch.randn(2, layers, len(tokens), channels).half()
                nbytes = kv.numel() * 2
                gb = nbytes / 1e9
                cold_store = timed(lambda: client.store(tokens, kv))  # the first store of these chunks
                cold_retrieve = timed(lambda: client.retrieve(tokens))
                # Warm: the same chunks again, sent in full (dedupe off), buffers already faulted in.
                store = best_of(lambda: client.store(tokens, kv, dedupe=False), repeats)
                out = client.retrieve(tokens)
                assert out is not None and torch.equal(out, kv), "retrieve is not bit-exact"
                retrieve = best_of(lambda: client.retrieve(tokens), repeats)
                restore = best_of(lambda: client.store(tokens, kv), repeats)  # the client asks first: nothing moves
                flat = kv.reshape(-1)
                loop.send(byte_view(flat))
                loop_send = best_of(lambda: loop.send(byte_view(flat)), repeats)
                sink = torch.empty_like(flat)
                loop_recv = best_of(lambda: loop.receive(byte_view_writable(sink)), repeats)
                memcpy = best_of(lambda: sink.copy_(flat), repeats)
                label = f"{model} ({chunks}×{nbytes // chunks / 1e6:.1f} MB chunks)"
                report.add(
                    "dataplane",
                    f"store {label}",
                    gb / store,
                    "GB/s",
                    gb / loop_send,
                    "loopback socket",
                    "≥30% (goal ≥70%) of loopback",
                    extra={"memcpy_GBps": gb / memcpy, "bytes": nbytes},
                    need=("ratio", ">=", 0.30),
                )
                report.add(
                    "dataplane",
                    f"retrieve {label}",
                    gb / retrieve,
                    "GB/s",
                    gb / loop_recv,
                    "loopback socket",
                    "≥30% (goal ≥70%) of loopback",
                    extra={"memcpy_GBps": gb / memcpy, "bytes": nbytes},
                    need=("ratio", ">=", 0.30),
                )
                report.add("dataplane", f"memcpy {label}", gb / memcpy, "GB/s")
                for what, seconds, baseline in (("store", cold_store, loop_send), ("retrieve", cold_retrieve, loop_recv)):
                    report.add(
                        "dataplane",
                        f"cold {what} (first time) {label}",
                        gb / seconds,
                        "GB/s",
                        gb / baseline,
                        "loopback socket",
                        "≥50% (goal ≥70%) of loopback" if model == "SmolLM2-135M" else "",
                        need=("ratio", ">=", 0.50) if model == "SmolLM2-135M" else None,
                    )
                report.add(
                    "dataplane",
                    f"re-store of a stored prompt {label}",
                    restore * 1000,
                    "ms",
                    cold_store * 1000,
                    "first store",
                    "≥20× faster than the first store",
                    better="lower",
                    need=("ratio", ">=", 20.0),
                )
                bar.advance(task)
            sweep_chunk_sizes(report, client, loop, quick)
        client.close()
        loop.close()
    finally:
        daemon.terminate()
        loop_proc.terminate()
        daemon.wait(20)
        loop_proc.wait(20)


def sweep_chunk_sizes(report: Report, client: Any, loop: Any, quick: bool) -> None:
    """Throughput against bytes per chunk (channels vary, 30 layers, 256 tokens, 16 chunks a request)."""
    from lmcached.client import byte_view_writable
    from lmcached.tensors import byte_view

    xs, store_rates, retrieve_rates, loop_rates = [], [], [], []
    for channels in (32, 128, 512) if quick else (16, 64, 192, 512, 1024):
        tokens = list(range(10_000_000, 10_000_000 + 16 * CHUNK_TOKENS))
        kv = torch.randn(2, 30, len(tokens), channels).half()
        gb = kv.numel() * 2 / 1e9
        client.store(tokens, kv, dedupe=False)
        store_rates.append(gb / best_of(lambda: client.store(tokens, kv, dedupe=False), 3))
        retrieve_rates.append(gb / best_of(lambda: client.retrieve(tokens), 3))
        flat = kv.reshape(-1)
        sink = torch.empty_like(flat)
        loop.send(byte_view(flat))
        loop_rates.append(gb / best_of(lambda: loop.receive(byte_view_writable(sink)), 3))
        xs.append(kv.numel() * 2 / 16 / 1e6)
    report.series["data plane throughput vs chunk size"] = {
        "x": xs,
        "xlabel": "MB per chunk",
        "ylabel": "GB/s",
        "xlog": True,
        "lines": {"store": store_rates, "retrieve": retrieve_rates, "loopback socket": loop_rates},
    }
