"""Dialling the remote tier: a redis-py client (standalone or cluster) that has answered, with one clear line for
each way it can fail, and which errors mean the tier is down."""

from __future__ import annotations

from typing import Any

from lmcached.wire.redis_url import PASSWORD_ENV, RemoteURL
from lmcached.worker.remote.errors import RemoteError

SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
_PASSWORD_HINT = f"give the password in remote_url (redis://:PASSWORD@host:port) or {PASSWORD_ENV}"


def connect(url: RemoteURL) -> Any:
    """A redis-py client (Redis or RedisCluster) that has answered a PING; RemoteError with one clear line for
    an unreachable host, a wrong password or something that is not Redis."""
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    common: dict[str, Any] = {
        "username": url.username,
        "password": url.password,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        **url.tls_options,
    }
    # One quick retry (a pooled connection gone stale after a Redis restart; in a cluster, a slot that moved), not
    # redis-py's backoff (10 attempts in a cluster): a down tier must fail fast, an engine is waiting. A failover
    # in progress is a clean miss; the next request finds the new primary.
    common["retry"] = Retry(NoBackoff(), 1)
    where = url.display
    try:
        if url.cluster:
            client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url.nodes], **common)
        else:
            host, port = url.nodes[0]
            client = redis.Redis(host=host, port=port, db=url.db, health_check_interval=30, **common)
        client.ping()
        return client
    except redis.AuthenticationError as exc:
        raise RemoteError(f"remote tier {where}: authentication failed ({exc}); {_PASSWORD_HINT}") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise RemoteError(f"remote tier {where}: authentication failed ({exc}); {_PASSWORD_HINT}") from None
        raise RemoteError(f"remote tier {where}: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RemoteError(f"remote tier {where} is unreachable: {exc}") from None
    except (redis.RedisError, OSError, ValueError, IndexError) as exc:
        # What a port that speaks another protocol (HTTP, SSH, nothing) makes redis-py raise.
        raise RemoteError(f"remote tier {where} did not answer like a Redis server ({type(exc).__name__}: {exc})") from None


def is_down(exc: BaseException) -> bool:
    import redis
    from redis.exceptions import RedisClusterException

    # RedisClusterException (no reachable node, a slot nobody serves during a failover) is not a RedisError.
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, RedisClusterException)) or "CLUSTERDOWN" in str(exc)
