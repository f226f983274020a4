"""The `lmcached` command line: thin typer commands that forward to one function each.

Heavy modules (torch, numba, aiohttp, Textual) are imported inside the commands that need them, so
`lmcached --help` and the scripted operations start fast.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from lmcached import DEFAULT_INSTANCE_ID
from lmcached.errors import LmcachedError
from lmcached.wire.handshake import address_list, http_base

app = typer.Typer(
    name="lmcached",
    help="A KV-cache daemon for LLM serving: see where a prompt's KV cache lives; compress, pin, move and clear it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich help shows flags as `--copy <bool>`, which the parser then rejects.
    rich_markup_mode=None,
)

DEFAULT_CONTROLLER = "http://127.0.0.1:9000"
CPU_LOCATION = "LocalCPUBackend"

ControllerOpt = typer.Option(
    DEFAULT_CONTROLLER, "--controller", envvar="LMCACHED_CONTROLLER", help="The controller's HTTP API: http://HOST:PORT or HOST:PORT (port 9000 by default); a failover group's, comma-separated.",
)
TlsCertOpt = typer.Option(None, "--tls-cert", help="Serve this process's ports (HTTP API, worker/monitor port, data plane) over TLS with this certificate (PEM).")
TlsKeyOpt = typer.Option(None, "--tls-key", help="The --tls-cert certificate's key (PEM).")
TlsCaOpt = typer.Option(None, "--tls-ca", help="Dial lmcached's ports (controller, data planes) over TLS, verifying them against this CA file (PEM).")
PeersOpt = typer.Option(
    None, "--peers", help="The other controllers of a failover group, HTTP HOST:PORT, comma-separated: start as a standby."
)
FailoverOpt = typer.Option(None, "--failover-after", help="Seconds without an active controller before a standby takes over (default 3).")
TokenOpt = typer.Option(None, "--auth-token", envvar="LMCACHED_AUTH_TOKEN", help="Bearer token, when the daemon has one.")
TokensOpt = typer.Option(None, "--tokens", help="Token ids, comma-separated: 1,2,3.")
TokensFileOpt = typer.Option(None, "--tokens-file", help="A file of token ids: a JSON list, or ids separated by commas/spaces.")
InstanceOpt = typer.Option(DEFAULT_INSTANCE_ID, "--instance-id", help="The instance to act on.")
LocationOpt = typer.Option(CPU_LOCATION, "--location", help="LocalCPUBackend, LocalDiskBackend or RemoteBackend.")
RequireMatchOpt = typer.Option(
    False, "--require-match", help="Exit 3 when no chunk of these tokens is at the location (nothing matched, nothing done)."
)
#: The exit code of --require-match when nothing matched (1 is a failure, 2 a usage error).
NOTHING_MATCHED_EXIT = 3
MethodOpt = typer.Option(
    "cachegen", "--method", help="Codec: cachegen (lossy, default), kvtc (lossy, smaller: needs a codebook, see calibrate) or lossless."
)
LogFormatOpt = typer.Option("text", "--log-format", help="Log lines as text, or json (one object per line, to stderr).")
WaitOpt = typer.Option(True, "--wait/--no-wait", help="Wait for the operation to finish and exit non-zero if it fails.")
TimeoutOpt = typer.Option(300.0, "--timeout", help="Seconds to wait for the operation (with --wait).")
#: How often a waiting command asks /check_finish.
POLL_S = 0.1


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app()


def _print_version(value: bool) -> None:
    if value:
        from lmcached import __version__  # (the wheel's version is this one: pyproject reads it from there)

        typer.echo(f"lmcached {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """A KV-cache daemon for LLM serving: see where a prompt's KV cache lives; compress, pin, move and clear it."""


# ---------------------------------------------------------------------------------------------- daemons
def _load_config(config_file: Path | None, overrides: dict[str, Any]) -> Any:
    from lmcached.config import load_config
    from lmcached.errors import ConfigError

    try:
        return load_config(config_file, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)


