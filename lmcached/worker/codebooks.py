"""A worker's kvtc codebooks: every codebook its kvtc blobs name, and which one new blobs of each model shape
are written with.

A kvtc blob decodes only with the codebook it names, so a worker keeps them as long as its chunks: durably
beside the disk tier's files (`<local_disk>/codebooks/`) when it has one, else in memory, like its RAM chunks.
Where else codebooks travel is the storage role's business: a /move sends them ahead of the blobs, a store of
a kvtc blob whose codebook the worker cannot find is refused, and the remote tier keeps a copy beside the
chunks (and is where a worker looks for one it lacks). So no stored blob is ever undecodable.

A codebook comes from `lmcached calibrate` (a text file through the engine's model, sent to the worker), or the
worker learns one itself the first time kvtc is asked for on a shape: from the chunks of that shape it holds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcached.codecs.kvtc import Codebook, CodebookStore

log = logging.getLogger(__name__)

#: A worker learns a codebook itself only from at least this many tokens of the shape (with fewer, the
#: components past the sample count are guesses) and uses at most LEARN_MAX_TOKENS of them.
LEARN_MIN_TOKENS = 1024
LEARN_MAX_TOKENS = 16384
#: Which codebook new blobs of each shape use, in the codebook directory: {"<layers>x<channels>": digest}.
CURRENT_FILE = "current.json"


def shape_key(layers: int, channels: int) -> str:
    return f"{layers}x{channels}"


class Codebooks:
    """Codebooks by digest (a CodebookStore: memory, the directory, then `fetch`) and the current one per shape."""

    def __init__(self, directory: str | Path | None = None, fetch: Callable[[str], bytes | None] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        #: Where a codebook found nowhere here is asked for (the remote tier): digest -> its bytes, or None.
        self.fetch = fetch
        self._store: CodebookStore | None = None
        self._current: dict[str, str] = {}
        self._current_mtime: float | None = None
        self._lock = threading.Lock()  # codecs run on executor threads

    @property
    def store(self) -> CodebookStore:
        """The codebooks by digest, made on first use: the codecs (numba, torch) load then, not with the daemon."""
        if self._store is None:
            from lmcached.codecs.kvtc import CodebookStore

            self._store = CodebookStore(self.directory, lambda digest: self.fetch(digest) if self.fetch is not None else None)
        return self._store

    def current(self, layers: int, channels: int) -> Codebook | None:
        """The codebook new blobs of this shape are written with, or None. Re-reads the directory's choice when it
        changed (`lmcached calibrate --codebooks DIR` may write it while the daemon runs)."""
        with self._lock:
            self._reload_current()
            digest = self._current.get(shape_key(layers, channels))
        return self.store.get(digest) if digest is not None else None

    def install(self, book: Codebook, current: bool = True) -> None:
        """Keep `book` (durably with a directory); with `current`, new blobs of its shape use it from now on."""
        self.store.add(book)
        if not current:
            return
        with self._lock:
            self._reload_current()
            self._current[shape_key(book.layers, book.channels)] = book.digest
            if self.directory is not None:
                path = self.directory / CURRENT_FILE
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._current, sort_keys=True))
                os.replace(tmp, path)  # atomic: a reader sees the old choice or the new one
                self._current_mtime = path.stat().st_mtime

    def find(self, digest: str) -> Codebook | None:
        return self.store.find(digest)

    def get(self, digest: str) -> Codebook:
        return self.store.get(digest)

    def _reload_current(self) -> None:
        if self.directory is None:
            return
        path = self.directory / CURRENT_FILE
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._current_mtime:
            return
        try:
            chosen = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return
        if isinstance(chosen, dict):
            self._current.update({str(k): str(v) for k, v in chosen.items()})
        self._current_mtime = mtime
