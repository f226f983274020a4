"""Configuration: LMCache's keys plus lmcached's own, merged as flags > LMCACHE_<KEY> env > YAML file > defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmcached import DEFAULT_INSTANCE_ID
from lmcached.errors import ConfigError

log = logging.getLogger(__name__)

if typing.TYPE_CHECKING:
    from lmcached.wire.kv_events import KVEventsSettings
    from lmcached.wire.redis_url import RemoteURL

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
AUTH_TOKEN_ENV = "LMCACHED_AUTH_TOKEN"
GB = 1024**3
#: remote_serde values: "naive" keeps chunks as stored (LMCache's default), the others are codec names.
REMOTE_SERDES = ("naive", "cachegen", "lossless")
#: Where a worker runs its codecs: "auto" picks a CUDA device when torch sees one.
CODEC_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Config:
    """Every setting of a controller or worker, with LMCache's names where LMCache has one."""

    # LMCache's keys.
    chunk_size: int = 256  # tokens per chunk: the unit of storage, keys and every operation
    local_cpu: bool = True  # keep chunks in the RAM tier (LocalCPUBackend)
    max_local_cpu_size: float = 5.0  # GB of the RAM tier
    local_disk: str | None = None  # the disk tier's directory (LocalDiskBackend); LMCache's "file:///path/" works too
    max_local_disk_size: float = 5.0  # GB of the disk tier
    save_unfull_chunk: bool = True  # store a prompt's last, partial chunk too (vLLM's connector continues it in a chat's next round)
    enable_controller: bool = True  # a worker registers with the controller at controller_url
    lmcache_instance_id: str = DEFAULT_INSTANCE_ID  # the instance a worker serves (the controller's name for it)
    # where a worker dials the controller: its worker/monitor port; several, comma-separated, for a failover group
    controller_url: str = "localhost:9001"
    lmcache_worker_port: int = 8001  # a worker's data plane (engines store and retrieve there; 0: any free port)
    remote_url: str | None = None  # the shared Redis tier: redis://host:port[/db], rediss://…, redis-cluster://h1:p1,h2:p2
    remote_serde: str = "naive"  # how chunks rest in the remote tier: naive (as stored), cachegen or lossless
    # lmcached's own keys.
    host: str = "127.0.0.1"  # the address every port binds (0.0.0.0: all; then set auth_token)
    port: int = 9000  # the controller's HTTP API
    monitor_port: int = 9001  # the controller's worker/monitor TCP port
    auth_token: str | None = None  # a bearer token every client and worker must present (unset: none)
    heartbeat_interval: float = 1.0  # seconds between a worker's heartbeats
    heartbeat_timeout: float = 5.0  # a worker silent this long is dropped from the index (LMCache issue 4808)
    command_timeout: float = 30.0  # a controller command whose worker has said nothing of it this long fails (workers report progress each second)
    max_request_bytes: int = 16 * 1024 * 1024  # HTTP bodies above this get a 413
    # GB of the RAM tier's arena faulted in at start-up (before ready), so the first stores do not pay for page
    # faults; unset: a tenth of max_local_cpu_size, at most 1 GB and 5 % of the memory available at start.
    local_cpu_prefault: float | None = None
    shared_memory: bool = True  # same-host clients (same user) may move KV through the RAM tier's shared memory
    remote_ttl_s: float = 86400.0  # unpinned chunks in the remote tier expire after this (0: never)
    remote_namespace: str = "lmcached"  # prefix of every Redis key; fleets of different models use different ones
    remote_scan_interval: float = 5.0  # seconds between reconciliation scans of the remote tier
    remote_keep_local: bool = True  # a chunk read from the remote tier is also kept in RAM
    remote_timeout_s: float = 1.0  # an engine's lookup or retrieve waits this long for the remote tier, then misses
    remote_write_queue_size: float = 1.0  # GB of write-through queued while the remote tier is slow or down
    codec_device: str = "auto"  # where compress/decompress run: auto (a CUDA device when torch sees one), cpu or cuda
    remote_tls_ca: str | None = None  # rediss://: the CA file that signs Redis' certificate (unset: the system's CAs)
    remote_tls_cert: str | None = None  # rediss://: the client certificate Redis asks for (its tls-auth-clients)
    remote_tls_key: str | None = None  # rediss://: that certificate's key
    tls_cert: str | None = None  # serve this process's ports (HTTP API, worker/monitor port, data plane) over TLS with this certificate
    tls_key: str | None = None  # that certificate's key
    tls_ca: str | None = None  # dial lmcached's ports over TLS, verifying them against this CA file (needed with tls_cert)
    # the other controllers of a failover group, HTTP HOST:PORT, comma-separated: this one stands by while one is active
    controller_peers: str | None = None
    failover_after_s: float = 3.0  # a standby takes over once no controller of its group has been active this long
    # publish this worker's tiers as KV events in vLLM's ZMQ format (docs/routers.md): a mapping of vLLM's
    # KVEventsConfig fields (enable_kv_cache_events, publisher, endpoint, replay_endpoint, buffer_steps, hwm, topic)
    kv_events: dict | None = None
    enable_kv_events: bool = False  # LMCache's switch: publish KV events with vLLM's defaults (tcp://*:5557) when kv_events is unset
    # LMCache's keys: also report this worker's chunks to an LMCache-protocol controller (LMCache's own, or vLLM
    # production-stack's kvaware router) at HOST:PORT (docs/routers.md); both or neither.
    controller_pull_url: str | None = None  # the controller's PULL port: this worker pushes its admits and evictions there
    controller_reply_url: str | None = None  # the controller's reply port: this worker registers and heartbeats there
    # a controller's ports for LMCache engines' workers (LMCache's controller_pull_url and controller_reply_url
    # point there): their chunks join the index beside lmcached's; both or neither (0: any free port)
    lmcache_pull_port: int | None = None
    lmcache_reply_port: int | None = None  # see lmcache_pull_port

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be positive, got {self.chunk_size}", "chunk_size")
        for key in ("max_local_cpu_size", "max_local_disk_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 GB, got {getattr(self, key)}", key)
        for key in ("port", "monitor_port", "lmcache_worker_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise ConfigError(f"{key} must be a port number (0-65535), got {getattr(self, key)}", key)
        for key in ("heartbeat_interval", "heartbeat_timeout", "command_timeout", "failover_after_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive seconds, got {getattr(self, key)}", key)
        if self.max_request_bytes <= 0:
            raise ConfigError("max_request_bytes must be positive", "max_request_bytes")
        if self.remote_serde not in REMOTE_SERDES:
            raise ConfigError(f"remote_serde must be one of {', '.join(REMOTE_SERDES)}, got {self.remote_serde!r}", "remote_serde")
        for key in ("remote_ttl_s", "remote_write_queue_size", "local_cpu_prefault"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}", key)
        if self.remote_timeout_s <= 0:
            raise ConfigError(f"remote_timeout_s must be positive, got {self.remote_timeout_s}", "remote_timeout_s")
        if self.remote_scan_interval <= 0:
            raise ConfigError(f"remote_scan_interval must be positive, got {self.remote_scan_interval}", "remote_scan_interval")
        if not self.remote_namespace or any(c in self.remote_namespace for c in " :{}"):
            raise ConfigError(
                f"remote_namespace must be a plain word (no spaces, ':' or braces), got {self.remote_namespace!r}", "remote_namespace"
            )
        if self.codec_device not in CODEC_DEVICES:
            raise ConfigError(f"codec_device must be one of {', '.join(CODEC_DEVICES)}, got {self.codec_device!r}", "codec_device")
        _ = self.remote  # a malformed remote_url fails here, at start-up
        for key in ("remote_tls_ca", "remote_tls_cert", "remote_tls_key", "tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{key}: no such file {path!r}", key)
        if (self.remote_tls_cert is None) != (self.remote_tls_key is None):
            raise ConfigError("remote_tls_cert and remote_tls_key go together (a certificate and its key)", "remote_tls_cert")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together (a certificate and its key)", "tls_cert")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("tls_cert needs tls_ca too: the CA this daemon's own clients (its instance, its peers) verify it with", "tls_ca")
        from lmcached.errors import InvalidRequest
        from lmcached.wire.handshake import parse_address

        for key, default_port in (("controller_url", 9001), ("controller_peers", 9000)):
            for address in (getattr(self, key) or "").split(","):
                try:
                    parse_address(address.strip().split("://")[-1], default_port)
                except InvalidRequest as exc:
                    raise ConfigError(f"{key}: {exc}", key) from None
        _ = self.kv_events_settings  # a malformed kv_events fails here, at start-up
        if (self.lmcache_pull_port is None) != (self.lmcache_reply_port is None):
            raise ConfigError("lmcache_pull_port and lmcache_reply_port go together (LMCache's two controller ports)", "lmcache_pull_port")
        for key in ("lmcache_pull_port", "lmcache_reply_port"):
            if getattr(self, key) is not None and not 0 <= getattr(self, key) <= 65535:
                raise ConfigError(f"{key} must be a port number (0-65535), got {getattr(self, key)}", key)
        if (self.controller_pull_url is None) != (self.controller_reply_url is None):
            raise ConfigError("controller_pull_url and controller_reply_url go together (an LMCache controller's two ports)", "controller_pull_url")
        if not self.controller_url.strip(", "):
            raise ConfigError("controller_url needs at least one HOST:PORT", "controller_url")

    @property
    def remote(self) -> RemoteURL | None:
        """The parsed remote_url, or None when there is no remote tier."""
        if not self.remote_url:
            return None
        from lmcached.wire.redis_url import parse_remote_url

        parsed = parse_remote_url(self.remote_url)
        return dataclasses.replace(parsed, tls_ca=self.remote_tls_ca, tls_cert=self.remote_tls_cert, tls_key=self.remote_tls_key)

    @property
    def kv_events_settings(self) -> KVEventsSettings | None:
        """What to publish KV events with, or None when they are off."""
        from lmcached.wire.kv_events import parse_kv_events

        return parse_kv_events(self.kv_events, self.enable_kv_events)

    @property
    def local_disk_path(self) -> Path | None:
        """The disk backend's directory, or None when disk caching is off."""
        if not self.local_disk:
            return None
        return Path(self.local_disk.removeprefix("file://"))

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _base_type(key: str) -> tuple[type, bool]:
    """The scalar type of a field and whether it accepts None."""
    hint = _HINTS[key]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def coerce(key: str, value: Any, *, from_text: bool = False) -> Any:
    """Check (and, for environment text, parse) one value for `key`; raise ConfigError naming the key."""
    if key not in _FIELDS:
        raise ConfigError(f"unknown configuration key {key!r}", key)
    kind, optional = _base_type(key)
    if value is None or (from_text and optional and str(value).strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"configuration key {key!r} must not be empty", key)
    if from_text:
        text = str(value).strip()
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"configuration key {key!r} must be true or false, got {text!r}", key)
        if kind is dict:  # a mapping in an environment variable: JSON
            import json

            try:
                value = json.loads(text)
            except ValueError:
                raise ConfigError(f"configuration key {key!r} must be a JSON object, got {text!r}", key) from None
            if not isinstance(value, dict):
                raise ConfigError(f"configuration key {key!r} must be a JSON object, got {text!r}", key)
            return value
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"configuration key {key!r} must be {kind.__name__}, got {text!r}", key) from None
    # Values from YAML or flags already carry a type; accept int where float is wanted, nothing looser.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"configuration key {key!r} must be true or false, got {value!r}", key)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"configuration key {key!r} must be an integer, got {value!r}", key)
    if not isinstance(value, kind):
        what = "a mapping" if kind is dict else kind.__name__
        raise ConfigError(f"configuration key {key!r} must be {what}, got {value!r}", key)
    return value


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into checked values."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return {str(k): coerce(str(k), v) for k, v in data.items()}


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """A line for each LMCACHE_ variable that names no key (a typo is otherwise silently ignored), with the
    nearest key's variable when one is close."""
    import difflib

    known = {ENV_PREFIX + key.upper() for key in _FIELDS} | {CONFIG_FILE_ENV}
    lines = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a configuration key lmcached knows{hint}; ignored")
    return lines


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read LMCACHE_<KEY> variables for known keys; warn about the others (they may be another engine's, so
    they are not an error)."""
    for line in unknown_env(environ):
        log.warning("%s", line)
    values: dict[str, Any] = {}
    for key in _FIELDS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            values[key] = coerce(key, environ[name], from_text=True)
    if AUTH_TOKEN_ENV in environ:
        values["auth_token"] = coerce("auth_token", environ[AUTH_TOKEN_ENV], from_text=True)
    return values


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults < file < environment < overrides (flags); None in overrides means "not given"."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(CONFIG_FILE_ENV) or None
    if config_file:
        values.update(load_file(config_file))
    values.update(load_env(environ))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value)
    return Config(**values)