def run_daemon(main: Callable[[Any], Awaitable[None]]) -> None:
    """Run a long-lived command until SIGINT/SIGTERM (a second signal exits at once); `main` gets the stop
    event. Failing to start (a port in use, bad storage) is one error line and exit code 1; a remote tier that
    is unreachable, refuses the password or is not Redis is one line and exit code 2."""
    import asyncio
    import logging
    import signal

    from lmcached.service import notify

    async def runner() -> None:
        stop = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            # Logged, not printed: with --log-format json these are JSON lines like every other.
            log = logging.getLogger("lmcached")
            if stop.is_set():
                log.warning("forced exit")
                os._exit(130)
            # The Ctrl-C hint is for a person at a terminal; a service manager's SIGTERM gets a plain line.
            interactive = sig == signal.SIGINT and sys.stdin is not None and sys.stdin.isatty()
            log.info("shutting down (press Ctrl-C again to force)" if interactive else "shutting down (%s)", *([] if interactive else [sig.name]))
            notify("STOPPING=1")
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await main(stop)

    from lmcached.worker.remote import RemoteError

    try:
        asyncio.run(runner())
    except OSError as exc:
        fail(f"cannot start: {exc}")
    except RemoteError as exc:  # a remote tier that cannot be used is a configuration problem: exit 2, like a bad key
        fail(f"cannot start: {exc}", 2)
    except LmcachedError as exc:
        fail(str(exc))


def _prepare_process(verbose: bool, log_format: str = "text") -> None:
    """Logging and allocator settings for the long-running commands."""
    from lmcached.logs import LOG_FORMATS, configure
    from lmcached.worker.memory import tune_allocator

    if log_format not in LOG_FORMATS:
        fail(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}", 2)
    tune_allocator()
    configure(verbose, log_format)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP controller port (default 9000)."),
    monitor_port: int | None = typer.Option(None, help="Worker/monitor TCP port (default 9001)."),
    worker_port: int | None = typer.Option(None, help="Data-plane port of the embedded instance (default 8001)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (LMCache's keys); also LMCACHE_CONFIG_FILE."),
    auth_token: str | None = typer.Option(None, "--auth-token", help="Require this token (also LMCACHED_AUTH_TOKEN)."),
    local_disk: str | None = typer.Option(None, "--local-disk", help="Directory for the embedded instance's disk backend."),
    engine: bool = typer.Option(False, "--engine", help="Also serve the SmolLM2 engine (port 8000) on the embedded instance."),
    engine_port: int = typer.Option(8000, "--engine-port", help="The engine's port, with --engine."),
    model: str | None = typer.Option(None, "--model", help="A local .gguf file or transformers directory, with --engine."),
    instance: bool = typer.Option(
        True, "--instance/--no-instance", help="Run the embedded default instance (--no-instance: instances register from elsewhere)."
    ),
    peers: str | None = PeersOpt,
    failover_after: float | None = FailoverOpt,
    tls_cert: str | None = TlsCertOpt,
    tls_key: str | None = TlsKeyOpt,
    tls_ca: str | None = TlsCaOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    log_format: str = LogFormatOpt,
) -> None:
    """Run the controller, the worker/monitor port and the embedded default instance (with --engine, the engine too)."""

    from lmcached.serve import run

    if engine and not instance:
        fail("--engine needs the embedded instance; drop --no-instance", 2)

    cfg = _load_config(
        config,
        {
            "host": host,
            "port": port,
            "monitor_port": monitor_port,
            "lmcache_worker_port": worker_port,
            "auth_token": auth_token,
            "local_disk": local_disk,
            "controller_peers": peers,
            "failover_after_s": failover_after,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
        },
    )
    _prepare_process(verbose, log_format)
    engine_options = {"port": engine_port, "model": model} if engine else None
    run_daemon(lambda stop: run(cfg, stop, engine_options, embedded=instance))


