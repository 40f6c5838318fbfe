"""What a benchmark reports: figures (contender A, contender B, their ratio, a goal), the environment,
a table on the console and a JSON file.

JSON layout (``python -m medseg.bench --out FILE``)::

    {
      "schema": 1,
      "environment": {"device", "device_name", "cpu_model", "cpu_count", "threads", "python", "platform",
                      "torch", "lightning", "monai", "numpy"},
      "settings": {"quick", "device", "repeats", "threads", "only", "cache_dir"},
      "benchmarks": {
        "<name>": {"seconds": wall time of the benchmark, "settings": {...}, "details": {...},
                   "figures": [<figure>, ...]},
        ...
      },
      "errors": {"<name>": "what went wrong", ...}   (benchmarks that failed; the others still ran)
    }

A figure::

    {"benchmark", "name",
     "kind": "ratio" (value = A / B), "exponent" (value = k of a fit cost ~ voxels^k) or "value" (a
             quantity in a's unit, b null),
     "value", "ratio_min" (A / B of the minimum times, or null), "ratio_peak_memory" (or null),
     "a": <contender>, "b": <contender or null>,
     "goal": {"op": "<=" or ">=", "value"} or null, "meets_goal": true, false or null (no goal),
     "note": what is measured and how}

A contender: ``{"name", "value", "unit" ("s", "patches/s", ...), "min" (or null), "samples": [...],
"peak_bytes" (or null)}``; for times ``value`` is the median. Goals are information: nothing fails on them.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from medseg.bench.timing import Timing

SCHEMA_VERSION = 1
_MIB = 2**20
PIPED_WIDTH = 180  # table width when the output is not a terminal (rich would use 80)


@dataclass(frozen=True)
class Contender:
    """One side of a figure: a time (median of ``samples``), a rate, or another measured quantity."""

    name: str
    value: float
    unit: str
    min: float | None = None
    samples: tuple[float, ...] = ()
    peak_bytes: int | None = None

    @classmethod
    def from_timing(cls, name: str, timing: Timing, peak_bytes: int | None = None) -> Contender:
        return cls(name, timing.median_s, "s", timing.min_s, timing.times_s, peak_bytes)


@dataclass(frozen=True)
class Goal:
    """``value`` of a figure should be ``op`` ``limit`` (``<=`` or ``>=``)."""

    op: Literal["<=", ">="]
    value: float

    def met(self, x: float) -> bool:
        return x <= self.value if self.op == "<=" else x >= self.value


@dataclass(frozen=True)
class Figure:
    """One row of the table: A against B (``kind="ratio"``), a growth exponent (``kind="exponent"``) or a
    measured quantity in ``a``'s unit (``kind="value"``, e.g. a slope in MB per case)."""

    benchmark: str
    name: str
    value: float
    a: Contender | None = None
    b: Contender | None = None
    kind: Literal["ratio", "exponent", "value"] = "ratio"
    ratio_min: float | None = None
    ratio_peak_memory: float | None = None
    goal: Goal | None = None
    note: str = ""

    @classmethod
    def compare(cls, benchmark: str, name: str, a: Contender, b: Contender, goal: Goal | None = None, note: str = "") -> Figure:
        """A / B of the values, the minima and the peak memory (where both sides have them)."""
        ratio_min = a.min / b.min if a.min is not None and b.min else None
        memory = a.peak_bytes / b.peak_bytes if a.peak_bytes is not None and b.peak_bytes else None
        return cls(benchmark, name, a.value / b.value, a, b, "ratio", ratio_min, memory, goal, note)

    @property
    def meets_goal(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "meets_goal": self.meets_goal}


