from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmcached.config import Config, load_config
from lmcached.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "example.yaml"


def test_defaults_follow_lmcache() -> None:
    config = load_config(environ={})
    assert config.chunk_size == 256
    assert config.lmcache_instance_id == "lmcache_default_instance"
    assert (config.port, config.monitor_port, config.lmcache_worker_port) == (9000, 9001, 8001)
    assert config.host == "127.0.0.1"


def test_example_yaml_loads_as_is() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.chunk_size == 256 and config.local_cpu and config.enable_controller
    assert config.controller_url == "localhost:9001"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 64\nmax_local_cpu_size: 2\nlocal_disk: 'file:///tmp/x/'\n")
    env = {"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_CONFIG_FILE": str(path)}
    config = load_config(None, {"chunk_size": None}, env)
    assert config.chunk_size == 128  # env beats file
    assert config.max_local_cpu_size == 2.0  # file beats default
    assert str(config.local_disk_path) == "/tmp/x"
    assert load_config(None, {"chunk_size": 32}, env).chunk_size == 32  # flag beats env


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 64\n")
    with pytest.raises(ConfigError, match="chunk_sise"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("chunk_size: many\n", "chunk_size"),
        ("local_cpu: 3\n", "local_cpu"),
        ("chunk_size: -1\n", "chunk_size"),
        ("controller_url: 'a:9001,b:port'\n", "controller_url"),
        ("controller_url: ','\n", "controller_url"),
        ("controller_peers: 'hostb:ninety'\n", "controller_peers"),
        ("failover_after_s: 0\n", "failover_after_s"),
    ],
)
def test_ill_typed_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(path, environ={})


def test_bad_env_value_is_named() -> None:
    with pytest.raises(ConfigError, match="local_cpu"):
        load_config(environ={"LMCACHE_LOCAL_CPU": "maybe"})


def test_auth_token_env() -> None:
    assert load_config(environ={"LMCACHED_AUTH_TOKEN": "s3cret"}).auth_token == "s3cret"


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().chunk_size = 3  # type: ignore[misc]


def test_cli_unknown_key_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("bogus_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "lmcached", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown configuration key 'bogus_key'"]


def test_a_mistyped_lmcache_variable_is_named_with_the_key_it_was_meant_for() -> None:
    from lmcached.config import unknown_env

    environ = {"LMCACHE_CHUNK_SIZ": "5", "LMCACHE_CHUNK_SIZE": "16", "LMCACHE_CONFIG_FILE": "x.yaml", "LMCACHE_SOMETHING_ELSE": "1"}
    assert unknown_env(environ) == [
        "LMCACHE_CHUNK_SIZ is not a configuration key lmcached knows (did you mean LMCACHE_CHUNK_SIZE?); ignored",
        "LMCACHE_SOMETHING_ELSE is not a configuration key lmcached knows; ignored",
    ]


def test_the_ram_tier_prefaults_in_proportion_and_warns_beyond_the_machine() -> None:
    from lmcached.worker.memory import GB, capacity_warning, prefault_bytes

    machine = (24 * GB, 20 * GB)  # total, available
    assert prefault_bytes(5 * GB, None, machine) == int(0.5 * GB)  # a tenth of the tier
    assert prefault_bytes(100 * GB, None, machine) == 1 * GB  # at most 1 GB
    assert prefault_bytes(100 * GB, None, (4 * GB, 2 * GB)) == int(0.1 * GB)  # 5 % of what is free
    assert prefault_bytes(5 * GB, 2.0, machine) == 2 * GB and prefault_bytes(1 * GB, 2.0, machine) == 1 * GB  # as set
    assert capacity_warning(20 * GB, machine) is None
    warning = capacity_warning(500 * GB, machine)
    assert warning is not None and warning.startswith("max_local_cpu_size is 500.0 GB but this machine has 24.0 GB")


def test_serve_warns_at_start_about_a_typo_and_a_tier_larger_than_the_machine() -> None:
    from lmcached.worker.memory import machine_memory

    from .conftest import start_serve, stop_serve

    memory = machine_memory()
    assert memory is not None
    too_big = str(int(memory[0] / 1024**3) * 4 + 64)
    server = start_serve(env={"LMCACHE_CHUNK_SIZ": "5", "LMCACHE_MAX_LOCAL_CPU_SIZE": too_big})
    try:
        output = "".join(server.output)
        assert "LMCACHE_CHUNK_SIZ is not a configuration key lmcached knows (did you mean LMCACHE_CHUNK_SIZE?)" in output
        assert f"max_local_cpu_size is {float(too_big):.1f} GB but this machine has" in output
    finally:
        stop_serve(server)


def test_the_configuration_reference_is_the_code() -> None:
    """docs/configuration.md is generated from Config and the CLI: it must be current, name every key with what
    it does, and name only flags the commands really have."""
    import dataclasses
    import re

    import typer

    from lmcached.cli import app
    from lmcached.config_reference import fields_in_order, flags_by_key, render

    document = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert document == render(), "stale: run python -m lmcached.config_reference > docs/configuration.md"
    described = fields_in_order()
    assert [key for _, key, _, _ in described] == [f.name for f in dataclasses.fields(Config)]
    assert all(description for *_, description in described), [key for _, key, _, d in described if not d]
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for key, mentions in flags_by_key().items():
        for mention in mentions:
            command, flag = re.fullmatch(r"`lmcached (\S+) (--\S+)`", mention).groups()  # type: ignore[union-attr]
            assert any(flag in param.opts for param in commands[command].params), (key, mention)
    assert "`lmcached serve --local-disk`" in document and "`lmcached worker --controller`" in document
