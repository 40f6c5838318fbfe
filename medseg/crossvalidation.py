"""Cross-validation as nnU-Net runs it: k folds trained one by one (or as separate jobs), the operating point tuned
once on the pooled out-of-fold predictions, and the cross-validation folder as the model users share.

The flow (:func:`crossval`), in the cross-validation folder ``<cv>`` (``hydra.run.dir``):

1. **Folds** (:func:`run_fold`): fold ``k`` is a training run in ``<cv>/fold_<k>/`` of the experiment's config with
   ``data.fold=k``, ``data.num_folds=k`` folds and no final evaluation of its own; then its best checkpoint predicts
   its validation cases (stage 1 of :class:`medseg.final_evaluation.Evaluator`): probabilities on each case's input
   grid kept in ``fold_<k>/oof/probabilities/`` (float16, compressed) and counted at every operating-point grid
   point (``fold_<k>/oof/sweep_counts.npy``, the grid in ``sweep_grid.json``); ``fold_<k>/oof/oof.json`` marks the
   fold finished. A finished fold is
   reused; a killed one resumes from its ``last.ckpt``. Each fold is an independent job (``crossval.fold=k``), so a
   cluster can run one per GPU.
2. **Aggregation** (:func:`aggregate`, once every fold is finished): the point is tuned ONCE on the summed counts of
   every out-of-fold case (the experiment's criterion; a fold counted on another grid is counted again from its stored
   probabilities, so a new grid needs no training: ``crossval.train=false`` with the new grid's keys), every case's
   label file is written at it in its original geometry (``<cv>/oof/<case>.nii.gz``) and scored by the evaluation core: ``<cv>/oof/evaluation/`` (one row per case
   and region, with its fold; pictures) and ``<cv>/oof/evaluation_before_postprocessing/``; ``<cv>/crossval.json``
   holds the pooled and per-fold summaries, the fold checkpoints and the point; ``<cv>/operating_point.json`` and
   every fold checkpoint carry the point. ``medseg.predict ckpt_path=<cv>`` then averages the folds' probabilities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medseg.checkpoint_io import update_checkpoint
from medseg.config import ConfigError
from medseg.data.layouts import CaseRecord, find_cases
from medseg.distributed import group_rank_and_size, on_rank_zero
from medseg.evaluation import summarise
from medseg.final_evaluation import Evaluator, case_target, load_probabilities
from medseg.io import write_csv_atomic, write_json_atomic, write_text_atomic
from medseg.postprocess import CHECKPOINT_KEY, TUNED_ON
from medseg.prediction import PreparedCase, load_model

log = logging.getLogger("medseg")
RECORD_NAME = "crossval.json"
OOF_DIR = "oof"
FOLD_RECORD = "oof.json"
COUNTS_NAME = "sweep_counts.npy"
GRID_NAME = "sweep_grid.json"


def fold_dir(cv: Path, fold: int) -> Path:
    return cv / f"fold_{fold}"


def fold_config(cfg: DictConfig, fold: int, cv: Path) -> DictConfig:
    """Fold ``fold``'s training config: the cross-validation's with ``data.fold``, ``data.num_folds``, its own run folder,
    no final evaluation of its own (the point is tuned once, out of fold) and resuming from its ``last.ckpt``."""
    folds = int(cfg.crossval.folds)
    fold_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(fold_cfg, "paths.output_dir", str(fold_dir(cv, fold)), force_add=True)
    fold_cfg.data.fold, fold_cfg.data.num_folds = fold, folds
    fold_cfg.evaluate_best, fold_cfg.ckpt_path = False, "last"
    fold_cfg.pop("crossval", None)
    return fold_cfg


def best_checkpoint(folder: Path) -> Path:
    """A fold's best checkpoint (``epoch*.ckpt``, by validation Dice), else its ``last.ckpt``.

    Raises:
        ConfigError: the fold has no checkpoint.
    """
    found = sorted((folder / "checkpoints").glob("epoch*.ckpt")) or sorted((folder / "checkpoints").glob("last.ckpt"))
    if not found:
        raise ConfigError(f"{folder} holds no checkpoint: the fold has not been trained")
    return found[-1]


def validation_cases(cfg: DictConfig, folder: Path) -> list[CaseRecord]:
    """The validation cases a fold's ``split.json`` names."""
    split = json.loads((folder / "split.json").read_text())
    by_id = {c["case"]: c for c in find_cases(cfg.data.layout, cfg.data.root, modalities=list(cfg.data.get("modalities") or ()))}
    return [by_id[c] for c in split["val"]]


