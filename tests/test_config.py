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
    ("text", "key"), [("chunk_size: many\n", "chunk_size"), ("local_cpu: 3\n", "local_cpu"), ("chunk_size: -1\n", "chunk_size")]
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
