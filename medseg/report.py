"""Human-readable summaries of metric dictionaries: console tables (per-case CSV files: :func:`medseg.io.write_csv_atomic`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# The report files of a run or cross-validation folder, relative to it (those a run lacks are skipped by their readers):
# summaries and pictures of the evaluation, and the files that name the cases (ids of clinical data may identify
# patients). The model zip ships the first (the second on request), the experiment tracker both.
REPORT_FILES = (
    "metrics.json", "crossval.json", "operating_point.json", "operating_point_sweep.csv", "operating_point_sweep.png",
    "validation/evaluation/summary.json", "validation/evaluation/recall_by_lesion_size.png", "oof/evaluation/summary.json", "oof/evaluation/recall_by_lesion_size.png",
)  # fmt: skip
CASE_REPORT_FILES = ("splits.json", "validation/evaluation/evaluation.csv", "validation/evaluation/dice_per_case.png", "oof/evaluation/evaluation.csv", "oof/evaluation/dice_per_case.png")
# Width of the table when output is not a terminal (log files, CI): room for eight or more bucket columns.
LOG_WIDTH = 200
# Columns of the console table: voxel overlap scores, then lesion-wise detection (overall recall, one recall
# column per lesion size bucket, whatever the buckets are named, then lesion precision).
VOXEL_COLUMNS = {"dice": "Dice", "iou": "IoU", "recall": "Recall", "precision": "Prec."}


def _as_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def metrics_table(metrics: Mapping[str, Any], names: Sequence[str], stage: str = "val", title: str | None = None) -> Table:
    """A table with one row per region/class (and the mean of the overlap scores) and one column per metric.

    Args:
        metrics: logged values keyed ``"<stage>/<metric>_<name>"`` (and ``"<stage>/<score>"`` for the means).
        names: region/class names in row order.
    """
    table = Table(title=title or f"{stage} metrics", title_justify="left")
    table.add_column("region", no_wrap=True)
    by_size = {f"lesion_recall_{b}": f"{b.capitalize()} rec." for b in size_buckets(metrics, names, stage)}
    headers = {**VOXEL_COLUMNS, "lesion_recall": "Lesion rec.", **by_size, "lesion_precision": "Lesion prec.", "lesion_f1": "Lesion F1", "fp_per_case": "FP/case"}
    columns = [c for c in headers if any(f"{stage}/{c}_{n}" in metrics for n in names)]
    for column in columns:
        table.add_column(headers[column], justify="right")
    for name in [*names, "mean"]:
        cells = []
        for column in columns:
            value = metrics.get(f"{stage}/{column}" if name == "mean" else f"{stage}/{column}_{name}")
            if column.startswith("lesion_recall_"):  # a bucket without reference lesions has no recall to show
                count = metrics.get(f"{stage}/n_ref_lesions_{column.removeprefix('lesion_recall_')}_{name}")
                value = None if count is not None and _as_float(count) == 0 else value
            cells.append("-" if value is None or math.isnan(_as_float(value)) else f"{_as_float(value):.4f}")
        table.add_row(name, *cells, style="bold" if name == "mean" else None)
    return table


def size_buckets(metrics: Mapping[str, Any], names: Sequence[str], stage: str = "val") -> list[str]:
    """Lesion size bucket names in logged order, read off the ``<stage>/n_ref_lesions_<bucket>_<name>`` keys."""
    prefix = f"{stage}/n_ref_lesions_"
    found = [key.removeprefix(prefix).removesuffix(f"_{name}") for key in metrics for name in names if key.startswith(prefix) and key.endswith(f"_{name}")]
    return list(dict.fromkeys(b for b in found if b))


def print_metrics_table(metrics: Mapping[str, Any], names: Sequence[str], stage: str = "val", title: str | None = None) -> None:
    """Print :func:`metrics_table` to the terminal (in logs and pipes, wide enough for every column)."""
    console = Console()
    if not console.is_terminal:  # rich assumes 80 columns there and would cut the numbers short
        console = Console(width=LOG_WIDTH)
    console.print(metrics_table(metrics, names, stage, title))


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Tensors and numbers to plain floats (for JSON)."""
    return {k: _as_float(v) for k, v in metrics.items()}