def run_fold(cfg: DictConfig, fold: int, cv: Path, device: torch.device) -> dict[str, Any]:
    """Train fold ``fold`` (resuming if it was killed) and predict its out-of-fold cases; reuse it if finished.

    Returns:
        The fold's record (``fold_<k>/oof/oof.json``).
    """
    from medseg.training import train  # imported when a fold trains: Lightning and the network stack

    folder = fold_dir(cv, fold)
    record_path = folder / OOF_DIR / FOLD_RECORD
    if record_path.is_file():
        log.info("Fold %d is finished (%s): reused", fold, record_path)
        return json.loads(record_path.read_text())
    fold_cfg = fold_config(cfg, fold, cv)
    log.info("Fold %d of %d: training in %s", fold, int(cfg.crossval.folds), folder)
    train(fold_cfg)
    rank, world = group_rank_and_size()
    if world > 1:  # a fold trained with DDP: rank 0 predicts its out-of-fold cases, the others wait for it
        result = on_rank_zero(_predict_fold, fold_cfg, fold, folder, torch.device("cpu") if device.type == "cpu" else device)
        return result
    return _predict_fold(fold_cfg, fold, folder, device)


def _predict_fold(fold_cfg: DictConfig, fold: int, folder: Path, device: torch.device) -> dict[str, Any]:
    """Stage 1 of a trained fold: its best checkpoint's out-of-fold probabilities and counts, then the fold record."""
    record_path = folder / OOF_DIR / FOLD_RECORD
    checkpoint = best_checkpoint(folder)
    model, saved = load_model(checkpoint)
    # With the cross-validation's test-time flips: a finished cross-validation is predicted again with other flips by
    # removing fold_<k>/oof/oof.json (the fold resumes at its end and trains no further).
    flips = [int(a) for a in fold_cfg.model.get("tta_flip_axes") or []]
    OmegaConf.update(saved, "model.tta_flip_axes", flips, force_add=True)
    cases = validation_cases(fold_cfg, folder)
    evaluator = Evaluator(model, saved, folder / OOF_DIR, device)
    results = evaluator.predict(cases, folder / OOF_DIR / "probabilities", compact=True, stage=f"fold {fold}: predict out of fold")
    if evaluator.sweep is not None:
        save_counts(folder / OOF_DIR, evaluator.sweep.counts.cpu().numpy(), evaluator.sweep.grid())
    record = {
        "fold": fold,
        "checkpoint": str(checkpoint),
        "tta_flip_axes": flips,
        "cases": [{"case": r["case"], "record": r["prepared"].record, "probabilities": str(r["probabilities"])} for r in results],
    }
    write_json_atomic(record_path, record)  # last: its presence says the fold is finished
    return record


def save_counts(folder: Path, counts: np.ndarray, grid: dict[str, Any]) -> None:
    """A fold's summed out-of-fold counts and the grid they were counted on."""
    np.save(folder / COUNTS_NAME, counts)
    write_json_atomic(folder / GRID_NAME, grid)


def fold_counts(evaluator: Evaluator, cv: Path, record: dict[str, Any]) -> np.ndarray:
    """A fold's out-of-fold counts on ``evaluator``'s grid: the stored ones, or counted again from the stored
    probabilities when they were counted on another grid (and stored for the next aggregation)."""
    folder = fold_dir(cv, record["fold"]) / OOF_DIR
    grid = evaluator.sweep.grid()
    stored = json.loads((folder / GRID_NAME).read_text()) if (folder / GRID_NAME).is_file() else None
    if stored is not None and json.dumps(stored, sort_keys=True) == json.dumps(grid, sort_keys=True):  # as text: a NaN empty_score equals itself
        return np.load(folder / COUNTS_NAME)
    log.info("Fold %d's out-of-fold counts are of another operating-point grid: counted again from its stored probabilities", record["fold"])
    counts = sum((evaluator.case_counts(entry["record"], load_probabilities(entry["probabilities"])) for entry in record["cases"]), np.zeros(tuple(evaluator.sweep.counts.shape)))
    save_counts(folder, counts, grid)
    return counts


