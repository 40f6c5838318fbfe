"""Evaluate predicted label files against references: ``python -m medseg.evaluate pred=DIR ref=DIR``.

Each ``<pred>/<case>.nii.gz`` is compared with the reference label of the same case (a BraTS tree, an MSD
task or a folder of label files) in the dataset's label convention (``data.labels``), giving one row per case
and region: Dice, IoU, recall, precision, HD95 (mm), lesion-wise detection by size. Written to ``output``:
``evaluation.csv``, ``summary.json`` (means per region, pooled lesion detection: recall, precision, F1, false
positives per case; recall by size) and two pictures,
``dice_per_case.png`` and ``recall_by_lesion_size.png``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.labels import LabelSpec, check_label_values
from medseg.data.layouts import NIFTI_SUFFIXES, DatasetError, find_label_files
from medseg.io import write_csv_atomic, write_json_atomic
from medseg.metrics.cases import case_rows, pooled_detection, region_means
from medseg.viz import plot_case_dice, plot_recall_by_size, recall_by_size, save_figure

log = logging.getLogger("medseg")
AFFINE_TOLERANCE_MM = 1e-3


def prediction_files(folder: str | Path) -> dict[str, Path]:
    """``<case>.nii.gz`` (or ``.nii``) files of a prediction folder, by case id."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"prediction folder {str(folder)!r} does not exist or is not a folder")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("."):
            case = path.name
            for suffix in NIFTI_SUFFIXES:
                case = case.removesuffix(suffix)
            found[case] = path
    if not found:
        raise DatasetError(f"prediction folder {str(folder)!r} holds no <case>.nii.gz files")
    return found


def load_pair(pred_path: Path, ref_path: Path, spec: LabelSpec) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """Binary channels ``(R, D, H, W)`` of a prediction and its reference, and the voxel spacing in mm.

    Raises:
        ValueError: naming the files, when shapes or affines differ or a file has unexpected label values.
    """
    pred_img, ref_img = nib.load(pred_path), nib.load(ref_path)
    if pred_img.shape != ref_img.shape:
        raise ValueError(f"{pred_path}: shape {pred_img.shape} differs from the reference {ref_path} {ref_img.shape}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=AFFINE_TOLERANCE_MM):
        raise ValueError(f"{pred_path}: affine differs from the reference {ref_path} (predictions must be in the reference geometry)")
    channels = []
    for path, img in ((pred_path, pred_img), (ref_path, ref_img)):
        label = torch.from_numpy(np.asarray(img.dataobj)).unsqueeze(0)  # (1, D, H, W)
        check_label_values(label, spec, str(path))
        channels.append(spec.to_channels(label))  # (R, D, H, W) bool
    spacing = tuple(float(z) for z in pred_img.header.get_zooms()[:3])
    return channels[0], channels[1], spacing


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Compare every prediction with its reference; write the CSV, the summary and the pictures.

    Returns:
        The per-case rows (one per case and region).
    """
    check_required(cfg)
    spec = LabelSpec.from_config(cfg.data.labels)
    predictions, references = prediction_files(cfg.pred), find_label_files(cfg.ref)
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise DatasetError(f"no reference label under {cfg.ref} for predicted case(s) {missing[:5]}")
    lesion_options = OmegaConf.to_container(cfg.model.lesion_metrics, resolve=True) if cfg.model.get("lesion_metrics") else None
    rows: list[dict[str, Any]] = []
    for case, pred_path in tqdm(predictions.items(), desc="Evaluating", unit="case"):
        pred, ref, spacing = load_pair(pred_path, Path(references[case]), spec)
        rows += case_rows([case], pred[None], ref[None], torch.tensor([spacing]), spec.names, lesion_options, cfg.model.empty_score)
    write_report(rows, Path(cfg.output), spec, lesion_options)
    return rows


def write_report(rows: list[dict[str, Any]], out: Path, spec: LabelSpec, lesion_options: dict[str, Any] | None) -> None:
    """``evaluation.csv``, ``summary.json``, ``dice_per_case.png`` and (with lesion metrics) ``recall_by_lesion_size.png``."""
    write_csv_atomic(rows, out / "evaluation.csv")
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float))]
    summary: dict[str, Any] = {"cases": len(rows) // len(spec.names), "region_means": region_means(rows, numeric)}
    save_figure(plot_case_dice(rows), out / "dice_per_case.png")
    if lesion_options is not None:
        buckets = lesion_options.get("bucket_names", ("small", "medium", "large"))
        pooled = recall_by_size(rows, buckets)
        summary["lesion_detection"] = {r: pooled_detection(rows, r) for r in spec.names}
        summary["lesion_recall_by_size"] = {r: {b: {"detected": d, "reference": n, "recall": d / n if n else None} for b, (d, n) in v.items()} for r, v in pooled.items()}
        edges = lesion_options.get("size_buckets_mm3", (50.0, 500.0))
        save_figure(plot_recall_by_size(rows, buckets, edges), out / "recall_by_lesion_size.png")
    write_json_atomic(out / "summary.json", summary)
    log.info("Evaluated %d case(s): %s", summary["cases"], out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (DatasetError, ConfigError, ValueError) as err:  # user mistakes: one readable message, no traceback
        log.error("%s", err)
        sys.exit(1)


register_resolvers()

if __name__ == "__main__":
    main()
