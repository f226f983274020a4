"""`lmcached bench`: figures users can reproduce, each measured beside its baseline in the same run."""

from __future__ import annotations

import importlib

from lmcached.bench.report import Report

ORDER = ("dataplane", "index", "codec", "engine")


def run_benchmarks(kind: str, quick: bool = False, curve: bool = False) -> Report:
    """`curve` adds the codec's rate–quality curve (lmcached.bench.codec_curve) to the codec benchmark."""
    report = Report()
    for name in ORDER if kind == "all" else (kind,):
        module = importlib.import_module(f"lmcached.bench.{name}")
        if name == "codec":
            module.run(report, quick, curve=curve)
        else:
            module.run(report, quick)
    return report