@app.command()
def controller(
    host: str | None = typer.Option(None, help="Address to bind (default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP controller port (default 9000)."),
    monitor_port: int | None = typer.Option(None, help="Worker/monitor TCP port (default 9001)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (LMCache's keys); also LMCACHE_CONFIG_FILE."),
    auth_token: str | None = typer.Option(None, "--auth-token", help="Require this token (also LMCACHED_AUTH_TOKEN)."),
    peers: str | None = PeersOpt,
    failover_after: float | None = FailoverOpt,
    tls_cert: str | None = TlsCertOpt,
    tls_key: str | None = TlsKeyOpt,
    tls_ca: str | None = TlsCaOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    log_format: str = LogFormatOpt,
) -> None:
    """Run only the controller (HTTP and the worker/monitor port), as LMCache's `lmcache_controller` does:
    the instances register from elsewhere (vLLM's LmcachedConnector, `lmcached worker`). Same as `serve --no-instance`."""
    from lmcached.serve import run

    cfg = _load_config(
        config,
        {
            "host": host,
            "port": port,
            "monitor_port": monitor_port,
            "auth_token": auth_token,
            "controller_peers": peers,
            "failover_after_s": failover_after,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
        },
    )
    _prepare_process(verbose, log_format)
    run_daemon(lambda stop: run(cfg, stop, None, embedded=False))


