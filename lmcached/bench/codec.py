"""Codec quality and speed on real KV: SmolLM2-135M's cache of real text, scored by the continuation's
perplexity and top-1 agreement; sizes and throughputs beside LMCache's CacheGen (emulated), plain int8 and zstd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmcached.bench.codec_quality import (
    CHUNK,
    PREFIX,
    TOPICS,
    Method,
    Sample,
    evaluate,
    int8_per_token,
    lmcache_cachegen,
    lmcached_codec,
    samples,
    summarize,
)
from lmcached.bench.dataplane import best_of
from lmcached.bench.report import Report, progress


def run(report: Report, quick: bool = False, curve: bool = False) -> None:
    from lmcached.engine.model import load_model

    loaded = load_model()
    data = samples(loaded, 3 if quick else 8)
    methods: dict[str, Method] = {
        "lmcached cachegen": lmcached_codec("cachegen"),
        "LMCache CacheGen (emulated)": lmcache_cachegen,
        "int8 per token": int8_per_token,
        # The quality knob (5 is the default above): what each level costs and keeps.
        **{f"lmcached cachegen quality {q}": lmcached_codec("cachegen", quality=q) for q in (1, 3, 7, 9)},
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    with progress() as bar:
        task = bar.add_task("codec quality", total=len(data) * len(methods))
        for sample in data:
            for name, method in methods.items():
                results[name].append(evaluate(loaded, method, sample))
                bar.advance(task)
    for name, rows in results.items():
        ratio, dppl, agree = (float(np.mean([r[i] for r in rows])) for i in range(3))
        ours = name == "lmcached cachegen"
        report.add(
            "codec quality",
            f"{name}: size vs fp16",
            ratio,
            "×",
            target="≥ 4.5×" if ours else "",
            need=("value", ">=", 4.5) if ours else None,
        )
        report.add(
            "codec quality",
            f"{name}: perplexity change",
            100 * dppl,
            "%",
            target="≤ +1.0%" if ours else "",
            need=("value", "<=", 1.0) if ours else None,
        )
        report.add(
            "codec quality",
            f"{name}: top-1 agreement",
            agree,
            "",
            target="≥ 0.95" if ours else "",
            need=("value", ">=", 0.95) if ours else None,
        )
    from lmcached.bench import codec_kvtc
    from lmcached.bench.heldout import KINDS, split

    per_kind = 1 if quick else 3
    held_out = {kind: samples(loaded, per_kind, split(kind, TOPICS)[1]) for kind in KINDS}
    heldout_quality(report, loaded, held_out)
    chunks = [s.kv[:, :, i : i + CHUNK].contiguous() for s in data for i in range(0, PREFIX, CHUNK)]
    book = codec_kvtc.calibrate(loaded, 1 if quick else 6, weigh_layers=not quick)  # more tuning text than held-out: it is cheap
    kvtc = codec_kvtc.run(report, loaded, book, held_out, weighed=not quick)
    if curve:
        from lmcached.bench import codec_curve

        codec_curve.run(report, loaded, [s for texts in held_out.values() for s in texts[: 1 if quick else 2]], book)
    speed(report, chunks, quick, kvtc)


def heldout_quality(report: Report, loaded: object, held_out: dict[str, list[Sample]]) -> None:
    """cachegen's defaults on the held-out half of six kinds of text (lmcached.bench.heldout): the mean and the
    worst perplexity change and the top-1 agreement per kind, against the targets for text nobody tuned on."""
    method = lmcached_codec("cachegen")
    with progress() as bar:
        task = bar.add_task("held-out text", total=sum(len(texts) for texts in held_out.values()))
        for kind, texts in held_out.items():
            rows = []
            for sample in texts:
                rows.append(evaluate(loaded, method, sample))
                bar.advance(task)
            if not rows:
                continue
            ratio, mean, worst, agree = summarize(rows)
            label = f"held-out {kind} ({len(rows)} text{'s' if len(rows) > 1 else ''}, {ratio:.2f}× smaller)"
            report.add("codec held-out", f"{label}: perplexity change, mean", mean, "%", target="≤ +1.0%", need=("value", "<=", 1.0))
            report.add("codec held-out", f"{label}: perplexity change, worst", worst, "%", target="≤ +2.5%", need=("value", "<=", 2.5))
            report.add("codec held-out", f"{label}: top-1 agreement", agree, "", target="≥ 0.95", need=("value", ">=", 0.95))


def encode_decode_times(codec: Any, chunks: list[torch.Tensor], repeats: int) -> tuple[list[bytes], float, float]:
    """The blobs, and the best-of-`repeats` seconds to encode and to decode all chunks (after one untimed pass
    each, which also compiles the kernels)."""
    blobs = [codec.encode(c) for c in chunks]
    [codec.decode(b) for b in blobs]
    enc = best_of(lambda: [codec.encode(c) for c in chunks], repeats)
    dec = best_of(lambda: [codec.decode(b) for b in blobs], repeats)
    return blobs, enc, dec


def speed(report: Report, chunks: list[torch.Tensor], quick: bool, kvtc: Any = None) -> None:
    """Codec throughput beside zstd on the same chunks; with `kvtc` (a KvtcCodec), its throughput beside
    cachegen's from this same pass."""
    import zstandard

    from lmcached.codecs import get_codec

    repeats = 2 if quick else 3
    raw = [c.numpy().tobytes() for c in chunks]
    total = sum(len(r) for r in raw) / 1e9
    z3 = zstandard.ZstdCompressor(level=3)
    zstd3 = best_of(lambda: [z3.compress(r) for r in raw], repeats)
    for name in ("cachegen", "lossless"):
        codec = get_codec(name)
        blobs, enc, dec = encode_decode_times(codec, chunks, repeats)
        report.add(
            "codec speed",
            f"{name} encode (fp16 in)",
            total / enc,
            "GB/s",
            total / zstd3,
            "zstd -3 compress",
            "≥ zstd -3" if name == "cachegen" else "",
            need=("ratio", ">=", 1.0) if name == "cachegen" else None,
        )
        report.add(
            "codec speed",
            f"{name} decode (fp16 out)",
            total / dec,
            "GB/s",
            total / zstd3,
            "zstd -3 compress",
            "≥ 2× zstd -3" if name == "cachegen" else "",
            need=("ratio", ">=", 2.0) if name == "cachegen" else None,
        )
        if name == "cachegen" and kvtc is not None:
            _, kvtc_enc, kvtc_dec = encode_decode_times(kvtc, chunks, repeats)
            for what, theirs, ours in (("encode", enc, kvtc_enc), ("decode", dec, kvtc_dec)):
                report.add(
                    "codec kvtc",
                    f"kvtc {what} (fp16)",
                    total / ours,
                    "GB/s",
                    total / theirs,
                    f"cachegen {what}",
                    "within 2× of cachegen",
                    need=("ratio", ">=", 0.5),
                )
        if name == "cachegen":
            library_speed(report, chunks, quick)
        if name == "cachegen" and torch.cuda.is_available():
            gpu_speed(report, codec, chunks, repeats)
        if name == "lossless":
            assert all(torch.equal(codec.decode(b), c) for b, c in zip(blobs, chunks, strict=True)), "lossless is not exact"
            size = sum(len(b) for b in blobs)
            z19 = zstandard.ZstdCompressor(level=19)
            z19_time = best_of(lambda: [z19.compress(r) for r in raw[:2]], 1) * len(raw) / 2
            z19_size = sum(len(z19.compress(r)) for r in raw[:2]) * len(raw) / 2
            report.add(
                "codec speed",
                "lossless size vs fp16",
                total * 1e9 / size,
                "×",
                total * 1e9 / z19_size,
                "zstd -19",
                "smaller than zstd -19",
                need=("ratio", ">=", 1.0),
            )
            report.add(
                "codec speed",
                "lossless encode vs zstd -19",
                total / enc,
                "GB/s",
                total / z19_time,
                "zstd -19 compress",
                "≥ 2× zstd -19",
                need=("ratio", ">=", 2.0),
            )


