"""A wide evaluation set for the codec, from text that ships with what lmcached installs on any machine (no
download): six kinds of text, each split into a tuning half and a held-out half. Tune on the first; report the
second (`lmcached bench codec` does). The split is fixed: candidates sorted by name, every other one held out.

    prose          package descriptions (the long description in each *.dist-info/METADATA)
    legal          licence texts shipped in *.dist-info
    code           CPython standard-library modules
    documentation  the Python language reference (pydoc_data), minus the topics the defaults were tuned on
    dialogue       interactive sessions (>>> prompts and their answers) from standard-library docstrings
    tables         comma-separated tables (matplotlib's sample data)
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

KINDS = ("prose", "legal", "code", "documentation", "dialogue", "tables")
#: A candidate must be long enough for a prefix and its scored continuation (characters, roughly 4 a token).
MIN_CHARS = 5000
#: Characters per sample cut from a long table.
TABLE_SLICE = 7000

_STDLIB_CODE = (
    "argparse.py", "asyncio/tasks.py", "collections/__init__.py", "configparser.py", "email/message.py",
    "http/client.py", "json/decoder.py", "logging/__init__.py", "pathlib.py", "subprocess.py", "tarfile.py",
    "threading.py", "zipfile.py", "inspect.py",
)  # fmt: skip
_STDLIB_DOCTESTS = (
    "_pydecimal.py", "fractions.py", "statistics.py", "difflib.py", "textwrap.py", "collections/__init__.py",
    "itertools.py", "heapq.py", "functools.py", "doctest.py", "string.py", "shlex.py", "ipaddress.py",
)  # fmt: skip


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _prose() -> Iterator[tuple[str, str]]:
    for meta in sorted(_site_packages().glob("*.dist-info/METADATA")):
        text = _read(meta)
        _, sep, body = text.partition("\n\n")  # headers, then the long description
        if sep:
            yield meta.parent.name, body


def _legal() -> Iterator[tuple[str, str]]:
    for dist in sorted(_site_packages().glob("*.dist-info")):
        for path in sorted([*dist.glob("LICENSE*"), *dist.glob("COPYING*"), *dist.glob("licenses/*")]):
            if path.is_file():
                yield f"{dist.name}/{path.name}", _read(path)


def _code() -> Iterator[tuple[str, str]]:
    for name in _STDLIB_CODE:
        yield name, _read(_stdlib() / name)


def _documentation(tuned: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if name not in tuned:
            yield name, topics[name]


def _dialogue() -> Iterator[tuple[str, str]]:
    """The >>> sessions of a module's docstrings, joined: a question, an answer, the next question…"""
    for name in _STDLIB_DOCTESTS:
        lines, inside = [], False
        for line in _read(_stdlib() / name).splitlines():
            stripped = line.strip()
            if stripped.startswith((">>> ", "... ")):
                inside = True
                lines.append(stripped)
            elif inside and stripped and not stripped.startswith(('"""', "'''")):
                lines.append(stripped)  # the answer
            else:
                inside = False
        yield name, "\n".join(lines)


def _tables() -> Iterator[tuple[str, str]]:
    data = _site_packages() / "matplotlib" / "mpl-data" / "sample_data"
    for path in sorted(data.glob("*.csv")):
        text = _read(path)
        for i, start in enumerate(range(0, len(text) - MIN_CHARS + 1, TABLE_SLICE)):
            yield f"{path.name}[{i}]", text[start : start + TABLE_SLICE]


def candidates(kind: str, tuned_topics: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every text of a kind long enough to be a sample, sorted by name."""
    source = {
        "prose": _prose,
        "legal": _legal,
        "code": _code,
        "documentation": lambda: _documentation(tuned_topics),
        "dialogue": _dialogue,
        "tables": _tables,
    }[kind]
    return sorted((name, text) for name, text in source() if len(text) >= MIN_CHARS)


def split(kind: str, tuned_topics: tuple[str, ...] = ()) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(tuning half, held-out half) of a kind: every other candidate held out."""
    texts = candidates(kind, tuned_topics)
    return texts[0::2], texts[1::2]