@dataclass
class BenchResult:
    """What one benchmark returns: its figures, the settings it ran with and further numbers."""

    figures: list[Figure]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None  # wall time of the benchmark, set by the suite


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and threads, so that figures can be compared across runs."""
    import lightning
    import monai
    import numpy

    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None for a CPU build of torch
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_count": torch.cuda.device_count(),
        "lightning": lightning.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
    }


def finite_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def format_quantity(value: float | None, unit: str) -> str:
    """``0.0123, "s"`` -> ``12.3 ms``; other units keep three significant digits."""
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.3g} {unit}".strip()


def format_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / _MIB:.0f} MiB" if value >= 10 * _MIB else f"{value / _MIB:.1f} MiB"


def _contender_cell(c: Contender | None) -> str:
    if c is None:
        return ""
    lines = [c.name, format_quantity(c.value, c.unit) + (f" (min {format_quantity(c.min, c.unit)})" if c.min is not None and len(c.samples) > 1 else "")]
    if c.peak_bytes is not None:
        lines.append(f"peak {format_bytes(c.peak_bytes)}")
    return "\n".join(lines)


def _value_cell(f: Figure) -> str:
    if f.kind == "exponent":
        return f"k = {f.value:.2f}"
    if f.kind == "value":
        return format_quantity(f.value, f.a.unit if f.a else "")
    parts = [f"{f.value:.3f}"]
    if f.ratio_min is not None:
        parts.append(f"min {f.ratio_min:.3f}")
    if f.ratio_peak_memory is not None:
        parts.append(f"mem {f.ratio_peak_memory:.2f}")
    return "\n".join(parts)


def print_table(env: Mapping[str, Any], results: Mapping[str, BenchResult], quick: bool = False) -> None:
    """The figures of a suite run as a rich table, with the environment above it."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
    console.print(
        f"[bold]medseg benchmarks[/bold] on {env['device']} ({env['device_name']}), {env['threads']} torch threads, "
        f"torch {env['torch']}, lightning {env['lightning']}, monai {env['monai']}"
        + (" [quick mode: tiny sizes, figures not meaningful]" if quick else "")
    )
    table = Table(show_lines=True)
    for column in ("benchmark", "figure", "A", "B", "A / B", "goal", "met"):
        table.add_column(column, overflow="fold")
    for name, result in results.items():
        for figure in result.figures:
            goal = f"{figure.goal.op} {figure.goal.value:g}" if figure.goal else ""
            met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: ""}[figure.meets_goal]
            table.add_row(name, figure.name, _contender_cell(figure.a), _contender_cell(figure.b), _value_cell(figure), goal, met)
    console.print(table)


def markdown_rows(env: Mapping[str, Any], results: Mapping[str, BenchResult]) -> list[str]:
    """The figures as rows of the README's Performance table: ``| what | A / B | context |``."""
    where = f"{'GPU' if env['device'] == 'cuda' else 'CPU'} {env['device_name']}, {env['threads']} thread(s)"
    rows = ["| what | A / B | context |", "| --- | --- | --- |"]
    for result in results.values():
        for f in result.figures:
            if f.kind == "exponent":
                rows.append(f"| {f.benchmark}: {f.name} | k = {f.value:.2f} | {where} |")
                continue
            if f.kind == "value":
                goal = f" (goal {f.goal.op} {f.goal.value:g})" if f.goal else ""
                rows.append(f"| {f.benchmark}: {f.name} | {format_quantity(f.value, f.a.unit if f.a else '')}{goal} | {f.note}; {where} |")
                continue
            ratio = f"{f.value:.2f}" + (f", peak memory {f.ratio_peak_memory:.2f}" if f.ratio_peak_memory is not None else "")
            goal = f" (goal {f.goal.op} {f.goal.value:g})" if f.goal else ""
            sides = " vs ".join(f"{c.name} {format_quantity(c.value, c.unit)}" + (f" / {format_bytes(c.peak_bytes)}" if c.peak_bytes is not None else "") for c in (f.a, f.b) if c)
            rows.append(f"| {f.benchmark}: {f.name} | {ratio}{goal} | {sides}; {where} |")
    return rows
