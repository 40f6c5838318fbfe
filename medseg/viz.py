"""Pictures of results: per-case Dice by region, lesion detection recall by lesion size, overlays of a
case's modalities with reference and predicted outlines, and the loader the inspection notebook uses.

Every function takes plain data (rows of the per-case table written by training and ``medseg.evaluate``)
and returns a matplotlib ``Figure``; :func:`save_figure` writes it atomically. The non-interactive Agg
backend is used unless one was chosen already, so this works on headless machines and in notebooks.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

if "MPLBACKEND" not in os.environ and not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "qt", "tk")):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import cc3d  # noqa: E402
import nibabel as nib  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from medseg.io import write_figure_atomic  # noqa: E402

Row = Mapping[str, Any]


def _regions(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(str(r["region"]) for r in rows))


def plot_case_dice(rows: Sequence[Row], title: str = "Dice per case") -> Figure:
    """Per-case Dice of every region: one box and the individual cases as dots.

    Args:
        rows: per-case rows with ``case``, ``region`` and ``dice``.
    """
    regions = _regions(rows)
    values = [[float(r["dice"]) for r in rows if r["region"] == region] for region in regions]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(regions), 4))
    ax.boxplot(values, showfliers=False)
    ax.set_xticks(range(1, len(regions) + 1), regions)
    jitter = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.7, color="tab:blue")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(f"{title} ({len(values[0]) if values else 0} cases)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def recall_by_size(rows: Sequence[Row], bucket_names: Sequence[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Detected and reference lesion counts per region and size bucket, pooled over cases.

    Returns:
        ``{region: {bucket: (detected, n_ref_lesions)}}``.
    """
    pooled: dict[str, dict[str, tuple[int, int]]] = {}
    for region in _regions(rows):
        subset = [r for r in rows if r["region"] == region]
        pooled[region] = {
            b: (sum(int(float(r.get(f"detected_{b}", 0))) for r in subset), sum(int(float(r.get(f"n_ref_lesions_{b}", 0))) for r in subset))
            for b in bucket_names
        }
    return pooled


def bucket_labels(bucket_names: Sequence[str], edges_mm3: Sequence[float] | None) -> list[str]:
    """Tick labels such as ``small\n< 50 mm³``, ``medium\n50-500 mm³``, ``large\n>= 500 mm³``."""
    if edges_mm3 is None or len(edges_mm3) != len(bucket_names) - 1:
        return list(bucket_names)
    e = [f"{float(x):g}" for x in edges_mm3]
    ranges = [f"< {e[0]}", *[f"{a}-{b}" for a, b in zip(e, e[1:])], f">= {e[-1]}"]
    return [f"{name}\n{r} mm³" for name, r in zip(bucket_names, ranges)]


