"""The final evaluation of a trained checkpoint on labelled cases, done as a user would: predict, then evaluate.

After training, the validation cases are segmented by the prediction library (:mod:`medseg.prediction`: the
checkpoint's preprocessing, the sliding window with the test-time flips of ``model.tta_flip_axes``, probabilities
mapped back onto each case's own voxel grid) and scored by the evaluation core (:mod:`medseg.evaluation`) against
their original label files, so that ``medseg.evaluate`` on ``medseg.predict``'s files of the same cases gives the
same numbers, as nnU-Net validates its folds. In three stages:

1. every case's probabilities on its input grid are counted at every point of the operating-point grid
   (:mod:`medseg.metrics.operating_point`) and kept (float32, ``<out>/.probabilities/``, removed at the end; where
   the disk has no room for them, the cases are predicted a second time in stage 3 instead);
2. the point maximising ``model.operating_point.criterion`` is chosen once for all cases (or the configured
   ``model.threshold`` / ``model.min_component_mm3`` is kept), with the flips it was tuned on recorded;
3. each case's labels at that point are written as ``medseg.predict`` writes them (``<out>/<case>.nii.gz``,
   ``predictions.json``) and the files are scored (``<out>/evaluation/``); the untuned point's files are written and
   scored too (``<out>/evaluation_before_postprocessing/``). The grid's point is kept only if its files beat the
   untuned point's on the criterion (averaged over regions): regions are swept independently while the files keep
   nested regions nested, so the grid's choice can lose there; then the untuned files are kept instead.

Under DDP every process predicts its share of the cases (the sweep's counts are summed across processes, so all
choose the same point) and process 0 writes the records and reports.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from medseg.build import preprocessing_from_config
from medseg.data.layouts import CaseRecord
from medseg.evaluation import evaluate_case, label_channels, spacing_mm, summarise, write_report
from medseg.io import write_json_atomic
from medseg.distributed import gather_objects, group_rank_and_size, on_rank_zero, raise_if_any_failed
from medseg.metrics.matching import MatchingRule
from medseg.metrics.operating_point import OperatingPointSweep
from medseg.module import SegmentationModule
from medseg.postprocess import OperatingPoint
from medseg.prediction import SUMMARY_NAME, PredictOptions, PreparedCase, predict_cases, write_labels

log = logging.getLogger("medseg")
PROBABILITY_DIR = ".probabilities"
UNTUNED_DIR = ".untuned"


@dataclass
class FinalEvaluation:
    """What :func:`evaluate_cases` found (on every process; the reports only on process 0).

    Attributes:
        point: the operating point the label files were written at (tuned or configured; flips recorded).
        summary: :func:`medseg.evaluation.summarise` of the label files (``<out>/evaluation/summary.json``).
        untuned: the same at the untuned point (``model.threshold``, ``model.min_component_mm3``), when tuned.
        sweep_table: the operating-point grid's scores (one row per region and point), when tuned.
    """

    point: OperatingPoint
    summary: dict[str, Any]
    untuned: dict[str, Any] | None = None
    sweep_table: list[dict[str, Any]] = field(default_factory=list)


def evaluate_cases(model: SegmentationModule, cfg: DictConfig, cases: list[CaseRecord], out: str | Path, device: torch.device | str = "cpu", prefetch: int = 1, checkpoint: str | None = None) -> FinalEvaluation:
    """Predict ``cases`` with ``model``, tune the operating point on them, write their label files and score them.

    Args:
        model: the trained module (its weights as they are: load the checkpoint to evaluate first).
        cfg: the run's composed config (``data`` for the preprocessing and labels; ``model`` for flips, the
            operating-point grid, lesion metrics and the empty convention).
        cases: labelled case records (``{"case", "image": [files], "label": file}``).
        out: the folder of the label files and reports (the run's ``validation/``).
        device: where the network runs.
        checkpoint: the weights' file, recorded in ``predictions.json``.

    Returns:
        The point, the summaries and the sweep table (see :class:`FinalEvaluation`).

    Raises:
        RuntimeError: a case could not be predicted (naming it): a final evaluation without it would not be one.
    """
    out = Path(out)
    rank, world = group_rank_and_size()
    spec = model.label_spec
    names = spec.names
    model_cfg = cfg.model
    lesion_options = OmegaConf.to_container(model_cfg.lesion_metrics, resolve=True) if model_cfg.get("lesion_metrics") else None
    empty_score = float(model_cfg.get("empty_score", 1.0))
    flips = tuple(int(a) for a in model_cfg.get("tta_flip_axes") or ())
    untuned = replace(OperatingPoint.uniform(names, float(model_cfg.threshold), float(model_cfg.get("min_component_mm3") or 0.0)), tta_flip_axes=flips)
    tuning = (model_cfg.get("operating_point") or {}).get("criterion")
    transform = preprocessing_from_config(cfg.data, with_label=False)
    options = PredictOptions(output=out, device=torch.device(device), flip_axes=flips, point=untuned, connectivity=model.connectivity,
                             in_channels=cfg.data.get("in_channels"), inputs=frozenset(Path(f).resolve() for c in cases for f in c["image"]))
    # On the network's device: the counts are synced across processes there (NCCL syncs CUDA tensors only).
    sweep = _sweep(model, cfg, lesion_options, empty_score).to(options.device) if tuning else None
    mine = cases[rank::world]
    probability_dir = out / PROBABILITY_DIR
    # Keep every case's probabilities on disk until the point is chosen, where there is room for them (float32,
    # the values prediction thresholds); else predict the cases a second time after choosing.
    store = sweep is not None and _room_for_probabilities(mine, spec.num_outputs, out)

    untuned_dir = out / UNTUNED_DIR

    def write_and_score(case: PreparedCase, probs: torch.Tensor, point: OperatingPoint) -> dict[str, Any]:
        """Stage 3 of one case: its label file at ``point``, scored from the file; with a sweep, the untuned point's
        file too (``<out>/.untuned/``, kept until the reports say which point the files keep)."""
        record = case.record
        written = write_labels(case, probs, spec, replace(options, point=point))
        rows = evaluate_case(str(record["case"]), case.target, record["label"], spec, lesion_options, empty_score)
        rows_before = []
        if sweep is not None:
            shadow = replace(case, target=untuned_dir / case.target.name)
            untuned_dir.mkdir(parents=True, exist_ok=True)
            write_labels(shadow, probs, spec, replace(options, point=untuned))
            rows_before = evaluate_case(str(record["case"]), shadow.target, record["label"], spec, lesion_options, empty_score)
        return {"case": record["case"], "record": written, "rows": rows, "rows_before": rows_before}

    def count(case: PreparedCase, probs: torch.Tensor) -> dict[str, Any]:  # stage 1 with a sweep, in the writer thread
        path = None
        if store:
            path = probability_dir / f"{case.target.name}.npy"
            np.save(path, probs.numpy())
        reference = label_channels(nib.load(case.record["label"]), spec, str(case.record["label"])).numpy()
        counts = sweep.case_counts(probs, reference, spacing_mm(nib.load(case.record["image"][0])))
        return {"case": case.record["case"], "prepared": PreparedCase(case.record, case.target, {}, case.seconds), "probabilities": path, "counts": counts}

    model.to(options.device).eval()  # (Lightning may have moved the module back to the CPU after fit)
    if store:
        probability_dir.mkdir(parents=True, exist_ok=True)
    first = count if sweep is not None else (lambda case, probs: write_and_score(case, probs, untuned))
    results = _run(mine, model, transform, spec, options, prefetch, first, "predict" if sweep is not None else "predict, write and score", rank)
    point, table = untuned, []
    if sweep is not None:
        for result in results:
            sweep.add(result.pop("counts"))
        with sweep.sync_context():  # every process's counts (DDP): all choose the same point
            point = replace(sweep.choose(str(tuning), default_threshold=float(model_cfg.threshold)), tta_flip_axes=flips)
            table = sweep.table()
        if store:
            finished, errors = [], []
            for result in tqdm(results, desc="final evaluation: write and score", unit="case", disable=rank != 0):
                try:
                    finished.append(write_and_score(result["prepared"], torch.from_numpy(np.load(result["probabilities"])), point))
                except Exception as err:  # reported by every process below, not left for the others to wait on
                    errors.append(f"{result['case']}: {type(err).__name__}: {err}")
                finally:
                    result["probabilities"].unlink(missing_ok=True)
            raise_if_any_failed(errors, "the final evaluation of the validation cases")
            results = finished
        else:
            results = _run(mine, model, transform, spec, options, prefetch, lambda case, probs: write_and_score(case, probs, point), "predict again, write and score", rank)
    records = gather_objects([r["record"] for r in results])
    rows = gather_objects([row for r in results for row in r["rows"]])
    rows_before = gather_objects([row for r in results for row in r["rows_before"]])
    order = {str(c["case"]): i for i, c in enumerate(cases)}
    for items in (records, rows, rows_before):
        items.sort(key=lambda r: order[str(r["case"])])

    def reports() -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
        """On rank 0: the summaries; the grid's point is kept only if its files beat the untuned point's files on the
        criterion (regions are swept independently, the files keep nested regions nested: the grid's choice can lose);
        else the untuned files replace them. Then the records and reports of the files kept."""
        nonlocal rows, rows_before
        keep_untuned = False
        if sweep is not None:
            tuned_value = criterion_value(summarise(rows, spec, lesion_options, empty_score), str(tuning), names)
            untuned_value = criterion_value(summarise(rows_before, spec, lesion_options, empty_score), str(tuning), names)
            keep_untuned = untuned_value > tuned_value
            if keep_untuned:
                log.info("On the written files the grid's point scores %s %.4f, the configured point %.4f: the configured point is kept", tuning, tuned_value, untuned_value)
                for record in records:
                    os.replace(untuned_dir / Path(record["prediction"]).name, record["prediction"])
                rows = rows_before
        shutil.rmtree(probability_dir, ignore_errors=True)
        shutil.rmtree(untuned_dir, ignore_errors=True)
        chosen = untuned if keep_untuned else point
        write_json_atomic(out / SUMMARY_NAME, {"checkpoint": checkpoint, "input": "validation cases", "options": {"tta_flip_axes": list(flips), "operating_point": chosen.to_dict()}, "failed": 0, "cases": records})
        summary = write_report(rows, out / "evaluation", spec, lesion_options, empty_score)
        untuned_summary = write_report(rows_before, out / "evaluation_before_postprocessing", spec, lesion_options, empty_score) if sweep is not None else None
        return summary, untuned_summary, keep_untuned

    summary, untuned_summary, keep_untuned = on_rank_zero(reports)
    if sweep is not None:
        if keep_untuned:
            point = replace(untuned, criterion=str(tuning))
        # The criterion of the label files as written (regions were swept independently; nested ones are kept nested).
        point = replace(point, score=tuple(float(summary["metrics"].get(f"{tuning}_{n}", float("nan"))) for n in names))
    return FinalEvaluation(point, summary, untuned_summary, table)


def criterion_value(summary: dict[str, Any], criterion: str, names: tuple[str, ...]) -> float:
    """The operating-point criterion of a summary, averaged over regions (NaN regions left out; -inf when none)."""
    values = [float(summary["metrics"].get(f"{criterion}_{n}", float("nan"))) for n in names]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("-inf")


def _run(cases: list[CaseRecord], model: SegmentationModule, transform: Any, spec: Any, options: PredictOptions, prefetch: int, finish: Any, stage: str, rank: int) -> list[dict[str, Any]]:
    """:func:`medseg.prediction.predict_cases` over ``cases`` with ``finish`` as the writer's work; a failed case fails
    the final evaluation on every process (a collective)."""
    results, errors = [], []
    for result in tqdm(predict_cases(cases, model, transform, spec, options, prefetch, finish=finish), total=len(cases), desc=f"final evaluation: {stage}", unit="case", disable=rank != 0):
        if "error" in result:
            errors.append(f"{result['case']}: {result['error']}")
        else:
            results.append(result)
    raise_if_any_failed(errors, f"the final evaluation ({stage}) of the validation cases")
    return results


def _room_for_probabilities(cases: list[CaseRecord], channels: int, out: Path, margin_bytes: float = 2**30) -> bool:
    """Whether ``out``'s file system holds float32 probabilities of every case at once (from the images' headers),
    with ``margin_bytes`` to spare."""
    needed = sum(4 * channels * int(np.prod(nib.load(c["image"][0]).shape[:3])) for c in cases)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if needed + margin_bytes > free:
        log.warning("The validation cases' probabilities need %.1f GiB, %.1f GiB are free under %s: the cases are predicted a second time instead",
                    needed / 2**30, free / 2**30, out)
        return False
    return True


def _sweep(model: SegmentationModule, cfg: DictConfig, lesion_options: dict[str, Any] | None, empty_score: float) -> OperatingPointSweep:
    """The operating-point grid of ``model.operating_point`` (softmax: the argmax, with the configured threshold kept
    so that the untuned point can win)."""
    options, lesion = cfg.model.operating_point, lesion_options or {}
    thresholds = list(options.get("thresholds") or [cfg.model.threshold]) if model.mode == "sigmoid" else [cfg.model.threshold]
    return OperatingPointSweep(model.label_spec.names, model.mode, thresholds, list(options.get("min_component_mm3") or [0.0]), model.connectivity,
                               lesion.get("size_buckets_mm3", ()), lesion.get("bucket_names"), empty_score, MatchingRule.from_options(lesion))
