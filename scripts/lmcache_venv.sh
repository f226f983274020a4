#!/usr/bin/env bash
# LMCache 0.5.6 in a venv of its own (.lmcache-venv), for the tests that check lmcached against LMCache's own code
# (its controller: tests/test_lmcache_controller.py). Never in the project's environment: LMCache pins numpy<=2.2.6.
# Only what its controller imports is installed (--no-deps: its full list pulls CUDA packages); torch is the CPU
# build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .lmcache-venv/bin/python ] || "$PYTHON" -m venv .lmcache-venv
.lmcache-venv/bin/python -m pip install -q --upgrade pip
.lmcache-venv/bin/python -m pip install -q "numpy<=2.2.6" msgspec pyzmq "torch==2.13.0" pyyaml requests "prometheus_client<=0.24.1" transformers cachetools
.lmcache-venv/bin/python -m pip install -q --no-deps "lmcache==0.5.6"
.lmcache-venv/bin/python -c "import lmcache.v1.cache_controller.controller_manager" >/dev/null 2>&1 \
    || { echo "LMCache's controller does not import in .lmcache-venv" >&2; exit 1; }
echo "LMCache 0.5.6 is installed in .lmcache-venv"
