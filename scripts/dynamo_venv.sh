#!/usr/bin/env bash
# NVIDIA Dynamo's standalone KV indexer in a venv of its own (.dynamo-venv), for the test that has it consume
# lmcached's KV events (tests/test_dynamo_indexer.py). `pip install ai-dynamo` does not complete off NVIDIA's
# network: it depends on `aisimulate`, a placeholder that downloads the real wheel from pypi.nvidia.com. The
# indexer needs only ai-dynamo and its runtime (a Rust extension), so those are installed without their
# dependency list, plus pydantic, which the runtime imports. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .dynamo-venv/bin/python ] || "$PYTHON" -m venv .dynamo-venv
.dynamo-venv/bin/python -m pip install -q --upgrade pip
.dynamo-venv/bin/python -m pip install -q --no-deps "ai-dynamo==1.6.1" "ai-dynamo-runtime==1.6.1"
.dynamo-venv/bin/python -m pip install -q "pydantic>=2.10.6,<=2.13.5"
.dynamo-venv/bin/python -m dynamo.indexer --help >/dev/null || { echo "Dynamo's indexer does not run in .dynamo-venv" >&2; exit 1; }
echo "Dynamo's KV indexer is installed in .dynamo-venv"
