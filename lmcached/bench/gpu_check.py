"""The GPU path's checks and figures, run by `scripts/gpu_check.sh`: codec parity between the device and the CPU,
codec speed beside a device copy, the connector's paged-cache moves on device tensors, decoding straight to the
device, and a worker that codes on the GPU. On a CUDA device at full size; with NUMBA_ENABLE_CUDASIM=1 (and no
device) the same checks at small sizes in Numba's simulator, without speed targets, so they cannot rot.

    python -m lmcached.bench.gpu_check OUT_DIR [--chunks DIR]     # writes OUT_DIR/gpu_check.json
    python -m lmcached.bench.gpu_check --save-chunks DIR          # real SmolLM2 chunks to carry (CPU machine)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcached.bench.synthetic import VLLM_KV_LAYOUTS, kv_like_real

#: Model shapes (layers, tokens per chunk, channels = kv_heads * head_dim) on a device, and in the simulator,
#: which runs every CUDA thread in Python: a few thousand elements a kernel.
FULL_SIZES = {"smollm2": (30, 256, 192), "llama-3.1-8b": (32, 256, 1024)}
SIM_SIZES = {"smollm2": (2, 8, 32), "llama-3.1-8b": (2, 8, 64)}
#: (kv_heads, head_dim) of the same models, for the paged cache.
HEADS = {"smollm2": (3, 64), "llama-3.1-8b": (8, 128)}
#: Targets from issue 29, for a real device only.
CODEC_TARGET_GBPS = 100.0
PAGED_TARGET_OF_COPY = 0.5
#: kvtc's device decode differs from the CPU's by the products' rounding (float32 there, bfloat16 here).
KVTC_DEVICE_TOLERANCE = 0.01
#: Either decode against the original chunk: a sanity bound on the lossy codecs at their defaults.
LOSSY_TOLERANCE = 0.3
CHUNK_GLOB = "smollm2-*.lmkv"


@dataclass
class Check:
    """One entry of gpu_check.json: correctness checks fail the script; speed checks report against a target."""

    name: str
    kind: str  # "correctness", "speed" or "info"
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    device: str = ""


class Device:
    """Where the GPU path runs: a CUDA device, or Numba's simulator with CPU tensors (`simulate_gpu`)."""

    def __init__(self) -> None:
        from lmcached.codecs.base import simulator_on

        self.simulated = simulator_on() or not torch.cuda.is_available()
        if self.simulated and not simulator_on():
            raise SystemExit("no CUDA device: run with NUMBA_ENABLE_CUDASIM=1 for the simulator's checks")
        self.torch_device = torch.device("cpu" if self.simulated else "cuda")
        self.sizes = SIM_SIZES if self.simulated else FULL_SIZES
        self.name = "numba CUDA simulator" if self.simulated else torch.cuda.get_device_name()

    @contextlib.contextmanager
    def gpu_path(self) -> Iterator[None]:
        """Inside: codec calls on this device's tensors take the GPU path."""
        if self.simulated:
            from lmcached.codecs.base import simulate_gpu

            with simulate_gpu():
                yield
        else:
            yield

    def put(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.torch_device)

    def sync(self) -> None:
        if not self.simulated:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], Any], repeats: int) -> float:
        """The best of `repeats` timed runs after one warm-up (none in the simulator, whose figures mean nothing),
        the device drained before the clock stops."""
        if not self.simulated:
            fn()
            self.sync()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best

    def versions(self) -> dict[str, Any]:
        from importlib import metadata

        import numba

        def version(dist: str) -> str | None:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                return None

        info: dict[str, Any] = {
            "device": self.name,
            "simulated": self.simulated,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "numba": numba.__version__,
            "numba_cuda": version("numba-cuda"),
            "lmcached": version("lmcached"),
        }
        if not self.simulated:
            props = torch.cuda.get_device_properties(0)
            info |= {"memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
            with contextlib.suppress(Exception):
                from numba import cuda

                info["driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
        return info


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def lane_size(blob: bytes) -> int:
    from lmcached.codecs.format import unpack

    return int(unpack(blob).params["lane_size"])


def codebook(chunks: list[torch.Tensor]) -> Any:
    from lmcached.codecs.kvtc import Codebook

    return Codebook.fit([c.cpu() for c in chunks])


def make_codec(name: str, book: Any = None) -> Any:
    from lmcached.codecs import get_codec

    return get_codec(name, codebook=book) if name == "kvtc" else get_codec(name)


# ------------------------------------------------------------------------------------------------- chunks
def real_chunks(directory: Path | None) -> list[torch.Tensor]:
    """The SmolLM2 chunks `--save-chunks` wrote (lossless blobs), or none."""
    if directory is None:
        return []
    from lmcached.codecs import decode

    return [decode(path.read_bytes()) for path in sorted(directory.glob(CHUNK_GLOB))]


def save_chunks(directory: Path, count: int = 2) -> list[Path]:
    """Real SmolLM2 KV from the built-in model (CPU), `count` chunks of 256 tokens as lossless blobs: the few MB
    of real KV a GPU run carries (the model itself is too big to)."""
    from pydoc_data.topics import topics

    from lmcached.codecs import get_codec
    from lmcached.engine.model import forward, kv_from_cache, load_model

    loaded = load_model()
    text = topics["execmodel"] + topics["assignment"]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : 256 * count]
    with torch.no_grad():
        kv = kv_from_cache(forward(loaded.model, ids).cache, torch.float16)
    directory.mkdir(parents=True, exist_ok=True)
    codec, paths = get_codec("lossless"), []
    for i in range(count):
        path = directory / f"smollm2-{i}.lmkv"
        path.write_bytes(codec.encode(kv[:, :, 256 * i : 256 * (i + 1)].contiguous()))
        paths.append(path)
    return paths


def chunk_sets(dev: Device, real: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Float16 chunks per model: random ones of each size, and the real SmolLM2 ones (cut to the simulator's
    size there)."""
    sets = {name: [kv_like_real(L, T, C, torch.float16, seed) for seed in range(2)] for name, (L, T, C) in dev.sizes.items()}
    if real:
        L, T, C = dev.sizes["smollm2"]
        sets["smollm2-real"] = [c[:, :L, :T, :C].contiguous() for c in real]
    return sets


# ------------------------------------------------------------------------------------------------- checks
def codec_parity(dev: Device, name: str, book: Any, kv: torch.Tensor) -> dict[str, Any]:
    """Encoded on the device, decoded on the CPU and on the device; encoded on the CPU, decoded on the device.
    cachegen decodes to the same bits either side; kvtc within its products' rounding."""
    from lmcached.codecs.gpu import GPU_LANE_SIZE

    codec = make_codec(name, book)
    with dev.gpu_path():
        gpu_blob = codec.encode(dev.put(kv))
    if lane_size(gpu_blob) != GPU_LANE_SIZE:
        raise AssertionError(f"{name}: the device blob has lanes of {lane_size(gpu_blob)}, not the GPU path's {GPU_LANE_SIZE}")
    cpu_blob = codec.encode(kv)
    with dev.gpu_path():
        gpu_of_gpu = codec.decode(gpu_blob, device=dev.torch_device)
        gpu_of_cpu = codec.decode(cpu_blob, device=dev.torch_device)
    if gpu_of_gpu.device.type != dev.torch_device.type or gpu_of_gpu.dtype != kv.dtype or gpu_of_gpu.shape != kv.shape:
        raise AssertionError(f"{name}: decoded to {gpu_of_gpu.device} {gpu_of_gpu.dtype} {list(gpu_of_gpu.shape)}")
    cpu_of_gpu, cpu_of_cpu = codec.decode(gpu_blob), codec.decode(cpu_blob)
    gpu_of_gpu, gpu_of_cpu = gpu_of_gpu.cpu(), gpu_of_cpu.cpu()
    figures = {
        "device_vs_cpu_decode_of_device_blob": relative_error(gpu_of_gpu, cpu_of_gpu),
        "device_vs_cpu_decode_of_cpu_blob": relative_error(gpu_of_cpu, cpu_of_cpu),
        "error_vs_original": relative_error(cpu_of_gpu, kv),
        "device_blob_bytes": len(gpu_blob),
        "cpu_blob_bytes": len(cpu_blob),
    }
    if name == "cachegen":
        if not (torch.equal(gpu_of_gpu, cpu_of_gpu) and torch.equal(gpu_of_cpu, cpu_of_cpu)):
            raise AssertionError(f"cachegen: device and CPU decodes differ ({figures})")
    elif max(figures["device_vs_cpu_decode_of_device_blob"], figures["device_vs_cpu_decode_of_cpu_blob"]) > KVTC_DEVICE_TOLERANCE:
        raise AssertionError(f"kvtc: device and CPU decodes differ beyond the products' rounding ({figures})")
    if figures["error_vs_original"] > LOSSY_TOLERANCE:
        raise AssertionError(f"{name}: the device blob decodes {figures['error_vs_original']:.3f} away from the original")
    return figures


def batch_parity(dev: Device, name: str, book: Any, batch: list[torch.Tensor]) -> dict[str, Any]:
    """A batch (≥ 64 MB on a device) encoded on the device decodes on the CPU as on the device."""
    codec = make_codec(name, book)
    worst = 0.0
    for kv in batch:
        with dev.gpu_path():
            blob = codec.encode(dev.put(kv))
            on_device = codec.decode(blob, device=dev.torch_device).cpu()
        on_cpu = codec.decode(blob)
        if name == "cachegen" and not torch.equal(on_device, on_cpu):
            raise AssertionError("cachegen: a batch chunk decodes differently on the device and the CPU")
        worst = max(worst, relative_error(on_device, on_cpu))
    if worst > KVTC_DEVICE_TOLERANCE:
        raise AssertionError(f"{name}: a batch chunk's decodes differ by {worst:.4f}")
    return {"chunks": len(batch), "MB": sum(c.numel() * c.element_size() for c in batch) / 1e6, "worst_difference": worst}


def codec_speed(dev: Device, name: str, book: Any, batch: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Encode and decode GB/s of a batch held on the device, beside a device-to-device copy of the same bytes."""
    codec = make_codec(name, book)
    on_device = [dev.put(c) for c in batch]
    nbytes = sum(c.numel() * c.element_size() for c in batch)
    blobs: list[bytes] = []
    with dev.gpu_path():
        encode = dev.seconds(lambda: blobs.__setitem__(slice(None), [codec.encode(c) for c in on_device]), repeats)
        decode = dev.seconds(lambda: [codec.decode(b, device=dev.torch_device) for b in blobs], repeats)
    copy = dev.seconds(lambda: [c.clone() for c in on_device], repeats)
    return {
        "MB": nbytes / 1e6,
        "encode_GBps": nbytes / encode / 1e9,
        "decode_GBps": nbytes / decode / 1e9,
        "device_copy_GBps": nbytes / copy / 1e9,
        "size_ratio": nbytes / sum(len(b) for b in blobs),
        "target_GBps": None if dev.simulated else CODEC_TARGET_GBPS,
    }


def reference_gather(layers: list[torch.Tensor], packing: str, slots: torch.Tensor) -> torch.Tensor:
    """The obvious gather, from each layout's definition (paged.py's docstring), on the CPU: [2, L, T, C]."""
    out = []
    for layer in layers:
        blocks, heads, block_size, width = layer.shape
        size = width // 2
        block, token = slots // block_size, slots % block_size
        if packing == "interleaved":  # per token and head: the key's head_size values, then the value's
            picked = layer[block, :, token, :]  # [T, heads, 2 * size]
            key, value = picked[..., :size], picked[..., size:]
        else:  # halves: the tile as [heads, 2 * block_size, size], all keys, then all values
            tile = layer.view(blocks, heads, 2 * block_size, size)
            key, value = tile[block, :, token, :], tile[block, :, token + block_size, :]
        out.append(torch.stack([key.reshape(len(slots), -1), value.reshape(len(slots), -1)]))
    return torch.stack(out, dim=1)


def paged_moves(dev: Device, model: str, layout_name: str, packing: str, tokens: int, repeats: int) -> dict[str, Any]:
    """The connector's gather (paged cache -> [2, L, T, C]) and scatter back on a device cache laid out as vLLM
    lays it under `layout_name` (one allocation, a strided view per layer), bit-exact against the reference;
    GB/s beside a device copy of the same bytes; and the host round trip a load of `tokens` tokens makes."""
    from lmcached.bench.synthetic import paged_cache_like_vllm
    from lmcached.integrations.paged import PagedLayout

    L = dev.sizes[model][0]
    heads, head_dim = HEADS[model]
    block_size = 16
    blocks = -(-tokens // block_size) * 2 + 3  # room for a shuffled set of blocks

    def cache(device: torch.device | str) -> list[torch.Tensor]:
        return paged_cache_like_vllm(L, blocks, heads, block_size, 2 * head_dim, layout_name, torch.float16, device, seed=7)

    host_layers = cache("cpu")
    layout = PagedLayout.build(cache(dev.torch_device), block_size, packing)
    gen = torch.Generator().manual_seed(7)
    block_ids = torch.randperm(blocks, generator=gen)[: -(-tokens // block_size)].tolist()
    slots = layout.slots(block_ids, 0, tokens)
    gathered = layout.gather(slots)
    expected = reference_gather(host_layers, packing, slots.cpu())
    if not torch.equal(gathered.cpu(), expected):
        raise AssertionError(f"{layout_name} {packing}: the device gather differs from the reference")
    empty = cache(dev.torch_device)
    for layer in empty:
        layer.zero_()
    target = PagedLayout.build(empty, block_size, packing)
    target.scatter(slots, gathered)
    if not torch.equal(reference_gather([x.cpu() for x in target.layers], packing, slots.cpu()), expected):
        raise AssertionError(f"{layout_name} {packing}: scattering back does not restore the slots")
    written = sum(int(x.count_nonzero()) for x in target.layers)
    if written != expected.count_nonzero():
        raise AssertionError(f"{layout_name} {packing}: the scatter wrote outside its slots")
    nbytes = gathered.numel() * gathered.element_size()
    gather_s = dev.seconds(lambda: layout.gather(slots), repeats)
    scatter_s = dev.seconds(lambda: target.scatter(slots, gathered), repeats)
    copy_s = dev.seconds(lambda: gathered.clone(), repeats)
    host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=not dev.simulated)
    to_host = dev.seconds(lambda: host.copy_(gathered, non_blocking=True), repeats)
    to_device = dev.seconds(lambda: gathered.copy_(host, non_blocking=True), repeats)
    copy_gbps = nbytes / copy_s / 1e9
    return {
        "tokens": tokens,
        "MB": nbytes / 1e6,
        "gather_GBps": nbytes / gather_s / 1e9,
        "scatter_GBps": nbytes / scatter_s / 1e9,
        "device_copy_GBps": copy_gbps,
        "gather_of_copy": nbytes / gather_s / 1e9 / copy_gbps,
        "scatter_of_copy": nbytes / scatter_s / 1e9 / copy_gbps,
        "device_to_host_ms": to_host * 1e3,
        "host_to_device_ms": to_device * 1e3,
        "target_of_copy": None if dev.simulated else PAGED_TARGET_OF_COPY,
    }


def worker_codes_on_gpu(dev: Device, book_chunks: list[torch.Tensor]) -> dict[str, Any]:
    """A worker's storage with `codec_device: auto` compresses on the GPU when torch sees one (in the simulator:
    inside `simulate_gpu`), and a retrieve decodes it back to the values the CPU decodes."""
    from lmcached.codecs import get_codec
    from lmcached.codecs.gpu import GPU_LANE_SIZE
    from lmcached.config import Config
    from lmcached.wire.chunk import CPU, Chunk
    from lmcached.wire.tensors import byte_view, from_bytes
    from lmcached.worker.storage import Storage

    kv = book_chunks[0]
    chunk = Chunk(0x5EED, kv.shape[2], tuple(kv.shape), "float16", bytes(byte_view(kv)))

    async def run() -> dict[str, Any]:
        storage = Storage(Config(max_local_cpu_size=0.25, local_cpu_prefault=0.0, codec_device="auto"), "gpu-check")
        await storage.open()
        try:
            await storage.store([chunk], CPU)
            with dev.gpu_path():
                result = await storage.execute("compress", {"location": CPU, "keys": [chunk.key], "method": "cachegen"})
                [served] = await storage.retrieve([chunk.key])
            stored = await storage._get(CPU, chunk.key)
        finally:
            await storage.close()
        assert stored is not None and stored.method == "cachegen", f"the chunk was not compressed: {result}"
        if lane_size(bytes(stored.data)) != GPU_LANE_SIZE:
            raise AssertionError("the worker compressed on the CPU, not the GPU")
        values = from_bytes(served.data, served.shape, served.dtype)
        if not torch.equal(values, get_codec("cachegen").decode(bytes(stored.data))):
            raise AssertionError("the worker's GPU decode differs from the CPU's")
        return {"codec_device": storage.codec_device, "chunks": result["chunks"], "bytes_after": result["bytes_after"]}

    return asyncio.run(run())


# ------------------------------------------------------------------------------------------------- runner
class Runner:
    """Runs the checks one by one; with a `report` path it rewrites gpu_check.json after each, so a run cut short
    (the device's time ran out) still leaves every figure it measured."""

    def __init__(self, device: str, log: Callable[[str], None], report: Path | None = None, versions: dict[str, Any] | None = None) -> None:
        self.checks: list[Check] = []
        self.device = device
        self.log = log
        self.report = report
        self.versions = versions or {}

    def save(self, finished: bool) -> None:
        if self.report is not None:
            body = {"versions": self.versions, "finished": finished, "checks": [asdict(c) for c in self.checks]}
            self.report.write_text(json.dumps(body, indent=1))

    def run(self, name: str, kind: str, fn: Callable[[], dict[str, Any]], meets: Callable[[dict[str, Any]], bool] | None = None) -> None:
        start = time.perf_counter()
        try:
            figures = fn()
        except Exception as exc:  # one failed check is reported; the others still run
            check = Check(name, kind, False, detail=f"{type(exc).__name__}: {exc}", device=self.device)
            self.log(traceback.format_exc())
        else:
            check = Check(name, kind, True if meets is None else meets(figures), figures, device=self.device)
        check.figures["seconds"] = round(time.perf_counter() - start, 3)
        self.checks.append(check)
        mark = "ok  " if check.passed else "FAIL"
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in check.figures.items()}
        self.log(f"{mark} {name} {check.detail} {json.dumps(shown)}")
        self.save(finished=False)


def run_checks(out_dir: Path, chunks_dir: Path | None, log: Callable[[str], None] = print) -> list[Check]:
    dev = Device()
    versions = dev.versions()
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(dev.name, log, out_dir / "gpu_check.json", versions)
    log(f"gpu_check on {dev.name}: {json.dumps(versions)}")
    real = real_chunks(chunks_dir)
    sets = chunk_sets(dev, real)
    runner.run("real SmolLM2 chunks carried", "info", lambda: {"chunks": len(real), "directory": str(chunks_dir)}, lambda f: True)
    books = {model: codebook(chunks) for model, chunks in sets.items()}
    repeats = 1 if dev.simulated else 3
    for model, chunks in sets.items():
        for name in ("cachegen", "kvtc"):
            for dtype in (torch.float16, torch.bfloat16):
                kv = chunks[-1].to(dtype)
                label = f"codec parity: {name} {str(dtype).removeprefix('torch.')} {model} {list(kv.shape)}"
                runner.run(label, "correctness", lambda n=name, m=model, k=kv: codec_parity(dev, n, books[m], k))
    big = "llama-3.1-8b"
    L, T, C = dev.sizes[big]
    per_chunk = 2 * L * T * C * 2
    count = max(2, -(-64 * 2**20 // per_chunk)) if not dev.simulated else 2
    batch = [kv_like_real(L, T, C, torch.float16, 10 + i) for i in range(count)]
    for name in ("cachegen", "kvtc"):
        runner.run(f"codec parity: {name} batch of {big} chunks", "correctness", lambda n=name: batch_parity(dev, n, books[big], batch))
    count = max(2, -(-256 * 2**20 // per_chunk)) if not dev.simulated else 1
    batch = [kv_like_real(L, T, C, torch.float16, 20 + i) for i in range(count)]
    for name in ("cachegen", "kvtc"):
        runner.run(
            f"codec speed: {name} {big} batch",
            "speed",
            lambda n=name: codec_speed(dev, n, books[big], batch, repeats),
            lambda f: dev.simulated or min(f["encode_GBps"], f["decode_GBps"]) >= CODEC_TARGET_GBPS,
        )
    tokens = 40 if dev.simulated else 1500
    # Every layout vLLM allocates, as the GPU backends pack a tile (interleaved); halves, a CPU packing, once.
    cases = [(layout, "interleaved") for layout in VLLM_KV_LAYOUTS] + [("LBHNC", "halves")]
    for model in dev.sizes:
        for layout, packing in cases:
            runner.run(
                f"paged moves: {layout} {packing} {model}",
                "correctness",
                lambda m=model, lay=layout, p=packing: paged_moves(dev, m, lay, p, tokens, repeats),
            )
            last = runner.checks[-1]
            if last.passed and not dev.simulated:
                runner.checks.append(
                    Check(
                        f"paged moves speed: {layout} {packing} {model}",
                        "speed",
                        min(last.figures["gather_of_copy"], last.figures["scatter_of_copy"]) >= PAGED_TARGET_OF_COPY,
                        {k: last.figures[k] for k in ("gather_of_copy", "scatter_of_copy", "target_of_copy")},
                        device=dev.name,
                    )
                )
    runner.run("worker compresses on the GPU", "correctness", lambda: worker_codes_on_gpu(dev, sets["smollm2"]))
    runner.save(finished=True)
    failed = [c.name for c in runner.checks if c.kind == "correctness" and not c.passed]
    slow = [c.name for c in runner.checks if c.kind == "speed" and not c.passed]
    log(f"gpu_check: {len(runner.checks)} checks, {len(failed)} failed, {len(slow)} below their speed target")
    return runner.checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcached.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="where gpu_check.json goes")
    parser.add_argument("--chunks", type=Path, help="a directory of real SmolLM2 chunks (--save-chunks wrote them)")
    parser.add_argument("--save-chunks", type=Path, metavar="DIR", help="save real SmolLM2 chunks to DIR and stop")
    args = parser.parse_args(argv)
    if args.save_chunks is not None:
        for path in save_chunks(args.save_chunks):
            print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.out_dir is None:
        parser.error("give OUT_DIR (or --save-chunks DIR)")
    checks = run_checks(args.out_dir, args.chunks, lambda line: print(line, flush=True))
    return 1 if any(c.kind == "correctness" and not c.passed for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
