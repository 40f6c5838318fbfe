"""The final evaluation of a trained checkpoint on labelled cases, done as a user would: predict, then evaluate.

After training, the validation cases are segmented by the prediction library (:mod:`medseg.prediction`: the
checkpoint's preprocessing, the sliding window with the test-time flips of ``model.tta_flip_axes``, probabilities
mapped back onto each case's own voxel grid) and scored by the evaluation core (:mod:`medseg.evaluation`) against
their original label files, so that ``medseg.evaluate`` on ``medseg.predict``'s files of the same cases gives the
same numbers, as nnU-Net validates its folds. In three stages:

1. every case's probabilities on its input grid are kept (``<out>/.probabilities/``, removed at the end) and
   counted at every point of the operating-point grid (:mod:`medseg.metrics.operating_point`);
2. the point maximising ``model.operating_point.criterion`` is chosen once for all cases (or the configured
   ``model.threshold`` / ``model.min_component_mm3`` is kept), with the flips it was tuned on recorded;
3. each case's labels at that point are written as ``medseg.predict`` writes them (``<out>/<case>.nii.gz``,
   ``predictions.json``) and the files are scored (``<out>/evaluation/``); the untuned point's labels are scored
   too (``<out>/evaluation_before_postprocessing/``, not written as files).

Under DDP every process predicts its share of the cases (the sweep's counts are summed across processes, so all
choose the same point) and process 0 writes the records and reports.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from medseg.build import preprocessing_from_config
from medseg.data.layouts import CaseRecord
from medseg.evaluation import evaluate_case, label_channels, score_labels, spacing_mm, write_report
from medseg.io import write_json_atomic
from medseg.metrics.cases import gather_rows
from medseg.metrics.matching import MatchingRule
from medseg.metrics.operating_point import OperatingPointSweep
from medseg.module import SegmentationModule
from medseg.postprocess import OperatingPoint
from medseg.prediction import SUMMARY_NAME, PredictOptions, PreparedCase, predict_cases, segment, write_labels

log = logging.getLogger("medseg")
PROBABILITY_DIR = ".probabilities"


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_cases(model: SegmentationModule, cfg: DictConfig, cases: list[CaseRecord], out: str | Path, device: torch.device | str = "cpu", prefetch: int = 1) -> FinalEvaluation:
    """Predict ``cases`` with ``model``, tune the operating point on them, write their label files and score them.

    Args:
        model: the trained module (its weights as they are: load the checkpoint to evaluate first).
        cfg: the run's composed config (``data`` for the preprocessing and labels; ``model`` for flips, the
            operating-point grid, lesion metrics and the empty convention).
        cases: labelled case records (``{"case", "image": [files], "label": file}``).
        out: the folder of the label files and reports (the run's ``validation/``).
        device: where the network runs.

    Returns:
        The point, the summaries and the sweep table (see :class:`FinalEvaluation`).

    Raises:
        RuntimeError: a case could not be predicted (naming it): a final evaluation without it would not be one.
    """
    out = Path(out)
    rank, world = _world()
    spec = model.label_spec
    names = spec.names
    model_cfg = cfg.model
    lesion_options = OmegaConf.to_container(model_cfg.lesion_metrics, resolve=True) if model_cfg.get("lesion_metrics") else None
    empty_score = float(model_cfg.get("empty_score", 1.0))
    flips = tuple(int(a) for a in model_cfg.get("tta_flip_axes") or ())
    untuned = replace(OperatingPoint.uniform(names, float(model_cfg.threshold), float(model_cfg.get("min_component_mm3") or 0.0)), tta_flip_axes=flips)
    tuning = (model_cfg.get("operating_point") or {}).get("criterion")
    sweep = _sweep(model, cfg, lesion_options, empty_score) if tuning else None
    transform = preprocessing_from_config(cfg.data, with_label=False)
    options = PredictOptions(output=out, device=torch.device(device), flip_axes=flips, point=untuned, connectivity=model.connectivity,
                             in_channels=cfg.data.get("in_channels"), inputs=frozenset(Path(f).resolve() for c in cases for f in c["image"]))
    mine = cases[rank::world]
    probability_dir = out / PROBABILITY_DIR
    probability_dir.mkdir(parents=True, exist_ok=True)

    def keep(case: PreparedCase, probs: torch.Tensor) -> dict[str, Any]:  # stage 1, in the writer thread
        path = probability_dir / f"{case.target.name}.npy"
        np.save(path, probs.numpy())
        counts = None
        if sweep is not None:
            reference = label_channels(nib.load(case.record["label"]), spec, str(case.record["label"])).numpy()
            counts = sweep.case_counts(probs, reference, spacing_mm(nib.load(case.record["image"][0])))
        return {"case": case.record["case"], "prepared": PreparedCase(case.record, case.target, {}, case.seconds), "probabilities": path, "counts": counts}

    model.eval()
    kept = []
    progress = tqdm(predict_cases(mine, model, transform, spec, options, prefetch, finish=keep), total=len(mine), desc="final evaluation: predict", unit="case", disable=rank != 0)
    for result in progress:
        if "error" in result:
            raise RuntimeError(f"the final evaluation could not predict validation case {result['case']}: {result['error']}")
        if sweep is not None:
            sweep.add(result.pop("counts"))
        kept.append(result)

    point, table = untuned, []
    if sweep is not None:
        with sweep.sync_context():  # every process's counts (DDP): all choose the same point
            point = replace(sweep.choose(str(tuning), default_threshold=float(model_cfg.threshold)), tta_flip_axes=flips)
            table = sweep.table()

    records, rows, rows_before = [], [], []
    for result in tqdm(kept, desc="final evaluation: write and score", unit="case", disable=rank != 0):
        case, record = result["prepared"], result["prepared"].record
        probs = torch.from_numpy(np.load(result["probabilities"]))  # (C_out, X, Y, Z) on the case's input grid
        records.append(write_labels(case, probs, spec, replace(options, point=point)))
        rows += evaluate_case(str(record["case"]), case.target, record["label"], spec, lesion_options, empty_score)
        if sweep is not None:  # the untuned point, post-processed and scored the same way (its labels are not kept)
            spacing = spacing_mm(nib.load(record["image"][0]))
            labels = segment(probs, spec, untuned, float(np.prod(spacing)), model.connectivity)  # (X, Y, Z)
            reference = label_channels(nib.load(record["label"]), spec, str(record["label"]))
            rows_before += score_labels(str(record["case"]), spec.to_channels(torch.from_numpy(labels)[None]), reference, spacing, spec, lesion_options, empty_score)
        result["probabilities"].unlink()
    records, rows, rows_before = gather_rows(records), gather_rows(rows), gather_rows(rows_before)
    order = {str(c["case"]): i for i, c in enumerate(cases)}
    records.sort(key=lambda r: order[str(r["case"])])
    rows.sort(key=lambda r: order[str(r["case"])])
    rows_before.sort(key=lambda r: order[str(r["case"])])

    summary = untuned_summary = None
    if rank == 0:
        shutil.rmtree(probability_dir, ignore_errors=True)
        write_json_atomic(out / SUMMARY_NAME, {"checkpoint": None, "input": "validation cases", "options": {"tta_flip_axes": list(flips), "operating_point": point.to_dict()}, "failed": 0, "cases": records})
        summary = write_report(rows, out / "evaluation", spec, lesion_options, empty_score)
        if sweep is not None:
            untuned_summary = write_report(rows_before, out / "evaluation_before_postprocessing", spec, lesion_options, empty_score)
    if world > 1:
        shared = [(summary, untuned_summary)]
        dist.broadcast_object_list(shared, src=0)
        summary, untuned_summary = shared[0]
    return FinalEvaluation(point, summary, untuned_summary, table)


def _sweep(model: SegmentationModule, cfg: DictConfig, lesion_options: dict[str, Any] | None, empty_score: float) -> OperatingPointSweep:
    """The operating-point grid of ``model.operating_point`` (softmax: the argmax, with the configured threshold kept
    so that the untuned point can win)."""
    options, lesion = cfg.model.operating_point, lesion_options or {}
    thresholds = list(options.get("thresholds") or [cfg.model.threshold]) if model.mode == "sigmoid" else [cfg.model.threshold]
    return OperatingPointSweep(model.label_spec.names, model.mode, thresholds, list(options.get("min_component_mm3") or [0.0]), model.connectivity,
                               lesion.get("size_buckets_mm3", ()), lesion.get("bucket_names"), empty_score, MatchingRule.from_options(lesion))
