"""The seed's workflow with real vLLM (the CPU build) on SmolLM2: vLLM stores its KV through LmcachedConnector
into an instance it hosts, `lmcached controller` sees and compresses it, and vLLM reuses it — and two vLLM
servers sharing one lmcached worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the vllm extra is not installed")

from lmcached.fleet.vllm_server import (  # noqa: E402
    TP3_ARGS,
    TP3_ENV,
    VllmServer,
    converted_model,
    free_port,
    free_ports,
    same_binding,
    start_vllm,
    startup_failure,
)

from .conftest import ServeProcess, scrape, start_process, start_serve, stop_serve  # noqa: E402
from .test_dashboard import check_queries  # noqa: E402
from .test_e2e import post, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

INSTANCE = "lmcache_default_instance"
SEED_PROMPT = "Explain the significance of KV cache in language models."
LONG_PROMPT = " ".join(f"Paragraph {i}: the cache keeps keys and values so that a prompt is not computed twice." for i in range(24))


@pytest.fixture(scope="module")
def model() -> str:
    return converted_model()


@pytest.fixture(scope="module")
def controller() -> Iterator[ServeProcess]:
    cmd = [sys.executable, "-m", "lmcached", "controller", "--port", "0", "--monitor-port", "0"]
    server = start_process(cmd, "lmcached ready ")
    yield server
    stop_serve(server)


def controller_metric(controller: ServeProcess, name: str) -> float:
    """A sample of the controller's /metrics, summed over its labels."""
    return sum(scrape(controller.http).get(name, {}).values())


def cli(controller: ServeProcess, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "lmcached", *args, "--controller", controller.http], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_vllm_that_dies_starting_shows_its_root_cause() -> None:
    """The engine core's own traceback, not only its parent's "see root cause above" at the end of the log."""
    log = [f"INFO {i}\n" for i in range(200)] + ["(EngineCore) ERROR boom\n", "OSError: [Errno 98] Address in use\n"]
    log += [f"INFO after {i}\n" for i in range(100)] + ["RuntimeError: Engine core initialization failed. See root cause above.\n"]
    shown = startup_failure(log)
    assert "Address in use" in shown and shown.rstrip().endswith("See root cause above.") and len(shown.splitlines()) <= 92
    assert startup_failure(["quiet\n"] * 100) == "quiet\n" * 40


def test_the_seed_workflow_with_vllm_hosting_the_instance(model: str, controller: ServeProcess) -> None:
    data_port = free_port()
    vllm = start_vllm(
        model,
        lmcache_config={
            "chunk_size": 256,
            "local_cpu": True,
            "max_local_cpu_size": 1,
            "enable_controller": True,
            "lmcache_instance_id": INSTANCE,
            "controller_url": f"127.0.0.1:{controller.ports['monitor']}",
            "lmcache_worker_port": data_port,
        },
        env=same_binding(),  # OpenMP on every core but one, as the benches run it
    )
    try:
        # Step 3: a completion; vLLM stores the prompt's KV in the instance it hosts.
        first = vllm.complete(SEED_PROMPT)
        assert first["cached_tokens"] == 0 and first["text"].strip()
        check_connector_threads_beside_openmp(vllm)
        # Step 4: vLLM's own tokenizer, then the controller's lookup.
        tokens = vllm.tokenize(SEED_PROMPT)
        layout = wait_for(lambda: post(controller, "/lookup", {"tokens": tokens})["layout_info"], 30)
        assert layout == {INSTANCE: ["LocalCPUBackend", len(tokens)]}
        instances = post(controller, "/query_worker_info", {"instance_id": INSTANCE})["worker_infos"]
        assert instances[0]["port"] == data_port  # the instance serves where LMCache's worker would

        hits_before = vllm.metric("vllm:external_prefix_cache_hits_total")
        raw_hit = vllm.complete(SEED_PROMPT)
        assert raw_hit == {"text": first["text"], "cached_tokens": len(tokens) - 1}

        # Step 5: compress; the completion is served from the compressed chunks.
        ids = ",".join(map(str, tokens))
        event = cli(controller, "compress", "--tokens", ids)
        assert event["status"] == "finished" and event["result"]["chunks"] == 1
        assert event["result"]["bytes_after"] * 2 < event["result"]["bytes_before"]
        compressed_hit = vllm.complete(SEED_PROMPT)
        assert compressed_hit["cached_tokens"] == len(tokens) - 1 and compressed_hit["text"].strip()
        assert vllm.metric("vllm:external_prefix_cache_hits_total") >= hits_before + 2 * (len(tokens) - 1)
        # The connector's own figures on vLLM's /metrics: both hits loaded whole, the first prompt saved.
        assert wait_for(lambda: vllm.metric("vllm:lmcached_load_tokens_total") >= 2 * (len(tokens) - 1), 30)
        assert vllm.metric("vllm:lmcached_loads_total") >= 2 and vllm.metric("vllm:lmcached_load_seconds_count") >= 2
        assert vllm.metric("vllm:lmcached_load_failed_tokens_total") == 0
        assert vllm.metric("vllm:lmcached_saves_total") >= 1 and vllm.metric("vllm:lmcached_lookups_total") >= 3
        # ... and the instance's on the controller's: what the instance inside vLLM served.
        retrieved = wait_for(lambda: controller_metric(controller, "lmcached_retrieve_tokens_found_total") >= 2 * len(tokens) or None, 30)
        assert retrieved and controller_metric(controller, "lmcached_lookups_total") >= 3
        check_queries(scrape(vllm.url), "vllm:")  # the dashboard's vLLM queries name what this vLLM exports

        # Step 6: decompress; then a lossless copy must give the very same greedy output as the raw one.
        assert cli(controller, "decompress", "--tokens", ids)["status"] == "finished"
        long_tokens = vllm.tokenize(LONG_PROMPT)
        reference = vllm.complete(LONG_PROMPT, 20)  # stores it raw
        raw = vllm.complete(LONG_PROMPT, 20)
        assert raw["cached_tokens"] == len(long_tokens) - 1 and raw["text"] == reference["text"]
        assert cli(controller, "compress", "--method", "lossless", "--tokens", ",".join(map(str, long_tokens)))["status"] == "finished"
        lossless = vllm.complete(LONG_PROMPT, 20)
        assert lossless == raw
        assert any("loaded" in line and "from lmcached" in line for line in vllm.log)  # vLLM's own log says so
    finally:
        vllm.stop()