@app.command(name="engine")
def engine_command(
    model: str | None = typer.Option(
        None, "--model", help="A local .gguf file or transformers directory (default: SmolLM2-135M-Instruct)."
    ),
    worker: str | None = typer.Option("127.0.0.1:8001", "--worker", help="The lmcached data plane, HOST:PORT ('' to run without a cache)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    auth_token: str | None = typer.Option(None, "--auth-token", envvar="LMCACHED_AUTH_TOKEN"),
    kv_dtype: str = typer.Option("float16", "--kv-dtype", help="dtype the KV is offloaded in: float16, bfloat16 or float32."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    log_format: str = LogFormatOpt,
) -> None:
    """Serve an OpenAI-compatible engine whose prompt KV is offloaded to (and reused from) lmcached."""
    import asyncio

    if kv_dtype not in ("float16", "bfloat16", "float32"):
        fail(f"--kv-dtype must be float16, bfloat16 or float32, not {kv_dtype!r}", 2)
    _prepare_process(verbose, log_format)

    async def run(stop: Any) -> None:

        from lmcached.engine.model import load_model
        from lmcached.engine.server import run_engine

        loaded = await asyncio.get_running_loop().run_in_executor(None, load_model, model)
        await run_engine(loaded, host, port, worker or None, auth_token, stop, kv_dtype)

    run_daemon(run)


@app.command()
def calibrate(
    text: list[Path] = typer.Argument(..., help="Text files to run through the model (several kinds of text calibrate best)."),
    model: str | None = typer.Option(None, "--model", help="A local .gguf file or transformers directory (default: SmolLM2)."),
    worker: str = typer.Option(
        "127.0.0.1:8001", "--worker", help="Send the codebook to this worker's data plane, current for its shape ('' not to send it)."
    ),
    codebooks: Path | None = typer.Option(
        None, "--codebooks", help="Also write it into this codebook directory (a worker's <local_disk>/codebooks), as current."
    ),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Use at most this many tokens of the text."),
    kv_dtype: str = typer.Option("float16", "--kv-dtype", help="The dtype the engine offloads KV in: float16, bfloat16 or float32."),
    probes: int | None = typer.Option(
        None, "--probes", help="Windows on which to measure each layer's error cost, to set its step (default 6; 0: one step for all)."
    ),
    kl_budget: float | None = typer.Option(
        None, "--kl-budget", help="The steps' total cost: KL from the uncoded output, nats per token (default 0.006; less: finer)."
    ),
    auth_token: str | None = TokenOpt,
) -> None:
    """Learn a kvtc codebook for a model from text, and give it to a worker: its kvtc compressions use it from then on."""
    import asyncio

    import torch

    from lmcached.engine.calibrate import calibrate as fit_codebook
    from lmcached.engine.model import ModelError, load_model
    from lmcached.errors import LmcachedError

    if kv_dtype not in ("float16", "bfloat16", "float32"):
        fail(f"--kv-dtype must be float16, bfloat16 or float32, not {kv_dtype!r}", 2)
    if not worker and codebooks is None:
        fail("nowhere to put the codebook: give --worker HOST:PORT and/or --codebooks DIR", 2)
    if (probes is not None and probes < 0) or (kl_budget is not None and not kl_budget > 0):
        fail("--probes must be 0 or more and --kl-budget above 0", 2)
    try:
        texts = [path.read_text(errors="replace") for path in text]
    except OSError as exc:
        fail(f"cannot read {exc.filename}: {exc.strerror}", 2)
    try:
        typer.echo("loading the model …", err=True)
        loaded = load_model(model)
        typer.echo(
            f"running up to {max_tokens} tokens of {len(texts)} file(s) through {loaded.name}, then measuring each layer's "
            f"cost on a few windows ({2 * loaded.num_layers} passes each) …",
            err=True,
        )
        result = fit_codebook(
            loaded,
            texts,
            max_tokens,
            getattr(torch, kv_dtype),
            probes,
            kl_budget,
            on_probe=lambda done, of: typer.echo(f"layer costs measured on window {done} of {of}", err=True),
        )
    except (ModelError, LmcachedError) as exc:
        fail(str(exc))
    book = result.codebook
    where = []
    if codebooks is not None:
        from lmcached.worker.codebooks import Codebooks

        Codebooks(codebooks).install(book)
        where.append(f"written to {codebooks}")
    if worker:
        from lmcached.client import AsyncKVClient
        from lmcached.wire.tls import CLI_CA_ENV, cli_context

        tls = cli_context() if os.environ.get(CLI_CA_ENV) else None  # a worker whose data plane speaks TLS

        async def send() -> None:
            async with AsyncKVClient(worker, auth_token=auth_token, ssl_context=tls) as client:
                await client.put_codebook(book.digest, book.to_bytes(), current=True)

        try:
            asyncio.run(send())
        except (LmcachedError, OSError) as exc:
            fail(f"could not send the codebook to the worker at {worker}: {exc}")
        where.append(f"current at the worker {worker}")
    steps = (
        f"layer steps for a KL budget of {result.kl_budget:g} from {result.probed} probed windows"
        if result.probed
        else "one step for every layer (no window was probed: --probes 0, or no full 512-token window)"
    )
    typer.echo(
        f"kvtc codebook {book.digest} for {book.layers} layers × {book.channels} channels, "
        f"from {result.tokens} tokens in {result.windows} windows, {steps}; {' and '.join(where)}"
    )


@app.command(name="model-dir")
def model_dir() -> None:
    """Print the directory of the default model (SmolLM2) as transformers and vLLM load it, converting it first if needed."""
    from lmcached.engine.model import ModelError, converted_dir, default_gguf

    try:
        typer.echo(str(converted_dir(default_gguf())))
    except ModelError as exc:
        fail(str(exc))


@app.command()
def worker(
    instance_id: str | None = typer.Option(None, "--instance-id", help="Instance this worker serves."),
    controller: str | None = typer.Option(None, "--controller", help="Controller's worker port, HOST:PORT (default localhost:9001); a failover group's, comma-separated."),
    host: str | None = typer.Option(None, help="Address the data plane binds."),
    port: int | None = typer.Option(None, "--port", help="Data-plane port (default 8001)."),
    local_disk: str | None = typer.Option(None, "--local-disk", help="Directory for the disk backend."),
    tp_rank: int | None = typer.Option(None, "--tp-rank", help="Hold this tensor-parallel rank's part of every chunk (with --tp-size)."),
    tp_size: int | None = typer.Option(None, "--tp-size", help="The engines' tensor-parallel size (one worker per rank, one instance)."),
    config: Path | None = typer.Option(None, "--config"),
    auth_token: str | None = typer.Option(None, "--auth-token"),
    tls_cert: str | None = TlsCertOpt,
    tls_key: str | None = TlsKeyOpt,
    tls_ca: str | None = TlsCaOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    log_format: str = LogFormatOpt,
) -> None:
    """Run a worker alone that dials a controller (reconnecting with backoff). For tensor-parallel engines
    sharing workers, run one per rank (`--tp-rank R --tp-size N`, the same --instance-id) and name them all, in
    rank order, in the engines' `lmcached_worker`."""

    from lmcached.service import notify
    from lmcached.wire.chunks import WHOLE, Shard
    from lmcached.worker.instance import Worker

    if (tp_rank is None) != (tp_size is None):
        fail("give both --tp-rank and --tp-size, or neither", 2)
    try:
        shard = WHOLE if tp_size is None else Shard(tp_rank, tp_size)  # type: ignore[arg-type]
    except LmcachedError as exc:
        fail(str(exc), 2)

    cfg = _load_config(
        config,
        {
            "lmcache_instance_id": instance_id,
            "controller_url": controller,
            "host": host,
            "lmcache_worker_port": port,
            "local_disk": local_disk,
            "auth_token": auth_token,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
        },
    )
    _prepare_process(verbose, log_format)

    async def run(stop: Any) -> None:
        w = Worker(cfg, shard=shard)
        await w.start()
        ready = {"instance_id": w.instance_id, "worker_id": w.worker_id, "data": w.data_port}
        if shard.world > 1:
            ready |= {"tp_rank": shard.rank, "tp_size": shard.world}
        print("lmcached worker ready " + json.dumps(ready), flush=True)
        notify("READY=1", f"STATUS=worker {w.worker_id} of {w.instance_id}, data plane on {w.data_port}")
        try:
            await stop.wait()
        finally:
            await w.stop()

    run_daemon(run)


# ---------------------------------------------------------------------------------------------- operations
def _tokens(tokens: str | None, tokens_file: Path | None) -> list[int]:
    if (tokens is None) == (tokens_file is None):
        fail("give exactly one of --tokens or --tokens-file", 2)
    text = tokens if tokens is not None else _read(tokens_file)  # type: ignore[arg-type]
    text = text.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
        else:
            values = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        fail(f"token ids must be integers: {exc}", 2)
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        fail("token ids must be a list of integers", 2)
    if not values:
        fail("the token list is empty: give at least one token id", 2)
    return values


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)


class _NotThere(Exception):
    """This controller cannot answer (unreachable, or a standby): the next one of the list may."""


def call(controller: str, path: str, body: dict[str, Any] | None, token: str | None) -> dict[str, Any]:
    """POST (or GET when body is None) to the controller — the first of a comma-separated list that is up and
    active; print nothing, raise nothing: fail() on errors."""
    reasons = []
    for address in address_list(controller) or [controller]:
        try:
            return _call_one(http_base(address), path, body, token)
        except _NotThere as exc:
            reasons.append(str(exc))
    if len(reasons) == 1:
        fail(reasons[0])
    fail("no active controller answered: " + "; ".join(reasons))


def _call_one(controller: str, path: str, body: dict[str, Any] | None, token: str | None) -> dict[str, Any]:
    import http.client

    url = controller + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    from lmcached.wire.tls import cli_context

    tls = cli_context() if controller.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=60, context=tls) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        if exc.code == 503 and exc.headers.get("X-Lmcached-Standby") is not None:
            raise _NotThere(f"{controller}: {detail}") from None
        fail(f"{exc.code}: {detail}")
    except (http.client.HTTPException, ValueError) as exc:  # something answered, but not in HTTP (or not JSON)
        _fail_if_tls_mismatch(controller)
        spoke = "lmcached's worker protocol" if "LMKV" in str(exc) else "something other than the controller's HTTP API"
        fail(
            f"{controller} answered in {spoke}: is that a worker port (9001) or a data port (8001)? "
            "--controller takes the controller's HTTP API, http://HOST:9000 by default"
        )
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail_if_tls_mismatch(controller, reason)
        raise _NotThere(f"cannot reach the controller at {controller}: {reason}") from None


