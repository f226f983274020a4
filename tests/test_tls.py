"""TLS on every port, with real handshakes: a private CA made by openssl, the HTTP API over https, the
worker/monitor port over TLS (the embedded instance, a monitor, a worker), the data plane over TLS (both
clients, socket and shared memory), and one clear line for every client that disagrees with the server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from lmcached.client import AsyncKVClient, KVClient
from lmcached.config import Config
from lmcached.control.monitor import MonitorClient
from lmcached.errors import ConfigError
from lmcached.serve import Daemon
from lmcached.wire.tls import CLI_CA_ENV, client_context
from lmcached.worker.instance import Worker

from .conftest import INSTANCE, make_certificates, make_kv, test_config


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The CLI in a subprocess, without blocking the loop the daemon under test runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmcached", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    return make_certificates(tmp_path / "certs")


async def test_the_controller_speaks_tls_on_both_ports(certs: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    config = test_config(tls_cert=certs["cert"], tls_key=certs["key"], tls_ca=certs["ca"])
    daemon = Daemon(config)
    ports = await daemon.start()  # its embedded instance registered over TLS (start waits for it)
    try:
        https = f"https://127.0.0.1:{ports.http}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs["ca"]))) as session:
            async with session.get(https + "/instances") as response:
                assert response.status == 200 and INSTANCE in await response.json()
        monitor = MonitorClient(f"127.0.0.1:{ports.monitor}", ssl_context=client_context(certs["ca"]))
        await monitor.connect()
        await monitor.close()

        # The CLI: https with the CA works; http:// to the TLS port and https without the CA say what is wrong.
        code, out, _ = await cli("instances", "--controller", https, env={CLI_CA_ENV: certs["ca"]})
        assert code == 0 and INSTANCE in out
        code, _, err = await cli("instances", "--controller", f"127.0.0.1:{ports.http}")
        assert code == 1 and "speaks TLS" in err and CLI_CA_ENV in err
        code, _, err = await cli("instances", "--controller", https, env={CLI_CA_ENV: ""})
        assert code == 1 and "certificate verify failed" in err.lower()

        # The data plane: both clients over TLS, the socket path and shared memory; a plain client is told.
        data = f"127.0.0.1:{ports.data}"
        tokens, kv = list(range(300)), make_kv(300)
        tls = client_context(certs["ca"])
        async with AsyncKVClient(data, ssl_context=tls) as client:
            assert await client.store(tokens, kv) == 300 and torch.equal(await client.retrieve(tokens), kv)

        def blocking_clients() -> None:
            for shared_memory in (False, True):
                with KVClient(data, ssl_context=tls, shared_memory=shared_memory) as client:
                    other = list(range(1000, 1300)) if shared_memory else list(range(2000, 2300))
                    assert client.store(other, kv) == 300
                    got = client.retrieve(other)
                    assert got is not None and torch.equal(got, kv), client.transport
            with pytest.raises(ConnectionError, match="speaks TLS"):
                KVClient(data).connect()

        await asyncio.to_thread(blocking_clients)
        with pytest.raises(ConnectionError, match="speaks TLS"):
            await AsyncKVClient(data).connect()

        # Plain clients of the TLS control port: a monitor and a worker each get one line that says so.
        with pytest.raises(ConnectionError, match="speaks TLS"):
            await MonitorClient(f"127.0.0.1:{ports.monitor}").connect()
        plain = Worker(test_config(controller_url=f"127.0.0.1:{ports.monitor}", lmcache_instance_id="plain"))
        with caplog.at_level(logging.WARNING, logger="lmcached.worker.controller_link"):
            await plain.start()
            try:
                await asyncio.sleep(1.5)
                assert not plain.connected.is_set()
            finally:
                await plain.stop()
        assert any("speaks TLS" in r.getMessage() for r in caplog.records)
    finally:
        await daemon.stop()


async def test_a_tls_client_of_a_plain_controller_is_told_so(certs: dict[str, str]) -> None:
    daemon = Daemon(test_config())
    ports = await daemon.start()
    try:
        code, _, err = await cli("instances", "--controller", f"https://127.0.0.1:{ports.http}", env={CLI_CA_ENV: certs["ca"]})
        assert code == 1 and "does not speak TLS" in err
        with pytest.raises(ConnectionError, match="does not speak TLS"):
            await MonitorClient(f"127.0.0.1:{ports.monitor}", ssl_context=client_context(certs["ca"])).connect()
        with pytest.raises(ConnectionError, match="does not speak TLS"):
            await AsyncKVClient(f"127.0.0.1:{ports.data}", ssl_context=client_context(certs["ca"])).connect()
    finally:
        await daemon.stop()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"tls_cert": "cert", "tls_key": None}, "tls_cert"),
        ({"tls_cert": "cert", "tls_key": "key"}, "tls_ca"),
        ({"tls_ca": "/nonexistent/ca.pem"}, "tls_ca"),
    ],
)
def test_tls_settings_are_checked_at_start(certs: dict[str, str], changes: dict[str, Any], key: str) -> None:
    resolved = {k: certs.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(ConfigError, match=key):
        Config(**resolved)