def aggregate(cfg: DictConfig, cv: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune the point once on every fold's out-of-fold counts, write and score every case's label file, and write the
    cross-validation's records (see the module docstring). Returns ``crossval.json``'s content."""
    out = cv / OOF_DIR
    evaluator = Evaluator(None, cfg, out)
    for record in records:
        if record.get("tta_flip_axes") is not None and tuple(record["tta_flip_axes"]) != evaluator.flips:
            raise ConfigError(f"fold {record['fold']}'s out-of-fold cases were predicted with test-time flips {record['tta_flip_axes']}, the cross-validation's "
                              f"model.tta_flip_axes is {list(evaluator.flips)}: remove {fold_dir(cv, record['fold']) / OOF_DIR / FOLD_RECORD} to predict them again")
    if evaluator.sweep is not None:
        for record in records:
            evaluator.sweep.add(fold_counts(evaluator, cv, record), len(record["cases"]))
    point, table = evaluator.choose()
    results, folds = [], {}
    for record in records:
        for entry in record["cases"]:
            prepared = PreparedCase(entry["record"], case_target(out, str(entry["case"])), {}, 0.0)
            out.mkdir(parents=True, exist_ok=True)
            results.append(evaluator.write_and_score(prepared, load_probabilities(entry["probabilities"]), point))
            folds[str(entry["case"])] = {"fold": record["fold"]}
    order = [str(e["case"]) for r in records for e in r["cases"]]
    final = evaluator.finish(results, point, table, order, checkpoint=None, extra_columns=folds)
    checkpoints = [record["checkpoint"] for record in records]
    relative = [str(Path(c).relative_to(cv)) if Path(c).is_relative_to(cv) else c for c in checkpoints]  # the folder travels
    per_fold = {}
    for record in records:
        rows = [row for row in final.rows if row.get("fold") == record["fold"]]
        per_fold[str(record["fold"])] = summarise(rows, evaluator.spec, evaluator.lesion_options, evaluator.empty_score)["metrics"]
    summary = {
        **final.summary,
        "folds": len(records),
        "checkpoints": relative,
        "operating_point": final.point.to_dict(),
        "per_fold": per_fold,
        **({"before_postprocessing": final.untuned["metrics"]} if final.untuned is not None else {}),
    }
    write_json_atomic(cv / RECORD_NAME, summary)
    write_json_atomic(cv / "operating_point.json", {"checkpoint": "crossval", "checkpoints": relative, **final.point.to_dict()})
    if table:
        from medseg.viz import plot_operating_point, save_figure

        write_csv_atomic(table, cv / "operating_point_sweep.csv")
        save_figure(plot_operating_point(table, final.point.to_dict()["regions"], str(final.point.criterion)), cv / "operating_point_sweep.png")
    for checkpoint in checkpoints:  # each fold alone predicts at the cross-validation's point too
        update_checkpoint(checkpoint, CHECKPOINT_KEY, {**final.point.to_dict(), TUNED_ON: "crossval"})
    write_text_atomic(cv / "splits.json", json.dumps({str(r["fold"]): [str(e["case"]) for e in r["cases"]] for r in records}, indent=1))
    return summary


def crossval(cfg: DictConfig) -> dict[str, Any] | None:
    """The whole cross-validation (``crossval.fold=null``) or one fold of it (``crossval.fold=k``: a job of its own;
    aggregate afterwards with ``crossval.train=false`` and the same ``hydra.run.dir``).

    Returns:
        ``crossval.json``'s content, or ``None`` when only one fold was run or folds are missing.

    Raises:
        ConfigError: bad ``crossval`` keys.
    """
    folds, only = cfg.crossval.folds, cfg.crossval.get("fold")
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"expected crossval.folds to be a whole number >= 2, got {folds!r}")
    if only is not None and not (isinstance(only, int) and 0 <= only < folds):
        raise ConfigError(f"expected crossval.fold null or in [0, {folds}), got {only!r}")
    cv = Path(cfg.paths.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_text_atomic(cv / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    for fold in range(folds) if only is None else [only]:
        if cfg.crossval.get("train", True):
            run_fold(cfg, fold, cv, device)
    finished = [fold_dir(cv, k) / OOF_DIR / FOLD_RECORD for k in range(folds)]
    missing = [k for k, path in enumerate(finished) if not path.is_file()]
    if missing:
        log.info("Folds %s of %s are not finished yet; run them (crossval.fold=k), then aggregate: crossval.train=false hydra.run.dir=%s", missing, cv, cv)
        return None
    return aggregate(cfg, cv, [json.loads(path.read_text()) for path in finished])
