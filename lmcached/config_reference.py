"""docs/configuration.md, generated from where the keys are declared: the fields of `lmcached.config.Config`
(their types, defaults and the comments beside them) and the `lmcached` commands whose flags set them.

    python -m lmcached.config_reference > docs/configuration.md

tests/test_config.py fails when the document and the code disagree, so a new key cannot go undocumented.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from pathlib import Path

from lmcached.config import AUTH_TOKEN_ENV, CONFIG_FILE_ENV, ENV_PREFIX, Config

SOURCE = Path(__file__).parent
#: The section comments inside Config that split LMCache's keys from lmcached's own.
SECTIONS = {"# LMCache's keys.": "LMCache's keys", "# lmcached's own keys.": "lmcached's own keys"}


def _comments(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """(comment-only lines, comments after code), each as line number -> the comment's text."""
    tokens = [tok for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline) if tok.type == tokenize.COMMENT]
    alone = {tok.start[0]: tok.string for tok in tokens if tok.line.lstrip().startswith("#")}
    after = {tok.start[0]: tok.string for tok in tokens if not tok.line.lstrip().startswith("#")}
    return alone, after


def fields_in_order() -> list[tuple[str, str, str, str]]:
    """(section, key, type, description) for every Config field, in declaration order: the description is the
    comment beside the field, or the comment lines just above it."""
    path = SOURCE / "config.py"
    tree = ast.parse(path.read_text())
    alone, after = _comments(path)
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    section, out = "", []
    for node in config.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in alone and alone[line].strip() not in SECTIONS:
            above.insert(0, alone[line].lstrip("# "))
            line -= 1
        if line in alone:
            section = SECTIONS[alone[line].strip()]
        beside = after.get(node.end_lineno or node.lineno, "").lstrip("# ")
        description = " ".join([*above, beside]).strip()
        out.append((section, node.target.id, ast.unparse(node.annotation), description))
    return out


def flags_by_key() -> dict[str, list[str]]:
    """Config key -> the command-line flags that set it (`lmcached serve --local-disk`), read from cli.py: each
    command passes its flags to `_load_config` as {key: parameter}."""
    tree = ast.parse((SOURCE / "cli.py").read_text())
    # Options shared by several commands are module-level names (PeersOpt = typer.Option(...)).
    shared = {
        target.id: node.value for node in tree.body if isinstance(node, ast.Assign) for target in node.targets if isinstance(target, ast.Name)
    }
    found: dict[str, list[str]] = {}
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        command = next((_command_name(d, function.name) for d in function.decorator_list if _command_name(d, function.name)), None)
        if command is None:
            continue
        defaults = [shared.get(d.id, d) if isinstance(d, ast.Name) else d for d in function.args.defaults]
        flags = {arg.arg: _flag(arg.arg, default) for arg, default in zip(function.args.args, defaults, strict=True)}
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_load_config"):
            overrides = call.args[1] if len(call.args) > 1 else None
            if not isinstance(overrides, ast.Dict):
                continue
            for key, value in zip(overrides.keys, overrides.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Name) and flags.get(value.id):
                    found.setdefault(key.value, []).append(f"`lmcached {command} {flags[value.id]}`")
    return found


def _command_name(decorator: ast.expr, function: str) -> str | None:
    """The command an `@app.command(...)` decorator registers (typer names it after the function by default)."""
    if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command"):
        return None
    for keyword in decorator.keywords:
        if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
            return str(keyword.value.value)
    return function.replace("_", "-")


def _flag(parameter: str, default: ast.expr) -> str | None:
    """A typer.Option's long flag: the first "--…" string it names, else typer's own (--the-parameter)."""
    if not (isinstance(default, ast.Call) and getattr(default.func, "attr", "") == "Option"):
        return None
    names = [a.value for a in default.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")]
    return names[0].split("/")[0] if names else "--" + parameter.replace("_", "-")


def _default(key: str) -> str:
    field = next(f for f in dataclasses.fields(Config) if f.name == key)
    value = field.default
    return "unset" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def render() -> str:
    flags = flags_by_key()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m lmcached.config_reference > docs/configuration.md` from lmcached/config.py and",
        "     lmcached/cli.py; tests/test_config.py fails when this file and the code disagree. Do not edit by hand. -->",
        "",
        "Every key, where it can be set, and what it does. Precedence: a command-line flag over the environment",
        f"(`{ENV_PREFIX}<KEY>`, the key upper-cased) over the YAML file (`--config FILE`, or `{CONFIG_FILE_ENV}`) over",
        "the default. A YAML key lmcached does not know stops the start with an error naming it; an unknown",
        f"`{ENV_PREFIX}` variable is named in a warning. LMCache's keys keep LMCache's names and meaning, so an",
        "LMCache config file works as it is.",
    ]
    section = None
    for group, key, kind, description in fields_in_order():
        if group != section:
            section = group
            lines += ["", f"## {group}", "", "| key | type | default | environment | flags | what it does |", "|---|---|---|---|---|---|"]
        env = f"`{ENV_PREFIX}{key.upper()}`" + (f", `{AUTH_TOKEN_ENV}`" if key == "auth_token" else "")
        # (a | inside a cell, even in code, would end the cell: escaped)
        shown, kind = description.replace("|", "\\|") or "—", kind.replace("|", "\\|")
        lines.append(f"| `{key}` | `{kind}` | {_default(key)} | {env} | {', '.join(flags.get(key, [])) or '—'} | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
