"""`lmcached calibrate`: a kvtc codebook for a model, learned from text run through the model the way the
engine runs prompts, then sent to a worker (as the current codebook for its shape) and/or written to a
codebook directory.

Two steps: the PCA basis of every layer from the KV of all the text (`Codebook.fit`), then, on a few windows
of it, what each layer's coding error costs the model's output, which sets each layer's step
(`lmcached.engine.sensitivity`): that is what takes kvtc from 5× to 6.7× on held-out text (docs/codec.md).

A worker can also learn a codebook from the chunks it happens to hold (lmcached.worker.codebooks); calibrating on
text chosen for the purpose is better: measured on the held-out set, a codebook from 29 texts of six kinds
kept −0.04 % mean perplexity change where one from 16 texts gave +0.88 % (docs/codec.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: Tokens per forward pass: long enough for keys at many positions, short enough for any small model.
WINDOW = 512
#: Fewer tokens than this cannot tell the components of a layer apart (a few hundred channels each).
MIN_TOKENS = 256
#: Windows probed for what each layer's error costs, spread over the text: each takes 2 × layers forward
#: passes of SCORED tokens (~20 s for SmolLM2 on two cores). Six set steps as good as eleven windows of twice
#: the scored tokens, within the noise of the tuning texts (docs/codec.md).
PROBES = 6
#: Of a probed window, the last SCORED tokens are scored; the tokens before them are the coded context.
SCORED = 128


@dataclass
class Calibration:
    codebook: Any  # lmcached.codecs.kvtc.Codebook
    tokens: int
    windows: int
    probed: int  # windows whose layer costs set the steps (0: the same step for every layer)
    kl_budget: float


def windows(loaded: Any, texts: list[str], max_tokens: int) -> Iterator[torch.Tensor]:
    """Token ids [1, ≤ WINDOW] of the texts, window by window, up to `max_tokens` in all."""
    left = max_tokens
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids
        for start in range(0, ids.shape[1], WINDOW):
            if left <= 0:
                return
            window = ids[:, start : start + min(WINDOW, left)]
            left -= window.shape[1]
            yield window


def calibrate(
    loaded: Any,
    texts: list[str],
    max_tokens: int,
    kv_dtype: torch.dtype = torch.float16,
    probes: int | None = None,
    kl_budget: float | None = None,
    on_probe: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Run the texts through the model and fit a codebook on the KV it produced, in the dtype the engine
    offloads; then set each layer's step from its cost measured on up to `probes` (default PROBES) full
    windows, for a total cost of `kl_budget` (default `sensitivity.KL_BUDGET`); `on_probe(done, of)` after each
    probed window, for progress. Blocking: minutes on a CPU."""
    from lmcached.codecs.kvtc import Codebook
    from lmcached.engine import sensitivity
    from lmcached.engine.model import forward, kv_from_cache
    from lmcached.errors import InvalidRequest

    probes = PROBES if probes is None else probes
    if probes < 0:
        raise InvalidRequest("the number of probed windows cannot be negative")
    budget = sensitivity.KL_BUDGET if kl_budget is None else kl_budget
    if not budget > 0:
        raise InvalidRequest(f"the KL budget must be above 0 (nats per token), not {budget}")
    chunks, full = [], []
    for ids in windows(loaded, texts, max_tokens):
        with torch.no_grad():
            chunks.append(kv_from_cache(forward(loaded.model, ids).cache, kv_dtype))
        if ids.shape[1] == WINDOW:
            full.append((ids, chunks[-1]))
    tokens = sum(c.shape[2] for c in chunks)
    if tokens < MIN_TOKENS:
        raise InvalidRequest(f"{tokens} tokens of text are too few to calibrate on (at least {MIN_TOKENS}): give more text")
    book = Codebook.fit(chunks)
    count = min(probes, len(full))
    chosen = [full[i * len(full) // count] for i in range(count)]  # spread over the text
    if chosen:
        probe_list = [sensitivity.probe(loaded, ids, WINDOW - SCORED, kv) for ids, kv in chosen]
        done = iter(range(1, len(probe_list) + 1))
        report = None if on_probe is None else lambda: on_probe(next(done), len(probe_list))
        book = sensitivity.weigh(loaded, book, probe_list, budget, report)
    return Calibration(book, tokens, len(chunks), len(chosen), budget)
