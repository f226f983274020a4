"""The HTTP controller (port 9000): LMCache's orchestration API with real event status and 4xx errors."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from lmcached import __version__
from lmcached.config import Config
from lmcached.control.events import Event, EventLog
from lmcached.control.failover import Role
from lmcached.control.hub import Hub, OnProgress
from lmcached.control.index import ChunkIndex, WorkerKey
from lmcached.control.lmcache_port import LMCacheFleetPort, with_lmcache_instances
from lmcached.control.metrics import Metrics
from lmcached.errors import InvalidRequest, LmcachedError, NotFound, WorkerUnavailable
from lmcached.wire import fields
from lmcached.wire.chunks import chunk_spans
from lmcached.wire.handshake import address_list
from lmcached.wire.http_logging import quiet_malformed_requests
from lmcached.wire.tls import dial_context

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: One command for one worker: (worker, op, args, timeout in seconds).
Call = tuple[WorkerKey, str, dict[str, Any], float]
#: A compress or decompress gets this much time per chunk on top of command_timeout.
PER_CHUNK_TIMEOUT_S = 0.5
HEALTH_TIMEOUT_S = 5.0
#: Result fields that count chunks (or their tokens): on a tensor-parallel instance each rank counts its parts.
PER_CHUNK_COUNTS = ("num_tokens", "chunks")
#: Operations that re-encode chunks: on a tensor-parallel instance they stage on every rank, then commit.
STAGED_OPS = ("compress", "decompress")
#: Each one undoes the other (a pin that failed on one rank of a tensor-parallel instance, on the others).
PIN_OPS = ("pin", "unpin")
#: What a standby controller still answers (everything else is a 503 naming the active one).
STANDBY_PATHS = frozenset({"/", "/role", "/metrics"})
#: A monitor's snapshot lists at most this many of the newest chunks per worker and location.
MONITOR_CHUNKS = 5000


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, detail: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"detail": detail, "status": status}
    if field:
        body["field"] = field
    return json_response(body, status)


def merge_results(results: list[dict[str, Any]], world: int = 1) -> dict[str, Any]:
    """One result from each worker's: numbers add up, `skipped` counts add up per reason, and a `message`
    says in words what was skipped (so "num_tokens: 0" never leaves a user guessing why). The workers of a
    tensor-parallel instance (`world` > 1) act on `world` parts of each chunk: tokens and chunks count chunks
    (parts / world), a chunk skipped on several ranks is one skipped chunk; bytes add up."""
    merged: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for result in results:
        for name, value in result.items():
            if name == "skipped" and isinstance(value, dict):
                for reason, n in value.items():
                    skipped[reason] = max(skipped.get(reason, 0), int(n)) if world > 1 else skipped.get(reason, 0) + int(n)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[name] = merged.get(name, 0) + value
            else:
                merged[name] = value
    for name in PER_CHUNK_COUNTS if world > 1 else ():
        if name in merged:
            merged[name] //= world
    if skipped:
        merged["skipped"] = skipped
        merged["message"] = "; ".join(f"{reason}: {n} chunk{'s' if n != 1 else ''} skipped" for reason, n in sorted(skipped.items()))
    return merged


class Controller:
    """The orchestration API over the index and the hub's worker sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.index = ChunkIndex()
        self.events = EventLog()
        self.hub = Hub(config, self.index, self.snapshot)
        #: LMCache engines' workers reporting here (lmcache_pull_port), or None.
        self.lmcache_port = (
            LMCacheFleetPort(config, self.index, self.hub.publish, self.hub.announce_report)
            if config.lmcache_pull_port is not None
            else None
        )
        self.hub.monitor_command = self.monitor_command
        peers = address_list(config.controller_peers or "")
        peers_tls = dial_context(config) if config.tls_cert else None
        self.role = Role(peers, config.failover_after_s, config.auth_token, lambda: self.hub.drop_all("controller stepped down"), peers_tls)
        self.hub.refusal = lambda: None if self.role.active else self.role.standby_detail()
        self.metrics = Metrics(self.index, self.role)
        self._tasks: set[asyncio.Task[None]] = set()
        from lmcached.codecs import available_codecs

        self.methods = available_codecs()

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        quiet_malformed_requests()
        app = web.Application(client_max_size=self.config.max_request_bytes, middlewares=[self._errors, self._auth, self._standby])
        routes = {
            "/lookup": self.lookup,
            "/compress": self.compress,
            "/decompress": self.decompress,
            "/pin": self.pin,
            "/unpin": self.unpin,
            "/clear": self.clear,
            "/move": self.move,
            "/health": self.health,
            "/check_finish": self.check_finish,
            "/query_worker_info": self.query_worker_info,
            "/query_instance": self.query_instance,
        }
        for path, handler in routes.items():
            app.router.add_post(path, handler)
        app.router.add_get("/instances", self.instances)
        # LMCache's read-only dashboard endpoints.
        app.router.add_get("/controller/workers", self.controller_workers)
        app.router.add_get("/controller/key-stats", self.key_stats)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/", self.root)
        app.router.add_get("/role", self.role_info)
        return app

    @web.middleware
    async def _standby(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A standby answers only what says what it is (/, /role, /metrics): 503 for the rest, naming the active
        controller, so a client given the group's addresses moves on to it."""
        if self.role.active or request.path in STANDBY_PATHS:
            return await handler(request)
        response = error_response(503, self.role.standby_detail())
        response.headers["X-Lmcached-Standby"] = self.role.active_peer or ""
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self.config.auth_token
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error_response(401, "missing or wrong 'Authorization: Bearer <token>' header")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure leaves as JSON with a `detail`; only a bug is a 500 (and is logged as one)."""
        started = time.perf_counter()
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            response = await handler(request)
        except LmcachedError as exc:
            response = error_response(exc.http_status, str(exc), getattr(exc, "field", None))
        except web.HTTPException as exc:
            if exc.status == 413:
                detail = f"request body exceeds the limit of {self.config.max_request_bytes} bytes"
            else:
                detail = exc.reason
            response = error_response(exc.status, detail)
        except Exception:
            log.exception("bug: unhandled error on %s", request.path)
            response = error_response(500, "internal error (a bug; see the daemon's log)")
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    # ------------------------------------------------------------------ helpers
    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        return fields.parse_body(await request.read())

    def _spans(self, body: dict[str, Any]) -> list[Any]:
        """The request's chunks; an optional `cache_salt` (vLLM's per-tenant salt) keys them as the engine did."""
        salt = fields.string(body, "cache_salt") if body.get("cache_salt") is not None else None
        return chunk_spans(fields.tokens(body), self.config.chunk_size, salt=salt)

    def _launch(self, event: Event, calls: list[Call], world: int = 1) -> None:
        """Run worker commands in the background; the event tells how they went."""

        by_call: dict[int, tuple[int, int]] = {}

        def progressed(call: int) -> OnProgress:
            def note(done: int, total: int) -> None:
                by_call[call] = (done, total)
                event.progress = {"done": sum(d for d, _ in by_call.values()), "total": sum(t for _, t in by_call.values())}

            return note

        async def run() -> None:
            self.events.start(event)
            try:
                if world > 1 and event.op in STAGED_OPS:
                    result = await self._on_every_rank_staged(event, calls, progressed, world)
                elif world > 1 and event.op == "move":
                    result = await self._move_every_rank(calls, progressed, world)
                elif world > 1 and event.op in PIN_OPS:
                    result = await self._pin_every_rank(event.op, calls, progressed, world)
                elif world > 1 and event.op == "clear":
                    result = await self._clear_every_rank(calls, progressed, world)
                else:
                    results = await asyncio.gather(*(self._command(call, progressed(n)) for n, call in enumerate(calls)))
                    result = merge_results(results, world)
                result.pop("changed_keys", None)  # the workers' own bookkeeping (see _pin_every_rank)
            except LmcachedError as exc:
                self.events.fail(event, str(exc))
            else:
                self.events.finish(event, result)
            self.metrics.operations.labels(event.op, event.status).inc()
            self.hub.publish("operation", **event.as_dict())

        task = asyncio.create_task(run(), name=f"event-{event.event_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _command(self, call: Call, on_progress: OnProgress | None = None) -> dict[str, Any]:
        key, op, args, timeout = call
        return await self.hub.session(key).command(op, args, timeout, on_progress)

    async def _each(self, calls: list[Call], progressed: Callable[[int], OnProgress] | None = None) -> list[dict[str, Any] | LmcachedError]:
        """Every call's result, or the LmcachedError it failed with (a bug's exception still propagates)."""
        outcomes = await asyncio.gather(
            *(self._command(call, progressed(n) if progressed else None) for n, call in enumerate(calls)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, LmcachedError):
                raise outcome
        return outcomes  # type: ignore[return-value]

    def _rank_of(self, key: WorkerKey) -> str:
        record = self.index.workers.get(key)
        return f"rank {record.rank} (worker {key[1]})" if record is not None else f"worker {key[1]}"

    async def _on_every_rank_staged(
        self, event: Event, calls: list[Call], progressed: Callable[[int], OnProgress], world: int
    ) -> dict[str, Any]:
        """A compress or decompress of a tensor-parallel instance: every rank re-encodes its parts and keeps
        them aside; only when all have does each swap them in. When one rank fails, the others drop theirs:
        no prefix is ever left compressed on some ranks and not on others."""
        stage = {"stage": event.event_id}
        outcomes = await self._each([(key, op, args | stage, timeout) for key, op, args, timeout in calls], progressed)
        failed = [(call[0], outcome) for call, outcome in zip(calls, outcomes, strict=True) if isinstance(outcome, LmcachedError)]
        if failed:
            await self._each([(key, "abort", stage, self.config.command_timeout) for key, *_ in calls])
            key, error = failed[0]
            raise LmcachedError(f"{self._rank_of(key)} failed: {error}; no rank's chunks were changed")
        commits = await self._each([(key, "commit", stage, timeout) for key, _, _, timeout in calls])
        broken = [(call[0], outcome) for call, outcome in zip(calls, commits, strict=True) if isinstance(outcome, LmcachedError)]
        if broken:  # only a rank lost between its two phases: its parts stay as they were
            key, error = broken[0]
            committed = f"{len(calls) - len(broken)} of {len(calls)}"
            raise LmcachedError(f"{event.op} was committed on {committed} ranks; {self._rank_of(key)} failed: {error}")
        return merge_results(commits, world)  # type: ignore[arg-type]

    async def _pin_every_rank(self, op: str, calls: list[Call], progressed: Callable[[int], OnProgress], world: int) -> dict[str, Any]:
        """A pin or unpin of a tensor-parallel instance: when one rank fails, the others flip back what they
        flipped, so a chunk's parts are never pinned on some ranks and not on others."""
        outcomes = await self._each(calls, progressed)
        failed = [(call[0], outcome) for call, outcome in zip(calls, outcomes, strict=True) if isinstance(outcome, LmcachedError)]
        if failed:
            undo = PIN_OPS[1 - PIN_OPS.index(op)]
            flipped = [(call, outcome) for call, outcome in zip(calls, outcomes, strict=True) if isinstance(outcome, dict)]
            await self._each([(key, undo, args | {"keys": done["changed_keys"]}, timeout) for (key, _, args, timeout), done in flipped])
            key, error = failed[0]
            raise LmcachedError(f"{self._rank_of(key)} failed: {error}; no rank's pins were changed")
        return merge_results(outcomes, world)  # type: ignore[arg-type]

    async def _clear_every_rank(self, calls: list[Call], progressed: Callable[[int], OnProgress], world: int) -> dict[str, Any]:
        """A clear of a tensor-parallel instance. Removed bytes cannot be put back, so a rank that fails leaves
        the others' parts removed: the error says so (the chunk no longer counts as cached; clear again)."""
        outcomes = await self._each(calls, progressed)
        failed = [(call[0], outcome) for call, outcome in zip(calls, outcomes, strict=True) if isinstance(outcome, LmcachedError)]
        if failed:
            key, error = failed[0]
            cleared = len(calls) - len(failed)
            raise LmcachedError(f"{self._rank_of(key)} failed: {error}; {cleared} of {len(calls)} ranks removed their parts: clear again")
        return merge_results(outcomes, world)  # type: ignore[arg-type]

    async def _move_every_rank(self, calls: list[Call], progressed: Callable[[int], OnProgress], world: int) -> dict[str, Any]:
        """A move of a tensor-parallel instance's chunks: every rank copies its parts to the same rank of the
        target first; the sources are cleared only when every copy landed, and a failed copy takes the others'
        copies back: the chunks end up whole at one place or the other."""
        had = {call[0]: self._held_at_target(call) for call in calls}  # what a failed move must not take back
        copies = await self._each([(key, op, args | {"copy": True}, timeout) for key, op, args, timeout in calls], progressed)
        failed = [(call, outcome) for call, outcome in zip(calls, copies, strict=True) if isinstance(outcome, LmcachedError)]
        if failed:
            copied = [call for call, outcome in zip(calls, copies, strict=True) if not isinstance(outcome, LmcachedError)]
            undo = [self._undo_copy(call, had[call[0]]) for call in copied]
            await self._each(undo)
            call, error = failed[0]
            raise LmcachedError(f"{self._rank_of(call[0])} failed: {error}; nothing was moved")
        if not calls[0][2].get("copy", False):
            clears = [(key, "clear", {"location": args["location"], "keys": args["keys"]}, timeout) for key, _, args, timeout in calls]
            cleared = await self._each(clears)
            left = [(call, outcome) for call, outcome in zip(calls, cleared, strict=True) if isinstance(outcome, LmcachedError)]
            if left:
                call, error = left[0]
                raise LmcachedError(f"copied on every rank, but clearing the source on {self._rank_of(call[0])} failed: {error}")
        return merge_results(copies, world)  # type: ignore[arg-type]

    def _target_of(self, call: Call) -> WorkerKey:
        key, _, args, _ = call
        address = args.get("target_address")
        return key if address is None else next(r.key for r in self.index.workers.values() if r.data_address == address)

    def _held_at_target(self, call: Call) -> set[int]:
        record = self.index.workers.get(self._target_of(call))
        return set(record.locations.get(call[2]["target_location"], {})) if record is not None else set()

    def _undo_copy(self, call: Call, had: set[int]) -> Call:
        """The clear that removes what one rank's move copied to its target (not what the target held before)."""
        _, _, args, timeout = call
        keys = [k for k in args["keys"] if k not in had]
        return (self._target_of(call), "clear", {"location": args["target_location"], "keys": keys}, timeout)

    def _schedule(self, op: str, instance_id: str, location: str, num_tokens: int, calls: list[Call], whole: bool = False) -> Event:
        event = self.events.create(op, instance_id, num_tokens)
        if calls:
            self._launch(event, calls, self.index.world_size(instance_id))
        else:  # nothing cached: nothing to do, and the event says so at once, in words
            what = "no chunk" if whole else "no chunk of these tokens"
            message = f"nothing matched: {what} is at {location} of {instance_id}, so nothing was done"
            self.events.finish(event, {"num_tokens": 0, "chunks": 0, "matched": False, "message": message})
            self.metrics.operations.labels(op, "finished").inc()
        return event

    def _scheduled(self, op: str, instance_id: str, location: str, num_tokens: int, calls: list[Call], whole: bool = False) -> web.Response:
        event = self._schedule(op, instance_id, location, num_tokens, calls, whole)
        return json_response({"event_id": event.event_id, "num_tokens": num_tokens})

    def _timeout(self, keys: list[int]) -> float:
        return self.config.command_timeout + PER_CHUNK_TIMEOUT_S * len(keys)

    async def _on_prefix(self, request: web.Request, op: str, extra: Callable[[dict[str, Any]], dict[str, Any]]) -> web.Response:
        body = await self._body(request)
        instance_id = fields.string(body, "instance_id")
        location = fields.location(body)
        args_extra = extra(body)
        spans = self._spans(body)
        self.index.check_location(instance_id, location)  # 404 for an unknown instance or tier, before anything happens
        num_tokens, by_worker = self.index.prefix(instance_id, location, spans)
        calls = [(key, op, {"location": location, "keys": keys, **args_extra}, self._timeout(keys)) for key, keys in by_worker.items()]
        return self._scheduled(op, instance_id, location, num_tokens, calls)

    # ------------------------------------------------------------------ endpoints
    async def root(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "service": "lmcached",
                "version": __version__,
                "role": self.role.state,
                "methods": self.methods,
                "instances": self.index.instance_ids(),
            }
        )

    async def role_info(self, request: web.Request) -> web.Response:
        """Whether this controller is its group's active one (its peers ask this every PROBE_INTERVAL_S)."""
        return json_response(self.role.describe())

    async def lookup(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        spans = self._spans(body)
        found = with_lmcache_instances(self.index, fields.tokens(body), self.index.lookup(spans))
        layout = {inst: [loc, length] for inst, (loc, length) in found.items()}
        event = self.events.create("lookup", None, max((v[1] for v in layout.values()), default=0))
        self.events.finish(event, {"layout_info": layout})
        return json_response({"event_id": event.event_id, "layout_info": layout})

    async def compress(self, request: web.Request) -> web.Response:
        return await self._on_prefix(request, "compress", self._compress_args)

    def _compress_args(self, body: dict[str, Any]) -> dict[str, Any]:
        method = fields.method(body, self.methods)
        quality = fields.quality(body, method)
        args: dict[str, Any] = {"method": method} if quality is None else {"method": method, "quality": quality}
        if fields.boolean(body, "allow_lossy_again", False):  # stack a lossy codec on values already lossy
            args["allow_lossy_again"] = True
        return args

    async def decompress(self, request: web.Request) -> web.Response:
        return await self._on_prefix(request, "decompress", lambda body: {"method": fields.method(body, self.methods)})

    async def pin(self, request: web.Request) -> web.Response:
        return await self._on_prefix(request, "pin", lambda body: {})

    async def unpin(self, request: web.Request) -> web.Response:
        return await self._on_prefix(request, "unpin", lambda body: {})

    async def clear(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        instance_id = fields.string(body, "instance_id")
        location = fields.location(body)
        self.index.check_location(instance_id, location)
        if body.get("tokens") is None:
            num_tokens, by_worker = self.index.all_at(instance_id, location)
            calls = [(key, "clear", {"location": location, "keys": None}, self.config.command_timeout) for key in by_worker]
        else:
            spans = self._spans(body)
            num_tokens, by_worker = self.index.prefix(instance_id, location, spans)
            calls = [(key, "clear", {"location": location, "keys": keys}, self.config.command_timeout) for key, keys in by_worker.items()]
        return self._scheduled("clear", instance_id, location, num_tokens, calls, whole=body.get("tokens") is None)

    async def move(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        src_instance, src_location = fields.position(body, "old_position")
        dst_instance, dst_location = fields.position(body, "new_position")
        # LMCache's scripts say `copy` or `should_copy`; either keeps the source chunks.
        copy = fields.boolean(body, "copy", False) or fields.boolean(body, "should_copy", False)
        spans = self._spans(body)
        if (src_instance, src_location) == (dst_instance, dst_location):
            raise InvalidRequest("old_position and new_position are the same", "new_position")
        self.index.check_location(src_instance, src_location)
        self.index.check_location(dst_instance, dst_location)
        world, dst_world = self.index.world_size(src_instance), self.index.world_size(dst_instance)
        if world != dst_world:
            raise InvalidRequest(
                f"{src_instance!r} has tensor-parallel size {world} and {dst_instance!r} {dst_world}: "
                "a chunk's parts per rank fit only the same size",
                "new_position",
            )
        # Each rank's parts go to the same rank of the target (a lone worker: to the target's first one there).
        targets = {}
        for record in sorted(self.index.instance_workers(dst_instance), key=lambda r: r.rank):
            if record.has_location(dst_location):
                targets.setdefault(record.rank if world > 1 else 0, record)
        if world > 1 and len(targets) < world:
            raise WorkerUnavailable(f"instance {dst_instance!r} has {len(targets)} of its {world} ranks at {dst_location} now")
        num_tokens, by_worker = self.index.prefix(src_instance, src_location, spans)
        calls = []
        for key, keys in by_worker.items():
            target = targets[self.index.workers[key].rank if world > 1 else 0]
            address = None if key == target.key else target.data_address
            args = {"location": src_location, "keys": keys, "target_location": dst_location, "target_address": address, "copy": copy}
            calls.append((key, "move", args, self._timeout(keys)))
        return self._scheduled("move", src_instance, src_location, num_tokens, calls)

    async def health(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        instance_id = fields.string(body, "instance_id")
        workers = self.index.instance_workers(instance_id)
        timeout = min(HEALTH_TIMEOUT_S, self.config.command_timeout)

        async def probe(key: WorkerKey) -> int:
            try:
                await self.hub.session(key).command("health", {}, timeout)
                return 0
            except WorkerUnavailable:
                return 1
            except LmcachedError:
                return 2

        codes = await asyncio.gather(*(probe(r.key) for r in workers))
        # Keyed by the worker's rank, as LMCache keys it; `workers` names each rank's lmcached id.
        error_codes = {str(r.rank): code for r, code in zip(workers, codes, strict=True)}
        names = {str(r.rank): r.worker_id for r in workers}
        versions = {str(r.rank): r.version for r in workers}
        event = self.events.create("health", instance_id, 0)
        self.events.finish(event, {"error_codes": error_codes})
        answer = {
            "event_id": event.event_id,
            "error_codes": error_codes,
            "workers": names,
            "version": __version__,
            "worker_versions": versions,
        }
        return json_response(answer)

    async def check_finish(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return json_response(self.events.get(fields.string(body, "event_id")).as_dict())

    async def query_worker_info(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        instance_id = fields.string(body, "instance_id")
        wanted = fields.worker_ids(body)
        records = list(self.index.workers.values()) if instance_id == "all" else self.index.instance_workers(instance_id)
        infos = [r.lmcache_info() for r in records if wanted is None or r.rank in wanted or r.worker_id in wanted]
        event = self.events.create("query_worker_info", instance_id, 0)
        self.events.finish(event, {"workers": len(infos)})
        return json_response({"event_id": event.event_id, "worker_infos": infos})

    async def query_instance(self, request: web.Request) -> web.Response:
        """LMCache's address-to-instance map for routers: the instance whose worker serves at `ip`."""
        body = await self._body(request)
        ip = fields.string(body, "ip")
        matches = sorted({r.instance_id for r in self.index.workers.values() if r.data_address.rpartition(":")[0] == ip})
        if not matches:
            raise NotFound(f"no instance has a worker at {ip!r}")
        event_id = body.get("event_id") if isinstance(body.get("event_id"), str) else None
        event = self.events.create("query_instance", matches[0], 0)
        self.events.finish(event, {"res": matches[0]})
        return json_response({"event_id": event_id or event.event_id, "res": matches[0], "instances": matches})

    async def controller_workers(self, request: web.Request) -> web.Response:
        """LMCache's dashboard list of workers, filtered by `instance_id` and `worker_id` (rank or id)."""
        instance_id = request.query.get("instance_id") or None
        worker = request.query.get("worker_id") or None
        records = list(self.index.workers.values()) if instance_id is None else self.index.instance_workers(instance_id)
        if worker is not None:
            records = [r for r in records if r.worker_id == worker or str(r.rank) == worker]
        workers = [r.lmcache_info() for r in sorted(records, key=lambda r: (r.instance_id, r.rank))]
        return json_response({"workers": workers, "total_count": len(workers)})

    async def key_stats(self, request: web.Request) -> web.Response:
        """LMCache's dashboard totals: keys per instance and overall."""
        instances = []
        for instance_id in self.index.instance_ids():
            workers = self.index.instance_workers(instance_id)
            keys = sum(r.key_count for r in workers)
            instances.append({"instance_id": instance_id, "key_count": keys, "worker_count": len(workers)})
        return json_response(
            {
                "total_key_count": sum(i["key_count"] for i in instances),
                "total_instance_count": len(instances),
                "total_worker_count": len(self.index.workers),
                "instances": instances,
            }
        )

    async def instances(self, request: web.Request) -> web.Response:
        return json_response(self.index.describe_instances())

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    def snapshot(self) -> dict[str, Any]:
        """What a monitor gets on connect, on request, and when it falls behind: the instances, the newest
        chunks of each worker and location (at most MONITOR_CHUNKS), and recent events."""
        instances = self.index.describe_instances()
        for record in list(self.index.workers.values()):
            described = next(w for w in instances[record.instance_id]["workers"] if w["worker_id"] == record.worker_id)
            described["chunks"] = {
                location: [info.as_wire() for info in list(chunks.values())[-MONITOR_CHUNKS:]]
                for location, chunks in record.locations.items()
            }
        return {
            "instances": instances,
            "events": [e.as_dict() for e in self.events.recent(200)],
            "methods": self.methods,
            "time": time.time(),
        }

    async def monitor_command(self, header: dict[str, Any]) -> dict[str, Any]:
        """compress / decompress / pin / unpin / clear on chunks a monitor selected by key."""
        op = header.get("op")
        if op not in ("compress", "decompress", "pin", "unpin", "clear"):
            raise InvalidRequest(f"unknown monitor operation {op!r}", "op")
        instance_id = fields.string(header, "instance_id")
        location = fields.location(header)
        keys = header.get("keys")
        if not isinstance(keys, list) or not all(type(k) is int for k in keys):
            raise InvalidRequest("keys must be a list of chunk keys", "keys", 422)
        extra = (
            self._compress_args(header)
            if op == "compress"
            else {"method": fields.method(header, self.methods)}
            if op == "decompress"
            else {}
        )
        self.index.check_location(instance_id, location)
        if self.index.world_size(instance_id) > 1:  # a key here is one rank's part: acting on it alone splits a chunk
            raise InvalidRequest(f"instance {instance_id!r} is tensor-parallel: {op} its chunks by tokens, so every rank's part goes along")
        wanted = set(keys)
        calls, num_tokens = [], 0
        for record in self.index.instance_workers(instance_id):
            held = record.locations.get(location, {})
            mine = [k for k in keys if k in held and k in wanted]
            if mine:
                num_tokens += sum(held[k].num_tokens for k in mine)
                calls.append((record.key, op, {"location": location, "keys": mine, **extra}, self._timeout(mine)))
        event = self._schedule(op, instance_id, location, num_tokens, calls)
        return {"event_id": event.event_id, "num_tokens": num_tokens}

    async def drain(self, timeout: float) -> None:
        """Let running operations finish (bounded), then cancel stragglers."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
