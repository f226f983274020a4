"""The commands the controller runs on a worker's storage: compress and decompress (re-encoding chunks in place,
or staged on every rank of a tensor-parallel instance and committed together), pin, unpin, clear and move.
A mixin of Storage: the put/get path is storage.py, what the controller asks of it is here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmcached.errors import InvalidRequest, NotFound
from lmcached.wire.chunk import DISK, REMOTE, Chunk
from lmcached.wire.tls import dial_context
from lmcached.worker.backends import Backend
from lmcached.worker.codebooks import LEARN_MAX_TOKENS, LEARN_MIN_TOKENS
from lmcached.worker.remote import RemoteBackend

log = logging.getLogger(__name__)

#: How long a command on the remote tier waits for queued write-through to land first (the tier may be down).
REMOTE_FLUSH_TIMEOUT_S = 10.0
#: A staged compress or decompress waits this long for its commit before its re-encoded chunks are dropped.
STAGED_FOR_S = 600.0


@dataclass
class Progress:
    """How far a controller command has got, in chunks: its worker reports it while the command runs, so a
    long compress (or the codec's first, compiling call) is seen working rather than timed out."""

    done: int = 0
    total: int = 0


class _Tally:
    """What a compress or decompress did: chunks re-encoded, their tokens and bytes, and why others were skipped."""

    def __init__(self) -> None:
        self.tokens = self.chunks = self.before = self.after = 0
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def count(self, old: Chunk, new: Chunk) -> None:
        self.tokens += old.num_tokens
        self.chunks += 1
        self.before += old.nbytes
        self.after += new.nbytes

    def result(self) -> dict[str, Any]:
        counts = {"num_tokens": self.tokens, "chunks": self.chunks, "bytes_before": self.before, "bytes_after": self.after}
        return counts | {"skipped": self.skipped}


class StorageCommands:
    """The controller's commands, run by Storage.execute (see Storage for the attributes they use)."""

    # ---------------------------------------------------------------- commands from the controller
    async def execute(self, op: str, args: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Run one controller command, counting its chunks into `progress`; raises LmcachedError subclasses
        for refusals."""
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise InvalidRequest(f"unknown worker command {op!r}")
        progress = progress if progress is not None else Progress()
        keys = args.get("keys")
        progress.total = len(keys) if isinstance(keys, list) else 0
        touched = {args.get("location"), args.get("target_location")}
        if DISK in touched:
            await self.flush_disk()  # a clear or compress must not be overtaken by a queued write
        if REMOTE in touched and REMOTE in self._behind:
            await self._behind[REMOTE].drain(REMOTE_FLUSH_TIMEOUT_S)  # bounded: the tier may be down
        return await handler(args, progress)

    async def _op_health(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {"ok": True}

    async def _transform(
        self, args: dict[str, Any], progress: Progress, skip_reason: Callable[[Chunk], str | None], fn: Callable[[Chunk], Chunk]
    ) -> dict[str, Any]:
        """Re-encode chunks in place. A chunk `skip_reason` names is left alone, and so is a compressed chunk
        whose re-encoding would be larger (a lossy blob re-encoded losslessly only grows); the result counts
        skipped chunks by reason. With a `stage` id the new versions are only kept, for `commit` to swap in
        (or `abort` to drop): the first phase of an operation on every rank of a tensor-parallel instance."""
        location = args["location"]
        backend = self.backend(location)
        stage = args.get("stage")
        staged: list[tuple[Chunk, Chunk]] = []
        done = _Tally()

        async def one(key: int) -> None:
            try:
                await transform(key)
            finally:
                progress.done += 1

        async def transform(key: int) -> None:
            # One re-encoding of a chunk at a time: a second compress of the same chunks waits for the first
            # and then finds them compressed (and says so) instead of losing the race without a word.
            async with self._transforming.hold((location, key)):
                chunk = await self._get(location, key)
                if chunk is None:
                    done.skip(f"gone from {location} before it was reached")
                    return
                reason = skip_reason(chunk)
                if reason is not None:
                    done.skip(reason)
                    return
                new = await self.run(fn, chunk)
                if chunk.method is not None and new.method is not None and new.nbytes >= chunk.nbytes:
                    done.skip(f"kept {chunk.method}, smaller than {new.method}")
                    return
                if stage is not None:
                    staged.append((chunk, new))
                    done.count(chunk, new)
                    return
                await self._swap(location, backend, chunk, new, done)

        await asyncio.gather(*(one(k) for k in args["keys"]))
        if stage is not None:
            self._stage(str(stage), location, staged)
        return done.result()

    async def _swap(self, location: str, backend: Backend, chunk: Chunk, new: Chunk, done: _Tally) -> None:
        # Swap only if nobody changed the chunk meanwhile; the old bytes stay until the new ones are whole.
        if not await self._call(backend, backend.replace_if_same, chunk, new):
            done.skip("changed by a store or clear meanwhile (left as it is now)")
            return
        self._note(location, chunk.key)
        done.count(chunk, new)

    def _stage(self, stage: str, location: str, swaps: list[tuple[Chunk, Chunk]]) -> None:
        """Keep re-encoded chunks for a commit; dropped after STAGED_FOR_S if none comes (a controller lost)."""
        self._staged[stage] = (location, swaps)
        asyncio.get_running_loop().call_later(STAGED_FOR_S, self._staged.pop, stage, None)

    async def _op_commit(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Swap in what a staged compress or decompress re-encoded."""
        stage = str(args.get("stage"))
        if stage not in self._staged:
            raise NotFound(f"nothing staged as {stage!r} (aborted, or kept longer than {STAGED_FOR_S:.0f} s)")
        location, swaps = self._staged.pop(stage)
        backend = self.backend(location)
        done = _Tally()
        progress.total = len(swaps)
        for chunk, new in swaps:
            async with self._transforming.hold((location, chunk.key)):
                await self._swap(location, backend, chunk, new, done)
            progress.done += 1
        return done.result()

    async def _op_abort(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Drop what a staged compress or decompress re-encoded: the chunks stay as they are."""
        _, swaps = self._staged.pop(str(args.get("stage")), (None, []))
        return {"num_tokens": 0, "dropped": len(swaps)}

    async def _op_compress(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from lmcached.codecs import LOSSY
        from lmcached.codecs.base import FP8

        method, quality = args["method"], args.get("quality")
        again = bool(args.get("allow_lossy_again", False))
        if method == "kvtc":
            await self._ensure_codebooks(args["location"], args["keys"])

        def skip_reason(chunk: Chunk) -> str | None:
            if chunk.method == method:
                return f"already compressed with {method}"
            # Values a lossy codec already rounded (compressed, or decompressed from it) lose more through a
            # second one: cachegen -> decompress -> kvtc garbled a greedy answer. Only when asked.
            if method in LOSSY and chunk.dtype in FP8:
                return f"{chunk.dtype} KV is 8-bit already: {method} codes 16- and 32-bit KV (lossless codes fp8)"
            if method in LOSSY and chunk.lossy is not None and not again:
                return f"values already lossy ({chunk.lossy}): a second lossy codec stacks the losses (allow_lossy_again to do it anyway)"
            return None

        return await self._transform(args, progress, skip_reason, lambda c: self.encode(self.decode(c) if c.method else c, method, quality))

    async def _op_decompress(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self._transform(args, progress, lambda c: "not compressed" if c.method is None else None, self.decode)

    async def _ensure_codebooks(self, location: str, keys: list[int]) -> None:
        """A current kvtc codebook for the shape of the chunks at `keys` (one model: the first chunk found tells),
        learned from this worker's own chunks of that shape when there is none yet; in the remote tier too when
        that is where the blobs will be."""
        backend = self.backend(location)
        present = [k for k in keys if k in backend]
        first = await self._get(location, present[0]) if present else None
        if first is None:
            return  # nothing here to compress: the transform reports that
        layers, channels = first.shape[1], first.shape[3]
        async with self._learning:
            book = await self.run(self.codebooks.current, layers, channels)
            if book is None:
                samples = await self._samples(layers, channels)
                tokens = sum(t.shape[2] for t in samples)
                if tokens < LEARN_MIN_TOKENS:
                    raise InvalidRequest(
                        f"no kvtc codebook for {layers} layers × {channels} channels yet, and {tokens} tokens of that shape here "
                        f"are too few to learn one from (at least {LEARN_MIN_TOKENS}): store more, or run lmcached calibrate"
                    )
                from lmcached.codecs.kvtc import Codebook

                book = await self.run(Codebook.fit, samples)
                await self.run(self.codebooks.install, book)
                log.info("learned kvtc codebook %s for %d×%d from %d tokens", book.digest, layers, channels, tokens)
        remote = self.backends.get(REMOTE)
        if location == REMOTE and isinstance(remote, RemoteBackend):
            await self.run_remote(remote.put_codebook, book.digest, book.to_bytes)

    async def _samples(self, layers: int, channels: int) -> list[Any]:
        """Up to LEARN_MAX_TOKENS tokens of this worker's chunks (RAM and disk) of one shape, as raw tensors."""
        from lmcached.wire.tensors import from_bytes

        samples: list[Any] = []
        tokens = 0
        for location, backend in self.backends.items():
            if location == REMOTE:
                continue
            for key in backend.keys():
                chunk = await self._get(location, key)
                if chunk is None or (chunk.shape[1], chunk.shape[3]) != (layers, channels) or chunk.method == "kvtc":
                    continue
                raw = await self.run(self.decode, chunk) if chunk.method else chunk
                samples.append(from_bytes(raw.data, raw.shape, raw.dtype))
                tokens += chunk.num_tokens
                if tokens >= LEARN_MAX_TOKENS:
                    return samples
        return samples

    async def _set_pinned(self, args: dict[str, Any], pinned: bool) -> dict[str, Any]:
        location = args["location"]
        backend = self.backend(location)
        tokens = 0
        changed = []  # keys whose pin this call flipped: what undoing it (on a tensor-parallel instance) flips back
        for key in args["keys"]:
            info = backend.info(key)
            done = await self._call(backend, backend.set_pinned, key, pinned)
            if done and info is not None:
                tokens += info.num_tokens
                self._note(location, key)
                if info.pinned != pinned:
                    changed.append(key)
        return {"num_tokens": tokens, "changed_keys": changed}

    async def _op_pin(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self._set_pinned(args, True)

    async def _op_unpin(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return await self._set_pinned(args, False)

    async def _op_clear(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        location = args["location"]
        backend = self.backend(location)
        keys = args.get("keys")
        if keys is None and isinstance(backend, RemoteBackend):
            await self.run_remote(backend.reconcile)  # clear everything: also what other workers wrote since the last scan
        tokens = 0
        for key in backend.keys() if keys is None else keys:
            info = backend.info(key)
            if info is None:
                continue
            removed = await self._call(backend, backend.remove, key)
            if removed:
                tokens += info.num_tokens
                self._note(location, key)
        return {"num_tokens": tokens}

    async def _op_move(self, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Copy (or move) chunks to another location here or to another worker's data plane, blobs as they are."""
        location, target_location = args["location"], args["target_location"]
        self.backend(location)
        chunks: list[Chunk] = []
        for key in args["keys"]:
            chunk = await self._get(location, key)
            if chunk is None:
                break
            chunks.append(chunk)
            progress.done += 1  # read; the send below is one step
        target = args.get("target_address")
        if target is None:
            self.backend(target_location)
            await self.store(chunks, target_location)
        else:
            from lmcached.client import AsyncKVClient

            async with AsyncKVClient(target, auth_token=self.config.auth_token, ssl_context=dial_context(self.config)) as client:
                for digest in await self._kvtc_codebooks(chunks):  # the codebooks first: the target refuses blobs without
                    if not await client.has_codebook(digest):
                        await client.put_codebook(digest, await self.run(self._codebook_bytes, digest))
                await client.store_chunks(chunks, target_location)
        if not args.get("copy", False):
            await self._op_clear({"location": location, "keys": [c.key for c in chunks]}, Progress())
        return {"num_tokens": sum(c.num_tokens for c in chunks)}
