"""Where the connector's threads run, measured on the workload bench (issue 24): vLLM alone, vLLM hosting lmcached
with its threads left where vLLM's worker puts them (`lmcached_cpus: inherit`, the old behaviour: on the forward
pass's OpenMP core), with them on the cores OpenMP leaves free (`auto`, the default), and `auto` with hits loaded
in the background. Each configuration twice, interleaved, like `lmcached bench workload --quick` (~25 minutes on
a 2-core VM). Prints the bench's table; writes its JSON to workload_threads.json.

    .venv/bin/python scripts/workload_threads.py
"""

from __future__ import annotations

from pathlib import Path

from lmcached.bench import workload
from lmcached.bench.report import Report


def main() -> None:
    configs = [
        workload.Setup("vLLM alone", {"connector": False}),
        workload.Setup("hosted, threads inherit", workload.hosted_config(lmcached_cpus="inherit")),
        workload.Setup("hosted, threads auto", workload.hosted_config()),
        workload.Setup("hosted, auto + async load", workload.hosted_config(lmcached_load_async=True)),
    ]
    report = Report()
    workload.run(report, quick=True, configs=configs)
    report.print_table()
    Path("workload_threads.json").write_text(report.as_json())


if __name__ == "__main__":
    main()
