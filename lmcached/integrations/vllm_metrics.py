"""The connector's own figures on vLLM's /metrics (`vllm:lmcached_*`): what the engine got from lmcached.

vLLM carries a connector's stats from its model runner (and its scheduler) to the API server's Prometheus
registry: `get_kv_connector_stats()` hands over what was counted since the last call, `build_kv_connector_stats`
rebuilds it on the other side, and `build_prom_metrics` turns it into counters and histograms there. Beside
vLLM's own `vllm:external_prefix_cache_queries/hits` (tokens asked of the connector vs found), these say what
was done with the hits: tokens and bytes placed into the paged cache, loads that fell short (recomputed),
how long a lookup held the scheduler and a load the forward pass, saves queued, dropped or failed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats, PromMetric, PromMetricT

from lmcached.wire.usage import LATENCY_BUCKETS

#: Counters: name -> help text (each is `vllm:lmcached_<name>_total` on /metrics).
COUNTS = {
    "lookups": "Prompts the scheduler asked lmcached about",
    "lookup_failures": "Lookups that found lmcached unreachable (the prompt was computed)",
    "loads": "Requests whose KV was loaded from lmcached into the paged cache",
    "load_tokens": "Tokens of KV placed into the paged cache from lmcached",
    "load_bytes": "Bytes of KV placed into the paged cache from lmcached",
    "load_failed_tokens": "Tokens promised by a lookup that could not be loaded (vLLM recomputed them)",
    "saves": "Prompts whose KV was stored in lmcached",
    "save_tokens": "Tokens of KV sent to lmcached to store",
    "save_bytes": "Bytes of KV sent to lmcached to store",
    "saves_dropped": "Prompts not stored because the connector's save queue was full",
    "save_failures": "Stores lmcached refused or could not be reached for",
}
#: Counters of requests and tokens: with tensor parallelism every rank loads and saves its part of the same
#: tokens, and vLLM adds the ranks' stats up, so only rank 0 counts these (bytes and timings: every rank).
PER_REQUEST = frozenset({"loads", "load_tokens", "load_failed_tokens", "saves", "save_tokens", "saves_dropped", "save_failures"})
#: Latency histograms: name -> help text (`vllm:lmcached_<name>_seconds`).
TIMINGS = {
    "lookup": "How long a lookup held up the scheduler",
    "load": "How long loading a request's KV held up the forward pass (fetch and placement)",
    "save": "How long storing a prompt's KV took (off the forward path)",
}


@dataclass
class LmcachedConnectorStats(KVConnectorStats):
    """What one side of the connector counted in an interval: {"counts": {...}, "timings": {name: [seconds]},
    "save_queue": depth} (plain data: it crosses vLLM's process boundary as is)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counts": {}, "timings": {}}

    def is_empty(self) -> bool:
        return not self.data["counts"] and not self.data["timings"] and "save_queue" not in self.data

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.get("counts", {}).items():
            self.data["counts"][name] = self.data["counts"].get(name, 0) + value
        for name, seconds in other.data.get("timings", {}).items():
            self.data["timings"].setdefault(name, []).extend(seconds)
        if "save_queue" in other.data:
            self.data["save_queue"] = other.data["save_queue"]
        return self

    def reduce(self) -> dict[str, int | float]:
        """For vLLM's periodic log line: the counts, and each timing's mean in ms."""
        out: dict[str, int | float] = dict(self.data["counts"])
        for name, seconds in self.data["timings"].items():
            if seconds:
                out[f"{name}_avg_ms"] = round(sum(seconds) / len(seconds) * 1000, 2)
        return out


class Recorder:
    """Counts as the connector works (the scheduler, the model runner and the saver thread all record here) and
    hands over what accumulated since the last call to vLLM."""

    def __init__(self, counts_requests: bool = True) -> None:
        self._lock = threading.Lock()
        self._stats = LmcachedConnectorStats()
        self._queue_depth: int | None = None
        #: False on tensor-parallel ranks other than 0 (see PER_REQUEST).
        self.counts_requests = counts_requests

    def count(self, name: str, amount: int = 1) -> None:
        assert name in COUNTS, name
        if name in PER_REQUEST and not self.counts_requests:
            return
        with self._lock:
            counts = self._stats.data["counts"]
            counts[name] = counts.get(name, 0) + amount

    def time(self, name: str, seconds: float) -> None:
        assert name in TIMINGS, name
        with self._lock:
            self._stats.data["timings"].setdefault(name, []).append(seconds)

    def save_queue(self, depth: int) -> None:
        with self._lock:
            if depth != self._queue_depth:  # a change is news; the same depth every step is not
                self._queue_depth = depth
                self._stats.data["save_queue"] = depth

    def take(self) -> LmcachedConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            taken, self._stats = self._stats, LmcachedConnectorStats()
            return taken


class LmcachedPromMetrics(KVConnectorPromMetrics):
    """The stats as Prometheus metrics in vLLM's registry, labelled as vLLM labels its own (model, engine)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:lmcached_{name}", documentation=doc, labelnames=labelnames) for name, doc in COUNTS.items()
        }
        self._histograms = {
            name: self._histogram_cls(
                name=f"vllm:lmcached_{name}_seconds", documentation=doc, labelnames=labelnames, buckets=list(LATENCY_BUCKETS)
            )
            for name, doc in TIMINGS.items()
        }
        self._queue = self._gauge_cls(
            name="vllm:lmcached_save_queue", documentation="Prompts waiting in the connector's save queue", labelnames=labelnames
        )
        for labels in per_engine_labelvalues.values():  # every series exists from the start (0 is an answer)
            for counter in self._counters.values():
                counter.labels(*labels)
            for histogram in self._histograms.values():
                histogram.labels(*labels)
            self._queue.labels(*labels).set(0)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.get("counts", {}).items():
            if name in self._counters:
                self._counters[name].labels(*labels).inc(value)
        for name, seconds in transfer_stats_data.get("timings", {}).items():
            if name in self._histograms:
                histogram = self._histograms[name].labels(*labels)
                for value in seconds:
                    histogram.observe(value)
        if "save_queue" in transfer_stats_data:
            self._queue.labels(*labels).set(transfer_stats_data["save_queue"])

