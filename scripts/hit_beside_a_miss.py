"""Issue 24's lead, measured: does loading a hit in the background (lmcached_load_async) let a short request that
arrives together with a long miss answer sooner? Real vLLM (the CPU build, its prefix cache off), a shared
`lmcached serve`; a 2,000-token miss and a 1,500-token hit sent 10 ms apart; the TTFT of each, three pairs per
server, two servers per mode, the modes alternated. Prints one line per server and the JSON of all pairs.
With --hit-first the hit is sent 10 ms before the miss instead of after it.

    .venv/bin/python scripts/hit_beside_a_miss.py [--hit-first]
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

from lmcached.bench.dataplane import start_daemon
from lmcached.fleet.vllm_server import MODEL_NAME, converted_model, start_vllm

CORPUS = " ".join(f"Sentence {i} about caches, keys, values and the prompts that reuse them." for i in range(400))


def first_token(url: str, prompt: list[int], out: dict[str, float], key: str) -> None:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {"):
                out[key] = time.perf_counter() - started
                return


def main() -> None:
    hit_first = "--hit-first" in sys.argv[1:]
    model = converted_model()
    results: dict[str, list[list[tuple[float, float]]]] = {}
    for load_async in (False, True, False, True):
        shared, ports = start_daemon()
        extra = {"lmcached_worker": f"127.0.0.1:{ports['data']}", "lmcached_load_async": load_async}
        vllm = start_vllm(model, extra_config=extra, lmcache_config={"chunk_size": 256})
        try:
            tokens = vllm.tokenize(CORPUS)
            hit = tokens[:1500]
            vllm.ttft(hit)  # stores it
            time.sleep(1)
            vllm.ttft(hit)  # a warm hit, untimed
            pairs = []
            for i in range(3):
                miss = [7 + i] + (tokens[200 + i * 50 :] + tokens)[1:2000]  # a new first token: nothing of it cached
                out: dict[str, float] = {}
                vllm.ttft([1], wake=False)  # an awake server (see VllmServer.ttft)
                long = threading.Thread(target=first_token, args=(vllm.url, miss, out, "miss"))
                short = threading.Thread(target=first_token, args=(vllm.url, hit, out, "hit"))
                first, second = (short, long) if hit_first else (long, short)
                first.start()
                time.sleep(0.01)
                second.start()
                long.join()
                short.join()
                pairs.append((round(out["hit"], 3), round(out["miss"], 3)))
                time.sleep(1)
            mode = "async" if load_async else "sync"
            results.setdefault(mode, []).append(pairs)
            print(f"{mode}: (hit TTFT, miss TTFT) in s: {pairs}", flush=True)
        finally:
            vllm.stop()
            shared.terminate()
            shared.wait(30)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
