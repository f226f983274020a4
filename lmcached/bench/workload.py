"""A serving workload through vLLM's OpenAI API: multi-round chat in the shape of LMCache's
`benchmarks/multi_round_qa` — N users, a shared system prompt, a long context per user, each user's history
growing round by round, requests arriving at a target rate — sent with the `openai` SDK (streamed chat
completions), against vLLM with its own prefix cache **on** and its KV capacity set with
`--num-gpu-blocks-override` to a share of the working set: a third by default, so vLLM evicts and an offload tier
can pay; `--kv-share 1.5`, so everything fits and the connector can only cost.

Configurations, each on a fresh server with the same OpenMP binding (fleet.vllm_server.same_binding), run twice
interleaved: vLLM alone, vLLM hosting an lmcached instance (LmcachedConnector) loading hits in the step, the
same loading them in the background (lmcached_load_async), and the peer to beat: LMCache 0.5.6's multiprocess
mode (its cache server and LMCacheMPConnector, from the side venv scripts/lmcache_mp_venv.sh makes; without it
the bench says so and skips that row). Per configuration: TTFT mean / p50 / p90 over all
requests, first rounds and later rounds apart; output tokens per second; finished and failed requests; vLLM's own
prefix-cache hit rate, its external (connector) hit tokens and its preemptions — and the ratios against vLLM alone.

`--servers 2`: two vLLM servers alone against two sharing one `lmcached serve` worker, each user's rounds
alternating between them. `--docs`: long-document QA instead of chat (the shape of LMCache's
`benchmarks/long_doc_qa`): documents each asked several questions over time, every request a whole document and
one question, the documents in a new order each round. `--tiers`: vLLM beside an `lmcached serve` worker whose RAM
holds half the working set, a disk tier behind it holding three quarters and Redis behind that holding all: hits
per tier, evictions per tier, nothing lost. `--soak MINUTES`: the workload for that long on vLLM hosting
lmcached, users starting new conversations as theirs end; failures, TTFT drift, RSS growth after warm-up and the
save queue. Every configuration's answers are compared with vLLM alone's in the same repeat (temperature 0).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmcached.bench.engine import prompts_corpus
from lmcached.bench.report import Report, progress

#: vLLM's KV block (tokens); set explicitly so the capacity below means the same on every build.
BLOCK_SIZE = 128
ANSWER_TOKENS = 16
#: Runs of each configuration, interleaved.
REPEATS = 2


@dataclass(frozen=True)
class Shape:
    users: int
    rounds: int
    rate: float  # requests per second, all users together
    system_chars: int = 2_000  # ~500 tokens
    context_chars: int = 6_000  # ~1,500 tokens per user
    #: "chat": each user's history grows round by round. "docqa": `users` documents, each asked `rounds`
    #: questions; a request is the document and one question, nothing of earlier answers.
    kind: str = "chat"

    def working_set_tokens(self) -> int:
        """Roughly what all users' prompts hold at their last round (4 characters a token)."""
        if self.kind == "docqa":
            return self.users * ((self.system_chars + self.context_chars) // 4 + 20)
        per_user = (self.system_chars + self.context_chars) // 4 + self.rounds * (ANSWER_TOKENS + 20)
        return self.users * per_user


def chat_shape(quick: bool) -> Shape:
    return Shape(users=8, rounds=3, rate=0.25) if quick else Shape(users=12, rounds=6, rate=0.12)


def docqa_shape(quick: bool) -> Shape:
    """Documents of ~3,000 tokens behind a short instruction: eight of them are three times the smallest KV
    capacity vLLM accepts (66 blocks), so each is evicted from vLLM before it is asked again."""
    if quick:
        return Shape(users=6, rounds=2, rate=0.1, system_chars=0, context_chars=12_000, kind="docqa")
    return Shape(users=8, rounds=3, rate=0.08, system_chars=0, context_chars=12_000, kind="docqa")


@dataclass
class Outcome:
    """One configuration's run: each request's (user, round, TTFT seconds, output tokens), what failed, and
    vLLM's counters before and after."""

    name: str
    requests: list[tuple[int, int, float, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    #: round kind -> the mean TTFT (ms) of each run pooled here (pooled())
    run_means: dict[str, list[float]] = field(default_factory=dict)
    #: when each request of `requests` went out, in seconds from the run's start
    sent_at: list[float] = field(default_factory=list)
    #: (user, request number) -> the answer's text
    answers: dict[tuple[int, int], str] = field(default_factory=dict)
    #: [answers equal to the baseline's in the same repeat, answers both have] (same_answers)
    same: list[int] = field(default_factory=lambda: [0, 0])
    #: the requests whose answers differed from the baseline's: "user U request I" ("run N: " once pooled)
    differing: list[str] = field(default_factory=list)
    #: the lmcached worker's (--tiers): {"hits": {tier: chunks}, "evictions": {tier: chunks}} in this run
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)

    def ttft(self, rounds: str = "all") -> np.ndarray:
        keep = {"all": lambda r: True, "first": lambda r: r == 0, "later": lambda r: r > 0}[rounds]
        return np.array([t for _, r, t, _ in self.requests if keep(r)])


COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    # The connector's own (0 without it): what loading a hit held up the forward pass, what was lost.
    "vllm:lmcached_loads_total",
    "vllm:lmcached_load_seconds_sum",
    "vllm:lmcached_load_tokens_total",
    "vllm:lmcached_load_failed_tokens_total",
    "vllm:lmcached_saves_dropped_total",
    "vllm:lmcached_save_failures_total",
)


def conversations(shape: Shape) -> tuple[str, list[str]]:
    """The shared system prompt and each user's own context, cut from real text (a user past the corpus's end
    starts over from its beginning, behind a line of its own, so no two contexts are equal)."""
    text = prompts_corpus()
    system = "You are a careful assistant. Answer in one short sentence.\n\n" + text[: shape.system_chars]
    body = text[shape.system_chars :]
    contexts = []
    for user in range(shape.users):
        start = (user * shape.context_chars) % max(1, len(body) - shape.context_chars)
        contexts.append(f"Document of user {user}:\n" + body[start : start + shape.context_chars])
    return system, contexts


def document_orders(documents: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """The order documents are asked in, round by round: in turn at first, then shuffled (seeded, the same in
    every configuration), never starting with the document the previous round ended on."""
    rng = random.Random(seed)
    orders = [list(range(documents))]
    for _ in range(1, rounds):
        order = rng.sample(range(documents), documents)
        if documents > 1 and order[0] == orders[-1][-1]:
            order[0], order[-1] = order[-1], order[0]
        orders.append(order)
    return orders


def question(r: int) -> str:
    return f"Question {r + 1}: what does part {r + 1} of the document say?"


async def run_users(base_urls: list[str], model: str, shape: Shape, outcome: Outcome, until: float | None = None) -> None:
    """Chat: every user's rounds; user u's round r goes out at (r * users + u) / rate seconds, or when its
    previous answer has arrived, whichever is later (the history needs the answer) — to server (u + r) mod
    servers, so with two servers each user's rounds alternate between them. With `until` (a perf_counter time:
    the soak) each user starts a new conversation, on a document of its own, after its last round, and no
    request goes out after `until`. Document QA: the p-th request of round r at (r * documents + p) / rate
    seconds, documents in document_orders()."""
    from openai import AsyncOpenAI

    clients = [AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0) for url in base_urls]
    started = time.perf_counter()
    rounds_in_time = math.ceil(((until or started) - started) * shape.rate / shape.users) + shape.rounds
    system, contexts = conversations(replace(shape, users=shape.users * math.ceil(rounds_in_time / shape.rounds)))

    async def ask(u: int, i: int, messages: list[dict[str, str]], due: float) -> str | None:
        """User (or document) u's request number i, sent at `due`: its answer, or None when it failed (counted)."""
        r = i % shape.rounds
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent = time.perf_counter()
        first: float | None = None
        answer, tokens = [], 0
        try:
            stream = await clients[(u + r) % len(clients)].chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=ANSWER_TOKENS,
                temperature=0,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    answer.append(chunk.choices[0].delta.content)
                    tokens += 1
        except Exception as exc:  # a failed request is counted and reported, the run goes on
            outcome.failures.append(f"user {u} round {r}: {type(exc).__name__}: {exc}")
            return None
        if first is None:
            outcome.failures.append(f"user {u} round {r}: no token came back")
            return None
        outcome.requests.append((u, r, first - sent, tokens))
        outcome.sent_at.append(sent - started)
        outcome.answers[(u, i)] = "".join(answer)
        return outcome.answers[(u, i)]

    async def user(u: int) -> None:
        for i in itertools.count():  # the user's requests, over all its conversations
            conversation, r = divmod(i, shape.rounds)
            if until is None and conversation:
                return
            due = started + (i * shape.users + u) / shape.rate
            if until is not None and due > until:
                return
            if r == 0:
                messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            context = contexts[u + conversation * shape.users]
            messages.append({"role": "user", "content": (context + "\n\n" + question(r)) if r == 0 else question(r)})
            answer = await ask(u, i, messages, due)
            if answer is None:
                return
            messages.append({"role": "assistant", "content": answer})

    def document_question(d: int, r: int, position: int) -> Any:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": contexts[d] + "\n\n" + question(r)}]
        return ask(d, r, messages, started + (r * shape.users + position) / shape.rate)

    if shape.kind == "docqa":
        orders = document_orders(shape.users, shape.rounds)
        await asyncio.gather(*(document_question(d, r, p) for r, order in enumerate(orders) for p, d in enumerate(order)))
    else:
        await asyncio.gather(*(user(u) for u in range(shape.users)))
    outcome.seconds = time.perf_counter() - started
    for client in clients:
        await client.close()


#: The lmcached worker's per-tier counters (its controller's /metrics) that --tiers reports.
TIER_METRICS = {"hits": "lmcached_retrieve_chunks_found_total", "evictions": "lmcached_evictions_total"}


def tier_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """{"hits": {tier: chunks}, "evictions": {tier: chunks}} from an lmcached controller's /metrics, read with
    Prometheus' own parser (summed over instances and workers)."""
    from lmcached.fleet.vllm_server import scrape

    out: dict[str, dict[str, float]] = {what: {} for what in TIER_METRICS}
    for sample in scrape(metrics_url):
        for what, name in TIER_METRICS.items():
            if sample.name == name:
                tier = sample.labels.get("tier", "?")
                out[what][tier] = out[what].get(tier, 0.0) + sample.value
    return out


@dataclass
class Running:
    """A setup's servers, started; its lmcached worker's /metrics when it has one of its own; what stops all."""

    servers: list[Any]
    stop: Callable[[], None]
    worker_metrics: str | None = None


def measure(name: str, running: Running, shape: Shape) -> Outcome:
    """One run of the workload against these servers; vLLM's counters summed over them, the lmcached worker's
    per-tier counters where it has its own."""
    from lmcached.fleet.vllm_server import MODEL_NAME

    servers = running.servers
    outcome = Outcome(name)
    before = {c: sum(server.metric(c) for server in servers) for c in COUNTERS}
    tiers_before = tier_counters(running.worker_metrics) if running.worker_metrics else {}
    asyncio.run(run_users([server.url for server in servers], MODEL_NAME, shape, outcome))
    outcome.counters = {c: sum(server.metric(c) for server in servers) - before[c] for c in COUNTERS}
    if running.worker_metrics:
        after = tier_counters(running.worker_metrics)
        outcome.tiers = {
            what: {tier: n - tiers_before[what].get(tier, 0.0) for tier, n in per_tier.items()} for what, per_tier in after.items()
        }
    return outcome


@dataclass(frozen=True)
class Setup:
    """One configuration: `servers` vLLM servers, each started with start_vllm(**kwargs), requests alternating
    between them; with `shared_worker` they all use one `lmcached serve` (lmcached_worker), started first with
    `worker_env` (LMCACHE_* settings), with `disk_gb` a disk tier of that size in a fresh directory and, with
    `redis`, a fresh Redis server of its own as its remote tier. `env` goes into each vLLM's environment. With
    `lmcache_mp`, the peer: LMCache's cache server and vLLM with LMCacheMPConnector, both from LMCache's side venv
    (fleet.lmcache_mp), LMCache's RAM tier as large as a hosted lmcached's."""

    name: str
    kwargs: dict[str, Any]
    servers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    shared_worker: bool = False
    worker_env: dict[str, str] = field(default_factory=dict)
    disk_gb: float = 0.0
    redis: bool = False
    lmcache_mp: bool = False


class PeerMissing(RuntimeError):
    """A configuration's peer cannot run here (its side venv is not installed): the bench skips its row."""


def start_setup(setup: Setup, model: str, args: list[str]) -> Running:
    """The setup's servers, started. Several servers are bound to different cores (the machine's cores in turn),
    alike in every configuration; one server gets same_binding()."""
    from lmcached.bench.dataplane import start_daemon
    from lmcached.fleet import lmcache_mp
    from lmcached.fleet.redis_servers import RedisServer, free_port
    from lmcached.fleet.vllm_server import same_binding, start_vllm

    started: list[Any] = []
    daemon = redis = peer = None
    disk = tempfile.TemporaryDirectory(prefix="lmcached-bench-disk-")  # a fresh disk tier each run (it survives restarts)

    def stop() -> None:
        for server in started:
            server.stop()
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        if redis is not None:
            redis.stop()
        if peer is not None:
            peer.terminate()
            peer.wait(30)
        disk.cleanup()

    running = Running(started, stop)
    try:
        kwargs = dict(setup.kwargs)
        if setup.shared_worker:
            env = dict(setup.worker_env)
            if setup.disk_gb:
                env |= {"LMCACHE_LOCAL_DISK": disk.name, "LMCACHE_MAX_LOCAL_DISK_SIZE": f"{setup.disk_gb:.4f}"}
            if setup.redis:
                redis = RedisServer(free_port()).start()
                env["LMCACHE_REMOTE_URL"] = redis.url
            daemon, ports = start_daemon(env)
            running.worker_metrics = f"http://127.0.0.1:{ports['http']}/metrics"
            kwargs["extra_config"] = {**kwargs.get("extra_config", {}), "lmcached_worker": f"127.0.0.1:{ports['data']}"}
        if setup.lmcache_mp:
            python = lmcache_mp.side_python()
            if python is None:
                where = f"{lmcache_mp.DEFAULT_VENV} or ${lmcache_mp.VENV_ENV}"
                raise PeerMissing(f"no LMCache side venv ({where}): scripts/lmcache_mp_venv.sh makes it")
            port = free_port()
            peer = lmcache_mp.start_server(python, port, HOSTED_RAM_GB, Path(disk.name) / "lmcache-server.log")
            kwargs |= {"python": python, "transfer": lmcache_mp.transfer_config(port)}
        cores = sorted(os.sched_getaffinity(0))
        for number in range(setup.servers):
            bind = same_binding() if setup.servers == 1 else {"VLLM_CPU_OMP_THREADS_BIND": str(cores[number % len(cores)])}
            started.append(start_vllm(model, prefix_cache=True, args=args, env={**setup.env, **bind}, **kwargs))
    except BaseException:
        stop()
        raise
    return running


#: The RAM tier (GB) of the hosted lmcached instance and of LMCache's cache server: more than any run's working set.
HOSTED_RAM_GB = 4


def hosted_config(**extra: Any) -> dict[str, Any]:
    """start_vllm's arguments for vLLM hosting an lmcached instance (RAM only); `extra` goes into
    kv_connector_extra_config."""
    from lmcached.fleet.vllm_server import free_port

    config = {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": HOSTED_RAM_GB,
        "enable_controller": False,
        "lmcache_worker_port": free_port(),
    }
    return {"lmcache_config": config, "extra_config": extra}


def default_configs() -> list[Setup]:
    return [
        Setup("vLLM alone", {"connector": False}),
        Setup("vLLM + lmcached (hosted)", hosted_config()),
        # A hit loaded while vLLM keeps the request waiting, as LMCache's connector does, instead of in its step.
        Setup("vLLM + lmcached (hosted, background loads)", hosted_config(lmcached_load_async=True)),
        Setup("vLLM + LMCache 0.5.6 multiprocess mode", {}, lmcache_mp=True),
    ]


def two_server_configs() -> list[Setup]:
    """Two vLLM servers, each user's rounds alternating between them: alone, and sharing one lmcached worker."""
    return [
        Setup("two vLLM servers alone", {"connector": False}, servers=2),
        Setup("two vLLM servers + one shared lmcached worker", {"lmcache_config": {"chunk_size": 256}}, servers=2, shared_worker=True),
    ]


def tier_configs(shape: Shape) -> list[Setup]:
    """vLLM alone, and vLLM beside an `lmcached serve` worker under pressure: its RAM holds half the working set,
    a disk tier behind it three quarters, Redis behind that all of it (LRU eviction in RAM and on disk)."""
    from lmcached.bench.sizing import MODELS

    working_set_gb = shape.working_set_tokens() * MODELS[0].bytes_per_token / 1024**3  # SmolLM2, as vLLM holds it
    pressed = Setup(
        "vLLM + lmcached worker (RAM 1/2, disk 3/4 of the working set, Redis)",
        {"lmcache_config": {"chunk_size": 256}},
        shared_worker=True,
        worker_env={"LMCACHE_MAX_LOCAL_CPU_SIZE": f"{working_set_gb / 2:.4f}"},
        disk_gb=working_set_gb * 3 / 4,
        redis=True,
    )
    return [Setup("vLLM alone", {"connector": False}), pressed]


def engine_blocks(shape: Shape, kv_share: float) -> int:
    """vLLM's KV capacity in blocks for `kv_share` of the working set: a third makes vLLM evict, more than 1
    holds every user's history. Never below one --max-model-len (8,192-token) request: vLLM refuses less."""
    return max(66, math.ceil(shape.working_set_tokens() * kv_share / BLOCK_SIZE))


def run(
    report: Report,
    quick: bool = False,
    configs: list[Setup] | None = None,
    kv_share: float = 1 / 3,
    servers: int = 1,
    docs: bool = False,
    tiers: bool = False,
) -> None:
    """Each configuration (the first is the baseline) REPEATS times, interleaved, with each vLLM's KV capacity
    at `kv_share` of the working set; `servers` 2: the two-server configurations instead of the default ones;
    `tiers`: tier_configs(); `docs`: long-document QA instead of chat."""
    from lmcached.fleet.vllm_server import converted_model

    shape = docqa_shape(quick) if docs else chat_shape(quick)
    working_set = shape.working_set_tokens()
    blocks = engine_blocks(shape, kv_share)
    args = ["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(blocks)]
    model = converted_model()
    configs = configs or (two_server_configs() if servers == 2 else tier_configs(shape) if tiers else default_configs())
    # Interleaved (alone, lmcached, alone, lmcached): two runs of the same configuration here differ by up to a
    # quarter in first-round TTFT, so one run each would book the machine's drift to whichever came first.
    runs: dict[str, list[Outcome]] = {setup.name: [] for setup in configs}
    skipped: dict[str, str] = {}
    with progress() as bar:
        task = bar.add_task("workload", total=REPEATS * len(configs))
        for _ in range(REPEATS):
            for setup in configs:
                if setup.name in skipped:
                    bar.advance(task)
                    continue
                try:
                    running = start_setup(setup, model, args)
                except PeerMissing as exc:
                    skipped[setup.name] = str(exc)
                    bar.console.print(f"{setup.name}: skipped, {exc}")
                    bar.advance(task)
                    continue
                try:
                    outcome = measure(setup.name, running, shape)
                finally:
                    running.stop()
                if runs[configs[0].name] and setup is not configs[0]:
                    outcome.same, outcome.differing = same_answers(outcome, runs[configs[0].name][-1])
                runs[setup.name].append(outcome)
                bar.advance(task)
    outcomes = [pooled(name, each) for name, each in runs.items() if name not in skipped]
    who = "documents x questions" if shape.kind == "docqa" else "users x rounds"
    setting = f"{shape.users}x{shape.rounds} {who} at {shape.rate} req/s, KV {blocks * BLOCK_SIZE:,} of ~{working_set:,} tokens"
    if max(setup.servers for setup in configs) > 1:
        setting += " per server"
    add_rows(report, outcomes, setting)
    for name, reason in skipped.items():
        report.add("workload", f"{name}: not run ({reason})", 0, "skipped")


#: The soak's RAM tier (GB): small, so that it fills during the warm-up and LRU eviction runs all along.
SOAK_RAM_GB = 0.5
#: Seconds between the soak's samples of memory and queues.
SOAK_SAMPLE_S = 15.0


@dataclass
class Sample:
    """One look at the soak's server: seconds from the start, RSS (bytes) of all vLLM's processes and of its
    worker (where the hosted lmcached instance lives), and the connector's save queue."""

    at: float
    rss: int
    worker_rss: int
    save_queue: float


def server_sample(server: Any, at: float) -> Sample:
    import psutil

    processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    rss = {p.pid: (p.name(), p.memory_info().rss) for p in processes if p.is_running()}
    worker = sum(size for name, size in rss.values() if name.startswith("VLLM::Worker"))
    return Sample(at, sum(size for _, size in rss.values()), worker, server.metric("vllm:lmcached_save_queue"))


def soak_setup() -> Setup:
    """vLLM hosting lmcached with a RAM tier of SOAK_RAM_GB."""
    hosted = hosted_config()
    hosted["lmcache_config"]["max_local_cpu_size"] = SOAK_RAM_GB
    return Setup("vLLM + lmcached (hosted)", hosted)


def soak(report: Report, minutes: float, setup: Setup | None = None) -> None:
    """The multi-round workload on vLLM hosting lmcached (or `setup`) for `minutes`: users start new
    conversations as theirs end, so the working set keeps moving through vLLM's KV (a third of one round's
    working set), lmcached's RAM tier (SOAK_RAM_GB, filled in the first minutes) and its LRU eviction. Memory and
    the save queue are sampled every SOAK_SAMPLE_S seconds."""
    from lmcached.fleet.vllm_server import MODEL_NAME, converted_model

    shape = Shape(users=8, rounds=3, rate=0.2)  # below the rate the 2-core VM saturates at (~0.25/s)
    blocks = engine_blocks(shape, 1 / 3)
    args = ["--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(blocks)]
    setup = setup or soak_setup()
    running = start_setup(setup, converted_model(), args)
    servers, stop = running.servers, running.stop
    outcome, samples = Outcome(setup.name), []
    try:
        before = {c: servers[0].metric(c) for c in COUNTERS}

        async def sampled() -> None:
            until = time.perf_counter() + minutes * 60
            users = asyncio.ensure_future(run_users([servers[0].url], MODEL_NAME, shape, outcome, until))
            started = time.perf_counter()
            with progress() as bar:
                task = bar.add_task("soak", total=minutes * 60)
                while not users.done():
                    samples.append(await asyncio.to_thread(server_sample, servers[0], time.perf_counter() - started))
                    bar.update(task, completed=min(minutes * 60, time.perf_counter() - started))
                    await asyncio.wait([users], timeout=SOAK_SAMPLE_S)
            await users
            samples.append(await asyncio.to_thread(server_sample, servers[0], time.perf_counter() - started))

        asyncio.run(sampled())
        outcome.counters = {c: servers[0].metric(c) - before[c] for c in COUNTERS}
    finally:
        stop()
    add_soak_rows(
        report, outcome, samples, f"{setup.name}: {minutes:g} min, {shape.users} users at {shape.rate} req/s, RAM tier {SOAK_RAM_GB} GB"
    )


def add_soak_rows(report: Report, outcome: Outcome, samples: list[Sample], setting: str) -> None:
    """Requests finished and failed; TTFT in the first and the last quarter; memory at the end of the warm-up
    (the first third) against the end, each the median of three samples; the save queue's deepest sample."""
    quarter = outcome.seconds / 4
    ttft = np.array([t for _, _, t, _ in outcome.requests]) * 1000
    sent = np.array(outcome.sent_at)
    report.add("soak", f"finished requests ({setting})", len(outcome.requests), "finished", extra={"failed": outcome.failures[:20]})
    report.add("soak", "failed requests", len(outcome.failures), "failed")
    if len(ttft):
        early, late = ttft[sent < quarter], ttft[sent >= outcome.seconds - quarter]
        if len(early) and len(late):
            report.add("soak", "TTFT mean, last quarter", float(late.mean()), "ms", float(early.mean()), "first quarter", better="lower")
    warm = [s for s in samples if s.at >= outcome.seconds / 3]
    if len(warm) >= 6:
        for what, pick in (("all vLLM processes", lambda s: s.rss), ("vLLM's worker (with lmcached inside)", lambda s: s.worker_rss)):
            start, end = float(np.median([pick(s) for s in warm[:3]])), float(np.median([pick(s) for s in warm[-3:]]))
            report.add(
                "soak",
                f"RSS of {what} at the end, against the end of the warm-up",
                end / 2**20,
                "MiB",
                start / 2**20,
                "after warm-up",
                better="lower",
                extra={"growth_pct": round((end / start - 1) * 100, 2), "samples": len(samples)},
            )
    report.add("soak", "deepest save queue sampled", max((s.save_queue for s in samples), default=0.0), "prompts")
    c = outcome.counters
    lost = {k: c.get(f"vllm:lmcached_{k}_total", 0.0) for k in ("load_failed_tokens", "saves_dropped", "save_failures")}
    report.add("soak", "lmcached loads short / saves dropped / saves failed", sum(lost.values()), "", extra=lost)
    report.add("soak", "external prefix-cache hits (tokens)", c.get("vllm:external_prefix_cache_hits_total", 0.0), "tokens")


def same_answers(outcome: Outcome, base: Outcome) -> tuple[list[int], list[str]]:
    """[answers equal to the baseline's, answers both runs have] and the requests that differed: the same
    prompts at temperature 0. A stale or misplaced hit (another prompt's KV) answers differently; so, now and
    then, does a prompt computed in a batch of another shape (its floating-point sums in another order)."""
    both = sorted(outcome.answers.keys() & base.answers.keys())
    differing = [k for k in both if outcome.answers[k] != base.answers[k]]
    return [len(both) - len(differing), len(both)], [f"user {u} request {i}" for u, i in differing]


def pooled(name: str, runs: list[Outcome]) -> Outcome:
    """The runs of one configuration as one outcome (their requests together), keeping each run's mean TTFT per
    round kind to show the spread between runs."""
    out = Outcome(name, [r for o in runs for r in o.requests], [f for o in runs for f in o.failures], sum(o.seconds for o in runs))
    out.counters = {c: sum(o.counters.get(c, 0.0) for o in runs) for c in COUNTERS}
    out.same = [sum(o.same[0] for o in runs), sum(o.same[1] for o in runs)]
    out.differing = [f"run {n + 1}: {what}" for n, o in enumerate(runs) for what in o.differing]
    for o in runs:
        for what, per_tier in o.tiers.items():
            total = out.tiers.setdefault(what, {})
            for tier, n in per_tier.items():
                total[tier] = total.get(tier, 0.0) + n
    out.run_means = {kind: [float(o.ttft(kind).mean() * 1000) for o in runs if len(o.ttft(kind))] for kind in ("all", "first", "later")}
    return out


def add_rows(report: Report, outcomes: list[Outcome], setting: str) -> None:
    base = outcomes[0]
    for outcome in outcomes:
        vs = outcome is not base
        for rounds, what in (("all", "all requests"), ("first", "first rounds"), ("later", "later rounds")):
            times, base_times = outcome.ttft(rounds) * 1000, base.ttft(rounds) * 1000
            if not len(times):
                continue
            for stat, fn in (("mean", np.mean), ("p50", np.median), ("p90", lambda a: np.percentile(a, 90))):
                means = outcome.run_means.get(rounds, [])
                spread = {"min_ms": min(means), "max_ms": max(means), "runs": len(means)} if stat == "mean" and len(means) > 1 else {}
                report.add(
                    "workload",
                    f"{outcome.name}: TTFT {stat}, {what} ({setting})",
                    float(fn(times)),
                    "ms",
                    float(fn(base_times)) if vs and len(base_times) else None,
                    base.name if vs else "",
                    better="lower",
                    extra=spread,
                )
        tokens = sum(t for *_, t in outcome.requests)
        base_tokens = sum(t for *_, t in base.requests)
        report.add(
            "workload",
            f"{outcome.name}: output throughput",
            tokens / outcome.seconds,
            "tokens/s",
            base_tokens / base.seconds if vs else None,
            base.name if vs else "",
        )
        c = outcome.counters
        local = c["vllm:prefix_cache_hits_total"] / c["vllm:prefix_cache_queries_total"] if c["vllm:prefix_cache_queries_total"] else 0.0
        report.add("workload", f"{outcome.name}: finished requests", len(outcome.requests), "finished", extra={"failed": outcome.failures})
        report.add("workload", f"{outcome.name}: failed requests", len(outcome.failures), "failed")
        report.add("workload", f"{outcome.name}: vLLM's own prefix-cache hit rate", local * 100, "%")
        report.add(
            "workload",
            f"{outcome.name}: external prefix-cache hits (tokens)",
            c["vllm:external_prefix_cache_hits_total"],
            "tokens",
            extra={"asked": c["vllm:external_prefix_cache_queries_total"]},
        )
        report.add("workload", f"{outcome.name}: preemptions", c["vllm:num_preemptions_total"], "")
        equal, compared = outcome.same
        if vs and compared:
            report.add(
                "workload",
                f"{outcome.name}: answers equal to {base.name}'s (same prompts, temperature 0)",
                equal / compared * 100,
                "%",
                extra={"equal": equal, "compared": compared, "differing": outcome.differing[:20]},
            )
        for what, per_tier in outcome.tiers.items():
            report.add(
                "workload",
                f"{outcome.name}: lmcached {what} by tier (chunks)",
                sum(per_tier.values()),
                "chunks",
                extra={tier: int(n) for tier, n in sorted(per_tier.items())},
            )
        if c.get("vllm:lmcached_loads_total"):
            loads = c["vllm:lmcached_loads_total"]
            report.add(
                "workload",
                f"{outcome.name}: lmcached load per hit (fetch and placement, in the step)",
                c["vllm:lmcached_load_seconds_sum"] / loads * 1000,
                "ms",
                extra={"loads": loads, "tokens_per_load": c["vllm:lmcached_load_tokens_total"] / loads},
            )
            lost = {k: c.get(f"vllm:lmcached_{k}_total", 0.0) for k in ("load_failed_tokens", "saves_dropped", "save_failures")}
            report.add(
                "workload", f"{outcome.name}: lmcached loads short / saves dropped / saves failed", sum(lost.values()), "", extra=lost
            )
