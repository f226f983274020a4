"""kvtc in `lmcached bench codec`: a codebook learned from the tuning half only (its basis from the KV, its
layer steps from costs probed on one tuning text of each kind, as `lmcached calibrate` does), scored on the
held-out half (size, perplexity change, top-1); its speed is timed beside cachegen's in the codec speed pass."""

from __future__ import annotations

from typing import Any

from lmcached.bench.report import Report


def calibrate(loaded: object, per_kind: int, weigh_layers: bool = True) -> Any:
    """The codebook: fitted on the 256-token chunks of `per_kind` tuning texts of every kind, its layer steps
    from costs probed on the first of each kind (the first SCORED tokens of its continuation scored). Without
    `weigh_layers` (`--quick`: the probing is most of the codec bench's time on a CPU) every layer keeps the
    same step, as a codebook learned from a worker's own chunks has."""
    from lmcached.bench.codec_quality import CHUNK, PREFIX, TOPICS, samples
    from lmcached.bench.heldout import KINDS, split
    from lmcached.bench.report import progress
    from lmcached.codecs.kvtc import Codebook
    from lmcached.engine import sensitivity
    from lmcached.engine.calibrate import SCORED

    tuning = {kind: samples(loaded, per_kind, split(kind, TOPICS)[0]) for kind in KINDS}
    book = Codebook.fit(s.kv[:, :, i : i + CHUNK] for texts in tuning.values() for s in texts for i in range(0, PREFIX, CHUNK))
    if not weigh_layers:
        return book
    firsts = [texts[0] for texts in tuning.values() if texts]
    probes = [sensitivity.Probe(s.ids[:, : PREFIX + SCORED], s.kv, s.ref_logits[:SCORED]) for s in firsts]
    with progress() as bar:
        task = bar.add_task("kvtc layer costs, tuning text", total=len(probes))
        return sensitivity.weigh(loaded, book, probes, on_probe=lambda: bar.advance(task))


def run(report: Report, loaded: object, book: Any, held_out: dict[str, list[Any]], weighed: bool = True) -> Any:
    """kvtc's size and quality on the held-out samples (by kind of text), all together against the targets and
    per kind for the record; returns the codec (its speed is timed beside cachegen's in
    `lmcached.bench.codec.speed`). A codebook whose layers were not `weighed` is reported without the targets,
    which are for the calibrated codebook."""
    from lmcached.bench.codec_quality import codec_method, evaluate, summarize
    from lmcached.bench.report import progress
    from lmcached.codecs.kvtc import KvtcCodec

    codec = KvtcCodec(book)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    with progress() as bar:
        task = bar.add_task("kvtc, held-out text", total=sum(len(texts) for texts in held_out.values()))
        for kind, texts in held_out.items():
            for sample in texts:
                rows.setdefault(kind, []).append(evaluate(loaded, codec_method(codec), sample))
                bar.advance(task)
    every = [row for kind_rows in rows.values() for row in kind_rows]
    ratio, mean, worst, agree = summarize(every)
    steps = "" if weighed else ", one step for every layer: --quick skips the layer probing"
    label = f"kvtc on {len(every)} held-out texts (codebook {book.digest[:8]} from the tuning half{steps})"

    def target(text: str, need: tuple[str, str, float]) -> dict[str, Any]:
        return {"target": text, "need": need} if weighed else {}

    report.add("codec kvtc", f"{label}: size vs fp16", ratio, "×", **target("≥ 6× (goal ≥ 8×)", ("value", ">=", 6.0)))
    report.add("codec kvtc", f"{label}: perplexity change, mean", mean, "%", **target("≤ +1.0%", ("value", "<=", 1.0)))
    report.add("codec kvtc", f"{label}: perplexity change, worst", worst, "%")
    report.add("codec kvtc", f"{label}: top-1 agreement", agree, "", **target("≥ 0.95", ("value", ">=", 0.95)))
    for kind, kind_rows in rows.items():
        ratio, mean, worst, agree = summarize(kind_rows)
        report.add(
            "codec kvtc",
            f"kvtc, held-out {kind} ({len(kind_rows)} text{'s' if len(kind_rows) > 1 else ''}, {ratio:.2f}× smaller): "
            f"perplexity change, mean (worst {worst:+.2f}%, top-1 {agree:.3f})",
            mean,
            "%",
            extra={"worst_pct": worst, "top1": agree, "ratio": ratio},
            better="lower",
        )
    return codec
