#!/usr/bin/env bash
# The GPU path's checks, one command for whoever has a CUDA device: the device tests (`pytest -m gpu` and the
# codec kernels' tests, on the device), then `lmcached.bench.gpu_check` (codec parity and speed, the paged
# cache's moves, decoding onto the device, a worker coding on the GPU). Writes OUT_DIR/gpu_check.log,
# OUT_DIR/pytest.xml and OUT_DIR/gpu_check.json; exits non-zero when a correctness check or a test fails.
#   scripts/gpu_check.sh OUT_DIR
# With a carry directory (scripts/gpu_prepare.sh made it; GPU_CARRY, default .gpu-carry) it installs the
# carried wheels the machine lacks into a scratch directory and uses the machine's python3; without one it
# uses PYTHON (default .venv/bin/python). With NUMBA_ENABLE_CUDASIM=1 and no device, the same checks run in
# Numba's simulator at small sizes (the test suite does this), and pytest's device tests are left to the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
CARRY=${GPU_CARRY:-.gpu-carry}
started=$SECONDS

CHUNKS=()
if [ -d "$CARRY/wheels" ]; then
    PYTHON=${PYTHON:-python3}
    SITE=$(mktemp -d /tmp/lmcached-gpu-site.XXXXXX)
    wanted=()
    for wheel in "$CARRY"/wheels/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        # lmcached always comes from its wheel; a dependency only where the machine lacks it.
        if [ "$dist" = lmcached ] || ! "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            wanted+=("$wheel")
        fi
    done
    echo "installing ${#wanted[@]} carried wheels into $SITE: $(for w in "${wanted[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-warn-conflicts --target "$SITE" "${wanted[@]}" || exit 2
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    [ -d "$CARRY/chunks" ] && CHUNKS=(--chunks "$REPO/$CARRY/chunks")
else
    PYTHON=${PYTHON:-$REPO/.venv/bin/python}
fi
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac

# Run from a scratch directory: in the checkout, its lmcached/ folder would shadow the installed package.
WORK=$(mktemp -d /tmp/lmcached-gpu-check.XXXXXX)
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
cd "$WORK"
"$PYTHON" -c "import lmcached, torch; print('lmcached from', lmcached.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" || exit 2

status=0
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # The codec kernels' tests, all of them on the device, and every test marked gpu elsewhere.
    others=$(grep -l "mark.gpu" tests/test_*.py | grep -v test_codec_cuda.py | tr '\n' ' ')
    timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -W default --timeout 120 --junitxml "$OUT/pytest.xml" \
        tests/test_codec_cuda.py ${others:+$others} || status=1
    echo "pytest on the device: $([ $status = 0 ] && echo passed || echo FAILED) after $((SECONDS - started)) s"
else
    echo "no CUDA device: pytest's device tests skipped (the test suite runs the kernels in the simulator)"
fi

timeout 270 "$PYTHON" -m lmcached.bench.gpu_check "$OUT" "${CHUNKS[@]}" || status=1
echo "gpu_check.sh: $([ $status = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s; figures in $OUT/gpu_check.json"
rm -rf "$WORK" ${SITE:+"$SITE"}
exit $status
