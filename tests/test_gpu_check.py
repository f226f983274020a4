"""The GPU check (`scripts/gpu_check.sh`) runs here in Numba's CUDA simulator, so it cannot rot between GPU
runs; and the codec device setting a worker follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcached.codecs.base import simulate_gpu

from lmcached.bench import gpu_check
from lmcached.bench.synthetic import VLLM_KV_LAYOUTS
from lmcached.config import Config, ConfigError
from lmcached.errors import CodecError
from lmcached.worker.storage import codec_device

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_check_in_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHON=sys.executable, GPU_CARRY=str(tmp_path / "no-carry"))
    run = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["versions"]["simulated"] is True and report["versions"]["lmcached"] and report["finished"] is True
    checks = {check["name"]: check for check in report["checks"]}
    expected = [
        f"codec parity: {codec} {dtype} {model}" for codec in ("cachegen", "kvtc") for dtype in ("float16", "bfloat16") for model in ("smollm2", "llama-3.1-8b")
    ]
    expected += [f"codec parity: {codec} batch of llama-3.1-8b chunks" for codec in ("cachegen", "kvtc")]
    expected += [f"codec speed: {codec} llama-3.1-8b batch" for codec in ("cachegen", "kvtc")]
    expected += [f"paged moves: {layout} interleaved {model}" for layout in VLLM_KV_LAYOUTS for model in ("smollm2", "llama-3.1-8b")]
    expected += [f"paged moves: LBHNC halves {model}" for model in ("smollm2", "llama-3.1-8b")]
    expected += ["worker compresses on the GPU"]
    for name in expected:
        [match] = [check for check_name, check in checks.items() if check_name.startswith(name)]
        assert match["passed"], match
        assert match["device"] == "numba CUDA simulator"
    worker = checks["worker compresses on the GPU"]["figures"]
    assert worker["chunks"] == 1 and worker["codec_device"] == "cpu"  # torch sees no device; the simulator stood in
    log = (out / "gpu_check.log").read_text()
    assert "pytest's device tests skipped" in log and "gpu_check.sh: passed" in log


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    lines: list[str] = []
    runner = gpu_check.Runner("a device", lines.append, tmp_path / "gpu_check.json")
    runner.run("breaks", "correctness", lambda: 1 / 0)
    # Written after each check: a run the device's time cuts short keeps what it measured.
    partial = json.loads((tmp_path / "gpu_check.json").read_text())
    assert partial["finished"] is False and [c["name"] for c in partial["checks"]] == ["breaks"]
    runner.run("too slow", "speed", lambda: {"GBps": 1.0}, lambda figures: figures["GBps"] >= 100)
    runner.run("works", "correctness", lambda: {"x": 1})
    assert [(c.name, c.passed) for c in runner.checks] == [("breaks", False), ("too slow", False), ("works", True)]
    assert "ZeroDivisionError" in runner.checks[0].detail and any(line.startswith("FAIL breaks") for line in lines)


def test_real_chunks_saved_for_the_gpu_run_load_back(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    [first, _] = gpu_check.save_chunks(tmp_path)
    assert first.stat().st_size < 6_000_000  # two of them (~10 MB) travel with a run, beside the wheels
    [kv, _] = gpu_check.real_chunks(tmp_path)
    assert kv.shape == (2, 30, 256, 192) and kv.dtype == torch.float16 and kv.abs().max() > 1


def test_codec_device_setting() -> None:
    assert codec_device("cpu") == "cpu"
    assert codec_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="codec_device"):
        Config(codec_device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            codec_device("cuda")


def test_simulating_the_gpu_needs_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    with pytest.raises(CodecError, match="NUMBA_ENABLE_CUDASIM"):
        with simulate_gpu():
            pass
