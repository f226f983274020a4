"""Module boundaries, checked in a fresh interpreter: what each entry point may and may not import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120).stdout
    return set(out.split())


def test_help_loads_no_heavy_module() -> None:
    modules = loaded_after("from lmcached.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass")
    heavy = {"torch", "numba", "aiohttp", "textual", "transformers"}
    assert not heavy & {m.split(".")[0] for m in modules}


def test_cli_help_runs_fast_enough_to_script() -> None:
    done = subprocess.run([sys.executable, "-m", "lmcached", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "compress" in done.stdout


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "codecs").glob("*.py")), ids=lambda p: p.name)
def test_codec_never_imports_the_event_loop_or_the_ui(path: Path) -> None:
    assert not imports_of(path) & {"asyncio", "aiohttp", "textual"}


@pytest.mark.parametrize("path", sorted((ROOT / "lmcached").glob("*.py")), ids=lambda p: p.name)
def test_daemon_never_imports_textual(path: Path) -> None:
    assert "textual" not in imports_of(path)


def test_importing_the_codec_loads_no_asyncio_server_stack() -> None:
    modules = loaded_after("from lmcached.codecs import get_codec\nget_codec('cachegen')")
    assert not {"aiohttp", "textual"} & {m.split(".")[0] for m in modules}
