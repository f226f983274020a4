"""Time to first token through vLLM's OpenAI server (the CPU build here) with LmcachedConnector: a miss, an
lmcached hit and a hit on compressed chunks, and the same miss on a vLLM without the connector; then the same at
1,500 tokens on a vLLM with an fp8 KV cache (--kv-cache-dtype fp8: chunks of fp8 bytes, compressed with
lossless, the codec that takes them), and on a vLLM with tensor parallel size 3 (each rank hosting its part of
the instance; its miss compared with a TP 3 vLLM without the connector, bound to the same cores). vLLM's own
prefix cache is off, so every hit is the external path."""

from __future__ import annotations

import time
from typing import Any

from lmcached.bench.dataplane import start_daemon
from lmcached.bench.engine import INSTANCE, clear, compress, prompts_corpus
from lmcached.bench.report import Report, median_spread, progress


def run(report: Report, quick: bool = False) -> None:
    from lmcached.fleet.vllm_server import TP3_ARGS, TP3_ENV, converted_model, free_port, free_ports, same_binding, start_vllm

    sizes = [1500] if quick else [512, 1500, 4000]
    repeats = 2 if quick else 3
    model = converted_model()
    corpus = prompts_corpus()
    controller_proc, ports = start_daemon(None, "--no-instance")  # the controller alone: vLLM hosts the instance
    controller = f"http://127.0.0.1:{ports['http']}"
    try:
        with progress() as bar:
            task = bar.add_task("vllm", total=2 * (1 + len(sizes)) + 3)
            baseline: dict[int, float] = {}
            bind = same_binding()  # the same OpenMP threads with and without the connector
            plain = start_vllm(model, connector=False, env=bind)
            try:
                tokens = plain.tokenize(corpus)
                plain.ttft(tokens[-600:])  # warm-up, untimed
                bar.advance(task)
                for size in sizes:
                    baseline[size] = median_spread([plain.ttft(tokens[:size]) for _ in range(repeats)])[0]
                    bar.advance(task)
            finally:
                plain.stop()
            config = {
                "chunk_size": 256,
                "local_cpu": True,
                "max_local_cpu_size": 4,
                "enable_controller": True,
                "lmcache_instance_id": INSTANCE,
                "controller_url": f"127.0.0.1:{ports['monitor']}",
                "lmcache_worker_port": free_port(),
            }
            vllm = start_vllm(model, lmcache_config=config, env=bind)
            try:
                warm = tokens[-600:]
                for _ in range(2):  # warm-up, untimed: a miss that stores, then hits raw and compressed
                    vllm.ttft(warm)
                compress(controller, warm)
                vllm.ttft(warm)
                bar.advance(task)
                for size in sizes:
                    measure(report, vllm, controller, tokens[:size], repeats, baseline[size])
                    bar.advance(task)
            finally:
                vllm.stop()
            fp8 = start_vllm(
                model, lmcache_config={**config, "lmcache_worker_port": free_port()}, args=["--kv-cache-dtype", "fp8"], env=bind
            )
            try:
                for _ in range(2):
                    fp8.ttft(warm)
                compress(controller, warm, "lossless")
                fp8.ttft(warm)
                measure(report, fp8, controller, tokens[:1500], repeats, baseline[1500], "fp8 KV cache, ", "lossless")
                bar.advance(task)
            finally:
                fp8.stop()
            plain_tp = start_vllm(model, connector=False, args=TP3_ARGS, env=TP3_ENV)
            try:
                plain_tp.ttft(warm)
                tp_baseline = median_spread([plain_tp.ttft(tokens[:1500]) for _ in range(repeats)])[0]
                bar.advance(task)
            finally:
                plain_tp.stop()
            tp = start_vllm(model, lmcache_config={**config, "lmcache_worker_port": free_ports(3)}, args=TP3_ARGS, env=TP3_ENV)
            try:
                for _ in range(2):
                    tp.ttft(warm)
                compress(controller, warm)
                tp.ttft(warm)
                measure(report, tp, controller, tokens[:1500], repeats, tp_baseline, "tensor parallel 3, ")
                bar.advance(task)
            finally:
                tp.stop()
    finally:
        controller_proc.terminate()
        controller_proc.wait(20)


def measure(
    report: Report, vllm: Any, controller: str, prompt: list[int], repeats: int, plain_miss: float, what: str = "", method: str = "cachegen"
) -> None:
    """A miss, a hit and a hit on `method`-compressed chunks of `prompt`; `what` names the configuration."""
    size = len(prompt)
    misses, hits, compressed = [], [], []
    for _ in range(repeats):
        clear(controller, prompt)  # a true miss: nothing of it in lmcached
        misses.append(vllm.ttft(prompt))
        time.sleep(0.3)  # the store happens behind the request; let it land
        hits.append(vllm.ttft(prompt))
        compress(controller, prompt, method)
        compressed.append(vllm.ttft(prompt))
    miss, miss_spread = median_spread(misses)
    hit, hit_spread = median_spread(hits)
    compressed_hit, compressed_spread = median_spread(compressed)
    at_target = size == 1500 and not what
    report.add(
        "vllm",
        f"TTFT miss with the connector, {what}{size} tokens (median of {repeats})",
        miss * 1000,
        "ms",
        plain_miss * 1000,
        "vLLM without it",
        "≤ 10% slower than without the connector" if at_target else "",
        better="lower",
        extra=miss_spread,
        need=("ratio", ">=", 1 / 1.1) if at_target else None,
    )
    report.add_vs_miss(
        "vllm",
        f"TTFT lmcached hit, {what}{size} tokens (median of {repeats})",
        hit,
        miss,
        hit_spread,
        "≥ 5× faster than a miss at 1,500" if at_target else "",
        5.0 if at_target else None,
    )
    report.add_vs_miss(
        "vllm",
        f"TTFT compressed ({method}) hit, {what}{size} tokens (median of {repeats})",
        compressed_hit,
        miss,
        compressed_spread,
        "≥ 3× faster than a miss at 1,500" if at_target else "",
        3.0 if at_target else None,
    )
