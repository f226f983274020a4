"""The control plane: the controller's HTTP API, the control port workers and monitors dial, the chunk index,
operation events, Prometheus metrics, controller failover, and the monitor client the TUI and the CLI use.
Knows workers only by what they report over the wire; never imports the worker's code."""
