"""Evaluate predicted label files against references: ``python -m medseg.evaluate pred=DIR ref=DIR``.

Each ``<pred>/<case>.nii.gz`` is compared with the reference label of the same case (a BraTS tree, an MSD or
nnU-Net task, a folder dataset or a folder of label files) in the dataset's label convention (``data.labels``),
by the evaluation core that also scores training's final evaluation (:mod:`medseg.evaluation`): one row per case
and region (Dice, IoU, recall, precision, HD95 in mm, lesion-wise detection by size under
``model.lesion_metrics.matching``). Written to ``output``: ``evaluation.csv``, ``summary.json`` (means per region,
pooled lesion detection: recall, precision, F1, false positives per case; recall by size) and two pictures,
``dice_per_case.png`` and ``recall_by_lesion_size.png``.

Which cases: when the folder holds the ``predictions.json`` that ``medseg.predict`` writes, exactly the cases it
lists (a case it failed on has no prediction; files it did not write in that run are left out, with a warning);
otherwise every reference case. A case without a prediction file ends the evaluation with an error naming it,
unless ``missing=zero`` scores it as an empty prediction.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from medseg.config import ConfigError, check_required, register_resolvers
from medseg.data.labels import LabelSpec
from medseg.data.layouts import NIFTI_SUFFIXES, DatasetError, find_label_files
from medseg.data.layouts.base import strip_nifti_suffix
from medseg.evaluation import evaluate_case, score_missing_case, write_report

log = logging.getLogger("medseg")
SUMMARY_NAME = "predictions.json"  # what medseg.predict writes beside its label files
MISSING = ("error", "zero")


def prediction_files(folder: str | Path) -> tuple[dict[str, Path], list[str] | None]:
    """The prediction files of a folder by case id, and the cases expected to have one.

    With ``predictions.json`` (``medseg.predict``'s record): the files it lists as written, and every case it lists
    (those it failed on included); other NIfTI files in the folder are stale and left out. Without it: every
    ``<case>.nii.gz`` (or ``.nii``) file, and ``None`` (every reference case is expected).

    Raises:
        DatasetError: the folder is missing or empty, ``predictions.json`` is unreadable, or a file it lists is gone.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"prediction folder {str(folder)!r} does not exist or is not a folder")
    on_disk = {strip_nifti_suffix(p.name): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")}
    record = folder / SUMMARY_NAME
    if not record.is_file():
        if not on_disk:
            raise DatasetError(f"prediction folder {str(folder)!r} holds no <case>.nii.gz files")
        return on_disk, None
    try:
        listed = json.loads(record.read_text())["cases"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{record}: not a predictions record of medseg.predict ({type(err).__name__}: {err})") from err
    files = {}
    for entry in listed:
        if "prediction" in entry:
            path = Path(entry["prediction"])
            path = path if path.is_file() else folder / path.name  # a moved folder keeps its file names
            if not path.is_file():
                raise DatasetError(f"{record} lists {entry['prediction']} for case {entry['case']}, but the file is gone")
            files[str(entry["case"])] = path
    stale = sorted(set(on_disk) - {strip_nifti_suffix(p.name) for p in files.values()})
    if stale:
        log.warning("%d file(s) in %s were not written by the run %s records; left out: %s", len(stale), folder, SUMMARY_NAME, stale[:5])
    return files, [str(entry["case"]) for entry in listed]


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Compare every prediction with its reference; write the CSV, the summary and the pictures.

    Returns:
        The per-case rows (one per case and region).

    Raises:
        DatasetError: predictions without a reference, or (``missing=error``) expected cases without a prediction.
        ConfigError: ``missing`` is not ``error`` or ``zero``.
    """
    check_required(cfg)
    if cfg.missing not in MISSING:
        raise ConfigError(f"expected missing to be one of {MISSING}, got {cfg.missing!r}")
    spec = LabelSpec.from_config(cfg.data.labels)
    (predictions, expected), references = prediction_files(cfg.pred), find_label_files(cfg.ref)
    expected = expected if expected is not None else sorted(references)
    no_reference = sorted(set(predictions) - set(references))
    if no_reference:
        raise DatasetError(f"no reference label under {cfg.ref} for predicted case(s) {no_reference[:5]}")
    missing = [c for c in expected if c not in predictions and c in references]
    if missing and cfg.missing == "error":
        raise DatasetError(f"{len(missing)} case(s) have a reference but no prediction in {cfg.pred}: {missing[:10]}; "
                           "predict them, or score them as empty predictions with missing=zero")
    lesion_options = OmegaConf.to_container(cfg.model.lesion_metrics, resolve=True) if cfg.model.get("lesion_metrics") else None
    empty_score = float(cfg.model.empty_score)
    rows: list[dict[str, Any]] = []
    for case in tqdm([c for c in expected if c in references], desc="Evaluating", unit="case"):
        if case in predictions:
            rows += evaluate_case(case, predictions[case], references[case], spec, lesion_options, empty_score)
        else:
            rows += [{**row, "missing": True} for row in score_missing_case(case, references[case], spec, lesion_options, empty_score)]
    summary = write_report(rows, Path(cfg.output), spec, lesion_options, empty_score, {"missing_cases": missing})
    log.info("Evaluated %d case(s)%s: %s", summary["cases"], f" ({len(missing)} without a prediction, scored empty)" if missing else "", cfg.output)
    return rows


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
