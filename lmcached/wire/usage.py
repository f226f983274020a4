"""What an instance's cache did for the engines that use it, counted as it happens: lookups, retrieves and stores
(chunks asked for against chunks found), bytes in and out, how long each took, codec time and evictions.

The answer to "is the cache helping?" is in the ratios: lookup_chunks_found / lookup_chunks_asked is the hit rate
engines were promised, retrieve_chunks_found / retrieve_chunks_asked the one they got (a chunk evicted between
the two is a promise not kept). Counts are cumulative from start-up (Prometheus counters), sent with every
heartbeat and exported by the controller per instance and worker. Thread-safe: the data plane counts on the event
loop, the codecs in the executor.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Seconds. From a one-chunk RAM hit (~0.1 ms) to a long prompt fetched from a remote tier on a slow link.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The data-plane operations whose latency is kept as a histogram.
OPERATIONS = ("lookup", "retrieve", "store")
#: Counters with no tier: name -> what one unit is (the metric's help text says it).
COUNTS = {
    "lookups": "Lookups engines made (a store's own 'what is held already' check is not one)",
    "lookup_chunks_asked": "Chunks engines looked up",
    "lookup_chunks_found": "Chunks a lookup found (the cached prefix)",
    "lookup_tokens_found": "Tokens a lookup found",
    "lookup_tails_found": "Lookups whose prefix went on into a shorter prompt's last, partial chunk",
    "retrieves": "Retrieves engines made",
    "retrieve_chunks_asked": "Chunks engines asked to retrieve",
    "retrieve_tokens_found": "Tokens a retrieve returned",
    "retrieve_bytes": "Bytes of KV a retrieve returned (decoded)",
    "stores": "Stores engines made",
    "store_chunks": "Chunks stored",
    "store_tokens": "Tokens stored",
    "store_bytes": "Bytes stored (as received)",
}
#: Counters per tier.
TIER_COUNTS = {
    "retrieve_chunks_found": "Chunks a retrieve returned, by the tier that held them",
    "evictions": "Chunks evicted to make room, by tier",
}


class Histogram:
    """Bucket counts (not cumulative) and the sum of the observations, in LATENCY_BUCKETS (+Inf last)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class Usage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTS, 0)
        self._by_tier: dict[str, dict[str, int]] = {name: {} for name in TIER_COUNTS}
        self._codec: dict[tuple[str, str], list[float]] = {}  # (method, encode|decode) -> [seconds, raw bytes]
        self._latency = {op: Histogram() for op in OPERATIONS}

    def add(self, name: str, amount: int = 1, tier: str | None = None) -> None:
        with self._lock:
            if tier is None:
                self._counts[name] += amount
            else:
                per_tier = self._by_tier[name]
                per_tier[tier] = per_tier.get(tier, 0) + amount

    @contextmanager
    def timed(self, op: str) -> Iterator[None]:
        """Observe how long the block took in `op`'s latency histogram (failures included: they took time too)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            with self._lock:
                self._latency[op].observe(seconds)

    def codec(self, method: str, direction: str, seconds: float, raw_bytes: int) -> None:
        with self._lock:
            entry = self._codec.setdefault((method, direction), [0.0, 0])
            entry[0] += seconds
            entry[1] += raw_bytes

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far, as the heartbeat carries it (plain JSON)."""
        with self._lock:
            return {
                "counts": dict(self._counts),
                "by_tier": {name: dict(per_tier) for name, per_tier in self._by_tier.items()},
                "codec": [[method, direction, seconds, raw] for (method, direction), (seconds, raw) in self._codec.items()],
                "latency": {op: h.to_dict() for op, h in self._latency.items()},
            }
