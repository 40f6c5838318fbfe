"""Aggregate a loss ablation: ``python -m medseg.ablation <multirun folder> [...] [--out DIR]``.

The ablation is a Hydra multirun (``+experiment=loss_ablation``): one job per loss, seed and (for
cross-validation) fold, each job folder holding ``.hydra/hydra.yaml`` (the loss chosen), ``.hydra/overrides.yaml``
(its command-line overrides), ``config.yaml`` (the resolved config: seed, fold, lesion size buckets) and
``validation/evaluation/evaluation.csv`` (one row per validation case and region: the final evaluation of the label
files ``medseg.train`` writes, by the evaluation core of ``medseg.evaluate``; job folders of earlier versions hold
``test_cases.csv`` instead, read as well).

A *variant* is the loss config chosen (``loss=focal_dice_g1``) plus any ``loss.*`` or ``data.augment.*`` override
(``loss.gamma=3``, ``data.augment.sampling=lesion``).
For each variant and seed, the validation cases of all its jobs (all folds) are pooled into one estimate:

* ``dice``: voxel Dice, mean over cases;
* ``lesion_recall`` and ``recall_<bucket>``: detected / reference lesions, pooled over cases (a case with
  many lesions weighs more; buckets of the same case are not averaged first, so sparse buckets stay exact);
* ``lesion_precision``: true-positive predicted components (under the job's matching rule) / predicted
  components, pooled;
* ``lesion_f1``: detection F1 ``2PR / (P + R)`` of the pooled precision and recall; ``lesion_f1_case_mean``: the
  mean over cases of each case's F1;
* ``fp_per_case``: predicted components that are not true positives, mean over cases, at the job's final
  operating point; ``fp_per_case_before``: the same at the untuned point (``model.threshold`` and
  ``model.min_component_mm3``, by default 0.5 and no size filter; from
  ``validation/evaluation_before_postprocessing/evaluation.csv`` when the job tuned its operating point, else equal).

Lesion counts are those of each job's matching rule (``model.lesion_metrics.matching``; all jobs must share one) and
are pooled by the one pooling of :func:`medseg.metrics.matching.detection_scores`.

Then the mean and the sample standard deviation (``ddof=1``; NaN with one seed) over seeds. Written to
``--out`` (default ``<first folder>/ablation``): ``ablation.csv`` (one row per variant and region),
``ablation_seeds.csv`` (one row per variant, region and seed), ``ablation.md`` (the table, mean +- std) and
``recall_by_lesion_size.png`` (recall per size bucket, one line per variant).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from medseg.metrics.cases import pooled_detection
from medseg.metrics.matching import MatchingRule, detection_scores
from medseg.io import write_csv_atomic, write_text_atomic
from medseg.viz import bucket_labels, read_rows, recall_by_size, save_figure

# Overrides that make a variant (besides the loss config chosen): loss options and patch sampling.
VARIANT_PREFIXES = ("loss.", "data.augment.")
# The per-case rows of a job's final evaluation (and those of earlier versions' job folders).
FINAL_ROWS, FINAL_ROWS_BEFORE = "validation/evaluation/evaluation.csv", "validation/evaluation_before_postprocessing/evaluation.csv"
LEGACY_ROWS, LEGACY_ROWS_BEFORE = "test_cases.csv", "test_cases_before_postprocessing.csv"
# Per-seed scores, in table order; recall_<bucket> columns go after lesion_recall.
SCORES = ("dice", "lesion_recall", "lesion_precision", "lesion_f1", "lesion_f1_case_mean", "fp_per_case", "fp_per_case_before")


@dataclass(frozen=True)
class Job:
    """One finished training run of the sweep.

    Attributes:
        folder: the job folder.
        variant: loss config name plus ``loss.*`` / ``data.augment.*`` overrides, e.g. ``focal_dice_g1``.
        seed: the run's global seed.
        fold: the cross-validation fold (``data.fold``), ``None`` for a seeded split.
        buckets: lesion size bucket names; ``edges_mm3`` their edges (``len(buckets) - 1``).
        rows: the rows of the final evaluation (strings, as read).
        rows_before: the rows of the untuned point's evaluation (``None`` when the job did not tune).
        empty_score: the job's ``model.empty_score``.
        matching: the job's lesion matching rule, described (jobs without ``matching`` used any overlap).
    """

    folder: Path
    variant: str
    seed: int
    fold: int | None
    buckets: tuple[str, ...]
    edges_mm3: tuple[float, ...]
    rows: list[dict[str, str]]
    rows_before: list[dict[str, str]] | None = None
    empty_score: float = 1.0
    matching: str = "any overlap"


def job_folders(folder: str | Path) -> list[Path]:
    """Job folders (those with ``.hydra/overrides.yaml``) in or under ``folder``, in Hydra's job order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"expected a multirun or job folder, got {str(folder)!r} (not a folder)")
    found = [p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")]
    # Hydra names job folders by job number: 0, 1, ..., 10 sorts after 9.
    return sorted(found, key=lambda p: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.relative_to(folder).parts])


