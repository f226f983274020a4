"""What the codec benchmark's rows share: samples of real text through the real model, the methods under test
(lmcached's codecs, LMCache's CacheGen, int8, zstd) and how a method's output is scored against the raw KV's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PREFIX = 768
CONTINUATION = 256
CHUNK = 256
#: Long prose from the Python language reference, which ships with every CPython (pydoc_data): real text,
#: no download, the same on every machine.
TOPICS = ("execmodel", "assignment", "import", "function", "comparisons", "customization", "try", "naming", "calls", "types")


@dataclass
class Sample:
    name: str
    ids: torch.Tensor  # [1, PREFIX + CONTINUATION]
    kv: torch.Tensor  # [2, L, PREFIX, C] fp16, as an engine would store it
    ref_logits: torch.Tensor  # continuation logits with the original (fp16) KV


def texts(tokenizer: object, count: int, source: list[tuple[str, str]] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The first `count` texts of `source` (default: the tuning topics) long enough for a prefix and its
    scored continuation, as token ids."""
    if source is None:
        from pydoc_data.topics import topics

        source = [(name, topics[name]) for name in TOPICS]
    out = []
    for name, text in source:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : PREFIX + CONTINUATION]  # type: ignore[operator]
        if ids.shape[1] == PREFIX + CONTINUATION:
            out.append((name, ids))
        if len(out) == count:
            break
    return out


def continuation_logits(loaded: object, kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from lmcached.engine.model import cache_from_kv, forward

    cache = cache_from_kv(kv, loaded.kv_heads)  # type: ignore[attr-defined]
    with torch.no_grad():
        return forward(loaded.model, ids[:, PREFIX:], cache).logits[0].float()  # type: ignore[attr-defined]


def samples(loaded: object, count: int, source: list[tuple[str, str]] | None = None) -> list[Sample]:
    from lmcached.engine.model import forward, kv_from_cache

    out = []
    for name, ids in texts(loaded.tokenizer, count, source):  # type: ignore[attr-defined]
        with torch.no_grad():
            prefill = forward(loaded.model, ids[:, :PREFIX])  # type: ignore[attr-defined]
        kv = kv_from_cache(prefill.cache, torch.float16)
        out.append(Sample(name, ids, kv, continuation_logits(loaded, kv, ids)))
    return out


def score(logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    """(perplexity, reference perplexity, top-1 agreement) of the continuation."""
    targets = ids[0, PREFIX + 1 :]
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets)
    ref_nll = torch.nn.functional.cross_entropy(ref[:-1], targets)
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    return math.exp(nll.item()), math.exp(ref_nll.item()), agree.item()


# ---------------------------------------------------------------------------------------- the contenders
Method = Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # fp16 chunk -> (decoded chunk, bytes it took)


def lmcached_codec(name: str, **params: Any) -> Method:
    from lmcached.codecs import get_codec

    return codec_method(get_codec(name, **params))


def codec_method(codec: Any) -> Method:
    """A codec object as a Method: encode, decode, and the blob's size."""

    def run(chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
        blob = codec.encode(chunk)
        return codec.decode(blob), len(blob)

    return run


def summarize(rows: list[tuple[float, float, float]]) -> tuple[float, float, float, float]:
    """Evaluations (size ratio, perplexity change, top-1) -> mean ratio, mean and worst change in %, mean top-1."""
    return (
        float(np.mean([r[0] for r in rows])),
        100 * float(np.mean([r[1] for r in rows])),
        100 * max(r[1] for r in rows),
        float(np.mean([r[2] for r in rows])),
    )


def int8_per_token(chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain int8: symmetric, one fp16 scale per token and layer, no entropy coding."""
    x = chunk.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8).half().float()
    q = torch.round(x / scale).clamp(-127, 127)
    return (q * scale).half(), q.numel() + scale.numel() * 2


def lmcache_cachegen(chunk: torch.Tensor) -> tuple[torch.Tensor, int]:
    """LMCache's CacheGen, emulated: per-token max-normalised quantisation with 32 bins in the first layers
    (10 for keys, 2 for values) and 16 after, an arithmetic coder (counted at its ideal size: the entropy of
    each layer-and-channel's symbols) and the 33-entry int16 CDF table per layer and channel it ships."""
    out = torch.empty_like(chunk)
    total_bits = 0.0
    _, layers, tokens, channels = chunk.shape
    for kv_index, first_layers in ((0, 10), (1, 2)):
        x = chunk[kv_index].float()  # [L, T, C]
        bins = torch.tensor([32 if layer < first_layers else 16 for layer in range(layers)]).view(-1, 1, 1)
        levels = (bins // 2 - 1).float()
        peak = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8).half().float()
        q = torch.round(x / peak * levels)
        out[kv_index] = (q / levels * peak).half()
        sym = (q + 16).to(torch.int64).numpy()  # [L, T, C] in 0..32
        for layer in range(layers):
            counts = np.zeros((channels, 33))
            np.add.at(counts, (np.broadcast_to(np.arange(channels), (tokens, channels)), sym[layer]), 1)
            p = counts / tokens
            with np.errstate(divide="ignore", invalid="ignore"):
                total_bits += float(-(counts * np.where(p > 0, np.log2(p), 0)).sum())
        total_bits += layers * channels * 33 * 16 + layers * tokens * 16  # CDF tables + per-token maxima
    return out, int(total_bits / 8)


def zstd_size(chunk: torch.Tensor, level: int) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(chunk.numpy().tobytes()))


# ---------------------------------------------------------------------------------------- the run


def evaluate(loaded: object, method: Method, sample: Sample) -> tuple[float, float, float]:
    """(size vs fp16, perplexity change, top-1 agreement) of a method on a sample, chunk by chunk."""
    parts, size = [], 0
    for start in range(0, PREFIX, CHUNK):
        decoded, nbytes = method(sample.kv[:, :, start : start + CHUNK].contiguous())
        parts.append(decoded)
        size += nbytes
    ppl, ref_ppl, agree = score(continuation_logits(loaded, torch.cat(parts, dim=2), sample.ids), sample.ref_logits, sample.ids)
    return sample.kv.numel() * 2 / size, ppl / ref_ppl - 1, agree
