"""Shared fixtures: an in-process daemon on port 0, a real `lmcached serve` subprocess, KV helpers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Tests never write to the user's home: the converted model (and anything else lmcached caches) goes to one
# temporary directory for the whole run, converted once and removed at the end. A run started with
# LMCACHED_CACHE_DIR set (e.g. by a developer reusing a conversion) keeps that directory.
if "LMCACHED_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="lmcached-test-cache-")
    os.environ["LMCACHED_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    # The libraries the tests drive keep caches of their own in the home directory: those go there too.
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_cache, "vllm"))
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(_cache, "matplotlib"))

# Daemons the tests start do not fault their RAM arena in up front (a gigabyte each, many daemons): the tests
# that measure or check prefaulting ask for it.
os.environ.setdefault("LMCACHE_LOCAL_CPU_PREFAULT", "0")

# Without a GPU, numba.cuda runs the CUDA kernels in its simulator, so their logic is tested everywhere.
# This must happen before numba is first imported; on a machine with a GPU the real device is used.
if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import aiohttp  # noqa: E402
import pytest  # noqa: E402

from lmcached.config import Config  # noqa: E402
from lmcached.serve import Daemon  # noqa: E402

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"
CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_kv(num_tokens: int, layers: int = 4, channels: int = 64, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    """A KV tensor [2, L, T, C] with per-channel scales, like real keys."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, channels)
    return (torch.randn(2, layers, num_tokens, channels, generator=gen) * scale).to(dtype)


def test_config(**changes: Any) -> Config:
    base = dict(
        port=0, monitor_port=0, lmcache_worker_port=0, chunk_size=16, heartbeat_interval=0.2, heartbeat_timeout=2.0, command_timeout=10.0
    )
    base.update(changes)
    return Config(**base)


test_config.__test__ = False  # type: ignore[attr-defined]


@dataclass
class Running:
    daemon: Daemon
    http: aiohttp.ClientSession
    base: str
    data: str

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with self.http.post(self.base + path, data=data, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base + path) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if resp.content_type == "application/json" else text)

    async def wait_event(self, event_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = await self.post("/check_finish", {"event_id": event_id})
            assert status == 200, body
            if body["status"] in ("finished", "failed") or time.monotonic() > deadline:
                return body
            await _sleep(0.02)

    async def wait_cached(self, tokens: list[int], expected: int, timeout: float = 10.0) -> None:
        """Wait until the controller's index shows `expected` tokens of `tokens` (reports are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            _, body = await self.post("/lookup", {"tokens": tokens})
            found = max((v[1] for v in body["layout_info"].values()), default=0)
            if found == expected:
                return
            assert time.monotonic() < deadline, f"index shows {found} tokens, expected {expected}"
            await _sleep(0.02)

    async def store(self, tokens: list[int], kv: torch.Tensor) -> None:
        from lmcached.client import AsyncKVClient

        async with AsyncKVClient(self.data) as client:
            assert await client.store(tokens, kv) == len(tokens)
        worker = self.daemon.worker
        if worker is not None:  # the disk copy is written behind RAM: let it land, and be reported
            await worker.flush_disk()
            await worker.flush_reports()
        await self.wait_cached(tokens, len(tokens))


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Running]:
    """A daemon on port 0 and an HTTP session to it; stopped afterwards, also when the test fails."""
    daemon = Daemon(config)
    ports = await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Running(daemon, http, f"http://127.0.0.1:{ports.http}", f"127.0.0.1:{ports.data}")
    finally:
        await daemon.stop()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """A daemon (controller + embedded worker with a disk backend) on port 0, and an HTTP session to it."""
    async with serving(test_config(local_disk=str(tmp_path / "disk"))) as run:
        yield run


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    ports: dict[str, Any]
    output: list[str]
    drain: threading.Thread

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def data(self) -> str:
        return f"127.0.0.1:{self.ports['data']}"


def start_process(cmd: list[str], ready: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> ServeProcess:
    """Start a daemon and wait for its `ready` line (which carries JSON: its ports)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(ready):
            # Keep reading its output, so a chatty daemon never blocks on a full pipe.
            drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
            drain.start()
            return ServeProcess(proc, json.loads(line[len(ready) :]), lines, drain)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"{cmd[3]} did not become ready:\n" + "".join(lines))


def start_serve(*args: str, env: dict[str, str] | None = None, http: int = 0, monitor: int = 0) -> ServeProcess:
    """Start `python -m lmcached serve` (on port 0 unless told) and wait for its ready line."""
    cmd = [sys.executable, "-m", "lmcached", "serve", "--port", str(http), "--monitor-port", str(monitor), "--worker-port", "0", *args]
    return start_process(cmd, "lmcached ready ", env)


def stop_serve(server: ServeProcess) -> int:
    server.proc.terminate()
    try:
        return server.proc.wait(20)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.drain.join(5)
        assert server.proc.stdout is not None
        server.proc.stdout.close()


@pytest.fixture
def serve_process() -> Iterator[ServeProcess]:
    server = start_serve()
    yield server
    stop_serve(server)


def prometheus_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A /metrics page read with Prometheus' own parser: {sample name: {sorted label pairs: value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """`prometheus_samples` of a live server's /metrics (blocking)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        return prometheus_samples(response.read().decode())


def make_certificates(directory: Path) -> dict[str, str]:
    """A private CA, a server certificate for 127.0.0.1 / localhost and a client certificate, made with the
    openssl command (skips the test where there is none): {"ca", "cert", "key", "client_cert", "client_key"}."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=lmcached test CA")
    for name, cn, extension in (
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "lmcached test client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(extension + "\n")
        run("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
        run(
            "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(d / f"{name}.ext"),
        )  # fmt: skip
    return {
        "ca": str(d / "ca.pem"),
        "cert": str(d / "server.pem"),
        "key": str(d / "server.key"),
        "client_cert": str(d / "client.pem"),
        "client_key": str(d / "client.key"),
    }
