"""`lmcached bench`: figures users can reproduce, each measured beside its baseline in the same run."""

from __future__ import annotations

import importlib

from lmcached.bench.report import Report

ORDER = ("dataplane", "index", "codec", "engine")


def run_benchmarks(kind: str, quick: bool = False) -> Report:
    report = Report()
    for name in ORDER if kind == "all" else (kind,):
        importlib.import_module(f"lmcached.bench.{name}").run(report, quick)
    return report
