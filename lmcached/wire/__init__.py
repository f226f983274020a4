"""What travels between lmcached's processes, and what both ends of a link must agree on: frames and socket I/O,
addresses and hellos, data-plane messages, chunk keys and chunk metadata, tensors as bytes, the shared-memory view
a client maps, TLS contexts, the HTTP API's request fields. Imports nothing of the worker or the controller."""