def plot_recall_by_size(
    rows: Sequence[Row],
    bucket_names: Sequence[str] = ("small", "medium", "large"),
    edges_mm3: Sequence[float] | None = (50.0, 500.0),
    title: str = "Lesion detection recall by lesion size",
) -> Figure:
    """Bars of pooled lesion detection recall per size bucket and region, annotated ``detected/total``.

    Buckets without reference lesions are left empty (no bar, "none") rather than drawn as a perfect score.
    """
    pooled = recall_by_size(rows, bucket_names)
    regions = list(pooled)
    width = 0.8 / max(1, len(regions))
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(bucket_names), 4))
    x = np.arange(len(bucket_names))
    for i, region in enumerate(regions):
        counts = [pooled[region][b] for b in bucket_names]
        recall = [d / n if n else np.nan for d, n in counts]
        bars = ax.bar(x + (i - (len(regions) - 1) / 2) * width, np.nan_to_num(recall), width, label=region)
        for bar, (d, n) in zip(bars, counts):
            label = f"{d}/{n}" if n else "none"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, bucket_labels(bucket_names, edges_mm3))
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("detected / reference lesions")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_operating_point(rows: Sequence[Row], chosen: Mapping[str, Mapping[str, float]], criterion: str) -> Figure:
    """The operating-point sweep: per region, the criterion, the recall of the smallest lesions the grid finds 10% of
    and the false positives per case against the threshold, one line per minimum component size (at the chosen
    minimum component score), the chosen point circled; with a grid of component scores, a last panel of the criterion against the minimum
    component score at the chosen threshold, one line per size.

    Args:
        rows: rows of ``operating_point_sweep.csv`` (``region``, ``threshold``, ``min_component_mm3``, optionally
            ``min_component_score``, scores).
        chosen: ``{region: {"threshold": t, "min_component_mm3": m, "min_component_score": c}}``
            (``operating_point.json``'s ``regions``).
        criterion: the score column that was maximised (``dice``, ``lesion_f1``).
    """
    regions = list(dict.fromkeys(r["region"] for r in rows))
    recall_keys = [k for k in rows[0] if k.startswith("lesion_recall_")] if rows else []
    # The smallest size bucket of which the grid finds 10% somewhere (MS: next to no tiny lesion is found, small ones are).
    moving = [k for k in recall_keys if max(float(r[k]) for r in rows) >= 0.1]
    panels = [criterion, *(moving or recall_keys)[:1], "fp_per_case"]
    min_scores = sorted({float(r.get("min_component_score") or 0.0) for r in rows})
    columns = len(panels) + (len(min_scores) > 1)
    fig, axes = plt.subplots(len(regions), columns, figsize=(4.2 * columns, 3.2 * len(regions)), squeeze=False)
    for row_axes, region in zip(axes, regions):
        pick = chosen.get(region)
        pick_score = float((pick or {}).get("min_component_score") or 0.0)
        every = [r for r in rows if r["region"] == region]
        subset = [r for r in every if float(r.get("min_component_score") or 0.0) == pick_score]
        sizes = list(dict.fromkeys(float(r["min_component_mm3"]) for r in subset))
        for ax, score in zip(row_axes, panels):
            for size in sizes:
                line = sorted((float(r["threshold"]), float(r[score])) for r in subset if float(r["min_component_mm3"]) == size)
                ax.plot(*zip(*line), marker="o", markersize=3, linewidth=1.1, label=f">= {size:g} mm³")
            if pick:
                value = next(float(r[score]) for r in subset if float(r["threshold"]) == pick["threshold"] and float(r["min_component_mm3"]) == pick["min_component_mm3"])
                ax.plot([pick["threshold"]], [value], "o", markersize=11, markerfacecolor="none", markeredgecolor="black")
            ax.set_xlabel("threshold")
            ax.set_title(f"{region}: {score}" + (f" (component score >= {pick_score:g})" if len(min_scores) > 1 else ""), fontsize=10)
            ax.grid(alpha=0.3)
            if score == "fp_per_case":
                ax.set_yscale("symlog")
        if len(min_scores) > 1 and pick:
            ax = row_axes[-1]
            at_threshold = [r for r in every if float(r["threshold"]) == pick["threshold"]]
            for size in sizes:
                line = sorted((float(r.get("min_component_score") or 0.0), float(r[criterion])) for r in at_threshold if float(r["min_component_mm3"]) == size)
                ax.plot(*zip(*line), marker="o", markersize=3, linewidth=1.1)
            value = next(float(r[criterion]) for r in at_threshold if float(r["min_component_mm3"]) == pick["min_component_mm3"] and float(r.get("min_component_score") or 0.0) == pick_score)
            ax.plot([pick_score], [value], "o", markersize=11, markerfacecolor="none", markeredgecolor="black")
            ax.set_xlabel("minimum component score")
            ax.set_title(f"{region}: {criterion} at threshold {pick['threshold']:g}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, title="kept components", title_fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG atomically (:func:`medseg.io.write_figure_atomic`) and close it."""
    try:
        return write_figure_atomic(fig, path, dpi)
    finally:
        plt.close(fig)


# Axes of a RAS-ordered array (x: left->right, y: posterior->anterior, z: inferior->superior) and the plane
# that fixes each one.
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}
MISSED_COLOR = ListedColormap(["gold"])