def check_connector_threads_beside_openmp(vllm: VllmServer) -> None:
    """The worker's OpenMP threads keep their core; the connector's saver and the hosted instance's threads run
    on the core vLLM left free (integrations/cpus.py), not on the forward pass's."""
    import psutil

    omp = {int(c) for c in same_binding()["VLLM_CPU_OMP_THREADS_BIND"].split(",")}
    spare = os.sched_getaffinity(0) - omp
    if not spare:
        return  # one core: nothing to keep away from
    workers = [p for p in psutil.Process(vllm.proc.pid).children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert len(workers) == 1
    bindings = [frozenset(os.sched_getaffinity(thread.id)) for thread in workers[0].threads()]
    assert omp in bindings  # the forward pass's threads, where vLLM put them
    assert sum(binding == spare for binding in bindings) >= 2  # the instance's loop and the saver, at least
    assert any("lmcached's background threads on cores" in line for line in vllm.log)


def test_two_vllm_servers_share_one_lmcached_worker(model: str) -> None:
    shared = start_serve()
    servers: list[VllmServer] = []
    try:
        for _ in range(2):
            servers.append(start_vllm(model, extra_config={"lmcached_worker": shared.data}, lmcache_config={"chunk_size": 256}))
        first, second = servers
        computed = first.complete(LONG_PROMPT, 8)
        assert computed["cached_tokens"] == 0
        tokens = first.tokenize(LONG_PROMPT)
        wait_for(lambda: post(shared, "/lookup", {"tokens": tokens})["layout_info"], 30)
        reused = second.complete(LONG_PROMPT, 8)
        assert reused == {"text": computed["text"], "cached_tokens": len(tokens) - 1}  # an external hit on the other server
    finally:
        for server in servers:
            server.stop()
        stop_serve(shared)


def test_a_router_following_kv_events_sends_a_prompt_to_the_server_holding_its_kv(model: str) -> None:
    """Two vLLM servers, each hosting its lmcached instance with kv_events on. A router of a few lines on top
    of vLLM's own event decoder (tests/test_kv_events.Subscriber) rebuilds each server's token prefixes from the
    BlockStored events (tokens along the parent chain) and sends the prompt where its KV is: an external hit
    there; the other server would have computed it."""
    from .test_kv_events import Subscriber

    endpoints = [free_port() for _ in range(2)]
    servers: list[VllmServer] = []
    subscribers = [Subscriber(f"tcp://127.0.0.1:{port}") for port in endpoints]
    try:
        for port in endpoints:
            config = {
                "chunk_size": 256,
                "enable_controller": False,
                "lmcache_worker_port": free_port(),
                "kv_events": {"endpoint": f"tcp://*:{port}"},
            }
            servers.append(start_vllm(model, lmcache_config=config))

        def prefixes(subscriber: Subscriber) -> list[list[int]]:
            """Every token prefix the server's lmcached holds in RAM, rebuilt from the events alone."""
            subscriber.receive(0.05)
            out = []
            for key in subscriber.held("CPU"):
                tokens: list[int] = []
                block: int | None = key
                while block is not None:
                    event = subscriber.blocks[block]
                    tokens[:0] = event.token_ids
                    block = event.parent_block_hash
                out.append(tokens)
            return out

        def route(tokens: list[int]) -> tuple[int, int]:
            """(the server with the longest cached prefix of `tokens`, that prefix's length)."""
            scores = [max((len(p) for p in prefixes(s) if tokens[: len(p)] == p), default=0) for s in subscribers]
            return scores.index(max(scores)), max(scores)

        computed = servers[1].complete(LONG_PROMPT, 8)  # the second server computes it: no first-server bias
        tokens = servers[1].tokenize(LONG_PROMPT)
        assert wait_for(lambda: route(tokens)[1] == len(tokens) or None, 30)
        chosen, _ = route(tokens)
        assert chosen == 1
        assert servers[chosen].complete(LONG_PROMPT, 8) == {"text": computed["text"], "cached_tokens": len(tokens) - 1}
        assert servers[0].complete(LONG_PROMPT, 8)["cached_tokens"] == 0  # where a router without events might go
    finally:
        for server in servers:
            server.stop()
        for subscriber in subscribers:
            subscriber.close()


def test_a_dead_lmcached_never_fails_a_request(model: str) -> None:
    shared = start_serve()
    vllm = start_vllm(model, extra_config={"lmcached_worker": shared.data}, lmcache_config={"chunk_size": 256})
    try:
        vllm.complete(LONG_PROMPT, 4)
        stop_serve(shared)  # the cache goes away
        time.sleep(0.5)
        after = vllm.complete(LONG_PROMPT, 4)
        assert after["cached_tokens"] == 0 and after["text"]  # computed, not failed
        assert wait_for(lambda: vllm.metric("vllm:lmcached_lookup_failures_total") >= 1 or None, 30)  # and counted
    finally:
        vllm.stop()


def test_an_async_load_gives_the_same_greedy_text(model: str) -> None:
    """lmcached_load_async: real vLLM parks the request while the connector's thread loads its KV, then runs it
    from the loaded prefix: the very same greedy text as the miss, the hit counted on vLLM's /metrics."""
    shared = start_serve()
    vllm = start_vllm(model, extra_config={"lmcached_worker": shared.data, "lmcached_load_async": True}, lmcache_config={"chunk_size": 256})
    try:
        tokens = vllm.tokenize(LONG_PROMPT)
        miss = vllm.complete(LONG_PROMPT, 12)
        assert miss["cached_tokens"] == 0
        assert wait_for(lambda: post(shared, "/lookup", {"tokens": tokens})["layout_info"], 30)
        hit = vllm.complete(LONG_PROMPT, 12)
        assert hit == {"text": miss["text"], "cached_tokens": len(tokens) - 1}
        assert wait_for(lambda: vllm.metric("vllm:lmcached_load_tokens_total") >= len(tokens) - 1 or None, 30)
        assert vllm.metric("vllm:lmcached_load_failed_tokens_total") == 0
    finally:
        vllm.stop()
        stop_serve(shared)


def test_an_fp8_kv_cache_is_stored_bit_exact_and_reused(model: str) -> None:
    """vLLM with --kv-cache-dtype fp8 (its CPU build runs fp8 caches on AVX-512/AMX): the connector stores the
    cache's fp8 bytes as float8_e4m3fn chunks, a hit gives the miss's greedy text, lossless compression keeps
    it, and cachegen refuses fp8 chunks and says why."""
    import torch

    from lmcached.client import KVClient

    shared = start_serve()
    vllm = start_vllm(
        model, extra_config={"lmcached_worker": shared.data}, lmcache_config={"chunk_size": 256}, args=["--kv-cache-dtype", "fp8"]
    )
    try:
        miss = vllm.complete(LONG_PROMPT, 12)
        tokens = vllm.tokenize(LONG_PROMPT)
        assert miss["cached_tokens"] == 0
        assert wait_for(lambda: post(shared, "/lookup", {"tokens": tokens})["layout_info"], 30)
        with KVClient(shared.data) as client:
            held = client.retrieve(tokens)
        assert held is not None and held.dtype == torch.float8_e4m3fn and held.shape[2] == len(tokens)
        hit = vllm.complete(LONG_PROMPT, 12)
        assert hit == {"text": miss["text"], "cached_tokens": len(tokens) - 1}
        ids = ",".join(map(str, tokens))
        refused = subprocess.run(
            [sys.executable, "-m", "lmcached", "compress", "--method", "cachegen", "--tokens", ids, "--controller", shared.http],
            capture_output=True,
            text=True,
            timeout=120,
        )
        event = json.loads(refused.stdout)
        assert event["result"]["chunks"] == 0 and "8-bit already" in event["result"]["message"]
        assert cli(shared, "compress", "--method", "lossless", "--tokens", ids)["result"]["chunks"] >= 1
        assert vllm.complete(LONG_PROMPT, 12) == hit  # decoded from lossless: the same bytes, the same text
    finally:
        vllm.stop()
        stop_serve(shared)


def tp_seed_workflow(vllm: VllmServer, controller: ServeProcess, instance: str, ports: list[int]) -> None:
    """The seed's steps on a tensor-parallel vLLM: the controller sees one instance with a worker per rank,
    a hit gives the very same greedy text, and a compress acts on every rank's part together."""
    first = vllm.complete(SEED_PROMPT)
    assert first["cached_tokens"] == 0 and first["text"].strip()
    tokens = vllm.tokenize(SEED_PROMPT)
    workers = post(controller, "/query_worker_info", {"instance_id": instance})["worker_infos"]
    assert sorted((w["worker_id"], w["port"]) for w in workers) == list(enumerate(ports))
    layout = wait_for(lambda: post(controller, "/lookup", {"tokens": tokens})["layout_info"].get(instance), 30)
    assert layout == ["LocalCPUBackend", len(tokens)]

    hit = vllm.complete(SEED_PROMPT)
    assert hit == {"text": first["text"], "cached_tokens": len(tokens) - 1}

    event = cli(controller, "compress", "--instance-id", instance, "--tokens", ",".join(map(str, tokens)))
    assert event["status"] == "finished" and event["result"]["chunks"] == 1 and event["result"]["num_tokens"] == len(tokens)
    compressed = vllm.complete(SEED_PROMPT)
    assert compressed["cached_tokens"] == len(tokens) - 1 and compressed["text"].strip()
    # vLLM adds its ranks' stats up: the tokens loaded are counted once (by rank 0), not once per rank.
    loaded = 2 * (len(tokens) - 1)
    assert wait_for(lambda: vllm.metric("vllm:lmcached_load_tokens_total") >= loaded, 30)
    assert vllm.metric("vllm:lmcached_load_tokens_total") == loaded


def test_tensor_parallel_vllm_hosting_a_part_of_the_instance_per_rank(model: str, controller: ServeProcess) -> None:
    """Real vLLM with --tensor-parallel-size 3 (SmolLM2: 9 query heads, 3 KV heads, one per rank): each rank
    hosts its part of the instance on lmcache_worker_port + rank."""
    base = free_ports(3)
    config = {"chunk_size": 256, "enable_controller": True, "lmcache_instance_id": "vllm-tp3", "lmcache_worker_port": base}
    config["controller_url"] = f"127.0.0.1:{controller.ports['monitor']}"
    vllm = start_vllm(model, lmcache_config=config, args=TP3_ARGS, env=TP3_ENV)
    try:
        tp_seed_workflow(vllm, controller, "vllm-tp3", [base, base + 1, base + 2])
        assert sum("loaded" in line and "from lmcached" in line for line in vllm.log) >= 6  # two hits, on each of 3 ranks
    finally:
        vllm.stop()


def test_tensor_parallel_vllm_sharing_a_worker_per_rank(model: str, controller: ServeProcess) -> None:
    """The same with the instance outside vLLM: `lmcached worker --tp-rank R --tp-size 3`, one per rank."""
    hub = f"127.0.0.1:{controller.ports['monitor']}"
    workers = [
        start_process(
            [
                sys.executable,
                "-m",
                "lmcached",
                "worker",
                "--instance-id",
                "shared-tp3",
                "--controller",
                hub,
                "--port",
                "0",
                "--tp-rank",
                str(rank),
                "--tp-size",
                "3",
            ],
            "lmcached worker ready ",
        )  # fmt: skip
        for rank in range(3)
    ]
    try:
        ports = [w.ports["data"] for w in workers]
        assert [w.ports["tp_rank"] for w in workers] == [0, 1, 2]
        addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
        shared = {"lmcached_worker": addresses}
        vllm = start_vllm(model, extra_config=shared, lmcache_config={"chunk_size": 256}, args=TP3_ARGS, env=TP3_ENV)
        try:
            tp_seed_workflow(vllm, controller, "shared-tp3", ports)
        finally:
            vllm.stop()
    finally:
        for worker in workers:
            stop_serve(worker)
