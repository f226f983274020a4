from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcached.errors import InvalidRequest
from lmcached.wire.chunks import chunk_spans, continuation_spans

from .conftest import SEED_TOKENS

token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=200)


def test_seed_prompt_is_one_partial_chunk() -> None:
    spans = chunk_spans(SEED_TOKENS, 256)
    assert [(s.start, s.end) for s in spans] == [(0, 12)]


def test_last_partial_chunk_is_kept_unless_disabled() -> None:
    tokens = list(range(600))
    assert [(s.start, s.end) for s in chunk_spans(tokens, 256)] == [(0, 256), (256, 512), (512, 600)]
    assert [(s.start, s.end) for s in chunk_spans(tokens, 256, save_unfull_chunk=False)] == [(0, 256), (256, 512)]


def test_keys_are_stable_across_processes() -> None:
    code = "from lmcached.wire.chunks import chunk_spans; print([s.key for s in chunk_spans(list(range(700)), 256)])"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1
    assert outs.pop().strip() == str([s.key for s in chunk_spans(list(range(700)), 256)])


def test_key_golden_value() -> None:
    # Pinned: changing the hash would orphan every chunk on every disk.
    assert f"{chunk_spans(SEED_TOKENS, 256)[0].key:016x}" == GOLDEN_SEED_KEY


@given(token_lists, st.integers(1, 64))
def test_keys_of_a_prefix_are_a_prefix_of_keys(tokens: list[int], chunk_size: int) -> None:
    full = chunk_spans(tokens, chunk_size)
    cut = (len(tokens) // chunk_size) * chunk_size
    prefix = chunk_spans(tokens[:cut], chunk_size)
    assert [s.key for s in prefix] == [s.key for s in full[: len(prefix)]]


@given(token_lists, st.integers(1, 64))
def test_chunk_key_depends_on_everything_before_it(tokens: list[int], chunk_size: int) -> None:
    if len(tokens) <= chunk_size:
        return
    changed = [tokens[0] ^ 1, *tokens[1:]]
    assert all(a.key != b.key for a, b in zip(chunk_spans(tokens, chunk_size), chunk_spans(changed, chunk_size), strict=True))


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], ["a"], [[1]]])
def test_bad_token_ids_are_refused(bad: list[object]) -> None:
    with pytest.raises(InvalidRequest):
        chunk_spans(bad, 256)  # type: ignore[arg-type]


GOLDEN_SEED_KEY = "bed3f9cec8da59f4"


def test_continuation_keys_are_the_keys_a_shorter_prompt_stored_its_partial_chunk_under() -> None:
    """For every length short of a chunk (and of the prompt), the continuation key past the whole chunks is
    the key chunk_spans gives the prompt cut there: what that shorter prompt's partial last chunk was stored
    under. Longest first; none where no token is left to continue with."""
    tokens = list(range(100, 171))  # chunks of 16: four whole ones, then 7 tokens
    for salt in (None, "tenant"):
        spans = chunk_spans(tokens, 16, salt=salt)
        for whole in (0, 2, 4):
            candidates = continuation_spans(tokens, spans[:whole], 16, salt)
            left = len(tokens) - 16 * whole
            assert [c.end - c.start for c in candidates] == list(range(min(15, left - 1), 0, -1))
            for candidate in candidates:
                assert candidate == chunk_spans(tokens[: candidate.end], 16, salt=salt)[-1]
    assert continuation_spans(tokens[:33], chunk_spans(tokens[:33], 16)[:2], 16) == []  # one token left: the prompt's own
    salted = continuation_spans(tokens, chunk_spans(tokens, 16, salt="a")[:1], 16, "a")
    assert salted[0] != continuation_spans(tokens, chunk_spans(tokens, 16)[:1], 16)[0]