def missed_lesions(prediction: np.ndarray, reference: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Binary mask of the reference lesions (connected components) that no predicted voxel touches."""
    components = cc3d.connected_components(reference.astype(bool), connectivity=connectivity)  # (X, Y, Z) ids
    hit = np.unique(components[prediction.astype(bool)])
    return (components > 0) & ~np.isin(components, hit)


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice of a ``(X, Y, Z)`` RAS volume at ``index`` along ``axis``, transposed for display."""
    return np.take(volume, index, axis=axis).T


def plot_overlays(
    images: Mapping[str, np.ndarray],
    reference: np.ndarray,
    prediction: np.ndarray,
    center: Sequence[int],
    missed: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> Figure:
    """Every modality on axial, coronal and sagittal slices through ``center``, with outlines.

    Args:
        images: modality name -> ``(X, Y, Z)`` volume in RAS order (e.g. ``nib.as_closest_canonical``).
        reference: binary ``(X, Y, Z)`` reference mask, outlined in green.
        prediction: binary ``(X, Y, Z)`` predicted mask, outlined in red.
        center: voxel ``(x, y, z)`` the three slices pass through (a lesion's centroid).
        missed: optional binary ``(X, Y, Z)`` mask of missed reference lesions, filled in gold.
        spacing: voxel size in mm along x, y, z, so that anisotropic volumes are drawn to scale.
    """
    shape = reference.shape
    if prediction.shape != shape or any(v.shape != shape for v in images.values()):
        raise ValueError(f"expected images, reference and prediction of one shape {shape}, got {[v.shape for v in images.values()]} and {prediction.shape}")
    center = [int(round(c)) for c in center]
    fig, axes = plt.subplots(len(images), 3, figsize=(9.5, 3.1 * len(images)), squeeze=False)
    for row, (name, volume) in enumerate(images.items()):
        for col, (plane, axis) in enumerate(PLANES.items()):
            ax = axes[row][col]
            horizontal, vertical = (a for a in range(3) if a != axis)
            aspect = spacing[vertical] / spacing[horizontal]
            ax.imshow(_plane(volume, axis, center[axis]), cmap="gray", origin="lower", aspect=aspect)
            if missed is not None and _plane(missed, axis, center[axis]).any():
                ax.imshow(np.ma.masked_equal(_plane(missed, axis, center[axis]).astype(float), 0), cmap=MISSED_COLOR, alpha=0.6, origin="lower", aspect=aspect)
            for mask, color in ((reference, "lime"), (prediction, "red")):
                section = _plane(mask, axis, center[axis]).astype(float)
                if section.any():
                    ax.contour(section, levels=[0.5], colors=color, linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{plane} {center[axis]}")
            if col == 0:
                ax.set_ylabel(name)
    handles = [plt.Line2D([], [], color="lime", label="reference"), plt.Line2D([], [], color="red", label="prediction")]
    if missed is not None:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="gold", label="missed lesion"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (tuple, list, np.ndarray)):
        return "(" + ", ".join(f"{float(v):.0f}" for v in value) + ")"
    return str(value)


def rows_html(rows: Sequence[Row], columns: Sequence[str], highlight: Callable[[Row], bool] | None = None) -> str:
    """An HTML table of ``rows`` (dicts) for notebooks; rows where ``highlight(row)`` is true in red."""
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        f"<tr style=\"{'background-color:#f8d0d0' if highlight and highlight(r) else ''}\">" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def lesions_html(rows: Sequence[Row], columns: Sequence[str] = ("id", "volume_mm3", "bucket", "detected", "lesion_dice", "centroid")) -> str:
    """Per-lesion rows (:func:`medseg.metrics.lesion.lesion_table`) as HTML, missed lesions in red."""
    return rows_html(rows, columns, highlight=lambda r: not r.get("detected", True))


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file (``evaluation.csv``) as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def worst_cases(rows: Sequence[Row], region: str | None = None, metric: str = "dice", n: int = 5) -> list[Row]:
    """The ``n`` rows with the lowest ``metric`` (of one region, or of all), worst first."""
    chosen = [r for r in rows if region is None or r["region"] == region]
    return sorted(chosen, key=lambda r: float(r[metric]))[:n]


@dataclass
class Inspection:
    """One case with its reference and a model's prediction, in RAS voxel order, ready to draw.

    Attributes:
        case: case id.
        images: modality -> ``(X, Y, Z)`` volume.
        reference, prediction: binary ``(X, Y, Z)`` masks of ``region``.
        spacing: voxel size in mm.
        lesions: one row per reference lesion (:func:`medseg.metrics.lesion.lesion_table`).
        run_dir: the training run folder of the checkpoint (holds ``validation/evaluation/evaluation.csv``).
        connectivity: of the lesions (the run's ``model.lesion_metrics.connectivity``).
        predicted_lesions: one row per predicted lesion of ``region`` (``medseg.predict lesion_table=true``: volume,
            scanner-space centroid, score).
    """

    case: str
    region: str
    images: dict[str, np.ndarray]
    reference: np.ndarray
    prediction: np.ndarray
    spacing: tuple[float, ...]
    lesions: list[dict[str, Any]]
    run_dir: Path

    connectivity: int = 26
    predicted_lesions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def missed(self) -> np.ndarray:
        """Reference lesions the matching rule counts as missed (``lesions`` rows with ``detected`` false), ``(X, Y, Z)``."""
        labels = cc3d.connected_components(np.ascontiguousarray(self.reference), connectivity=self.connectivity)  # ids as lesion_table's
        return np.isin(labels, [row["id"] for row in self.lesions if not row["detected"]])


def latest_checkpoint(log_dir: str | Path = "outputs/demo") -> Path:
    """The best checkpoint (``epoch*.ckpt``, else ``last.ckpt``) of the newest run under ``log_dir``.

    Raises:
        FileNotFoundError: saying how to make one (``make demo``).
    """
    runs = sorted(Path(log_dir).glob("runs/*/checkpoints"), key=lambda p: p.stat().st_mtime)
    for folder in reversed(runs):
        found = sorted(folder.glob("epoch*.ckpt")) or sorted(folder.glob("last.ckpt"))
        if found:
            return found[-1]
    raise FileNotFoundError(f"no checkpoint under {str(log_dir)!r}/runs/*/checkpoints: run `make demo` first, or pass a checkpoint path")


def _canonical(path: str) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def load_inspection(checkpoint: str | Path, case: str | None = None, region: str | None = None, workdir: str | Path | None = None) -> Inspection:
    """Predict one case of a checkpoint's dataset with ``medseg.predict`` and load it for drawing.

    Args:
        checkpoint: a ``.ckpt`` written by ``medseg.train``.
        case: case id; default: the first validation case of the run's ``split.json``.
        region: region or class name; default: the last one (BraTS: ET, the smallest lesions).
        workdir: where the prediction file is written (default: ``<run>/inspection``).
    """
    from medseg.config import compose
    from medseg.data.labels import LabelSpec
    from medseg.data.layouts import find_cases, get_layout
    from medseg.metrics.lesion import lesion_table
    from medseg.prediction import predict

    checkpoint = Path(checkpoint)
    config = torch.load(checkpoint, map_location="cpu", weights_only=True)["medseg_config"]
    data, run_dir = config["data"], checkpoint.parent.parent
    spec = LabelSpec.from_config(data["labels"])
    records = {r["case"]: r for r in find_cases(data["layout"], data["root"], modalities=data.get("modalities") or ())}
    split = run_dir / "split.json"
    case = case or (json.loads(split.read_text())["val"][0] if split.is_file() else next(iter(records)))
    if case not in records:
        raise ValueError(f"expected a case of {data['root']}, got {case!r}")
    region = region or spec.names[-1]
    if region not in spec.names:
        raise ValueError(f"expected a region in {list(spec.names)}, got {region!r}")
    record, out = records[case], Path(workdir or run_dir / "inspection")
    files = "[" + ",".join(record["image"]) + "]"
    # The inspection folder is the notebook's own scratch folder: whatever an earlier inspection left there goes.
    # With the dataset as reference: the table marks each predicted lesion true or false positive and adds the missed ones.
    result = predict(compose("predict", [f"ckpt_path={checkpoint}", f"input={files}", f"output={out}", "overwrite=true", "lesion_table=true", f"reference={data['root']}"]))[0]
    if "error" in result:
        raise ValueError(f"prediction of {case} failed: {result['error']}")
    predicted = Path(result["prediction"])

    channel = spec.names.index(region)
    def mask(path: str) -> np.ndarray:
        return spec.to_channels(np.asarray(_canonical(path).dataobj)[None])[channel]

    names = get_layout(data["layout"]).channel_names(data["root"], data.get("modalities") or (), len(record["image"]))
    images = {str(n): np.asarray(_canonical(f).dataobj, dtype=np.float32) for n, f in zip(names, record["image"])}
    reference, prediction = mask(record["label"]), mask(str(predicted))
    spacing = tuple(float(z) for z in _canonical(record["label"]).header.get_zooms()[:3])
    options = {k: v for k, v in (config["model"].get("lesion_metrics") or {}).items() if k in inspect.signature(lesion_table).parameters}
    lesions = lesion_table(prediction, reference, spacing, **options)  # the run's matching rule and buckets
    predicted_lesions = [row for row in read_rows(Path(result["lesion_table"])) if row["region"] == region]
    return Inspection(case, region, images, reference, prediction, spacing, lesions, run_dir, int(options.get("connectivity", 26)), predicted_lesions)
