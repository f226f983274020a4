"""`lmcached engine`: a small real LLM engine (OpenAI-compatible, port 8000) whose prompt KV is offloaded to an
lmcached worker after prefill and reused from it on later requests, compressed chunks included.

Model work (tokenizing, forward passes) runs on one dedicated thread, so concurrent requests queue instead of
racing on the model and the event loop never blocks. A cache failure never fails a request: it is logged and
the engine computes the prefix itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
from aiohttp import web

from lmcached.engine.model import LoadedModel, cache_from_kv, forward, kv_from_cache
from lmcached.errors import InvalidRequest, LmcachedError, NotFound
from lmcached.wire.http_logging import quiet_malformed_requests

log = logging.getLogger(__name__)

KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Request:
    """A validated completion request."""

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False


@dataclass
class Piece:
    """One step of a generation: new text, why it ended (None while it goes on), token counts."""

    text: str
    finish: str | None
    cached_tokens: int
    completion_tokens: int


@dataclass
class Prefill:
    """What the prompt's prefill produced: the cache to decode from and the first token's logits."""

    cache: Any
    logits: torch.Tensor
    cached_tokens: int
    kv: torch.Tensor | None  # the whole prompt's KV in lmcached's layout, for offloading


#: OpenAI request fields this engine does not implement, with the values that mean "not used": any other value
#: is refused with a 400 naming the field, never silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
#: Chat message roles the model's chat template knows.
CHAT_ROLES = ("system", "user", "assistant")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        # Compared with the type too: True == 1, but `"n": true` is not a request for one choice.
        if value is not None and not any(value == u and type(value) is type(u) for u in unused):
            raise InvalidRequest(f"{name} is not supported by this engine (got {value!r})", name)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not kind_ok:
        raise InvalidRequest(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return value


class Engine:
    """The HTTP engine over one loaded model and one lmcached worker."""

    def __init__(self, loaded: LoadedModel, worker: str | None, auth_token: str | None = None, kv_dtype: str = "float16") -> None:
        self.loaded = loaded
        self.worker_address = worker
        self.auth_token = auth_token
        self.kv_dtype = KV_DTYPES[kv_dtype]
        # One thread owns the model: forward passes queue here, in arrival order.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcached-model")
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    # ------------------------------------------------------------------ plumbing
    def app(self) -> web.Application:
        quiet_malformed_requests()
        app = web.Application(client_max_size=8 * 1024 * 1024, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/health", self.health)
        app.on_cleanup.append(self._close)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except LmcachedError as exc:
            return web.json_response({"detail": str(exc), "status": exc.http_status}, status=exc.http_status)
        except web.HTTPException as exc:
            return web.json_response({"detail": exc.reason, "status": exc.status}, status=exc.status)
        except Exception:
            log.exception("bug: unhandled error on %s", request.path)
            return web.json_response({"detail": "internal error (a bug; see the engine's log)", "status": 500}, status=500)

    async def _close(self, app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def _kv_client(self) -> Any:
        """The data-plane connection, (re)opened on demand; None when no worker is configured."""
        if self.worker_address is None:
            return None
        async with self._client_lock:
            if self._client is None:
                from lmcached.client import AsyncKVClient

                client = AsyncKVClient(self.worker_address, auth_token=self.auth_token, timeout=30)
                await client.connect()
                self._client = client
            return self._client

    async def _drop_client(self) -> None:
        async with self._client_lock:
            if self._client is not None:
                await self._client.close()
                self._client = None

    # ------------------------------------------------------------------ requests
    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        from lmcached.wire.fields import parse_body

        return parse_body(await request.read())

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.loaded.name:
            raise NotFound(f"model {model!r} is not served here; this engine serves {self.loaded.name!r}")

    async def _prompt_tokens(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", "prompt")
            return await self._run(lambda: self.loaded.tokenizer(prompt).input_ids)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            vocab = self.loaded.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"prompt token ids must lie in 0..{vocab - 1}", "prompt")
            return prompt
        if prompt is None:
            raise InvalidRequest("missing field 'prompt'", "prompt")
        raise InvalidRequest("prompt must be a non-empty string or a list of token ids", "prompt")

    async def _chat_tokens(self, body: dict[str, Any]) -> list[int]:
        """The conversation as the model's chat template lays it out, ending where the assistant answers."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list of {role, content}", "messages")
        plain = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}] must have a role of {', '.join(CHAT_ROLES)}", "messages")
            content = message.get("content")
            if isinstance(content, list):  # the parts form: text parts only (the model reads no images)
                if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                    raise InvalidRequest(f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(part["text"] for part in content)
            if not isinstance(content, str):
                raise InvalidRequest(f"messages[{i}].content must be a string", "messages")
            plain.append({"role": message["role"], "content": content})

        def render() -> list[int]:
            ids = self.loaded.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

        return await self._run(render)

    async def _parse(self, body: dict[str, Any], chat: bool = False) -> Request:
        self._check_model(body)
        _refuse_unsupported(body)
        prompt = await (self._chat_tokens(body) if chat else self._prompt_tokens(body))
        if chat and body.get("max_completion_tokens") is not None:  # the newer name of max_tokens
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise InvalidRequest("stop must be a string or a list of up to 4 non-empty strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest("seed must be an integer", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be true or false", "stream")
        req = Request(
            prompt,
            _number(body, "max_tokens", 16, 0, self.loaded.max_len, integer=True),
            float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
            stop,
            seed,
            stream,
        )
        if len(prompt) + req.max_tokens > self.loaded.max_len:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the context of {self.loaded.max_len} tokens",
                "prompt",
            )
        return req

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.loaded.name, "object": "model", "owned_by": "lmcached", "max_model_len": self.loaded.max_len}],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.loaded.name})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_model(body)
        tokens = await self._prompt_tokens(body)
        return web.json_response({"count": len(tokens), "max_model_len": self.loaded.max_len, "tokens": tokens, "token_strs": None})

    # ------------------------------------------------------------------ the cache
    async def _cached_prefix(self, tokens: list[int]) -> torch.Tensor | None:
        """The worker's KV for the longest cached prefix, or None; failures are logged and treated as a miss."""
        try:
            client = await self._kv_client()
            if client is None:
                return None
            kv = await client.retrieve(tokens)
        except (LmcachedError, OSError, asyncio.TimeoutError) as exc:
            log.warning("KV cache unavailable, computing the prompt instead: %s", exc)
            await self._drop_client()
            return None
        if kv is not None and (kv.shape[1] != self.loaded.num_layers or kv.shape[3] != self.loaded.channels):
            log.warning("cached KV has shape %s, not this model's; ignoring it", list(kv.shape))
            return None
        return kv

    async def _offload(self, tokens: list[int], kv: torch.Tensor, skip_tokens: int) -> None:
        try:
            client = await self._kv_client()
            if client is not None:
                await client.store(tokens, kv, skip_tokens=skip_tokens)
        except (LmcachedError, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not offload the prompt's KV: %s", exc)
            await self._drop_client()

    # ------------------------------------------------------------------ the model
    def _prefill(self, tokens: list[int], cached: torch.Tensor | None) -> Prefill:
        """Run the prompt, reusing `cached` (a prefix's KV) when given; keep at least one token to compute.
        The prompt's KV for offloading is built only when some chunk of it is not cached yet."""
        used = 0
        cache = None
        if cached is not None:
            used = min(cached.shape[2], len(tokens) - 1)
            if used > 0:
                cache = cache_from_kv(cached[:, :, :used], self.loaded.kv_heads, torch.float32)
        ids = torch.tensor([tokens[used:]], dtype=torch.long)
        with torch.no_grad():
            out = forward(self.loaded.model, ids, cache)
        cache = out.cache
        fully_cached = cached is not None and cached.shape[2] >= len(tokens)
        kv = None if fully_cached else kv_from_cache(cache, self.kv_dtype)
        return Prefill(cache, out.logits[0, -1].float(), used, kv)

    def _step(self, cache: Any, token: int) -> torch.Tensor:
        with torch.no_grad():
            out = forward(self.loaded.model, torch.tensor([[token]], dtype=torch.long), cache)
        return out.logits[0, -1].float()

    @staticmethod
    def _sample(logits: torch.Tensor, req: Request, generator: torch.Generator | None) -> int:
        if req.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < req.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    async def _generate(self, req: Request) -> AsyncIterator[Piece]:
        """Yield the completion piece by piece, as tokens come."""
        cached = await self._cached_prefix(req.prompt)
        prefill = await self._run(self._prefill, req.prompt, cached)
        if prefill.kv is not None:
            await self._offload(req.prompt, prefill.kv, skip_tokens=cached.shape[2] if cached is not None else 0)
            prefill.kv = None
        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        tokenizer = self.loaded.tokenizer
        logits, produced, text = prefill.logits, [], ""
        if req.max_tokens == 0:
            yield Piece("", "length", prefill.cached_tokens, 0)
            return
        while True:
            token = self._sample(logits, req, generator)
            if token == tokenizer.eos_token_id:
                yield Piece("", "stop", prefill.cached_tokens, len(produced))
                return
            produced.append(token)
            full = tokenizer.decode(produced, skip_special_tokens=True)
            new, start = full[len(text) :], len(text)
            text = full
            hit = min((text.find(s) for s in req.stop if s in text), default=None)
            if hit is not None:  # cut at the stop string, which is not part of the answer
                yield Piece(new[: max(0, hit - start)], "stop", prefill.cached_tokens, len(produced))
                return
            if len(produced) >= req.max_tokens:
                yield Piece(new, "length", prefill.cached_tokens, len(produced))
                return
            yield Piece(new, None, prefill.cached_tokens, len(produced))
            logits = await self._run(self._step, prefill.cache, token)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(await self._body(request))
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            return await self._stream(request, req, completion_id, created)
        pieces = [piece async for piece in self._generate(req)]
        last = pieces[-1]
        return web.json_response(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": self.loaded.name,
                "choices": [{"index": 0, "text": "".join(p.text for p in pieces), "logprobs": None, "finish_reason": last.finish}],
                "usage": self._usage(req, last.completion_tokens, last.cached_tokens),
            }
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's chat completions: the messages through the model's chat template, then the same generation
        (and the same cache reuse: a conversation's earlier turns are a cached prefix of the next)."""
        body = await self._body(request)
        req = await self._parse(body, chat=True)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if req.stream:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream_chat(request, req, completion_id, created, include_usage)
        pieces = [piece async for piece in self._generate(req)]
        last = pieces[-1]
        message = {"role": "assistant", "content": "".join(p.text for p in pieces)}
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": self.loaded.name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish}],
                "usage": self._usage(req, last.completion_tokens, last.cached_tokens),
            }
        )

    async def _stream_chat(
        self, request: web.Request, req: Request, completion_id: str, created: int, include_usage: bool
    ) -> web.StreamResponse:
        """chat.completion.chunk events: the role first, then the text as it comes, the finish reason with the
        usage; with stream_options.include_usage, OpenAI's extra last chunk (no choices, the usage)."""

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
            event: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": self.loaded.name}
            event["choices"] = choices
            if usage is not None:
                event["usage"] = usage
            return event

        async def events() -> AsyncIterator[dict[str, Any]]:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            usage = None
            async for piece in self._generate(req):
                delta = {"content": piece.text} if piece.text else {}
                if piece.finish is not None:
                    usage = self._usage(req, piece.completion_tokens, piece.cached_tokens)
                yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": piece.finish}], usage)
            if include_usage and usage is not None:
                yield chunk([], usage)

        return await self._server_sent(request, events())

    def _usage(self, req: Request, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(req.prompt) + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _stream(self, request: web.Request, req: Request, completion_id: str, created: int) -> web.StreamResponse:
        """text_completion events, one per piece, the usage with the last one (OpenAI's shape)."""

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for piece in self._generate(req):
                event: dict[str, Any] = {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": self.loaded.name,
                    "choices": [{"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish}],
                }
                if piece.finish is not None:
                    event["usage"] = self._usage(req, piece.completion_tokens, piece.cached_tokens)
                yield event

        return await self._server_sent(request, events())

    @staticmethod
    async def _server_sent(request: web.Request, events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
        """Server-sent events: each event as a `data:` line as it comes, then `data: [DONE]` (both endpoints)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for event in events:
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

async def run_engine(
    loaded: LoadedModel, host: str, port: int, worker: str | None, auth_token: str | None, stop: asyncio.Event, kv_dtype: str = "float16"
) -> None:
    engine = Engine(loaded, worker, auth_token, kv_dtype)
    runner = web.AppRunner(engine.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(
        "lmcached engine ready " + orjson.dumps({"http": runner.addresses[0][1], "model": loaded.name, "worker": worker}).decode(),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
