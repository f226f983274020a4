"""The codec as a library, on a quiet machine and beside a busy neighbour: `get_codec("cachegen")` in a fresh
process that makes no allocator or thread tuning of its own, timed beside zstd -3 on the same bytes, then again
while another process keeps one core busy. Run as `python -m lmcached.bench.codec_library CHUNKS.pt`; prints
one JSON line of seconds per pass:

    {"quiet": {"encode": s, "decode": s, "zstd3": s}, "busy": {...}, "bytes": n, "threads": t}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

#: A CPU-bound neighbour: one core kept busy for as long as it runs.
NEIGHBOUR = "while True: pass"


def measure(path: str, repeats: int) -> dict[str, Any]:
    import torch
    import zstandard

    from lmcached.bench.dataplane import best_of
    from lmcached.codecs import get_codec, threads

    chunks = torch.load(path)
    raw = [c.numpy().tobytes() for c in chunks]
    codec = get_codec("cachegen")
    blobs = [codec.encode(c) for c in chunks]  # compiles (or loads) the kernels before timing
    [codec.decode(b) for b in blobs]
    z3 = zstandard.ZstdCompressor(level=3)

    def one_pass() -> dict[str, float]:
        return {
            "encode": best_of(lambda: [codec.encode(c) for c in chunks], repeats),
            "decode": best_of(lambda: [codec.decode(b) for b in blobs], repeats),
            "zstd3": best_of(lambda: [z3.compress(r) for r in raw], repeats),
        }

    result: dict[str, Any] = {"quiet": one_pass(), "bytes": sum(len(r) for r in raw), "threads": threads()}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        time.sleep(0.5)  # let the scheduler see it as the busy process it is
        result["busy"] = one_pass()
    finally:
        neighbour.kill()
        neighbour.wait()
    return result


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)), flush=True)