def read_job(folder: Path, before_postprocessing: bool = False) -> Job:
    """A job folder's variant, seed, fold, lesion buckets and per-case rows (with ``before_postprocessing``,
    the rows of the untuned operating point where the job has them, as if they were its final ones).

    Raises:
        ValueError: when a file is missing (an unfinished job), naming it.
    """
    rows_file = next((f for f in (folder / FINAL_ROWS, folder / LEGACY_ROWS) if f.is_file()), folder / FINAL_ROWS)
    needed = [folder / ".hydra" / "hydra.yaml", folder / ".hydra" / "overrides.yaml", folder / "config.yaml", rows_file]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"expected a finished job in {folder}, got no {', '.join(missing)} (failed or still running?)")
    choice = OmegaConf.load(needed[0]).hydra.runtime.choices.get("loss")
    loss_overrides = [o for o in OmegaConf.load(needed[1]) if str(o).startswith(VARIANT_PREFIXES)]
    config = OmegaConf.load(needed[2])
    lesion = config.model.get("lesion_metrics")
    if not lesion:
        raise ValueError(f"expected lesion metrics in {needed[2]} (model.lesion_metrics), got none: lesion recall cannot be aggregated")
    before = next((f for f in (folder / FINAL_ROWS_BEFORE, folder / LEGACY_ROWS_BEFORE) if f.is_file()), None)
    rows_before = read_rows(before) if before is not None else None
    rows = read_rows(needed[3]) if not (before_postprocessing and rows_before is not None) else rows_before
    return Job(
        folder=folder,
        variant=" ".join([str(choice), *map(str, loss_overrides)]),
        seed=int(config.seed),
        fold=config.data.get("fold"),
        buckets=tuple(str(b) for b in lesion.bucket_names),
        edges_mm3=tuple(float(e) for e in lesion.size_buckets_mm3),
        rows=rows,
        rows_before=rows_before,
        empty_score=float(config.model.get("empty_score", 1.0)),
        matching=MatchingRule.from_options({"matching": "overlap", **OmegaConf.to_container(lesion, resolve=True)}).describe(),
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def pooled_scores(rows: Sequence[dict[str, Any]], region: str, buckets: Sequence[str], rows_before: Sequence[dict[str, Any]] | None = None, empty_score: float = 1.0) -> dict[str, float]:
    """Scores of one region over a set of case rows (see the module docstring), with reference lesion counts.

    Args:
        rows_before: the same cases before post-processing (``None``: ``rows`` themselves).
        empty_score: the jobs' ``model.empty_score``: the value of a ratio with no denominator, per case and pooled.

    Returns:
        ``dice``, ``lesion_recall``, ``lesion_precision``, ``lesion_f1``, ``lesion_f1_case_mean``, ``fp_per_case``,
        ``fp_per_case_before``, ``n_cases``, ``n_ref_lesions`` and per bucket ``recall_<bucket>`` (NaN without
        reference lesions) and ``n_ref_lesions_<bucket>``.
    """
    subset = [r for r in rows if r["region"] == region]
    detection = pooled_detection(rows, region, empty_score)
    scores = {
        "dice": _nanmean([float(r["dice"]) for r in subset]),
        **{k: detection[k] for k in ("lesion_recall", "lesion_precision", "lesion_f1")},
        "lesion_f1_case_mean": _nanmean([_case_f1(r, empty_score) for r in subset]),
        "fp_per_case": detection["fp_per_case"],
        "fp_per_case_before": pooled_detection(rows_before if rows_before is not None else rows, region, empty_score)["fp_per_case"],
        "n_cases": detection["n_cases"],
        "n_ref_lesions": detection["n_ref_lesions"],
    }
    for bucket, (detected, n_ref) in recall_by_size(subset, buckets)[region].items():
        scores[f"recall_{bucket}"] = _ratio(detected, n_ref)
        scores[f"n_ref_lesions_{bucket}"] = float(n_ref)
    return scores


def _case_f1(row: dict[str, Any], empty_score: float) -> float:
    """One case's lesion F1, recomputed from its counts with the one pooling (a case scored 0 stays in the mean)."""
    return detection_scores(*(float(row[k]) for k in ("n_ref_lesions", "detected", "n_pred_lesions", "false_positives")), empty_score)["lesion_f1"]


def per_seed(jobs: Sequence[Job], per_fold: bool = False) -> list[dict[str, Any]]:
    """One row per variant, region and seed: the cases of every fold of that seed pooled, or with
    ``per_fold`` one row per fold too (the variant then reads ``<variant>, fold <k>``).

    Raises:
        ValueError: on jobs with different lesion buckets, or two jobs of one variant, seed and fold.
    """
    if len({(j.buckets, j.edges_mm3) for j in jobs}) > 1:
        found = sorted({(j.buckets, j.edges_mm3) for j in jobs})
        raise ValueError(f"expected every job to use the same lesion size buckets, got {found}")
    if len({(j.matching, j.empty_score) for j in jobs}) > 1:
        found = sorted({(j.matching, str(j.empty_score)) for j in jobs})
        raise ValueError(f"expected every job to use the same lesion matching rule and empty_score, got {found}")
    seen: dict[tuple[str, int, int | None], Path] = {}
    for job in jobs:
        key = (job.variant, job.seed, job.fold)
        if key in seen:
            raise ValueError(f"expected one job per loss, seed and fold, got two for {key}: {seen[key]} and {job.folder}")
        seen[key] = job.folder
    out = []
    def group(job: Job) -> tuple[str, int]:
        return (f"{job.variant}, fold {job.fold}" if per_fold else job.variant), job.seed

    for variant, seed in dict.fromkeys(map(group, jobs)):  # sweep order
        members = [j for j in jobs if group(j) == (variant, seed)]
        rows = [r for j in members for r in j.rows]
        rows_before = [r for j in members for r in (j.rows_before if j.rows_before is not None else j.rows)]
        folds = ",".join(str(f) for f in sorted(j.fold for j in members if j.fold is not None))
        for region in dict.fromkeys(r["region"] for r in rows):
            cases = ",".join(sorted({r["case"] for r in rows if r["region"] == region}))
            out.append({"variant": variant, "region": region, "seed": seed, "folds": folds, "cases": cases, **pooled_scores(rows, region, members[0].buckets, rows_before, members[0].empty_score)})
    return out


def summarise(seed_rows: Sequence[dict[str, Any]], buckets: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds, one row per variant and region."""
    scores = [*SCORES[:2], *(f"recall_{b}" for b in buckets), *SCORES[2:]]
    out = []
    for variant, region in dict.fromkeys((r["variant"], r["region"]) for r in seed_rows):
        group = [r for r in seed_rows if (r["variant"], r["region"]) == (variant, region)]
        row: dict[str, Any] = {"variant": variant, "region": region, "n_seeds": len(group), "folds": group[0]["folds"], "cases": group[0]["cases"]}
        row["n_cases"] = int(group[0]["n_cases"])
        for bucket in ("", *(f"_{b}" for b in buckets)):
            row[f"n_ref_lesions{bucket}"] = int(group[0][f"n_ref_lesions{bucket}"])
        for score in scores:
            values = np.array([float(r[score]) for r in group], dtype=np.float64)
            row[f"{score}_mean"] = float(values.mean())
            row[f"{score}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    return out


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: Sequence[dict[str, Any]], buckets: Sequence[str], edges_mm3: Sequence[float], show_cases: bool = False) -> str:
    """The summary as a markdown table: mean ± std over seeds. Bucket headers give the size range; reference
    lesion counts go in the headers when every row has the same ones (one task, all folds pooled), else in the
    cells. ``show_cases`` adds the validation case ids (per-fold tables)."""
    regions = list(dict.fromkeys(r["region"] for r in summary))
    ranges = [label.split("\n")[-1] for label in bucket_labels(buckets, edges_mm3)]
    recalls = [("lesion_recall", "n_ref_lesions", "lesion recall", "")] + [
        (f"recall_{b}", f"n_ref_lesions_{b}", f"recall {b}", rng) for b, rng in zip(buckets, ranges)
    ]
    shared = {key: summary[0][key] for _, key, _, _ in recalls if len({r[key] for r in summary}) == 1}

    def head(name: str, detail: str, count_key: str) -> str:
        parts = [p for p in (detail, f"n={shared[count_key]}" if count_key in shared else "") if p]
        return f"{name} ({', '.join(parts)})" if parts else name

    labels = ["loss", *(["validation cases"] if show_cases else []), *(["region"] if len(regions) > 1 else [])]
    heads = [*labels, "seeds", "Dice", *(head(name, detail, key) for _, key, name, detail in recalls), "lesion precision", "lesion F1", "FP lesions / case", "FP / case before post-processing"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * len(labels) + ["---:"] * (len(heads) - len(labels))) + "|"]
    for row in summary:
        cells = [f"`{row['variant']}`", *([row["cases"]] if show_cases else []), *([row["region"]] if len(regions) > 1 else [])]
        cells += [str(row["n_seeds"]), _pm(row["dice_mean"], row["dice_std"])]
        for score, key, _, _ in recalls:
            cells.append(_pm(row[f"{score}_mean"], row[f"{score}_std"]) + ("" if key in shared else f" (n={row[key]})"))
        cells += [_pm(row[f"{score}_mean"], row[f"{score}_std"]) for score in ("lesion_precision", "lesion_f1", "fp_per_case", "fp_per_case_before")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_recall_vs_size(summary: Sequence[dict[str, Any]], buckets: Sequence[str], edges_mm3: Sequence[float], title: str = "Lesion detection recall by lesion size") -> Figure:
    """Recall per size bucket, one line per variant (mean over seeds, error bars one std); a panel per region."""
    regions = list(dict.fromkeys(r["region"] for r in summary))
    fig, axes = plt.subplots(1, len(regions), figsize=(2.5 + 1.9 * len(buckets) * len(regions), 4.2), squeeze=False)
    x = np.arange(len(buckets), dtype=np.float64)
    for ax, region in zip(axes[0], regions):
        rows = [r for r in summary if r["region"] == region]
        for i, row in enumerate(rows):
            shift = (i - (len(rows) - 1) / 2) * 0.04  # keep the error bars of close lines apart
            mean = [row[f"recall_{b}_mean"] for b in buckets]
            std = np.nan_to_num([row[f"recall_{b}_std"] for b in buckets])
            ax.errorbar(x + shift, mean, yerr=std, marker="o", markersize=4, capsize=3, linewidth=1.2, label=row["variant"])
        ax.set_xticks(x, bucket_labels(buckets, edges_mm3))
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("detected / reference lesions")
        ax.set_title(region if len(regions) > 1 else title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if len(regions) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def aggregate(folders: Sequence[str | Path], out: str | Path | None = None, per_fold: bool = False, before_postprocessing: bool = False) -> list[dict[str, Any]]:
    """Read every finished job under ``folders`` and write the CSVs, the markdown table and the plot.

    With ``per_fold``, each cross-validation fold gets its own rows instead of being pooled (see :func:`per_seed`);
    with ``before_postprocessing``, the jobs' untuned operating point (threshold 0.5, no size filter) is scored.

    Returns:
        The summary rows (one per variant and region).

    Raises:
        ValueError: when no finished job is found, or jobs disagree (see :func:`per_seed`).
    """
    jobs, skipped = [], []
    for folder in folders:
        for job_folder in job_folders(folder):
            try:
                jobs.append(read_job(job_folder, before_postprocessing))
            except ValueError as err:
                skipped.append(str(err))
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not jobs:
        raise ValueError(f"expected finished jobs (with {FINAL_ROWS}) under {[str(f) for f in folders]}, got none")
    out = Path(out) if out is not None else Path(folders[0]) / "ablation"
    buckets, edges = jobs[0].buckets, jobs[0].edges_mm3
    seed_rows = per_seed(jobs, per_fold)
    summary = summarise(seed_rows, buckets)
    write_csv_atomic(seed_rows, out / "ablation_seeds.csv")
    write_csv_atomic(summary, out / "ablation.csv")
    table = markdown_table(summary, buckets, edges, show_cases=per_fold) + f"\nLesion matching: {jobs[0].matching}.\n"
    write_text_atomic(out / "ablation.md", table)
    save_figure(plot_recall_vs_size(summary, buckets, edges), out / "recall_by_lesion_size.png")
    print(table)
    print(f"{len(jobs)} job(s) aggregated into {out} (ablation.csv, ablation_seeds.csv, ablation.md, recall_by_lesion_size.png)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m medseg.ablation --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m medseg.ablation",
        description="Aggregate the jobs of a loss-ablation multirun: mean +- std over seeds per loss of voxel Dice, "
        "lesion recall per size bucket and false-positive lesions per case (table, CSV, plot).",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="multirun folders (or job folders); all their jobs are pooled")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first folder>/ablation)")
    parser.add_argument("--per-fold", action="store_true", help="a row per cross-validation fold instead of pooling the folds")
    parser.add_argument("--before-postprocessing", action="store_true", help="score the untuned operating point (threshold 0.5, no size filter) of jobs that tuned theirs")
    args = parser.parse_args(argv)
    try:
        aggregate(args.folders, args.out, args.per_fold, args.before_postprocessing)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