def library_speed(report: Report, chunks: list[torch.Tensor], quick: bool) -> None:
    """cachegen as a library in a fresh process (no allocator tuning), quiet and beside a CPU-bound neighbour,
    each beside zstd -3 in the same pass (lmcached.bench.codec_library)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/chunks.pt"
        torch.save(chunks, path)
        done = subprocess.run(
            [sys.executable, "-m", "lmcached.bench.codec_library", path, "2" if quick else "3"],
            capture_output=True,
            text=True,
            timeout=1200,
            check=True,
        )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    gb = figures["bytes"] / 1e9
    quiet, busy = figures["quiet"], figures["busy"]
    for what, zstd_need in (("encode", 1.2), ("decode", 2.5)):
        report.add(
            "codec speed",
            f"cachegen {what} as a library, quiet ({figures['threads']} threads)",
            gb / quiet[what],
            "GB/s",
            gb / quiet["zstd3"],
            "zstd -3 compress",
            f"≥ {zstd_need}× zstd -3",
            need=("ratio", ">=", zstd_need),
        )
        report.add(
            "codec speed",
            f"cachegen {what} as a library, one core kept busy by another process",
            gb / busy[what],
            "GB/s",
            gb / quiet[what],
            "the same, quiet",
            "≥ 45% of quiet",
            extra={"zstd3_busy_GBps": gb / busy["zstd3"]},
            need=("ratio", ">=", 0.45),
        )


def gpu_speed(report: Report, codec: object, chunks: list[torch.Tensor], repeats: int) -> None:
    """On a CUDA device: encode and decode a batch of at least 64 MB of real chunks, all on the device."""
    batch = [c.cuda() for c in (chunks * (1 + (64 * 2**20) // sum(c.numel() * 2 for c in chunks)))]
    total = sum(c.numel() * 2 for c in batch) / 1e9
    blobs = [codec.encode(c) for c in batch]  # type: ignore[attr-defined]
    [codec.decode(b, device="cuda") for b in blobs]  # type: ignore[attr-defined]

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    enc = best_of(synced(lambda: [codec.encode(c) for c in batch]), repeats)  # type: ignore[attr-defined]
    dec = best_of(synced(lambda: [codec.decode(b, device="cuda") for b in blobs]), repeats)  # type: ignore[attr-defined]
    name = torch.cuda.get_device_name()
    report.add(
        "codec speed",
        f"cachegen GPU encode, {total * 1e3:.0f} MB batch ({name})",
        total / enc,
        "GB/s",
        target="≥ 100 GB/s on an H200",
        need=("value", ">=", 100.0),
    )
    report.add(
        "codec speed",
        f"cachegen GPU decode, {total * 1e3:.0f} MB batch ({name})",
        total / dec,
        "GB/s",
        target="≥ 100 GB/s on an H200",
        need=("value", ">=", 100.0),
    )
