"""`lmcached bench codec --curve`: the rate–quality curve of every codec setting on held-out text.

Each point is one method at one setting, run chunk by chunk over the same held-out samples (every kind of text
in lmcached.bench.heldout): its size in bits per KV element (fp16 is 16) against the continuation's perplexity
change and top-1 agreement with the uncompressed cache. LMCache's CacheGen (emulated, see `lmcache_cachegen`)
is the reference point. Printed as a table (one row per point) and drawn as two plots.
"""

from __future__ import annotations

from lmcached.bench.report import Report, progress


def methods(book: object | None = None) -> dict[str, tuple[str, object]]:
    """Label -> (family, method): the curve's points, grouped into lines by family. kvtc's points need its
    codebook (learned from the tuning half)."""
    from lmcached.bench.codec_quality import codec_method, int8_per_token, lmcache_cachegen, lmcached_codec

    points: dict[str, tuple[str, object]] = {
        f"cachegen quality {q}": ("lmcached cachegen", lmcached_codec("cachegen", quality=q)) for q in range(1, 10)
    }
    if book is not None:
        from lmcached.codecs.kvtc import DEFAULTS, KvtcCodec

        def kvtc(codebook: object, scale: float) -> object:
            steps = {"key_step": DEFAULTS["key_step"] * scale, "value_step": DEFAULTS["value_step"] * scale}
            return codec_method(KvtcCodec(codebook, **steps))  # type: ignore[arg-type]

        # The codebook's own layer steps (×1: KL budget 0.006 nats a token; ×s: s² times that), and one step for
        # every layer as the codebook would have without costs probed (×1 is the old default).
        for scale in (0.5, 0.7, 1.0, 1.3, 1.6, 2.0):
            points[f"kvtc layer steps ×{scale}"] = ("lmcached kvtc", kvtc(book, scale))
        for scale in (1.0, 1.4):
            points[f"kvtc one step ×{scale}"] = ("lmcached kvtc, one step for all layers", kvtc(book.uniform(), scale))  # type: ignore[attr-defined]
    points["int8 per token"] = ("int8 per token", int8_per_token)
    points["LMCache CacheGen (emulated)"] = ("LMCache CacheGen (emulated)", lmcache_cachegen)
    return points


def run(report: Report, loaded: object, data: list[object], book: object | None = None) -> None:
    """The curve over `data` (held-out samples, lmcached.bench.codec.Sample)."""
    from lmcached.bench.codec_quality import evaluate, summarize

    points = methods(book)
    lines: dict[str, dict[str, list[float]]] = {}
    with progress() as bar:
        task = bar.add_task("rate–quality curve", total=len(points) * len(data))
        for label, (family, method) in points.items():
            rows = []
            for sample in data:
                rows.append(evaluate(loaded, method, sample))  # type: ignore[arg-type]
                bar.advance(task)
            ratio, dppl, worst, agree = summarize(rows)
            bits = 16 / ratio
            report.add(
                "codec curve",
                f"{label}: {bits:.2f} bits/element ({ratio:.2f}× smaller), top-1 {agree:.3f}, worst {worst:+.2f}%"
                f" ({len(data)} held-out texts)",
                dppl,
                "% ppl",
                extra={"bits_per_element": bits, "ratio": ratio, "top1": agree, "worst_pct": worst},
                better="lower",
            )
            line = lines.setdefault(family, {"x": [], "ppl": [], "top1": []})
            line["x"].append(bits)
            line["ppl"].append(dppl)
            line["top1"].append(agree)
    report.series["rate–quality: perplexity change"] = {
        "xlabel": "bits per KV element (fp16 = 16)",
        "ylabel": "perplexity change, % (held-out text)",
        "ylog": True,
        "points": {family: {"x": line["x"], "y": line["ppl"]} for family, line in lines.items()},
    }
    report.series["rate–quality: top-1 agreement"] = {
        "xlabel": "bits per KV element (fp16 = 16)",
        "ylabel": "top-1 agreement with fp16 KV",
        "points": {family: {"x": line["x"], "y": line["top1"]} for family, line in lines.items()},
    }
