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
    from lmcached.wire.tensors import byte_view

    loop_proc, loop_port = start_loopback()
    repeats = 2 if quick else 4
    plans = [("SmolLM2-135M", 16 if quick else 64), ("Llama-3.1-8B", 4 if quick else 12)]
    transports = {"socket": False, "shared memory": True}
    daemon: subprocess.Popen[str] | None = None
    try:
        loop = LoopbackClient(loop_port)
        with progress() as bar:
            task = bar.add_task("dataplane", total=len(plans) * len(transports))
            for number, (model, chunks) in enumerate(plans):
                layers, channels = SHAPES[model]
                kv = torch.randn(2, layers, chunks * CHUNK_TOKENS, channels).half()
                nbytes = kv.numel() * 2
                gb = nbytes / 1e9
                label = f"{model} ({chunks}×{nbytes // chunks / 1e6:.1f} MB chunks)"
                # Baselines on the same bytes: a plain loopback socket (warm buffers) and memcpy.
                flat = kv.reshape(-1)
                loop.send(byte_view(flat))
                loop_send = best_of(lambda: loop.send(byte_view(flat)), repeats)
                sink = torch.empty_like(flat)
                loop_recv = best_of(lambda: loop.receive(byte_view_writable(sink)), repeats)
                memcpy = best_of(lambda: sink.copy_(flat), repeats)
                report.add("dataplane", f"memcpy {label}", gb / memcpy, "GB/s")
                # The caller's buffer for retrieves (an engine's KV cache, say): already touched, reused.
                out = torch.zeros_like(kv)
                for t, (transport, shared_memory) in enumerate(transports.items()):
                    # "Cold" means the first store into a fresh worker: a new daemon for each model and transport.
                    daemon, ports = start_daemon()
                    client = KVClient(f"127.0.0.1:{ports['data']}", shared_memory=shared_memory)
                    client.connect()
                    assert client.transport == transport, f"{transport} client got {client.transport}"
                    base = (number * 2 + t) * 1_000_000
                    tokens = list(range(base, base + chunks * CHUNK_TOKENS))
                    cold_store = timed(lambda: client.store(tokens, kv))  # the first store of these chunks
                    cold_retrieve = timed(lambda: client.retrieve(tokens, out=out))
                    assert torch.equal(out, kv), f"{transport} retrieve is not bit-exact"
                    store = best_of(lambda: client.store(tokens, kv, dedupe=False), repeats)  # sent in full again
                    retrieve = best_of(lambda: client.retrieve(tokens, out=out), repeats)
                    restore = best_of(lambda: client.store(tokens, kv), repeats)  # the client asks first: nothing moves
                    if transport == "socket":
                        baselines = {"store": (loop_send, "loopback socket"), "retrieve": (loop_recv, "loopback socket")}
                        warm_need, cold_need = 0.30, (0.50 if model == "SmolLM2-135M" else None)
                        warm_target, cold_target = "≥30% (goal ≥70%) of loopback", "≥50% (goal ≥70%) of loopback"
                    else:
                        baselines = {"store": (memcpy, "memcpy"), "retrieve": (memcpy, "memcpy")}
                        warm_need, cold_need = 0.40, 0.40
                        warm_target = cold_target = "≥40% (goal ≥70%) of memcpy"
                    for what, warm, cold in (("store", store, cold_store), ("retrieve", retrieve, cold_retrieve)):
                        baseline, baseline_name = baselines[what]
                        report.add(
                            "dataplane",
                            f"{what} over {transport}, {label}",
                            gb / warm,
                            "GB/s",
                            gb / baseline,
                            baseline_name,
                            warm_target,
                            extra={"memcpy_GBps": gb / memcpy, "bytes": nbytes},
                            need=("ratio", ">=", warm_need),
                        )
                        report.add(
                            "dataplane",
                            f"cold {what} (first time) over {transport}, {label}",
                            gb / cold,
                            "GB/s",
                            gb / baseline,
                            baseline_name,
                            cold_target if cold_need else "",
                            need=("ratio", ">=", cold_need) if cold_need else None,
                        )
                    report.add(
                        "dataplane",
                        f"re-store of a stored prompt over {transport}, {label}",
                        restore * 1000,
                        "ms",
                        cold_store * 1000,
                        "first store",
                        "≥20× faster than the first store",
                        better="lower",
                        need=("ratio", ">=", 20.0),
                    )
                    bar.advance(task)
                    if transport == "socket" and number == len(plans) - 1:
                        sweep_chunk_sizes(report, client, loop, quick)
                    client.close()
                    daemon.terminate()
                    daemon.wait(20)
                    daemon = None
        loop.close()
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(20)
        loop_proc.terminate()
        loop_proc.wait(20)


def sweep_chunk_sizes(report: Report, client: Any, loop: Any, quick: bool) -> None:
    """Throughput against bytes per chunk (channels vary, 30 layers, 256 tokens, 16 chunks a request)."""
    from lmcached.client import byte_view_writable
    from lmcached.wire.tensors import byte_view

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
