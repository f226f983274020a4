"""Prometheus metrics of the controller (prometheus-client; one registry per controller)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lmcached import __version__
from lmcached.control.failover import Role
from lmcached.control.index import ChunkIndex, WorkerRecord
from lmcached.wire.chunk import REMOTE
from lmcached.wire.usage import COUNTS, LATENCY_BUCKETS, OPERATIONS, TIER_COUNTS


class IndexCollector(Collector):
    """Reads chunk, token and byte gauges from the index at scrape time (nothing to keep in sync)."""

    def __init__(self, index: ChunkIndex, role: Role | None = None) -> None:
        self.index = index
        self.role = role

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["instance_id", "worker_id", "location"]
        families = {
            name: GaugeMetricFamily(f"lmcached_{name}", doc, labels=labels)
            for name, doc in (
                ("chunks", "Chunks held"),
                ("tokens", "Tokens whose KV is held"),
                ("bytes", "Bytes held (compressed chunks count at their compressed size)"),
                ("compressed_chunks", "Chunks held in compressed form"),
                ("pinned_chunks", "Chunks pinned against eviction"),
            )
        }
        workers = GaugeMetricFamily("lmcached_workers", "Connected workers", labels=["instance_id"])
        # Versions as labels of a constant 1 (Prometheus' build_info idiom): a mixed-version fleet shows at a glance.
        build = GaugeMetricFamily("lmcached_build_info", "The controller's lmcached version", labels=["version"])
        build.add_metric([__version__], 1)
        active = GaugeMetricFamily("lmcached_controller_active", "1 on its group's active controller, 0 on a standby")
        active.add_metric([], 1 if self.role is None or self.role.active else 0)
        worker_build = GaugeMetricFamily(
            "lmcached_worker_build_info", "The lmcached version each worker runs", labels=["instance_id", "worker_id", "version"]
        )
        # The shared remote tier is counted once per tier (its workers all see the same Redis), and how each
        # worker reaches it per worker.
        tier_families = {
            name: GaugeMetricFamily(f"lmcached_remote_tier_{name}", doc, labels=["tier"])
            for name, doc in (
                ("chunks", "Chunks in the shared remote tier"),
                ("bytes", "Bytes in the shared remote tier"),
                ("compressed_chunks", "Chunks held compressed in the remote tier"),
                ("pinned_chunks", "Chunks pinned (no TTL) in the remote tier"),
            )
        }
        reach = {
            name: GaugeMetricFamily(f"lmcached_remote_{name}", doc, labels=["instance_id", "worker_id"])
            for name, doc in (
                ("up", "1 while the worker reaches its remote tier"),
                ("hits", "Chunks the worker read from the remote tier"),
                ("misses", "Chunks the worker asked the remote tier for and did not find"),
                ("write_queue_bytes", "Bytes waiting to be written through to the remote tier"),
                ("write_queue_dropped", "Chunks not written through because the queue was full"),
            )
        }
        per_instance: dict[str, int] = {}
        for record in list(self.index.workers.values()):
            per_instance[record.instance_id] = per_instance.get(record.instance_id, 0) + 1
            worker_build.add_metric([record.instance_id, record.worker_id, record.version or "unknown"], 1)
            for location, stats in record.location_stats().items():
                if location == REMOTE:
                    for name, family in reach.items():
                        family.add_metric([record.instance_id, record.worker_id], float(stats.get(name) or 0))
                    continue
                for name, family in families.items():
                    family.add_metric([record.instance_id, record.worker_id, location], stats[name])
        for tier, chunks in list(self.index.tiers.items()):
            infos = list(chunks.values())
            tier_families["chunks"].add_metric([tier], len(infos))
            tier_families["bytes"].add_metric([tier], sum(i.nbytes for i in infos))
            tier_families["compressed_chunks"].add_metric([tier], sum(1 for i in infos if i.method is not None))
            tier_families["pinned_chunks"].add_metric([tier], sum(1 for i in infos if i.pinned))
        for instance, count in per_instance.items():
            workers.add_metric([instance], count)
        yield from families.values()
        yield from tier_families.values()
        yield from reach.values()
        yield workers
        yield build
        yield worker_build
        yield active
        yield from usage_metrics(list(self.index.workers.values()))


def usage_metrics(records: list[WorkerRecord]) -> Iterator[Metric]:
    """"Is the cache helping?": what engines asked of each worker and what it did for them, from the counts
    its heartbeats carry (`usage.Usage`). Hit rate = found / asked; a worker too old to count shows nothing."""
    worker = ["instance_id", "worker_id"]
    counts = {name: CounterMetricFamily(f"lmcached_{name}", doc, labels=worker) for name, doc in COUNTS.items()}
    by_tier = {name: CounterMetricFamily(f"lmcached_{name}", doc, labels=[*worker, "tier"]) for name, doc in TIER_COUNTS.items()}
    codec_seconds = CounterMetricFamily(
        "lmcached_codec_seconds", "Seconds spent coding chunks, by codec and direction", labels=[*worker, "method", "direction"]
    )
    codec_bytes = CounterMetricFamily(
        "lmcached_codec_bytes", "Raw KV bytes coded, by codec and direction (bytes / seconds = codec speed)", labels=[*worker, "method", "direction"]
    )
    latency = {
        op: HistogramMetricFamily(f"lmcached_{op}_seconds", f"How long a {op} took on the worker", labels=worker) for op in OPERATIONS
    }
    queue_bytes = GaugeMetricFamily("lmcached_save_queue_bytes", "Bytes waiting to be written behind RAM, by tier", labels=[*worker, "tier"])
    dropped = CounterMetricFamily(
        "lmcached_saves_dropped", "Chunks not written behind RAM because the tier's queue was full, by tier", labels=[*worker, "tier"]
    )
    for record in records:
        ids = [record.instance_id, record.worker_id]
        for tier, stats in record.heartbeat_stats.items():
            if "write_queue_bytes" in stats:
                queue_bytes.add_metric([*ids, tier], float(stats["write_queue_bytes"] or 0))
                dropped.add_metric([*ids, tier], float(stats.get("write_queue_dropped") or 0))
        usage = record.usage
        if not usage:
            continue
        for name, value in usage.get("counts", {}).items():
            if name in counts:
                counts[name].add_metric(ids, float(value))
        for name, per_tier in usage.get("by_tier", {}).items():
            if name in by_tier:
                for tier, value in per_tier.items():
                    by_tier[name].add_metric([*ids, tier], float(value))
        for method, direction, seconds, raw_bytes in usage.get("codec", []):
            codec_seconds.add_metric([*ids, method, direction], float(seconds))
            codec_bytes.add_metric([*ids, method, direction], float(raw_bytes))
        for op, histogram in usage.get("latency", {}).items():
            if op in latency and len(histogram.get("counts", [])) == len(LATENCY_BUCKETS) + 1:
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], histogram["counts"], strict=True):
                    cumulative += count
                    buckets.append((bound, float(cumulative)))
                latency[op].add_metric(ids, buckets, float(histogram["sum"]))
    yield from counts.values()
    yield from by_tier.values()
    yield codec_seconds
    yield codec_bytes
    yield from latency.values()
    yield queue_bytes
    yield dropped


class Metrics:
    def __init__(self, index: ChunkIndex, role: Role | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmcached_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.operations = Counter("lmcached_operations", "Operations by kind and outcome", ["op", "status"], registry=self.registry)
        self.latency = Histogram(
            "lmcached_http_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.registry.register(IndexCollector(index, role))

    def render(self) -> bytes:
        return generate_latest(self.registry)
