"""The shared Redis tier's address, `remote_url`: redis://, rediss:// (TLS) and their -cluster forms, parsed once
for the configuration and for the worker that dials it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from lmcached.errors import ConfigError

#: Where the tier's password comes from when remote_url has none.
PASSWORD_ENV = "LMCACHED_REMOTE_PASSWORD"
SCHEMES = ("redis", "rediss", "redis-cluster", "rediss-cluster")


@dataclass(frozen=True)
class RemoteURL:
    """A parsed `remote_url`: redis://[user:pass@]host:port[/db], rediss:// (TLS), redis-cluster://h1:p1,h2:p2."""

    cluster: bool
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None
    #: With rediss://: the CA bundle that signs the server's certificate (None: the system's), and the client
    #: certificate and key Redis asks for when it authenticates clients (its default, tls-auth-clients yes).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for this URL's transport."""
        if not self.tls:
            return {"ssl": False}
        return {"ssl": True, "ssl_ca_certs": self.tls_ca, "ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}

    @property
    def display(self) -> str:
        """The URL without its password, for logs and the TUI."""
        scheme = ("rediss" if self.tls else "redis") + ("-cluster" if self.cluster else "")
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{nodes}" + ("" if self.cluster or self.db == 0 else f"/{self.db}")


def parse_remote_url(url: str, environ: dict[str, str] | None = None) -> RemoteURL:
    """Parse `remote_url`; ConfigError (naming the key) for anything malformed. The password comes from the URL
    or, when the URL has none, from LMCACHED_REMOTE_PASSWORD."""
    env = os.environ if environ is None else environ

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"remote_url {url!r} is malformed: {why} (expected redis://HOST:PORT[/DB], rediss://… or redis-cluster://H1:P1,H2:P2)",
            "remote_url",
        )

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise bad(f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    cluster = scheme.endswith("-cluster")
    tls = scheme.startswith("rediss")
    # urlsplit copes with user:pass@ but not with a comma-separated host list: split the hosts ourselves.
    parts = urlsplit(f"redis://{rest}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host:
            raise bad("a host is missing")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise bad(f"port {port!r} is not a port number")
        nodes.append((host, int(port)))
    if len(nodes) > 1 and not cluster:
        raise bad("several hosts need the redis-cluster:// scheme")
    path = parts.path.strip("/")
    db = 0
    if path:
        if cluster:
            raise bad("Redis Cluster has only database 0")
        if not path.isdigit():
            raise bad(f"database {path!r} is not a number")
        db = int(path)
    if password is None:
        password = env.get(PASSWORD_ENV) or None
    return RemoteURL(cluster, tls, tuple(nodes), db, username, password)
