"""Connectors that let serving engines store their KV in lmcached and load it back (vLLM: `integrations.vllm`)."""
