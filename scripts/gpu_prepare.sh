#!/usr/bin/env bash
# On the CPU machine, before a GPU run: fill CARRY_DIR (default .gpu-carry, git-ignored) with what the device
# image lacks — lmcached as a wheel, the wheels of its dependencies the image does not have (for its Python
# 3.12), and real SmolLM2 chunks to check the codecs on — so that `scripts/gpu_check.sh` needs no network.
#   scripts/gpu_prepare.sh [CARRY_DIR]
# The device image (issue 29) has Python 3.12, torch with CUDA, numba, numba-cuda, aiohttp, typer, pyyaml,
# prometheus-client, transformers, numpy, msgpack and xxhash. What travels with a run is capped at 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-.gpu-carry}
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/chunks"

# lmcached itself, built from this tree (what a user installs, not the checkout).
"$PYTHON" -m pip wheel -q --no-deps -w "$CARRY/wheels" .

# lmcached's runtime dependencies missing from the image, and the test suite's. --no-deps: the image's torch,
# numpy and aiohttp stay as they are; gpu_check.sh installs only the ones the image turns out to lack.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" \
    --python-version "$DEVICE_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    orjson zstandard redis hiredis \
    textual rich markdown-it-py mdurl pygments platformdirs typing-extensions \
    pytest pluggy iniconfig packaging pytest-asyncio pytest-timeout hypothesis sortedcontainers attrs psutil

# Real KV: the model is too big to carry, its KV is not.
"$PYTHON" -m lmcached.bench.gpu_check --save-chunks "$CARRY/chunks"

size=$(du -sm "$CARRY" | cut -f1)
echo "$CARRY: ${size} MiB ($(ls "$CARRY/wheels" | wc -l) wheels, $(ls "$CARRY/chunks" | wc -l) chunks)"
if [ "$size" -gt 60 ]; then
    echo "error: $CARRY is over the 60 MiB a run can carry beside the tree" >&2
    exit 1
fi
