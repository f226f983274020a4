"""How many threads the CPU kernels use, and how those threads wait.

Measured as a library on the 2-core VM, with another process keeping one core busy, cachegen fell to 61–120 MB/s
encode and 107–217 MB/s decode (from 0.73 and 1.37 GB/s quiet): Numba's parallel loops run on OpenMP, whose
threads spin while they wait for each other, so the thread that lost its core held the other one spinning.
Two changes, made by lmcached's package import unless the environment already says otherwise (both must be set
before Numba and OpenMP start): the thread count follows the CPUs this process may actually run on
(`NUMBA_NUM_THREADS` from its affinity, not the machine's core count), and OpenMP's threads wait passively
(`OMP_WAIT_POLICY=PASSIVE`). `configure(n)` changes the count later, for the calling thread (Numba's rule).
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure(count: int | None = None) -> int:
    """Use `count` threads (default: the CPUs available) for the kernels' parallel loops; returns the count."""
    import numba

    wanted = max(1, min(count or available_cpus(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(wanted)
    return wanted


def threads() -> int:
    import numba

    return int(numba.get_num_threads())
