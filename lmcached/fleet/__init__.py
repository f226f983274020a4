"""Real parts for the tests and the bench: private redis-server processes and clusters, hosts made of network
namespaces, and real vLLM servers with LmcachedConnector. Nothing here is needed to run lmcached."""
