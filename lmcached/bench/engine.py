"""Engine time to first token on a miss, a hit, and a hit on compressed chunks, through the real HTTP stack."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from lmcached.bench.dataplane import start_daemon
from lmcached.bench.report import Report, progress

INSTANCE = "lmcache_default_instance"
CPU = "LocalCPUBackend"


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def ttft(engine: str, tokens: list[int], max_tokens: int = 1) -> tuple[float, dict[str, Any]]:
    """Seconds until the first streamed token arrives (prefill, cache retrieval and offload included)."""
    request = urllib.request.Request(
        engine + "/v1/completions",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode(),
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        first = None
        last: dict[str, Any] = {}
        for line in response:
            if line.startswith(b"data: {"):
                first = first or time.perf_counter() - start
                last = json.loads(line[len(b"data: ") :])
    assert first is not None
    return first, last


def wait_event(controller: str, event_id: str) -> None:
    for _ in range(6000):
        if post(controller + "/check_finish", {"event_id": event_id})["status"] in ("finished", "failed"):
            return
        time.sleep(0.02)


def greedy(engine: str, tokens: list[int], n: int = 20) -> str:
    return post(engine + "/v1/completions", {"prompt": tokens, "max_tokens": n, "temperature": 0})["choices"][0]["text"]


def run(report: Report, quick: bool = False) -> None:
    from pydoc_data.topics import topics

    proc, ports = start_daemon(engine=True)
    engine, controller = f"http://127.0.0.1:{ports['engine']['http']}", f"http://127.0.0.1:{ports['http']}"
    sizes = [512, 1500] if quick else [512, 1500, 4000]
    text = "\n\n".join(topics[name] for name in ("specialnames", "compound", "types", "formatstrings"))
    corpus = post(engine + "/tokenize", {"prompt": text})["tokens"]
    try:
        with progress() as bar:
            task = bar.add_task("engine", total=len(sizes))
            offset = 0
            for size in sizes:
                tokens = corpus[offset : offset + size]
                offset += size
                miss, first = ttft(engine, tokens)
                assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                hit, second = ttft(engine, tokens)
                cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
                reference = greedy(engine, tokens)
                answer = post(controller + "/compress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": tokens})
                wait_event(controller, answer["event_id"])
                compressed_hit, third = ttft(engine, tokens)
                same = greedy(engine, tokens) == reference
                report.add("engine", f"TTFT miss, {size}-token prompt", miss * 1000, "ms")
                report.add(
                    "engine",
                    f"TTFT hit, {size}-token prompt ({cached} cached)",
                    hit * 1000,
                    "ms",
                    miss * 1000,
                    "miss",
                    "≥10× faster than a miss at 1,500",
                    better="lower",
                )
                report.add(
                    "engine",
                    f"TTFT compressed hit, {size}-token prompt",
                    compressed_hit * 1000,
                    "ms",
                    miss * 1000,
                    "miss",
                    "≥5× faster than a miss at 1,500",
                    better="lower",
                    extra={"greedy_20_tokens_identical": same},
                )
                report.add("engine", f"greedy output identical after compress, {size}-token prompt", float(same), "(1 = yes)")
                bar.advance(task)
    finally:
        proc.terminate()
        proc.wait(30)