def _fail_if_tls_mismatch(controller: str, reason: object = None) -> None:
    """One clear line when the client and the controller disagree on TLS (http:// to a TLS port, or https://
    to a plain one), instead of the protocol error each side sees."""
    from lmcached.wire.handshake import parse_address
    from lmcached.wire.tls import plain_server, plain_to_tls, speaks_tls, tls_to_plain

    if controller.startswith("https://"):
        if plain_server(reason):
            fail(tls_to_plain(controller))
        return
    host, port = parse_address(controller, 9000)
    if speaks_tls(host, port):
        fail(plain_to_tls(controller))


def _print(answer: dict[str, Any]) -> None:
    typer.echo(json.dumps(answer, indent=2))


@app.command()
def lookup(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
) -> None:
    """Which instances hold a prefix of these tokens, where, and how long."""
    _print(call(controller, "/lookup", {"tokens": _tokens(tokens, tokens_file)}, auth_token))


def run_operation(
    path: str, body: dict[str, Any], controller: str, auth_token: str | None, wait: bool, timeout: float, require_match: bool = False
) -> None:
    """Start an operation; with `wait`, follow its event until it ends: print the final event, exit 1 with
    the event's error when it failed, or when it is still running after `timeout` seconds. When no chunk
    matched, a note says so, and `require_match` makes that exit NOTHING_MATCHED_EXIT."""
    started = call(controller, path, body, auth_token)
    if not wait:
        _print(started)
        if started.get("num_tokens") == 0:
            _nothing_matched("nothing matched: no chunk of these tokens is at that location, so nothing will be done", require_match)
        return
    event = wait_for_event(controller, started["event_id"], auth_token, timeout)
    if event["status"] == "failed":
        fail(f"{event['op']} failed: {event.get('error')} (event {event['event_id']})")
    if event["status"] != "finished":
        fail(f"{event['op']} still {event['status']} after {timeout:.0f}s; follow it with: lmcached status {event['event_id']}")
    _print(event)
    result = event.get("result") or {}
    if result.get("matched") is False:
        _nothing_matched(result["message"], require_match)
    elif result.get("message"):
        typer.echo(f"note: {result['message']}", err=True)


