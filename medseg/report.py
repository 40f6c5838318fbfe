"""Human-readable summaries of metric dictionaries (console tables, JSON files)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from medseg.metrics.voxel import SCORES


def _as_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def metrics_table(metrics: Mapping[str, Any], names: Sequence[str], stage: str = "val", title: str | None = None) -> Table:
    """A table with one row per region/class (and their mean) and one column per overlap score.

    Args:
        metrics: logged values keyed ``"<stage>/<score>_<name>"`` and ``"<stage>/<score>"`` (the mean).
        names: region/class names in row order.
    """
    table = Table(title=title or f"{stage} metrics", title_justify="left")
    table.add_column("region")
    present = [s for s in SCORES if f"{stage}/{s}" in metrics]
    for score in present:
        table.add_column(score.capitalize() if score != "iou" else "IoU", justify="right")
    for name in [*names, "mean"]:
        suffix = "" if name == "mean" else f"_{name}"
        cells = []
        for score in present:
            value = metrics.get(f"{stage}/{score}{suffix}")
            cells.append("-" if value is None or math.isnan(_as_float(value)) else f"{_as_float(value):.4f}")
        table.add_row(name, *cells, style="bold" if name == "mean" else None)
    return table


def print_metrics_table(metrics: Mapping[str, Any], names: Sequence[str], stage: str = "val", title: str | None = None) -> None:
    """Print :func:`metrics_table` to the terminal."""
    Console().print(metrics_table(metrics, names, stage, title))


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Tensors and numbers to plain floats (for JSON)."""
    return {k: _as_float(v) for k, v in metrics.items()}
