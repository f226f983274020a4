"""Engine time to first token on a miss, a hit, and a hit on compressed chunks, through the real HTTP stack."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from lmcached.bench.dataplane import start_daemon
from lmcached.bench.report import Report, median_spread, progress

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


def clear(controller: str, tokens: list[int]) -> None:
    """Drop a prompt's chunks, so the next request on it is a true miss."""
    answer = post(controller + "/clear", {"instance_id": INSTANCE, "location": CPU, "tokens": tokens})
    wait_event(controller, answer["event_id"])


def compress(controller: str, tokens: list[int], method: str = "cachegen") -> None:
    answer = post(controller + "/compress", {"instance_id": INSTANCE, "method": method, "location": CPU, "tokens": tokens})
    wait_event(controller, answer["event_id"])


def one_round(engine: str, controller: str, tokens: list[int]) -> tuple[float, float, float, int]:
    """Miss, hit, compressed hit on one prompt, starting from an empty cache for it: (seconds x3, tokens cached)."""
    clear(controller, tokens)
    miss, first = ttft(engine, tokens)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "the miss was not a miss"
    hit, second = ttft(engine, tokens)
    compress(controller, tokens)
    compressed_hit, _ = ttft(engine, tokens)
    return miss, hit, compressed_hit, second["usage"]["prompt_tokens_details"]["cached_tokens"]


def prompts_corpus() -> str:
    """Long, real English-and-code text that ships with Python: the prompts the engine benchmarks time."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in ("specialnames", "compound", "types", "formatstrings"))


def run(report: Report, quick: bool = False) -> None:
    proc, ports = start_daemon(engine=True)
    engine, controller = f"http://127.0.0.1:{ports['engine']['http']}", f"http://127.0.0.1:{ports['http']}"
    sizes = [1500] if quick else [512, 1500, 4000]
    repeats = 2 if quick else 3
    text = prompts_corpus()
    corpus = post(engine + "/tokenize", {"prompt": text})["tokens"]
    try:
        with progress() as bar:
            task = bar.add_task("engine", total=1 + len(sizes))
            # Warm-up, untimed: the first forward pass, the codec's kernels and the data plane all pay one-off
            # costs that would otherwise be booked to whichever figure came first.
            one_round(engine, controller, corpus[-600:])
            bar.advance(task)
            offset = 0
            for size in sizes:
                tokens = corpus[offset : offset + size]
                offset += size
                rounds = [one_round(engine, controller, tokens) for _ in range(repeats)]
                miss, miss_spread = median_spread([r[0] for r in rounds])
                hit, hit_spread = median_spread([r[1] for r in rounds])
                compressed_hit, compressed_spread = median_spread([r[2] for r in rounds])
                cached = rounds[-1][3]
                # Greedy output from the compressed chunks against the raw ones (as a plain hit serves them).
                clear(controller, tokens)
                greedy(engine, tokens)  # a miss: stores the prompt's KV raw
                reference = greedy(engine, tokens)
                compress(controller, tokens)
                same = greedy(engine, tokens) == reference
                at_target = size == 1500
                report.add("engine", f"TTFT miss, {size}-token prompt (median of {repeats})", miss * 1000, "ms", extra=miss_spread)
                report.add_vs_miss(
                    "engine",
                    f"TTFT hit, {size}-token prompt ({cached} cached, median of {repeats})",
                    hit,
                    miss,
                    hit_spread,
                    "≥10× faster than a miss at 1,500" if at_target else "",
                    10.0 if at_target else None,
                )
                report.add_vs_miss(
                    "engine",
                    f"TTFT compressed hit, {size}-token prompt (median of {repeats})",
                    compressed_hit,
                    miss,
                    {**compressed_spread, "greedy_20_tokens_identical": same},
                    "≥5× faster than a miss at 1,500" if at_target else "",
                    5.0 if at_target else None,
                )
                report.add("engine", f"greedy output identical after compress, {size}-token prompt", float(same), "(1 = yes)")
                bar.advance(task)
    finally:
        proc.terminate()
        proc.wait(30)
