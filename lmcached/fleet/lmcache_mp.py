"""LMCache's multiprocess mode, the peer `lmcached bench workload` measures lmcached against: LMCache 0.5.6's cache
server (`python -m lmcache.v1.multiprocess.server`) and a vLLM with LMCacheMPConnector, both run from a side venv
(scripts/lmcache_mp_venv.sh) — LMCache pins numpy<=2.2.6, so it never enters the project's environment."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

#: Where scripts/lmcache_mp_venv.sh puts the side venv; LMCACHED_LMCACHE_MP_VENV names another.
VENV_ENV = "LMCACHED_LMCACHE_MP_VENV"
DEFAULT_VENV = ".lmcache-mp-venv"
START_TIMEOUT_S = 120.0


def side_python() -> str | None:
    """The side venv's interpreter, or None when there is none (the bench then says so and skips the peer)."""
    venv = Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)
    python = venv / "bin" / "python"
    return str(python.absolute()) if python.exists() else None


def transfer_config(port: int) -> dict[str, Any]:
    """vLLM's --kv-transfer-config for LMCacheMPConnector talking to a cache server on this port."""
    return {
        "kv_connector": "LMCacheMPConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port},
    }


def start_server(python: str, port: int, cpu_gb: float, log_path: Path) -> subprocess.Popen[bytes]:
    """LMCache's cache server on 127.0.0.1:port with an L1 (RAM) tier of `cpu_gb`, its output in log_path; returns
    once it accepts connections."""
    cmd = [python, "-m", "lmcache.v1.multiprocess.server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--l1-size-gb", f"{cpu_gb:g}", "--l1-init-size-gb", f"{min(cpu_gb, 1.0):g}", "--eviction-policy", "LRU"]
    # Both transfer paths: on a CPU-only vLLM its connector picks the engine-driven one, which the server's default
    # (lmcache_driven) does not serve.
    cmd += ["--supported-transfer-mode", "auto"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"LMCache's cache server exited while starting:\n{log_path.read_text(errors='replace')[-3000:]}")
        if "cache server is running" in log_path.read_text(errors="replace"):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
            except OSError:
                pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(
        f"LMCache's cache server did not start within {START_TIMEOUT_S:.0f}s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )
