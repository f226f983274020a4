"""Benchmark results: rows with their baseline, a table for people, JSON for machines, a plot."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: "higher" for rates (ratio = value / baseline), "lower" for latencies (ratio = baseline / value):
    #: either way a ratio above 1 means better than the baseline.
    better: str = "higher"
    #: What `target` says, checkable: ("value" or "ratio", ">=" or "<=", threshold); None when the figure
    #: has no target on this row.
    need: tuple[str, str, float] | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.value == 0:
            return None
        if self.better == "lower":
            return self.baseline / self.value  # type: ignore[operator]
        return self.value / self.baseline  # type: ignore[operator]

    @property
    def verdict(self) -> str:
        """ "pass" or "short" against the target on this machine, this run; "" when there is none."""
        if self.need is None:
            return ""
        what, op, threshold = self.need
        figure = self.value if what == "value" else self.ratio
        if figure is None:
            return "short"
        return "pass" if (figure >= threshold if op == ">=" else figure <= threshold) else "short"

    def value_cell(self) -> str:
        """The figure, with its spread (min–max over the runs) when it is a median of several."""
        spread = f" ({self.extra['min_ms']:.4g}–{self.extra['max_ms']:.4g})" if "min_ms" in self.extra and "max_ms" in self.extra else ""
        return f"{self.value:.4g} {self.unit}{spread}"

    def target_cell(self, marks: bool = True) -> str:
        """The target with a mark beside it: ✓ met, ✗ short (on this machine, in this run)."""
        if not self.verdict:
            return self.target
        mark = ("✓" if self.verdict == "pass" else "✗") if marks else ""
        return f"{mark} {self.verdict}: {self.target}".strip()


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    #: plot title -> {"x": [...], "xlabel": str, "ylabel": str, "lines": {label: [y...]}}
    series: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def add_vs_miss(
        self, section: str, name: str, seconds: float, miss_seconds: float, extra: dict[str, Any], target: str, factor: float | None
    ) -> Row:
        """A time to first token in ms beside the miss it saves (ratio = miss / it); `factor`, when given, is the
        ratio `target` asks for."""
        return self.add(
            section,
            name,
            seconds * 1000,
            "ms",
            miss_seconds * 1000,
            "miss",
            target,
            better="lower",
            extra=extra,
            need=("ratio", ">=", factor) if factor is not None else None,
        )

    def machine(self) -> dict[str, Any]:
        return {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }

    def as_json(self) -> str:
        return json.dumps(
            {
                "machine": self.machine(),
                "rows": [{**asdict(r), "ratio": r.ratio, "verdict": r.verdict} for r in self.rows],
                "series": self.series,
            },
            indent=2,
        )

    def markdown(self) -> str:
        """The results as a Markdown table (for docs/performance.md)."""
        lines = ["| section | figure | value | baseline | vs baseline (>1 = better) | target |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            base = f"{r.baseline:.4g} {r.unit} ({r.baseline_name})" if r.baseline is not None else ""
            ratio = f"{r.ratio:.2f}×" if r.ratio is not None else ""
            lines.append(f"| {r.section} | {r.name} | {r.value_cell()} | {base} | {ratio} | {r.target_cell()} |")
        return "\n".join(lines) + "\n"

    def print_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="lmcached bench")
        for col in ("section", "figure", "value", "baseline", "vs baseline (>1 = better)", "target"):
            table.add_column(col, justify="right" if col.startswith(("value", "vs")) else "left")
        for r in self.rows:
            base = f"{r.baseline:.4g} {r.unit} ({r.baseline_name})" if r.baseline is not None else ""
            ratio = f"{r.ratio:.2f}×" if r.ratio is not None else ""
            target = r.target_cell()
            style = {"pass": "green", "short": "bold red"}.get(r.verdict, "")
            table.add_row(r.section, r.name, r.value_cell(), base, ratio, f"[{style}]{target}[/]" if style else target)
        console = Console(width=max(160, Console().width))
        console.print(table)
        checked = [r for r in self.rows if r.verdict]
        short = [r for r in checked if r.verdict == "short"]
        if checked:
            console.print(f"{len(checked) - len(short)} of {len(checked)} targets met on this machine" + (":" if short else "."))
            for r in short:
                console.print(f"  [bold red]short[/]: {r.section} / {r.name}: {r.value:.4g} {r.unit} (target {r.target})")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.series)
        if not names:
            return
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            data = self.series[name]
            for label, values in data.get("lines", {}).items():
                ax.plot(data["x"], values, marker="o", label=label)
            for label, points in data.get("points", {}).items():  # lines with their own x values
                ax.plot(points["x"], points["y"], marker="o", label=label)
            ax.set_title(name)
            ax.set_xlabel(data.get("xlabel", ""))
            ax.set_ylabel(data.get("ylabel", ""))
            if data.get("xlog"):
                ax.set_xscale("log")
            if data.get("ylog"):
                ax.set_yscale("symlog", linthresh=0.1)  # perplexity changes can be tiny or negative
            ax.legend()
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def median_spread(seconds: list[float]) -> tuple[float, dict[str, float]]:
    """The median of repeated timings, and their spread (min-max, in ms) for a row's `extra`."""
    ordered = sorted(seconds)
    return statistics.median(ordered), {"min_ms": ordered[0] * 1000, "max_ms": ordered[-1] * 1000, "runs": len(ordered)}


def progress() -> Any:
    """A rich progress bar on stderr (so --json output on stdout stays clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
