"""deploy/: the systemd units and their environment file, checked as systemd reads them (systemd-analyze) and
run for real: each unit's command line with the file's settings starts, tells systemd it is ready over the
sd_notify protocol, logs JSON lines, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcached.config import load_config, unknown_env

from .conftest import ServeProcess, start_process, stop_serve
from .test_e2e import wait_for

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
INSTALLED_BINARY = "/opt/lmcached/.venv/bin/lmcached"
INSTALLED_ENV = "/etc/lmcached/lmcached.env"
LMCACHED = str(Path(sys.executable).parent / "lmcached")  # this environment's console script


def env_file() -> dict[str, str]:
    lines = (DEPLOY / "lmcached.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def exec_start(unit: Path) -> list[str]:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == INSTALLED_BINARY
    return [LMCACHED, *argv[1:]]


def test_there_is_a_unit_for_each_daemon() -> None:
    assert [unit.name for unit in UNITS] == ["lmcached-controller.service", "lmcached-worker.service", "lmcached.service"]
    assert [exec_start(unit)[1] for unit in UNITS] == ["controller", "worker", "serve"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_reads_the_unit_without_a_complaint(unit: Path, tmp_path: Path) -> None:
    # Pointed at this checkout's binary and environment file (systemd checks that ExecStart is executable).
    text = unit.read_text().replace(INSTALLED_BINARY, LMCACHED).replace(INSTALLED_ENV, str(DEPLOY / "lmcached.env"))
    (tmp_path / unit.name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit.name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr  # an unknown key is only a warning: none either


def test_the_environment_file_names_only_real_keys() -> None:
    settings = env_file()
    assert unknown_env(settings) == []
    config = load_config(environ=settings)
    assert config.local_disk == "/var/lib/lmcached/disk" and config.controller_url == "127.0.0.1:9001"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    yield sock
    sock.close()


def run_unit(unit: str, tmp_path: Path, notify: socket.socket, ready: str, **overrides: str) -> ServeProcess:
    """The unit's command with the environment file's settings (ports 0 and a scratch disk, so tests can run side
    by side), as systemd would start it with NOTIFY_SOCKET set."""
    env = {**env_file(), "LMCACHE_PORT": "0", "LMCACHE_MONITOR_PORT": "0", "LMCACHE_LMCACHE_WORKER_PORT": "0"}
    env |= {"LMCACHE_LOCAL_DISK": str(tmp_path / "disk"), "LMCACHED_CACHE_DIR": str(tmp_path / "cache"), **overrides}
    env["NOTIFY_SOCKET"] = notify.getsockname()
    return start_process(exec_start(DEPLOY / unit), ready, env=env)


def stop_and_check(server: ServeProcess, notify: socket.socket) -> None:
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert server.proc.wait(60) == 0  # one SIGTERM is a clean stop (a second would force it)
    finally:
        stop_serve(server)  # collects its output, and kills it if the checks above failed: no daemon left behind
    logged = [line for line in server.output if not line.startswith("lmcached ") or " ready " not in line]
    assert logged and all(json.loads(line)["level"] for line in logged)  # --log-format json: every line


def test_serve_unit_starts_says_ready_and_stops(tmp_path: Path, notify_socket: socket.socket) -> None:
    server = run_unit("lmcached.service", tmp_path, notify_socket, "lmcached ready ")
    try:
        message = notify_socket.recv(4096).decode()
        assert message.startswith("READY=1\nSTATUS=controller on 127.0.0.1:") and "worker data plane on" in message
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['http']}/instances", timeout=30) as response:
            assert "lmcache_default_instance" in json.loads(response.read())
        assert (tmp_path / "disk").is_dir() and oct((tmp_path / "disk").stat().st_mode & 0o777) == "0o700"
    finally:
        if server.proc.poll() is None:
            stop_and_check(server, notify_socket)


def test_controller_and_worker_units_make_a_fleet(tmp_path: Path, notify_socket: socket.socket) -> None:
    controller = run_unit("lmcached-controller.service", tmp_path, notify_socket, "lmcached ready ")
    try:
        assert notify_socket.recv(4096).startswith(b"READY=1\n")
        worker_notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        worker_notify.bind(str(tmp_path / "worker-notify"))
        worker_notify.settimeout(30)
        url = f"127.0.0.1:{controller.ports['monitor']}"
        worker = run_unit("lmcached-worker.service", tmp_path, worker_notify, "lmcached worker ready ", LMCACHE_CONTROLLER_URL=url)
        try:
            assert worker_notify.recv(4096).decode().startswith("READY=1\nSTATUS=worker ")

            def registered() -> bool:  # (the worker registers right after its ready line, on its own)
                with urllib.request.urlopen(f"http://127.0.0.1:{controller.ports['http']}/instances", timeout=30) as response:
                    workers = json.loads(response.read()).get("lmcache_default_instance", {}).get("workers", [])
                return [w["worker_id"] for w in workers] == [worker.ports["worker_id"]]

            assert wait_for(registered)
        finally:
            stop_and_check(worker, worker_notify)
            worker_notify.close()
    finally:
        stop_and_check(controller, notify_socket)
    assert os.environ.get("NOTIFY_SOCKET") is None  # (the test's own environment was never changed)