def _nothing_matched(message: str, require_match: bool) -> None:
    typer.echo(f"note: {message}", err=True)
    if require_match:
        raise typer.Exit(NOTHING_MATCHED_EXIT)


def wait_for_event(controller: str, event_id: str, auth_token: str | None, timeout: float) -> dict[str, Any]:
    """Poll /check_finish until the event ends or `timeout` passes; a spinner on a terminal shows it is alive."""
    import itertools
    import time

    spinner = itertools.cycle("|/-\\") if sys.stderr.isatty() else None
    deadline = time.monotonic() + timeout
    try:
        while True:
            event = call(controller, "/check_finish", {"event_id": event_id}, auth_token)
            if event["status"] in ("finished", "failed") or time.monotonic() >= deadline:
                return event
            if spinner is not None:
                progress = event.get("progress")
                so_far = f" {progress['done']}/{progress['total']} chunks" if progress else ""
                sys.stderr.write(f"\r{next(spinner)} {event['op']} {event['status']}{so_far}… ")
                sys.stderr.flush()
            time.sleep(POLL_S)
    finally:
        if spinner is not None:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _on_prefix(
    op: str,
    tokens: str | None,
    tokens_file: Path | None,
    instance_id: str,
    location: str,
    controller: str,
    auth_token: str | None,
    wait: bool,
    timeout: float,
    method: str | None = None,
    quality: int | None = None,
    require_match: bool = False,
    force: bool = False,
) -> None:
    body: dict[str, Any] = {"instance_id": instance_id, "location": location, "tokens": _tokens(tokens, tokens_file)}
    if method is not None:
        body["method"] = method
    if quality is not None:
        body["quality"] = quality
    if force:
        body["allow_lossy_again"] = True
    run_operation(f"/{op}", body, controller, auth_token, wait, timeout, require_match)


@app.command()
def compress(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    method: str = MethodOpt,
    quality: int | None = typer.Option(
        None, "--quality", min=1, max=9, help="cachegen only: 1 (smallest) to 9 (closest to the original); default 5."
    ),
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
    force: bool = typer.Option(
        False, "--force", help="Also compress values a lossy codec already rounded (decompressed chunks): the losses stack."
    ),
) -> None:
    """Compress the cached prefix of these tokens (keeps the raw bytes until the compressed ones are whole).
    Chunks whose values already went through a lossy codec are skipped with a note unless --force."""
    _on_prefix("compress", tokens, tokens_file, instance_id, location, controller, auth_token, wait, timeout, method, quality, require_match, force)


@app.command()
def decompress(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    method: str = MethodOpt,
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
) -> None:
    """Decompress the cached prefix of these tokens back to raw KV: the raw KV of the compressed values, not the
    original (a lossy codec's loss stays; decompress is not an undo)."""
    _on_prefix("decompress", tokens, tokens_file, instance_id, location, controller, auth_token, wait, timeout, method, None, require_match)


