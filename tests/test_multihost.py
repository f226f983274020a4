"""Several hosts on one machine (network namespaces on a virtual switch): the controller on one host, a 3-master
Redis Cluster with replicas on another, a worker and an engine (the real SmolLM2) on each of two more. A prompt
computed on host B is reused on host C through Redis; then faults: a worker host cut off, the Redis host cut
off, a Redis master killed; nothing acknowledged is lost and no wrong KV is ever returned."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lmcached.fleet import netns
from lmcached.fleet.redis_servers import RedisClusterProcs, RedisUnavailable, redis_server_binary

from .conftest import ServeProcess, start_process, stop_serve

pytestmark = pytest.mark.timeout(600)

why_not = netns.available()
if why_not is not None:
    pytest.skip(why_not, allow_module_level=True)
try:
    redis_server_binary()
except RedisUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

TOKEN = "fleet-secret"
REMOTE = "RemoteBackend"
PROMPT = " ".join(f"Item {i}: the shared remote tier keeps prefix number {i} for every host in the fleet." for i in range(40))


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Fleet:
    hosts: netns.Hosts
    redis: RedisClusterProcs
    controller: ServeProcess
    workers: dict[str, ServeProcess]
    engines: dict[str, ServeProcess]

    @property
    def api(self) -> str:
        return f"http://{self.hosts.ip('ctl')}:9000"

    def complete(self, host: str, prompt: str = PROMPT) -> dict[str, Any]:
        status, body = http(
            "POST", f"http://{self.hosts.ip(host)}:8000/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        )
        assert status == 200, body
        return body

    def remote_stats(self, instance: str) -> dict[str, Any] | None:
        status, body = http("GET", self.api + "/instances")
        if status != 200 or instance not in body:
            return None
        return body[instance]["locations"].get(REMOTE)

    def clear_ram(self, instance: str) -> None:
        """Empty an instance's RAM, so what it serves next can only come from Redis."""
        status, body = http("POST", self.api + "/clear", {"instance_id": instance, "location": "LocalCPUBackend"})
        assert status == 200, body
        wait_for(lambda: http("POST", self.api + "/check_finish", {"event_id": body["event_id"]})[1]["status"] == "finished")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    env = {"LMCACHED_AUTH_TOKEN": TOKEN, "LMCACHE_HEARTBEAT_INTERVAL": "0.3", "LMCACHE_HEARTBEAT_TIMEOUT": "2.0"}
    with netns.Hosts(["ctl", "redis", "b", "c"]) as hosts:
        started: list[ServeProcess] = []
        redis = RedisClusterProcs(3, 1, host=hosts.ip("redis"), prefix=hosts.prefix("redis"))
        try:
            redis.start()
            remote = {"LMCACHE_REMOTE_URL": redis.url, "LMCACHE_REMOTE_SCAN_INTERVAL": "1.0"}

            def start(host: str, ready: str, *args: str, extra: dict[str, str] | None = None) -> ServeProcess:
                proc = start_process([*hosts.prefix(host), sys.executable, "-m", "lmcached", *args], ready, {**env, **(extra or {})}, 180)
                started.append(proc)
                return proc

            ctl = start("ctl", "lmcached ready ", "controller", "--host", hosts.ip("ctl"), "--port", "9000", "--monitor-port", "9001")
            workers, engines = {}, {}
            for host in ("b", "c"):
                ip = hosts.ip(host)
                workers[host] = start(
                    host,
                    "lmcached worker ready ",
                    "worker",
                    "--instance-id",
                    f"host-{host}",
                    "--controller",
                    f"{hosts.ip('ctl')}:9001",
                    "--host",
                    ip,
                    "--port",
                    "8001",
                    extra=remote,
                )
                engines[host] = start(host, "lmcached engine ready ", "engine", "--worker", f"{ip}:8001", "--host", ip, "--port", "8000")
            yield Fleet(hosts, redis, ctl, workers, engines)
        finally:
            for proc in reversed(started):
                if proc.proc.poll() is None:
                    stop_serve(proc)
                print("".join(proc.output[-40:]))  # shown when a test failed: what each host said
            redis.stop()


