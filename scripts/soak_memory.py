"""Where the soak's memory growth comes from (issue 24): the soak of `lmcached bench workload --soak`, shorter, on
vLLM alone, on vLLM hosting lmcached, and on the same with glibc's mmap threshold fixed at 1 MiB
(`MALLOC_MMAP_THRESHOLD_`: every buffer of a megabyte or more is mapped on its own and unmapped when freed, so
none of them can fragment the per-thread heaps). Same binding, one after another; prints each soak's rows and
writes their JSON to soak_memory.json. MINUTES per configuration (default 7: ~25 minutes on a 2-core VM); WHICH
(default all) picks configurations by the first word of their key: alone, hosted, mmap (comma-separated).

    .venv/bin/python scripts/soak_memory.py [MINUTES] [WHICH]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from lmcached.bench import workload
from lmcached.bench.report import Report


def main() -> None:
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 7.0
    hosted = workload.soak_setup()
    every = {
        "alone": workload.Setup("vLLM alone", {"connector": False}),
        "hosted": hosted,
        "mmap": replace(hosted, name="vLLM + lmcached (hosted), mmap threshold 1 MiB", env={"MALLOC_MMAP_THRESHOLD_": str(2**20)}),
    }
    which = sys.argv[2].split(",") if len(sys.argv) > 2 else list(every)
    unknown = [key for key in which if key not in every]
    if unknown:
        sys.exit(f"unknown configuration {', '.join(unknown)}: choose from {', '.join(every)}")
    setups = [every[key] for key in which]
    results = {}
    for setup in setups:
        report = Report()
        workload.soak(report, minutes, setup)
        report.print_table()
        results[setup.name] = json.loads(report.as_json())
    Path("soak_memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
