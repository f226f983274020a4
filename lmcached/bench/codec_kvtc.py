"""kvtc in `lmcached bench codec`: a codebook learned from the tuning half's KV only, scored on the held-out
half (size, perplexity change, top-1); its speed is timed beside cachegen's in the codec speed pass."""

from __future__ import annotations

from typing import Any

from lmcached.bench.report import Report


def calibrate(loaded: object, per_kind: int) -> Any:
    """The codebook, fitted on the 256-token chunks of `per_kind` tuning texts of every kind."""
    from lmcached.bench.codec import CHUNK, PREFIX, TOPICS, samples
    from lmcached.bench.heldout import KINDS, split
    from lmcached.codecs.kvtc import Codebook

    tuning = [s for kind in KINDS for s in samples(loaded, per_kind, split(kind, TOPICS)[0])]
    return Codebook.fit(s.kv[:, :, i : i + CHUNK] for s in tuning for i in range(0, PREFIX, CHUNK))


def run(report: Report, loaded: object, book: Any, held_out: list[Any]) -> Any:
    """kvtc's size and quality on the held-out samples; returns the codec (its speed is timed beside
    cachegen's in `lmcached.bench.codec.speed`)."""
    from lmcached.bench.codec import codec_method, evaluate, summarize
    from lmcached.bench.report import progress
    from lmcached.codecs.kvtc import KvtcCodec

    codec = KvtcCodec(book)
    with progress() as bar:
        task = bar.add_task("kvtc, held-out text", total=len(held_out))
        rows = []
        for sample in held_out:
            rows.append(evaluate(loaded, codec_method(codec), sample))
            bar.advance(task)
    ratio, mean, worst, agree = summarize(rows)
    label = f"kvtc on {len(rows)} held-out texts (codebook {book.digest[:8]} from the tuning half)"
    report.add("codec kvtc", f"{label}: size vs fp16", ratio, "×", target="≥ 6× (goal ≥ 8×)", need=("value", ">=", 6.0))
    report.add("codec kvtc", f"{label}: perplexity change, mean", mean, "%", target="≤ +1.0%", need=("value", "<=", 1.0))
    report.add("codec kvtc", f"{label}: perplexity change, worst", worst, "%")
    report.add("codec kvtc", f"{label}: top-1 agreement", agree, "", target="≥ 0.95", need=("value", ">=", 0.95))
    return codec
