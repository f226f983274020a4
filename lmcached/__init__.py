"""lmcached: a KV-cache daemon for LLM serving (kept import-light: `lmcached --help` loads no heavy module)."""

import os as _os

__version__ = "0.1.0"

DEFAULT_INSTANCE_ID = "lmcache_default_instance"

# The codec's parallel loops run on OpenMP, whose threads spin while they wait: on a busy machine a thread that
# lost its core held the others spinning (encode fell to a tenth of its speed, measured). Passive waiting, unless
# the environment says otherwise; it has to be set before OpenMP starts, so here (see lmcached.codecs.threads).
#: True when lmcached chose the wait policy (a server it starts for another program, vLLM, does not inherit it).
OMP_WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# And as many threads as the CPUs this process may run on (a container's share, a taskset), not the machine's.
if hasattr(_os, "sched_getaffinity"):
    _os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, len(_os.sched_getaffinity(0)))))
