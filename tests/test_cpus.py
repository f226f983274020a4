"""Where the vLLM connector's own threads run (lmcached.integrations.cpus): parsing vLLM's binding, the plan, and a
real thread bound by it. The real vLLM worker's threads are checked in tests/test_vllm_e2e.py."""

from __future__ import annotations

import os
import threading

import pytest

from lmcached.integrations import cpus
from lmcached.integrations.cpus import CpuPlan, cpu_plan, omp_cpus, parse_cpus, pin


def test_cpu_lists_parse_like_vllms() -> None:
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
    assert parse_cpus(" 7 ") == {7}
    for bad in ("", "a", "1-", "4-2", "1,,2"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpus(bad)


def test_the_openmp_cores_are_read_from_what_vllm_sets_for_its_worker() -> None:
    assert omp_cpus({"OMP_PLACES": "{0,3}", "OMP_PROC_BIND": "true"}) == {0, 3}  # libgomp, vLLM's default
    assert omp_cpus({"OMP_PLACES": "{0,3}"}) is None  # places without binding bind nothing
    assert omp_cpus({"GOMP_CPU_AFFINITY": "1 2"}) == {1, 2}
    assert omp_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5]"}) == {4, 5}  # Intel OpenMP
    assert omp_cpus({}) is None


def test_auto_puts_background_threads_on_the_cores_openmp_leaves_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "machine_cpus", lambda: frozenset({0, 1, 2, 3}))
    bound = {"OMP_PLACES": "{0,1}", "OMP_PROC_BIND": "true", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    plan = cpu_plan("auto", on_cpu=True, environ=bound)
    assert plan == CpuPlan(background=frozenset({2, 3}), copies=frozenset({0, 1, 2, 3}), omp=frozenset({0, 1}))
    assert "background threads on cores 2,3" in plan.describe()
    # Another rank's OpenMP cores (an explicit per-rank bind) are not free either.
    other_rank = {"OMP_PLACES": "{0}", "OMP_PROC_BIND": "true", "VLLM_CPU_OMP_THREADS_BIND": "0|1-2"}
    assert cpu_plan("auto", on_cpu=True, environ=other_rank).background == {3}


def test_auto_leaves_threads_alone_where_there_is_nothing_to_keep_away_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "machine_cpus", lambda: frozenset({0, 1}))
    everything = {"OMP_PLACES": "{0,1}", "OMP_PROC_BIND": "true"}
    assert cpu_plan("auto", on_cpu=True, environ=everything).background is None  # OpenMP has every core
    assert cpu_plan("auto", on_cpu=True, environ={}) == CpuPlan()  # vLLM bound nothing
    assert cpu_plan("auto", on_cpu=False, environ=everything) == CpuPlan()  # a GPU worker
    assert cpu_plan("inherit", on_cpu=True, environ={"OMP_PLACES": "{0}", "OMP_PROC_BIND": "true"}) == CpuPlan()
    assert "keep vLLM's binding" in CpuPlan().describe()


def test_an_explicit_core_list_is_checked_against_the_cores_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "machine_cpus", lambda: frozenset({0, 1}))
    omp = {"OMP_PLACES": "{0}", "OMP_PROC_BIND": "true"}
    assert cpu_plan("1", on_cpu=True, environ=omp) == CpuPlan(frozenset({1}), frozenset({0, 1}), frozenset({0}))
    with pytest.raises(ValueError, match="cores 5 this process cannot run on"):
        cpu_plan("1,5", on_cpu=True, environ=omp)
    with pytest.raises(ValueError, match="CPU list"):
        cpu_plan("one", on_cpu=True, environ=omp)


def test_pin_binds_the_calling_thread_only() -> None:
    mine = os.sched_getaffinity(0)
    target = frozenset({max(mine)})
    seen: list[set[int]] = []

    def worker() -> None:
        pin(target)
        seen.append(os.sched_getaffinity(0))
        pin(None)  # None leaves it as it is
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [target, target]
    assert os.sched_getaffinity(0) == mine  # the caller's binding is untouched


def test_a_core_that_cannot_be_had_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    mine = os.sched_getaffinity(0)
    cpus.log.addHandler(caplog.handler)  # (directly: vLLM's logging config, once imported, stops "vllm.*" propagating)
    try:
        thread = threading.Thread(target=pin, args=(frozenset({4096}),))
        thread.start()
        thread.join()
    finally:
        cpus.log.removeHandler(caplog.handler)
    assert "cannot bind an lmcached thread to cores 4096" in caplog.text
    assert os.sched_getaffinity(0) == mine