@app.command()
def pin(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
) -> None:
    """Pin the cached prefix of these tokens: never evicted until unpinned."""
    _on_prefix("pin", tokens, tokens_file, instance_id, location, controller, auth_token, wait, timeout, require_match=require_match)


@app.command()
def unpin(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
) -> None:
    """Unpin the cached prefix of these tokens."""
    _on_prefix("unpin", tokens, tokens_file, instance_id, location, controller, auth_token, wait, timeout, require_match=require_match)


@app.command()
def clear(
    tokens: str | None = typer.Option(None, "--tokens", help="Token ids; omit to clear the whole location."),
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
) -> None:
    """Clear a prompt's chunks (or, without tokens, everything) at a location."""
    body: dict[str, Any] = {"instance_id": instance_id, "location": location}
    if tokens is not None or tokens_file is not None:
        body["tokens"] = _tokens(tokens, tokens_file)
    run_operation("/clear", body, controller, auth_token, wait, timeout, require_match)


@app.command()
def move(
    tokens: str | None = TokensOpt,
    tokens_file: Path | None = TokensFileOpt,
    instance_id: str = InstanceOpt,
    location: str = LocationOpt,
    to_instance: str | None = typer.Option(None, "--to-instance", help="Target instance (default: the same)."),
    to_location: str = typer.Option(..., "--to-location", help="Target location."),
    copy: bool = typer.Option(False, "--copy/--no-copy", help="Keep the source chunks (copy instead of move)."),
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
    wait: bool = WaitOpt,
    timeout: float = TimeoutOpt,
    require_match: bool = RequireMatchOpt,
) -> None:
    """Move (or copy) a prompt's chunks to another location or instance."""
    body = {
        "old_position": [instance_id, location],
        "new_position": [to_instance or instance_id, to_location],
        "tokens": _tokens(tokens, tokens_file),
        "copy": copy,
    }
    run_operation("/move", body, controller, auth_token, wait, timeout, require_match)


@app.command()
def health(instance_id: str = InstanceOpt, controller: str = ControllerOpt, auth_token: str | None = TokenOpt) -> None:
    """Ask every worker of an instance whether it answers (0 = healthy)."""
    answer = call(controller, "/health", {"instance_id": instance_id}, auth_token)
    _print(answer)
    if any(code != 0 for code in answer.get("error_codes", {}).values()):
        raise typer.Exit(1)


@app.command()
def status(
    event_id: str = typer.Argument(..., help="The event_id an operation returned."),
    controller: str = ControllerOpt,
    auth_token: str | None = TokenOpt,
) -> None:
    """The status of an operation (/check_finish): pending, running, finished or failed."""
    answer = call(controller, "/check_finish", {"event_id": event_id}, auth_token)
    _print(answer)
    if answer.get("status") == "failed":
        raise typer.Exit(1)


@app.command()
def role(controller: str = ControllerOpt, auth_token: str | None = TokenOpt) -> None:
    """Each controller's place in its failover group (active or standby, and which one is active), by address."""
    answers: dict[str, Any] = {}
    for address in address_list(controller) or [controller]:
        base = http_base(address)
        try:
            answers[base] = _call_one(base, "/role", None, auth_token)
        except _NotThere as exc:
            answers[base] = {"error": str(exc)}
    _print(answers)
    if all("error" in answer for answer in answers.values()):
        raise typer.Exit(1)


@app.command()
def instances(controller: str = ControllerOpt, auth_token: str | None = TokenOpt) -> None:
    """Every instance with its workers and, per location, chunks, tokens and bytes."""
    _print(call(controller, "/instances", None, auth_token))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


BENCH_KINDS = ("dataplane", "index", "codec", "engine", "remote", "vllm", "workload", "sizing", "all")


