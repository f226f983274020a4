"""The controller's index against a brute-force reference: random admits, evictions, full resyncs and workers
coming and going (RAM, disk and a shared Redis tier), then every prompt's lookup — by spans and by keys — must
be what the workers' own records say."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmcached.control.index import ChunkIndex, WorkerRecord
from lmcached.wire.chunk import CPU, DISK, REMOTE
from lmcached.wire.chunks import ChunkSpan

CHUNK = 16
KEYS = list(range(1, 9))  # one prompt of 8 chunks; its last one partial (9 tokens)
SPANS = [ChunkSpan(k, (k - 1) * CHUNK, k * CHUNK if k < 8 else 7 * CHUNK + 9) for k in KEYS]
WORKERS = [("a", "w1", None), ("a", "w2", "tier"), ("b", "w3", "tier"), ("c", "w4", None)]

operation = st.one_of(
    st.tuples(st.just("admit"), st.integers(0, 3), st.sampled_from([CPU, DISK, REMOTE]), st.sets(st.sampled_from(KEYS), max_size=8)),
    st.tuples(st.just("evict"), st.integers(0, 3), st.sampled_from([CPU, DISK, REMOTE]), st.sets(st.sampled_from(KEYS), max_size=8)),
    st.tuples(st.just("full"), st.integers(0, 3), st.sampled_from([CPU, DISK, REMOTE]), st.sets(st.sampled_from(KEYS), max_size=8)),
    st.tuples(st.just("leave"), st.integers(0, 3), st.just(CPU), st.just(frozenset())),
    st.tuples(st.just("join"), st.integers(0, 3), st.just(CPU), st.just(frozenset())),
)


def reference(index: ChunkIndex) -> dict[str, tuple[str, int]]:
    """What the records say: per instance, the location with the longest run of the prompt's chunks."""
    best: dict[str, tuple[str, int]] = {}
    for inst in sorted({i for i, _ in index.workers}):
        records = [r for (i, _), r in index.workers.items() if i == inst]
        for location in sorted({CPU, DISK, REMOTE}):
            held = set().union(*(r.locations.get(location, {}).keys() for r in records))
            n = next((i for i, k in enumerate(KEYS) if k not in held), len(KEYS))
            if n and (inst not in best or SPANS[n - 1].end > best[inst][1]):
                best[inst] = (location, SPANS[n - 1].end)
    return best


def record_of(number: int) -> WorkerRecord:
    inst, wid, tier = WORKERS[number]
    return WorkerRecord(inst, wid, f"h:{number}", remote_tier=tier)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40))
def test_lookups_agree_with_the_workers_records(operations: list[tuple[str, int, str, frozenset[int]]]) -> None:
    index = ChunkIndex()
    for number in range(len(WORKERS)):
        index.add_worker(record_of(number))
    for op, number, location, keys in operations:
        apply(index, op, number, location, keys)
        check(index)  # after every step: a lookup's cached answers must follow what comes after it


def apply(index: ChunkIndex, op: str, number: int, location: str, keys: frozenset[int]) -> None:
    inst, wid, tier = WORKERS[number]
    record = index.workers.get((inst, wid))
    if op == "join":
        if record is None:
            index.add_worker(record_of(number))
        return
    if record is None:
        return
    if op == "leave":
        index.remove_worker(record.key)
        return
    if location == REMOTE and tier is None:
        return  # this worker reaches no shared tier
    rows = [[location, k, CHUNK if k < 8 else 9, 100, None, False, 100] for k in sorted(keys)]
    if op == "admit":
        index.apply_report(record, rows, [], False)
    elif op == "evict":
        index.apply_report(record, [], [[location, k] for k in keys], False)
    else:
        index.apply_report(record, rows, [], True)


def check(index: ChunkIndex) -> None:
    expected = reference(index)
    assert index.lookup(SPANS) == expected
    by_keys = index.lookup_keys(KEYS, CHUNK)
    assert {inst: (loc, tokens) for inst, (loc, tokens, _) in by_keys.items()} == expected
    assert all(chunks == KEYS.index(next(s.key for s in SPANS if s.end == tokens)) + 1 for _, tokens, chunks in by_keys.values())
    assert index.total_chunks == len(
        {k for r in index.workers.values() for chunks in r.locations.values() for k in chunks} | _tier_keys(index)
    )


def _tier_keys(index: ChunkIndex) -> set[int]:
    return {k for chunks in index.tiers.values() for k in chunks}
