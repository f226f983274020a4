"""A controller that is not a single point of failure: two real controller processes in a group, a real worker
given both addresses, kill -9 of the active one while an engine keeps storing and retrieving — the standby
takes over, the worker re-registers and resends its chunks, lookups answer again, nothing is lost or failed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp
import torch

from lmcached.client import KVClient
from lmcached.control.failover import ACTIVE, STANDBY, Role
from lmcached.fleet.redis_servers import free_port

from .conftest import ServeProcess, make_kv, start_process, stop_serve
from .test_e2e import wait_for

INSTANCE = "failover-instance"
FAILOVER_AFTER_S = 2.0
#: What the README promises: failover_after_s, a probe, the worker's retry and its resync.
TAKEOVER_BUDGET_S = FAILOVER_AFTER_S + 4.0


# ------------------------------------------------------------------------------------------- the rules alone
def view(role: str, started_at: float, ident: str, active_since: float | None = None) -> dict[str, Any]:
    return {"role": role, "id": ident, "started_at": started_at, "active_since": active_since}


def test_a_standby_waits_for_an_active_peer_then_the_most_senior_takes_over() -> None:
    role = Role(["b:9000", "c:9000"], failover_after_s=0.2)
    assert role.state == STANDBY  # a controller with peers starts as a standby
    role.decide({"http://b:9000": view(ACTIVE, 1.0, "b", 5.0)})
    assert role.state == STANDBY and role.active_peer == "http://b:9000"
    time.sleep(0.25)
    role.decide({"http://c:9000": view(STANDBY, role.started_at - 10, "c")})  # b died; c started before us
    assert role.state == STANDBY and role.active_peer is None  # c takes over, not us
    role.decide({"http://c:9000": view(STANDBY, role.started_at + 10, "c")})
    assert role.state == ACTIVE and role.active_since is not None  # we are the most senior standby


def test_a_standby_does_not_take_over_before_failover_after() -> None:
    role = Role(["b:9000"], failover_after_s=60)
    role.decide({})  # b is silent, but not for long enough
    assert role.state == STANDBY


def test_of_two_active_controllers_the_newer_steps_down_and_drops_its_sessions() -> None:
    dropped: list[bool] = []
    role = Role(["b:9000"], failover_after_s=0.0, on_step_down=lambda: dropped.append(True))
    role.decide({})
    assert role.state == ACTIVE
    role.decide({"http://b:9000": view(ACTIVE, 0.0, "b", active_since=role.active_since + 1)})  # b is newer: we stay
    assert role.state == ACTIVE and not dropped
    role.decide({"http://b:9000": view(ACTIVE, 0.0, "b", active_since=role.active_since - 1)})
    assert role.state == STANDBY and role.active_peer == "http://b:9000" and dropped == [True]


def test_a_controller_without_peers_is_active_at_once() -> None:
    assert Role([], failover_after_s=3.0).state == ACTIVE


# ------------------------------------------------------------------------------------------- real processes
def start_controller(http: int, monitor: int, peer_http: int) -> ServeProcess:
    cmd = [sys.executable, "-m", "lmcached", "controller", "--port", str(http), "--monitor-port", str(monitor)]
    cmd += ["--peers", f"127.0.0.1:{peer_http}", "--failover-after", str(FAILOVER_AFTER_S)]
    return start_process(cmd, "lmcached ready ")


def cli(addresses: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmcached", *args, "--controller", addresses], capture_output=True, text=True, timeout=60)


def role_of(http_port: int) -> dict[str, Any]:
    """`lmcached role` of one controller: what it says of itself."""
    done = cli(f"127.0.0.1:{http_port}", "role")
    assert done.returncode == 0, done.stderr
    (answer,) = json.loads(done.stdout).values()
    return answer


def layout(addresses: str, tokens: list[int]) -> dict[str, Any] | None:
    done = cli(addresses, "lookup", "--tokens", ",".join(map(str, tokens)))
    return json.loads(done.stdout)["layout_info"] if done.returncode == 0 else None


def test_kill_9_of_the_active_controller_under_load() -> None:
    ports = {name: free_port() for name in ("a_http", "a_mon", "b_http", "b_mon")}
    a = start_controller(ports["a_http"], ports["a_mon"], ports["b_http"])
    time.sleep(0.5)  # a is the senior of the two
    b = start_controller(ports["b_http"], ports["b_mon"], ports["a_http"])
    both = f"127.0.0.1:{ports['a_http']},127.0.0.1:{ports['b_http']}"
    worker_cmd = [sys.executable, "-m", "lmcached", "worker", "--instance-id", INSTANCE, "--port", "0"]
    worker_cmd += ["--controller", f"127.0.0.1:{ports['a_mon']},127.0.0.1:{ports['b_mon']}"]
    worker = start_process(worker_cmd, "lmcached worker ready ", {"LMCACHE_CHUNK_SIZE": "256"})
    load_errors: list[str] = []
    stop = threading.Event()
    try:
        assert wait_for(lambda: layout(both, [1, 2, 3]) is not None, 15), "no controller became active"
        b_role = role_of(ports["b_http"])
        assert b_role["role"] == STANDBY and b_role["active_peer"] == f"http://127.0.0.1:{ports['a_http']}"
        # A standby says so, and names the active one, to anyone who asks it directly.
        refused = cli(f"127.0.0.1:{ports['b_http']}", "lookup", "--tokens", "1,2,3")
        assert refused.returncode == 1 and "standby" in refused.stderr and str(ports["a_http"]) in refused.stderr

        data = f"127.0.0.1:{worker.ports['data']}"
        prompts = [list(range(1000 * i, 1000 * i + 512)) for i in range(1, 9)]
        kvs = [make_kv(512, layers=4, channels=64, seed=i) for i in range(len(prompts))]
        with KVClient(data) as client:
            for tokens, kv in zip(prompts, kvs, strict=True):
                assert client.store(tokens, kv) == 512
        assert wait_for(lambda: layout(both, prompts[-1]) == {INSTANCE: ["LocalCPUBackend", 512]}, 15)

        def engine() -> None:  # what an engine does meanwhile: the data plane never needs the controller
            with KVClient(data) as client:
                i = 0
                while not stop.is_set():
                    try:
                        if client.lookup(prompts[i % len(prompts)]) != 512:
                            load_errors.append(f"lookup {i} missed")
                        got = client.retrieve(prompts[i % len(prompts)])
                        if got is None or not torch.equal(got, kvs[i % len(kvs)]):
                            load_errors.append(f"retrieve {i} differed")
                    except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                        load_errors.append(f"request {i}: {exc}")
                    i += 1

        traffic = threading.Thread(target=engine, daemon=True)
        traffic.start()
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        stop_serve(a)  # (its output pipe)
        whole = {INSTANCE: ["LocalCPUBackend", 512]}
        answered = wait_for(lambda: all(layout(both, p) == whole for p in (prompts[0], prompts[-1])), 30)
        took = time.monotonic() - killed_at
        assert answered, "the standby never answered with the worker's chunks"
        print(f"lookups answered again {took:.2f} s after kill -9 of the active controller")
        assert took < TAKEOVER_BUDGET_S, f"lookups answered again only after {took:.1f}s"
        time.sleep(0.5)
        stop.set()
        traffic.join(30)
        assert not load_errors, load_errors[:5]
        for tokens in prompts:  # nothing the worker held is lost
            assert layout(both, tokens) == whole

        # The killed controller comes back: it joins as the standby of the one that took over.
        a = start_controller(ports["a_http"], ports["a_mon"], ports["b_http"])
        time.sleep(FAILOVER_AFTER_S + 1.5)
        a_role = role_of(ports["a_http"])
        assert a_role["role"] == STANDBY and a_role["active_peer"] == f"http://127.0.0.1:{ports['b_http']}"
        assert layout(both, prompts[0]) == whole  # the CLI skips the standby and finds the active one
    finally:
        stop.set()
        for proc in (worker, a, b):
            if proc.proc.stdout is not None and not proc.proc.stdout.closed:
                stop_serve(proc)


# ------------------------------------------------------------------------------------------- in one process
async def test_standby_serve_daemons_send_their_instance_and_monitors_to_the_active_one() -> None:
    """Two `serve` daemons in a group, each with its embedded instance: both instances register with the active
    controller (the standby's own follows the list); a monitor given both control ports lands there too; the
    standby's HTTP API names the active one; /metrics says which is which."""
    from lmcached.control.monitor import MonitorClient
    from lmcached.serve import Daemon

    from .conftest import prometheus_samples, test_config

    http = {name: free_port() for name in "ab"}
    mon = {name: free_port() for name in "ab"}
    group = f"127.0.0.1:{mon['a']},127.0.0.1:{mon['b']}"
    daemons = {}
    for name, peer in (("a", "b"), ("b", "a")):
        config = test_config(port=http[name], monitor_port=mon[name], controller_peers=f"127.0.0.1:{http[peer]}", controller_url=group)
        daemons[name] = Daemon(config.replace(failover_after_s=0.5))
        await daemons[name].start()
        await asyncio.sleep(0.2)  # a is the senior
    try:
        a, b = daemons["a"].controller, daemons["b"].controller
        deadline = time.monotonic() + 10
        while not (a.role.active and len(a.index.workers) == 2 and b.role.active_peer) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert a.role.active and not b.role.active
        assert len(a.index.workers) == 2 and not b.index.workers  # b's own instance registered with a
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{http['b']}/lookup", json={"tokens": [1, 2]}) as response:
                assert response.status == 503 and response.headers["X-Lmcached-Standby"] == f"http://127.0.0.1:{http['a']}"
                assert "standby" in (await response.json())["detail"]
            for name, active in (("a", 1.0), ("b", 0.0)):
                async with session.get(f"http://127.0.0.1:{http[name]}/metrics") as response:
                    assert prometheus_samples(await response.text())["lmcached_controller_active"][()] == active
        monitor = MonitorClient(f"127.0.0.1:{mon['b']},127.0.0.1:{mon['a']}")  # the standby first
        await monitor.connect()
        assert monitor.connected_to == f"127.0.0.1:{mon['a']}"
        await monitor.close()
    finally:
        for daemon in daemons.values():
            await daemon.stop()