@app.command()
def bench(
    kind: str = typer.Argument(
        "all",
        help="dataplane, index, codec, engine, remote (needs redis-server), vllm (needs the vllm extra), workload (multi-round chat through vLLM, its prefix cache on; needs the vllm extra), sizing (bytes per token in each tier) or all (all but remote, vllm, workload and sizing).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    plot: Path | None = typer.Option(None, "--plot", help="Write plots to this PNG file."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes, fewer repeats (a smoke run)."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Also write the results as a Markdown table to this file."),
    curve: bool = typer.Option(
        False, "--curve", help="codec: also the rate–quality curve of every method and setting on held-out text (table and plot)."
    ),
    kv_share: float | None = typer.Option(
        None,
        "--kv-share",
        help="workload: vLLM's KV capacity as a share of the working set (default 0.33, so vLLM evicts; 1.5: everything fits).",
    ),
    servers: int = typer.Option(
        1, "--servers", help="workload: 2 compares two vLLM servers alone with two sharing one lmcached worker, rounds alternating."
    ),
    soak: float | None = typer.Option(
        None, "--soak", help="workload: instead, this many minutes of chat on vLLM hosting lmcached: failures, TTFT drift, RSS, queues."
    ),
    docs: bool = typer.Option(False, "--docs", help="workload: long-document QA (documents each asked several questions) instead of chat."),
    tiers: bool = typer.Option(
        False,
        "--tiers",
        help="workload: vLLM alone against vLLM beside an lmcached worker whose RAM holds half the working set, disk and Redis behind.",
    ),
) -> None:
    """Measure lmcached beside its baselines in the same run and print the figures."""
    if kind not in BENCH_KINDS:
        fail(f"unknown benchmark {kind!r}; choose one of {', '.join(BENCH_KINDS)}", 2)
    if curve and kind not in ("codec", "all"):
        fail("--curve belongs to the codec benchmark: lmcached bench codec --curve", 2)
    if kv_share is not None and kind != "workload":
        fail("--kv-share belongs to the workload benchmark: lmcached bench workload --kv-share 1.5", 2)
    if servers != 1 and kind != "workload":
        fail("--servers belongs to the workload benchmark: lmcached bench workload --servers 2", 2)
    if soak is not None and kind != "workload":
        fail("--soak belongs to the workload benchmark: lmcached bench workload --soak 30", 2)
    for flag, given in (("--docs", docs), ("--tiers", tiers)):
        if given and kind != "workload":
            fail(f"{flag} belongs to the workload benchmark: lmcached bench workload {flag}", 2)
        if given and soak is not None:
            fail(f"{flag} and --soak: the soak runs chat on vLLM hosting lmcached; run them apart", 2)
    if tiers and servers != 1:
        fail("--tiers and --servers 2: the tiers run has one vLLM server; run them apart", 2)
    if soak is not None and not 0 < soak <= 24 * 60:
        fail(f"--soak {soak}: give the soak's length in minutes (0 < minutes <= 1440)", 2)
    if servers not in (1, 2):
        fail(f"--servers {servers}: the workload benchmark compares one server or two", 2)
    if kv_share is not None and not 0 < kv_share <= 10:
        fail(f"--kv-share {kv_share} is not a share of the working set (0 < share <= 10)", 2)
    if kind in ("vllm", "workload"):
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            fail(f"bench {kind} needs vLLM: pip install 'lmcached[vllm]' (the CPU build) or vllm itself", 2)
    from lmcached.bench import run_benchmarks
    from lmcached.worker.memory import tune_allocator

    tune_allocator()
    report = run_benchmarks(kind, quick, curve=curve, kv_share=kv_share, servers=servers, soak=soak, docs=docs, tiers=tiers)
    if as_json:
        typer.echo(report.as_json())
    else:
        report.print_table()
    if plot is not None:
        report.plot(plot)
        typer.echo(f"plot written to {plot}", err=True)
    if markdown is not None:
        markdown.write_text(report.markdown())


@app.command()
def tui(
    monitor: str = typer.Option("127.0.0.1:9001", "--monitor", help="The daemon's monitor port, HOST:PORT; a failover group's, comma-separated."),
    auth_token: str | None = typer.Option(None, "--auth-token", envvar="LMCACHED_AUTH_TOKEN"),
    method: str = typer.Option("cachegen", "--method", help="Codec the compress action uses."),
    tls_ca: str | None = typer.Option(None, "--tls-ca", envvar="LMCACHED_TLS_CA", help="Dial a TLS controller, verifying it against this CA file."),
) -> None:
    """Watch instances, chunks and live events in a terminal UI; compress, pin and clear from the keyboard."""
    from lmcached.tui import run

    run(monitor, auth_token, method, tls_ca)
