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


@pytest.mark.parametrize("path", sorted((ROOT / "lmcached").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_daemon_never_imports_textual(path: Path) -> None:
    assert "textual" not in imports_of(path)


def test_importing_the_codec_loads_no_asyncio_server_stack() -> None:
    modules = loaded_after("from lmcached.codecs import get_codec\nget_codec('cachegen')")
    assert not {"aiohttp", "textual"} & {m.split(".")[0] for m in modules}


# ---------------------------------------------------------------------------------------------- the layout's arrows
#: Each folder (or top-level module) of lmcached, and what it may import besides itself. The arrows point down:
#: the wire format below both sides, the controller never into the worker, the client only into the wire.
ALLOWED = {
    "errors": set(),
    "lmcached": set(),  # the package's own constants (__version__, DEFAULT_INSTANCE_ID)
    "codecs": {"errors"},
    "wire": {"errors", "lmcached"},
    "config": {"errors", "lmcached", "wire"},
    "client": {"errors", "lmcached", "wire", "config", "codecs"},
    "control": {"errors", "lmcached", "wire", "config", "codecs"},
    "worker": {"errors", "lmcached", "wire", "config", "codecs", "client"},
    "engine": {"errors", "lmcached", "wire", "config", "codecs", "client"},
    "integrations": {"errors", "lmcached", "wire", "config", "codecs", "client", "worker"},
    "fleet": {"errors", "lmcached", "engine"},
    "tui": {"errors", "lmcached", "wire", "control"},
    "service": set(),
    "logs": set(),
    "serve": {"errors", "lmcached", "wire", "config", "codecs", "control", "worker", "engine", "service"},
    "config_reference": {"config"},
    # The command line and the benchmarks put everything together.
    "cli": None,
    "__main__": None,
    "bench": None,
}
FOLDERS = {"wire", "control", "worker", "engine", "fleet", "integrations", "bench", "codecs", "tui"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("codecs", "tui"):  # mapped into lmcached by pyproject's package-dir
        parts.insert(0, "lmcached")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str:
    parts = module.split(".")
    return "lmcached" if len(parts) == 1 else parts[1]


def runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The lmcached modules a file imports, anywhere in it (a function's lazy import too), but not the ones
    only a type checker reads (`if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{a.name}" for a in node.names} & modules
            found |= submodules if len(submodules) == len(node.names) else ({base} & modules) | submodules
    return found - {me}


def import_graph() -> dict[str, set[str]]:
    paths = [p for folder in ("lmcached", "codecs", "tui") for p in (ROOT / folder).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): runtime_imports(p, modules) for p in paths}


def test_every_folder_imports_only_what_lies_below_it() -> None:
    graph = import_graph()
    assert {area(m) for m in graph} <= set(ALLOWED), "a new folder or top-level module: give it its place in ALLOWED"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if ALLOWED[area(module)] is not None and area(target) != area(module) and area(target) not in ALLOWED[area(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_the_arrows_named_in_the_layout_issue_point_down() -> None:
    """The ones that pointed the wrong way before the folders: the control plane into the worker's storage,
    the client into the worker's arena and backends."""
    graph = import_graph()
    assert not {t for m, ts in graph.items() if area(m) == "control" for t in ts if area(t) in ("worker", "engine", "fleet", "client")}
    assert {area(t) for t in graph["lmcached.client"]} <= {"wire", "config", "errors", "codecs", "lmcached"}
    assert not {t for m, ts in graph.items() if area(m) == "worker" for t in ts if area(t) == "control"}


def test_no_import_circle() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while (top := stack.pop()) != module:
                component.append(top)
            if component:
                circles.append(sorted([module, *component]))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_the_folders_name_the_roles() -> None:
    """A folder is a role: each says what it is in its docstring, and no loose module is left beside
    client, config, serve, cli and errors but the process's own plumbing."""
    for folder in FOLDERS - {"codecs", "tui"}:
        init = ROOT / "lmcached" / folder / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"lmcached/{folder}/ says nothing of its role"
    loose = {p.stem for p in (ROOT / "lmcached").glob("*.py")}
    assert loose <= {"__init__", "__main__", "cli", "client", "config", "config_reference", "errors", "logs", "serve", "service"}
