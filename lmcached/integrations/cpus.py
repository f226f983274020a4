"""Which CPU cores the connector's own threads run on inside vLLM's CPU worker.

vLLM's CPU build binds the worker's OpenMP threads — the worker's main thread among them — to the cores named by
VLLM_CPU_OMP_THREADS_BIND and keeps the rest ("reserved") for its scheduler and API server. A thread the worker
starts afterwards inherits the main thread's binding: left alone, the connector's saver, its background loader
and the hosted instance's event loop all ran on the forward pass's own core and took turns with it (seen on this
2-core VM: every thread of the worker process bound to core 0, core 1 idle but for the scheduler). Like vLLM's
own NIXL connector, which moves its transfer thread to a reserved core, lmcached's background threads go to the
cores OpenMP does not use; the copies the forward pass waits for (a load placed, a prompt copied out for saving)
use every core, since the forward pass is not running while they do.

`lmcached_cpus` in kv_connector_extra_config: "auto" (the default, as above), "inherit" (leave every thread
where vLLM put it), or a core list such as "3" or "2,4-5" for the background threads.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("vllm.lmcached")


@dataclass(frozen=True)
class CpuPlan:
    """`background`: the cores of the saver, the background loader and the hosted instance; `copies`: the cores of
    the pool that moves KV while the forward pass waits. None: the thread keeps the binding it inherits."""

    background: frozenset[int] | None = None
    copies: frozenset[int] | None = None
    omp: frozenset[int] | None = None

    def describe(self) -> str:
        if self.background is None:
            return "lmcached's threads keep vLLM's binding"
        copies, omp = _listing(self.copies or self.background), _listing(self.omp or frozenset())
        background = _listing(self.background)
        return f"lmcached's background threads on cores {background}, its copies on {copies} (vLLM's OpenMP threads on {omp})"


def parse_cpus(text: str) -> frozenset[int]:
    """'0,2-4' -> {0, 2, 3, 4}; ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"{text!r} is not a CPU list (e.g. '3' or '2,4-5')")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise ValueError(f"{text!r} is not a CPU list: range {part} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def omp_cpus(environ: dict[str, str] | os._Environ[str] = os.environ) -> frozenset[int] | None:
    """The cores vLLM bound this worker's OpenMP threads to, from the variables it sets for the worker (libgomp's
    OMP_PLACES '{0,1}' or GOMP_CPU_AFFINITY '0 1', Intel OpenMP's KMP_AFFINITY '...proclist=[0,1]'); None when
    it bound nothing."""
    places = environ.get("OMP_PLACES", "")
    if re.fullmatch(r"\{[\d,]+\}", places) and environ.get("OMP_PROC_BIND", "").lower() not in ("", "false"):
        return frozenset(int(c) for c in places.strip("{}").split(","))
    if gomp := environ.get("GOMP_CPU_AFFINITY", "").strip():
        return frozenset(int(c) for c in gomp.split() if c.isdigit())
    if match := re.search(r"proclist=\[([\d,]+)\]", environ.get("KMP_AFFINITY", "")):
        return frozenset(int(c) for c in match[1].split(","))
    return None


def all_ranks_omp_cpus(environ: dict[str, str] | os._Environ[str] = os.environ) -> frozenset[int]:
    """Every core an explicit VLLM_CPU_OMP_THREADS_BIND ('0-3|4-7', one list per rank) gives to OpenMP."""
    bind = environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind in ("auto", "nobind", ""):
        return frozenset()
    cpus: set[int] = set()
    for rank_list in bind.split("|"):
        try:
            cpus |= parse_cpus(rank_list)
        except ValueError:
            continue  # vLLM itself refuses a bad list
    return frozenset(cpus)


def machine_cpus() -> frozenset[int]:
    """The cores this process may use at all: its parent's (vLLM's engine process, not bound) and its own."""
    cpus = set(os.sched_getaffinity(0))
    try:
        cpus |= os.sched_getaffinity(os.getppid())
    except OSError:
        pass
    return frozenset(cpus)


def cpu_plan(setting: str, on_cpu: bool, environ: dict[str, str] | os._Environ[str] = os.environ) -> CpuPlan:
    """Where the connector's threads go (see the module's docstring); ValueError for a bad `setting`."""
    setting = str(setting).strip()
    if setting == "inherit" or not hasattr(os, "sched_setaffinity"):
        return CpuPlan()
    omp = omp_cpus(environ) if on_cpu else None
    if setting != "auto":
        background = parse_cpus(setting)
        if unusable := background - machine_cpus():
            raise ValueError(
                f"lmcached_cpus names cores {_listing(unusable)} this process cannot run on (it may use {_listing(machine_cpus())})"
            )
        return CpuPlan(background, background | (omp or frozenset()), omp)
    if omp is None:  # a GPU, or vLLM left OpenMP unbound: nothing to keep away from
        return CpuPlan()
    spare = machine_cpus() - omp - all_ranks_omp_cpus(environ)
    if not spare:  # OpenMP has every core: sharing them is all there is
        return CpuPlan(omp=omp)
    return CpuPlan(spare, spare | omp, omp)


def pin(cpus: frozenset[int] | None) -> None:
    """Bind the calling thread to `cpus` (None: leave it); a core that cannot be had is logged, not fatal."""
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)  # pid 0: this thread, on Linux
    except OSError as exc:
        log.warning("cannot bind an lmcached thread to cores %s (%s); it keeps its binding", _listing(cpus), exc)


def _listing(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus))) or "-"
