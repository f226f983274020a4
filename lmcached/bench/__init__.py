"""`lmcached bench`: figures users can reproduce, each measured beside its baseline in the same run."""

from __future__ import annotations

import importlib

from lmcached.bench.report import Report

ORDER = ("dataplane", "index", "codec", "engine")


def run_benchmarks(
    kind: str,
    quick: bool = False,
    curve: bool = False,
    kv_share: float | None = None,
    servers: int = 1,
    soak: float | None = None,
    docs: bool = False,
    tiers: bool = False,
) -> Report:
    """`curve` adds the codec's rate–quality curve (lmcached.bench.codec_curve) to the codec benchmark;
    `kv_share` sets the workload bench's engine KV capacity as a share of its working set, `servers` 2 runs its
    two-server configurations, `tiers` its tiers under pressure, `docs` long-document QA instead of chat, `soak`
    its soak of that many minutes instead."""
    report = Report()
    for name in ORDER if kind == "all" else (kind,):
        module = importlib.import_module(f"lmcached.bench.{name}")
        if name == "codec":
            module.run(report, quick, curve=curve)
        elif name == "workload" and soak is not None:
            module.soak(report, soak)
        elif name == "workload":
            module.run(report, quick, kv_share=1 / 3 if kv_share is None else kv_share, servers=servers, docs=docs, tiers=tiers)
        else:
            module.run(report, quick)
    return report
