"""The model side: loading SmolLM2 and moving its KV, the OpenAI-compatible engine that stores and reuses KV
through a worker, and the kvtc calibration and per-layer sensitivity measured on the real model."""
