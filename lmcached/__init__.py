"""lmcached: a KV-cache daemon for LLM serving (kept import-light: `lmcached --help` loads no heavy module)."""

__version__ = "0.1.0"

DEFAULT_INSTANCE_ID = "lmcache_default_instance"
