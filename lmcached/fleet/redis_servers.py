"""Private `redis-server` processes, standalone or as a Redis Cluster, started on free ports and stopped again:
for the tests and `lmcached bench remote`, which never depend on a Redis someone else started.

`prefix` runs each server under another command (e.g. `ip netns exec HOST`) so a test can put Redis on
another "host" (a network namespace)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 10.0


class RedisUnavailable(RuntimeError):
    """redis-server is not installed (the message says how to get it)."""


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisUnavailable("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server process (`stop()` it, or use it as a context manager)."""

    port: int
    host: str = "127.0.0.1"
    args: Sequence[str] = ()
    prefix: Sequence[str] = ()
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lmcached-redis-")))
    proc: subprocess.Popen[bytes] | None = None
    #: Serve TLS only (rediss://): {"ca": CA file, "cert": server certificate, "key": its key}, plus "client_cert"
    #: and "client_key" that redis-cli presents (Redis authenticates TLS clients by default).
    tls: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"

    def start(self) -> RedisServer:
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"]]
            ports += ["--tls-ca-cert-file", self.tls["ca"]]
        cmd = [
            *self.prefix,
            redis_server_binary(),
            *ports,
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err.strip()}")
            if self.cli("PING", check=False).strip() in ("PONG", "NOAUTH Authentication required."):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {STARTUP_TIMEOUT_S} s")

    def cli(self, *args: str, check: bool = True, password: str | None = None) -> str:
        """Run redis-cli against this server (in its namespace), returning its output."""
        auth = ["-a", password, "--no-auth-warning"] if password else []
        if self.tls:
            auth += ["--tls", "--cacert", self.tls["ca"], "--cert", self.tls["client_cert"], "--key", self.tls["client_key"]]
        cmd = [*self.prefix, "redis-cli", "-h", self.host, "-p", str(self.port), *auth, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def kill(self) -> None:
        """Stop it at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisClusterProcs:
    """A Redis Cluster of `masters` primaries with `replicas` replicas each, on consecutive free ports."""

    masters: int = 3
    replicas: int = 1
    host: str = "127.0.0.1"
    prefix: Sequence[str] = ()
    args: Sequence[str] = ()
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes[: self.masters])

    def start(self) -> RedisClusterProcs:
        count = self.masters * (1 + self.replicas)
        try:
            for _ in range(count):
                port = _cluster_port(check=not self.prefix)
                node = RedisServer(
                    port,
                    self.host,
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000", *self.args],
                    self.prefix,
                )
                self.nodes.append(node.start())
            first = self.nodes[0]
            first.cli(
                "--cluster",
                "create",
                *(f"{n.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            )
            self.wait_ok()
            return self
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok (all slots served) and every replica has synced with its
        primary (a replica that never synced refuses to take over when its primary dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            ok = all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in live)
            replication = [n.cli("INFO", "replication", check=False) for n in live]
            synced = all("master_link_status:up" in r for r in replication if "role:slave" in r)
            if ok and synced:
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok with its replicas in sync")

    def primaries(self) -> list[RedisServer]:
        """The nodes that are primaries right now."""
        return [
            n
            for n in self.nodes
            if n.proc is not None and n.proc.poll() is None and "role:master" in n.cli("INFO", "replication", check=False)
        ]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcs:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_port(check: bool) -> int:
    """A port for a cluster node whose bus port (port + 10000) is free too. In another namespace (`check`
    False) this process cannot test ports, but a fresh namespace has nothing listening: any will do."""
    for _ in range(200):
        port = random.randrange(20000, 45000)
        if not check or all(port_is_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


def port_is_free(port: int) -> bool:
    """Whether nothing on this host listens on (or holds) `port` on the loopback address."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
