"""End to end: `lmcached serve` as a real subprocess, driven with the seed's curl bodies and the CLI."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from lmcached.client import KVClient

from .conftest import CPU, INSTANCE, SEED_TOKENS, ServeProcess, make_kv, start_process, start_serve, stop_serve


def post(server: ServeProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(server.http + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def cli(server: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args, "--controller", server.http], capture_output=True, text=True, timeout=60
    )


def test_seed_flow_against_a_real_serve_process(serve_process: ServeProcess) -> None:
    server = serve_process
    kv = make_kv(len(SEED_TOKENS), layers=30, channels=192)  # SmolLM2's shape
    with KVClient(server.data) as client:
        assert client.store(SEED_TOKENS, kv) == 12

    seed_body = {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": SEED_TOKENS}
    layout = wait_for(lambda: post(server, "/lookup", {"tokens": SEED_TOKENS})["layout_info"])
    assert layout == {INSTANCE: [CPU, 12]}

    answer = post(server, "/compress", seed_body)
    assert answer["num_tokens"] == 12 and answer["event_id"]
    event = wait_for(
        lambda: (e := post(server, "/check_finish", {"event_id": answer["event_id"]}))["status"] in ("finished", "failed") and e
    )
    assert event["status"] == "finished" and event["result"]["num_tokens"] == 12

    with KVClient(server.data) as client:
        out = client.retrieve(SEED_TOKENS)
    assert out is not None and out.shape == kv.shape
    assert (out.float() - kv.float()).norm() / kv.float().norm() < 0.2

    answer = post(server, "/decompress", seed_body)
    assert answer["num_tokens"] == 12
    event = wait_for(
        lambda: (e := post(server, "/check_finish", {"event_id": answer["event_id"]}))["status"] in ("finished", "failed") and e
    )
    assert event["status"] == "finished"


def test_cli_subcommands_print_json_and_exit_codes(serve_process: ServeProcess, tmp_path: Path) -> None:
    server = serve_process
    with KVClient(server.data) as client:
        client.store(SEED_TOKENS, make_kv(12))
    tokens = ",".join(map(str, SEED_TOKENS))
    wait_for(lambda: json.loads(cli(server, "lookup", "--tokens", tokens).stdout)["layout_info"])

    done = cli(server, "compress", "--tokens", tokens)
    assert done.returncode == 0, done.stderr
    event_id = json.loads(done.stdout)["event_id"]
    status = wait_for(lambda: json.loads(cli(server, "status", event_id).stdout)["status"] == "finished")
    assert status

    token_file = tmp_path / "tokens.json"
    token_file.write_text(json.dumps(SEED_TOKENS))
    for args in (
        ["pin", "--tokens-file", str(token_file)],
        ["unpin", "--tokens", tokens],
        ["decompress", "--tokens", tokens],
        ["move", "--tokens", tokens, "--to-location", "LocalCPUBackend", "--to-instance", INSTANCE, "--copy"],
    ):
        done = cli(server, *args)
        if args[0] == "move":  # same position: a clear 400
            assert done.returncode == 1 and done.stderr.startswith("error: 400") and len(done.stderr.splitlines()) == 1
        else:
            assert done.returncode == 0 and json.loads(done.stdout)["num_tokens"] == 12, (args, done.stderr)

    done = cli(server, "health")
    assert done.returncode == 0 and list(json.loads(done.stdout)["error_codes"].values()) == [0]
    done = cli(server, "compress", "--tokens", tokens, "--instance-id", "ghost")
    assert done.returncode == 1 and done.stderr.strip() == "error: 404: unknown instance 'ghost' (registered: lmcache_default_instance)"
    done = cli(server, "status", "nope")
    assert done.returncode == 1 and "unknown event_id" in done.stderr
    done = cli(server, "clear")
    assert done.returncode == 0 and json.loads(done.stdout)["num_tokens"] == 12
    done = cli(server, "lookup", "--tokens", "1,x")
    assert done.returncode == 2 and "integers" in done.stderr


def test_cli_says_when_nothing_matched_and_refuses_an_empty_token_list(serve_process: ServeProcess) -> None:
    server = serve_process
    done = cli(server, "compress", "--tokens", "")
    assert done.returncode == 2 and done.stderr == "error: the token list is empty: give at least one token id\n"
    done = cli(server, "compress", "--tokens", "5,6,7")
    assert done.returncode == 0 and json.loads(done.stdout)["result"]["matched"] is False
    assert done.stderr.startswith("note: nothing matched: no chunk of these tokens is at LocalCPUBackend")
    # For scripts: --require-match makes "nothing matched" an exit code of its own, with or without waiting.
    for wait in ("--wait", "--no-wait"):
        done = cli(server, "pin", "--tokens", "5,6,7", "--require-match", wait)
        assert done.returncode == 3 and "note: nothing matched" in done.stderr, (wait, done.stderr)
    with KVClient(server.data) as client:
        client.store(SEED_TOKENS, make_kv(12))
    tokens = ",".join(map(str, SEED_TOKENS))
    wait_for(lambda: json.loads(cli(server, "lookup", "--tokens", tokens).stdout)["layout_info"])
    done = cli(server, "pin", "--tokens", tokens, "--require-match")
    assert done.returncode == 0 and json.loads(done.stdout)["result"]["num_tokens"] == 12 and not done.stderr


def test_cli_takes_host_port_and_names_the_port_it_was_given_by_mistake(serve_process: ServeProcess) -> None:
    server = serve_process

    def lookup(controller: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "lmcached", "lookup", "--tokens", "1,2", "--controller", controller]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    done = lookup(f"127.0.0.1:{server.ports['http']}")  # no scheme: http is assumed
    assert done.returncode == 0 and json.loads(done.stdout)["layout_info"] == {}
    for wrong in (f"http://127.0.0.1:{server.ports['monitor']}", server.data):  # the worker port, a data port
        done = lookup(wrong)
        assert done.returncode == 1 and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
        assert "answered in lmcached's worker protocol" in done.stderr and "http://HOST:9000" in done.stderr


def test_cli_reports_an_unreachable_controller() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lmcached", "lookup", "--tokens", "1", "--controller", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.startswith("error: cannot reach the controller")


def test_standalone_worker_registers_and_survives_a_controller_restart(tmp_path: Path) -> None:
    server = start_serve()
    monitor_port = server.ports["monitor"]
    worker = start_process(
        [
            sys.executable,
            "-m",
            "lmcached",
            "worker",
            "--instance-id",
            "remote",
            "--controller",
            f"127.0.0.1:{monitor_port}",
            "--port",
            "0",
            "--local-disk",
            str(tmp_path / "disk"),
        ],
        "lmcached worker ready ",
    )
    try:
        data_port = worker.ports["data"]
        with KVClient(f"127.0.0.1:{data_port}") as client:
            client.store(SEED_TOKENS, make_kv(12))
        assert wait_for(lambda: post(server, "/lookup", {"tokens": SEED_TOKENS})["layout_info"].get("remote")) == [CPU, 12]

        # Restart the controller on the same ports: the worker reconnects and resyncs without a restart.
        stop_serve(server)
        server = start_serve_on(server.ports)
        assert wait_for(lambda: post(server, "/lookup", {"tokens": SEED_TOKENS})["layout_info"].get("remote"), 30) == [CPU, 12]
        assert worker.proc.poll() is None
    finally:
        assert stop_serve(worker) == 0
        stop_serve(server)


def start_serve_on(ports: dict[str, Any]) -> ServeProcess:
    deadline = time.monotonic() + 20
    while True:  # the old process's ports may linger for a moment
        try:
            return start_serve(http=ports["http"], monitor=ports["monitor"])
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_serve_shuts_down_cleanly_on_sigint() -> None:
    server = start_serve()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(20) == 0
    assert stop_serve(server) == 0


def test_a_port_in_use_is_one_error_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "lmcached", "serve", "--port", str(port), "--monitor-port", "0", "--worker-port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot start:")


def test_a_deliberate_shutdown_is_quiet_news_not_a_warning() -> None:
    """A worker stopped on purpose leaves with a goodbye (INFO, not 'lost' as a WARNING); SIGTERM, which a
    service manager sends, gets no Ctrl-C hint."""
    server = start_serve()
    controller = f"127.0.0.1:{server.ports['monitor']}"
    worker = start_process(
        [sys.executable, "-m", "lmcached", "worker", "--instance-id", "leaving", "--controller", controller, "--port", "0"],
        "lmcached worker ready ",
    )
    assert wait_for(lambda: "leaving" in post(server, "/query_worker_info", {"instance_id": "all"}).__str__())
    assert stop_serve(worker) == 0
    assert wait_for(lambda: any("worker" in line and "shut down" in line for line in server.output))
    assert stop_serve(server) == 0
    log = "".join(server.output) + "".join(worker.output)
    assert "WARNING" not in log, log
    assert "Ctrl-C" not in log and "shutting down" in log
    assert any(" INFO " in line and "leaving lost: shut down" in line for line in server.output), server.output


def test_logs_say_each_problem_once_without_tracebacks(serve_process: ServeProcess) -> None:
    server = serve_process
    # A malformed request: the client gets a 400; the daemon logs one warning line, not an aiohttp traceback.
    with socket.create_connection(("127.0.0.1", server.ports["http"])) as sock:
        sock.sendall(b"POST /lookup HTTP/1.1\r\nHost: x\r\nBad Header Line\r\nContent-Length: 2\r\n\r\n{}")
        assert sock.recv(100).startswith(b"HTTP/1.0 400")
    wait_for(lambda: any("malformed HTTP request" in line for line in server.output))
    [line] = [line for line in server.output if "aiohttp.server" in line]
    assert " WARNING " in line and "refused with 400" in line and not any("Traceback" in line for line in server.output)

    # A worker pointed at the HTTP port (a mix-up), retrying for a few seconds: one warning that names it.
    cmd = [sys.executable, "-m", "lmcached", "worker", "--instance-id", "w", "--port", "0", "--controller", server.http]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(6)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=30)
    link = [line for line in output.splitlines() if "controller_link" in line]
    assert len(link) == 1 and " WARNING " in link[0] and "answered in HTTP" in link[0], output


def test_json_logs_are_one_object_per_line() -> None:
    server = start_serve("--log-format", "json")
    try:
        wait_for(lambda: any("registered with the controller" in line for line in server.output))
    finally:
        stop_serve(server)
    logged = [line for line in server.output if not line.startswith("lmcached ready ")]
    entries = [json.loads(line) for line in logged]  # every line, or this fails
    assert entries and all(set(e) >= {"time", "level", "logger", "message"} and e["time"].endswith("Z") for e in entries)
    assert any(e["logger"] == "lmcached.worker.controller_link" and e["level"] == "INFO" for e in entries)
    done = subprocess.run([sys.executable, "-m", "lmcached", "serve", "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--log-format must be one of text, json" in done.stderr