def test_a_prompt_computed_on_host_b_is_reused_on_host_c_through_redis(fleet: Fleet) -> None:
    first = fleet.complete("b")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    prompt_tokens = first["usage"]["prompt_tokens"]
    # B's worker writes through to Redis; host C's instance reaches the same tier, so the index offers it there.
    wait_for(lambda: _remote_chunks(fleet, "host-c") >= prompt_tokens // 256, what="write-through")
    again = fleet.complete("c")
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= (prompt_tokens // 256) * 256 > 0, again["usage"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # the reused KV is the right KV


def _remote_chunks(fleet: Fleet, instance: str) -> int:
    stats = fleet.remote_stats(instance)
    return 0 if stats is None else int(stats["chunks"])


def test_a_worker_host_cut_off_is_lost_but_its_remote_chunks_stay(fleet: Fleet) -> None:
    fleet.complete("b")  # (the prompt is in Redis already when run after the first test; this makes it so alone)
    wait_for(lambda: _remote_chunks(fleet, "host-c") > 0, what="chunks in the tier")
    chunks_before = _remote_chunks(fleet, "host-c")
    fleet.hosts.cut("b")
    try:
        started = time.monotonic()
        wait_for(lambda: "host-b" not in http("GET", fleet.api + "/instances")[1], timeout=10, what="host-b marked lost")
        assert time.monotonic() - started < 2.0 + 3.0  # heartbeat timeout (2 s) plus a sweep
        assert _remote_chunks(fleet, "host-c") == chunks_before  # the shared tier lost nothing with the worker
        again = fleet.complete("c", PROMPT + " And one more line.")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        fleet.hosts.plug("b")
    wait_for(lambda: "host-b" in http("GET", fleet.api + "/instances")[1], timeout=30, what="host-b back")


def test_the_redis_host_unreachable_workers_keep_serving_then_catch_up(fleet: Fleet) -> None:
    fresh = "A prompt written while Redis was away. " * 60
    started = time.monotonic()
    fleet.complete("c", "A prompt of the same length, computed while Redis is there. " * 40)
    normal_s = time.monotonic() - started
    fleet.hosts.cut("redis")
    try:
        started = time.monotonic()
        first = fleet.complete("c", fresh)  # served (computed) with the tier down; RAM keeps its KV
        outage_s = time.monotonic() - started
        # The engine waited for Redis at most remote_timeout_s (1 s) once; then the tier counts as down.
        assert outage_s < normal_s + 1.0 + 1.5, (outage_s, normal_s)
        second = fleet.complete("c", fresh)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # from RAM
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        stats = wait_for(lambda: (s := fleet.remote_stats("host-c")) and s["up"] is False and s, timeout=15, what="tier shown down")
        assert stats["write_queue_bytes"] > 0  # the remote copies wait, bounded
    finally:
        fleet.hosts.plug("redis")
    wait_for(lambda: (s := fleet.remote_stats("host-c")) and s["up"] and s["write_queue_bytes"] == 0, timeout=60, what="queue drained")
    # Host B never saw that prompt: it finds it in Redis now.
    on_b = fleet.complete("b", fresh)
    assert on_b["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert on_b["choices"][0]["text"] == first["choices"][0]["text"]


def test_a_redis_master_killed_fails_over_without_errors_or_wrong_kv(fleet: Fleet) -> None:
    prompt = "Failover keeps serving. " * 70
    reference = fleet.complete("b", prompt)
    wait_for(lambda: (s := fleet.remote_stats("host-b")) and s["write_queue_bytes"] == 0, what="written through")
    fleet.redis.primaries()[0].kill()
    deadline = time.monotonic() + 20
    cached_again = False
    while time.monotonic() < deadline:
        fleet.clear_ram("host-c")  # a hit can only come from Redis
        answer = fleet.complete("c", prompt)  # never an error; cached or recomputed, always the same text
        assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
        if answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0:
            cached_again = True
            break
        time.sleep(0.5)
    assert cached_again
