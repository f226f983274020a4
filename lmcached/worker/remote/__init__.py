"""The shared remote tier (Redis or Redis Cluster) as a worker's backend: the backend and its mirror of the tier
(backend.py), the value format (values.py), dialling (connection.py), following Redis's evictions
(evictions.py) and the Lua it runs (scripts.py)."""

from lmcached.worker.remote.backend import RemoteBackend
from lmcached.worker.remote.errors import CorruptRemoteValue, RemoteError
from lmcached.worker.remote.values import pack_value, unpack_value

__all__ = ["CorruptRemoteValue", "RemoteBackend", "RemoteError", "pack_value", "unpack_value"]
