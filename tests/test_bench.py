"""`lmcached bench` runs from the command line and reports real figures beside their baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcached.bench.report import Report

pytestmark = pytest.mark.slow


def test_ratio_means_better_than_the_baseline_either_way() -> None:
    report = Report()
    rate = report.add("s", "rate", 2.0, "GB/s", 1.0, "socket")
    latency = report.add("s", "latency", 10.0, "ms", 100.0, "miss", better="lower")
    assert rate.ratio == 2.0 and latency.ratio == 10.0
    assert "| s | latency | 10 ms | 100 ms (miss) | 10.00× |" in report.markdown()


def test_targets_are_marked_pass_or_short_beside_the_figure() -> None:
    report = Report()
    met = report.add("s", "hit", 10.0, "ms", 100.0, "miss", "≥5× faster", better="lower", need=("ratio", ">=", 5.0))
    short = report.add("s", "size", 3.0, "×", target="≥ 4.5×", need=("value", ">=", 4.5))
    spread = report.add("s", "miss", 6000.0, "ms", extra={"min_ms": 5900.0, "max_ms": 6800.0, "runs": 3})
    assert (met.verdict, short.verdict, spread.verdict) == ("pass", "short", "")
    table = report.markdown()
    assert "✓ pass: ≥5× faster" in table and "✗ short: ≥ 4.5×" in table and "6000 ms (5900–6800)" in table
    assert [r["verdict"] for r in json.loads(report.as_json())["rows"]] == ["pass", "short", ""]


def test_bench_dataplane_quick_prints_json_and_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    done = subprocess.run(
        [sys.executable, "-m", "lmcached", "bench", "dataplane", "--quick", "--json", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    stores = [r for r in rows if r["name"].startswith("store")]
    assert stores and all(r["value"] > 0 and r["baseline"] > 0 and r["verdict"] in ("pass", "short") for r in stores)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_an_unknown_kind() -> None:
    done = subprocess.run([sys.executable, "-m", "lmcached", "bench", "disk"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown benchmark 'disk'" in done.stderr


def test_the_held_out_set_has_every_kind_split_apart() -> None:
    from lmcached.bench.codec import TOPICS
    from lmcached.bench.heldout import KINDS, MIN_CHARS, split

    for kind in KINDS:
        tuning, held_out = split(kind, TOPICS)
        assert held_out, f"no held-out {kind} text on this machine"
        assert not {n for n, _ in tuning} & {n for n, _ in held_out}  # disjoint halves
        assert all(len(text) >= MIN_CHARS for _, text in held_out)
        assert split(kind, TOPICS) == (tuning, held_out)  # the same split every time
    assert not {n for n, _ in split("documentation", TOPICS)[1]} & set(TOPICS)  # never the topics tuned on


def test_the_rate_quality_curve_orders_the_quality_levels_and_draws_both_plots(tmp_path: Path) -> None:
    """The curve's points are real measurements on held-out text: a higher cachegen quality (or finer kvtc
    steps) costs more bits and loses less perplexity; every method has a point; the plot renders."""
    from lmcached.codecs.kvtc import Codebook

    from lmcached.bench import codec_curve
    from lmcached.bench.codec import CHUNK, PREFIX, TOPICS, samples
    from lmcached.bench.heldout import split
    from lmcached.engine.model import load_model

    loaded = load_model()
    tuning, held_out = split("tables", TOPICS)
    book = Codebook.fit(s.kv[:, :, i : i + CHUNK] for s in samples(loaded, 1, tuning) for i in range(0, PREFIX, CHUNK))
    book = book.weighted(np.linspace(0.5, 3.0, 2 * book.layers).reshape(2, book.layers))  # layer steps, as calibrated
    report = Report()
    codec_curve.run(report, loaded, samples(loaded, 1, held_out), book)
    rows = {r.name.split(":")[0]: r for r in report.rows}
    assert set(rows) == set(codec_curve.methods(book))
    bits = [rows[f"cachegen quality {q}"].extra["bits_per_element"] for q in range(1, 10)]
    assert bits == sorted(bits) and 1.0 < bits[0] < bits[-1] < 16.0
    assert rows["cachegen quality 1"].value > rows["cachegen quality 9"].value  # coarser costs more perplexity
    kvtc_bits = [rows[f"kvtc layer steps ×{s}"].extra["bits_per_element"] for s in (0.5, 0.7, 1.0, 1.3, 1.6, 2.0)]
    assert kvtc_bits == sorted(kvtc_bits, reverse=True)
    assert rows["kvtc layer steps ×2.0"].value > rows["kvtc layer steps ×0.5"].value
    assert rows["kvtc one step ×1.0"].extra["bits_per_element"] > rows["kvtc one step ×1.4"].extra["bits_per_element"]
    assert rows["int8 per token"].extra["bits_per_element"] > 8.0
    plot = tmp_path / "curve.png"
    report.plot(plot)
    assert plot.stat().st_size > 10_000


def test_curve_belongs_to_the_codec_benchmark() -> None:
    done = subprocess.run([sys.executable, "-m", "lmcached", "bench", "index", "--curve"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--curve belongs to the codec benchmark" in done.stderr


def test_sizing_measures_each_tier_against_the_raw_kv() -> None:
    """The sizing bench's per-tier costs on a small KV (the real run uses SmolLM2's): RAM and disk hold about
    the raw bytes, Redis a little more (its allocator's size classes), cachegen several times less; and a
    model's raw bytes per token follow its KV geometry."""
    import asyncio

    from lmcached.bench.sizing import MODELS, _measure
    from lmcached.bench.synthetic import kv_like_real

    llama = next(m for m in MODELS if m.name.startswith("Llama-3.1-8B"))
    assert llama.bytes_per_token == 128 * 1024  # 32 layers x 8 KV heads x 128 x K and V x 2 bytes
    ratios = asyncio.run(_measure(kv_like_real(4, 1024, 128, torch.float16)))
    assert 1.0 <= ratios["ram"] < 1.01 and 1.0 <= ratios["disk"] < 1.02
    assert 0.05 < ratios["ram_cachegen"] < 0.5
    if "redis" in ratios:  # a redis-server is installed
        assert 1.0 <= ratios["redis"] <= 1.26 and ratios["redis_cachegen"] < 0.5  # jemalloc: 4 size classes per doubling


def test_the_workload_reports_rounds_apart_against_vllm_alone() -> None:
    """bench workload's arithmetic on known outcomes (the run itself needs vLLM servers for minutes: the bench)."""
    from lmcached.bench.workload import COUNTERS, Outcome, Shape, add_rows, conversations

    system, contexts = conversations(Shape(users=40, rounds=2, rate=1.0))
    assert len(set(contexts)) == 40 and all(c.startswith(f"Document of user {u}:") for u, c in enumerate(contexts))
    counters = dict.fromkeys(COUNTERS, 0.0) | {"vllm:prefix_cache_queries_total": 100.0, "vllm:prefix_cache_hits_total": 25.0}
    alone = Outcome("alone", [(0, 0, 2.0, 16), (0, 1, 4.0, 16), (1, 1, 6.0, 16)], [], 10.0, counters)
    cached = Outcome("cached", [(0, 0, 2.0, 16), (0, 1, 1.0, 16), (1, 1, 1.0, 16)], ["user 1 round 0: boom"], 8.0, counters)
    report = Report()
    add_rows(report, [alone, cached], "test")
    rows = {r.name: r for r in report.rows}
    later = rows["cached: TTFT mean, later rounds (test)"]
    assert (later.value, later.baseline, later.ratio) == (1000.0, 5000.0, 5.0)
    assert rows["cached: TTFT mean, first rounds (test)"].ratio == 1.0
    assert rows["cached: failed requests"].value == 1 and rows["cached: vLLM's own prefix-cache hit rate"].value == 25.0
    assert rows["cached: output throughput"].value == 6.0 and rows["cached: output throughput"].baseline == 4.8


def test_the_workload_pools_interleaved_runs_and_shows_their_spread() -> None:
    from lmcached.bench.workload import COUNTERS, Outcome, add_rows, pooled

    counters = dict.fromkeys(COUNTERS, 1.0)
    one = Outcome("x", [(0, 0, 1.0, 16), (0, 1, 1.0, 16)], [], 5.0, counters)
    two = Outcome("x", [(0, 0, 3.0, 16), (0, 1, 1.0, 16)], ["user 1 round 0: boom"], 5.0, counters)
    both = pooled("x", [one, two])
    assert len(both.requests) == 4 and both.failures == ["user 1 round 0: boom"] and both.seconds == 10.0
    assert both.counters["vllm:num_preemptions_total"] == 2.0 and both.run_means["first"] == [1000.0, 3000.0]
    report = Report()
    add_rows(report, [both], "t")
    first = next(r for r in report.rows if r.name == "x: TTFT mean, first rounds (t)")
    assert first.value == 2000.0 and (first.extra["min_ms"], first.extra["max_ms"]) == (1000.0, 3000.0)


def test_the_workloads_engine_capacity_is_a_share_of_its_working_set() -> None:
    from lmcached.bench.workload import BLOCK_SIZE, Shape, engine_blocks

    shape = Shape(users=12, rounds=6, rate=0.12)
    evicting, fitting = engine_blocks(shape, 1 / 3), engine_blocks(shape, 1.5)
    assert evicting * BLOCK_SIZE < shape.working_set_tokens() / 2 < shape.working_set_tokens() < fitting * BLOCK_SIZE
    assert engine_blocks(Shape(users=1, rounds=1, rate=1.0), 1 / 3) == 66  # vLLM's floor: one 8,192-token request


def test_the_workload_benchs_options_belong_to_it_and_are_checked() -> None:
    for args, said in (
        (["index", "--kv-share", "1.5"], "--kv-share belongs to the workload benchmark"),
        (["workload", "--kv-share", "0"], "is not a share"),
        (["index", "--servers", "2"], "--servers belongs to the workload benchmark"),
        (["workload", "--servers", "3"], "one server or two"),
        (["vllm", "--soak", "30"], "--soak belongs to the workload benchmark"),
        (["workload", "--soak", "-1"], "length in minutes"),
        (["index", "--docs"], "--docs belongs to the workload benchmark"),
        (["codec", "--tiers"], "--tiers belongs to the workload benchmark"),
        (["workload", "--docs", "--soak", "5"], "run them apart"),
        (["workload", "--tiers", "--servers", "2"], "run them apart"),
    ):
        done = subprocess.run([sys.executable, "-m", "lmcached", "bench", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and said in done.stderr, done.stderr


def test_the_soak_reports_failures_drift_and_memory_growth_after_warm_up() -> None:
    from lmcached.bench.workload import COUNTERS, Outcome, Sample, add_soak_rows

    requests = [(0, i % 3, 1.0 if i < 10 else 1.5, 16) for i in range(40)]
    outcome = Outcome(
        "soak", requests, ["user 3 round 1: boom"], 400.0, dict.fromkeys(COUNTERS, 0.0), sent_at=[i * 10.0 for i in range(40)]
    )
    outcome.counters["vllm:lmcached_saves_dropped_total"] = 2.0
    mib = 2**20
    samples = [Sample(at, (1000 + (10 if at > 200 else 0)) * mib, 600 * mib, 3.0 if at == 150 else 0.0) for at in range(0, 401, 15)]
    report = Report()
    add_soak_rows(report, outcome, samples, "t")
    rows = {r.name: r for r in report.rows}
    assert rows["finished requests (t)"].value == 40 and rows["failed requests"].value == 1
    drift = rows["TTFT mean, last quarter"]
    assert (drift.value, drift.baseline) == (1500.0, 1000.0)
    grown = rows["RSS of all vLLM processes at the end, against the end of the warm-up"]
    assert grown.value == 1010.0 and grown.baseline == 1000.0 and grown.extra["growth_pct"] == 1.0
    assert rows["RSS of vLLM's worker (with lmcached inside) at the end, against the end of the warm-up"].extra["growth_pct"] == 0.0
    assert rows["deepest save queue sampled"].value == 3.0
    assert rows["lmcached loads short / saves dropped / saves failed"].value == 2.0


def test_document_qa_asks_each_document_again_after_the_others() -> None:
    from lmcached.bench.workload import BLOCK_SIZE, docqa_shape, document_orders, engine_blocks

    orders = document_orders(8, 4)
    assert orders[0] == list(range(8)) and all(sorted(order) == list(range(8)) for order in orders)
    assert all(later[0] != earlier[-1] for earlier, later in zip(orders, orders[1:], strict=False))
    assert orders == document_orders(8, 4) and orders != document_orders(8, 4, seed=1)  # the same in every configuration
    shape = docqa_shape(quick=False)
    assert shape.working_set_tokens() > 2.5 * engine_blocks(shape, 1 / 3) * BLOCK_SIZE  # vLLM evicts a document before its next question


def test_the_workload_reports_answers_against_the_baseline_and_hits_per_tier() -> None:
    from lmcached.bench.workload import COUNTERS, Outcome, add_rows, pooled, same_answers

    counters = dict.fromkeys(COUNTERS, 0.0)
    alone = Outcome("alone", [(0, 0, 2.0, 16), (0, 1, 2.0, 16)], [], 10.0, counters, answers={(0, 0): "a", (0, 1): "b"})
    runs = []
    for answers, tiers in (({(0, 0): "a", (0, 1): "x"}, {"LocalCPUBackend": 3.0}), ({(0, 0): "a", (0, 1): "b"}, {"LocalDiskBackend": 2.0})):
        run = Outcome("tiers", [(0, 0, 2.0, 16), (0, 1, 1.0, 16)], [], 8.0, counters, answers=answers, tiers={"hits": tiers})
        run.same, run.differing = same_answers(run, alone)
        runs.append(run)
    assert [run.same for run in runs] == [[1, 2], [2, 2]] and runs[0].differing == ["user 0 request 1"]
    both = pooled("tiers", runs)
    assert both.same == [3, 4] and both.tiers == {"hits": {"LocalCPUBackend": 3.0, "LocalDiskBackend": 2.0}}
    report = Report()
    add_rows(report, [pooled("alone", [alone]), both], "t")
    rows = {r.name: r for r in report.rows}
    answers = rows["tiers: answers equal to alone's (same prompts, temperature 0)"]
    assert answers.value == 75.0 and answers.extra["differing"] == ["run 1: user 0 request 1"]
    hits = rows["tiers: lmcached hits by tier (chunks)"]
    assert hits.value == 5 and hits.extra == {"LocalCPUBackend": 3, "LocalDiskBackend": 2}
    assert not any(name.startswith("alone: answers") for name in rows)  # the baseline is not compared with itself


async def test_tier_counters_reads_a_real_controllers_metrics() -> None:
    """The per-tier counters --tiers reports, from a running daemon's /metrics through Prometheus' parser."""
    import asyncio

    from lmcached.bench.workload import tier_counters
    from lmcached.client import AsyncKVClient

    from .conftest import make_kv, serving, test_config

    async with serving(test_config()) as run:
        tokens = list(range(64))
        async with AsyncKVClient(run.data) as client:
            await client.store(tokens, make_kv(64))
            assert await client.retrieve(tokens) is not None
        for _ in range(50):  # the counts travel with the worker's next heartbeat
            counted = await asyncio.to_thread(tier_counters, run.base + "/metrics")
            if counted["hits"]:
                break
            await asyncio.sleep(0.1)
        assert counted["hits"] == {"LocalCPUBackend": 4.0} and set(counted) == {"hits", "evictions"}


def test_the_lmcache_peer_is_skipped_with_a_reason_when_its_venv_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lmcached.bench.workload import PeerMissing, Setup, start_setup
    from lmcached.fleet import lmcache_mp

    monkeypatch.setenv(lmcache_mp.VENV_ENV, str(tmp_path / "nowhere"))
    assert lmcache_mp.side_python() is None
    with pytest.raises(PeerMissing, match="scripts/lmcache_mp_venv.sh"):
        start_setup(Setup("peer", {}, lmcache_mp=True), "unused-model", [])
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setenv(lmcache_mp.VENV_ENV, str(tmp_path / "venv"))
    assert lmcache_mp.side_python() == str(tmp_path / "venv" / "bin" / "python")
    transfer = lmcache_mp.transfer_config(5555)
    assert transfer["kv_connector"] == "LMCacheMPConnector" and transfer["kv_connector_extra_config"]["lmcache.mp.port"] == 5555
