"""The final evaluation of a trained checkpoint on labelled cases, done as a user would: predict, then evaluate.

After training, the validation cases are segmented by the prediction library (:mod:`medseg.prediction`: the
checkpoint's preprocessing, the sliding window with the test-time flips of ``model.tta_flip_axes``, probabilities
mapped back onto each case's own voxel grid) and scored by the evaluation core (:mod:`medseg.evaluation`) against
their original label files, so that ``medseg.evaluate`` on ``medseg.predict``'s files of the same cases gives the
same numbers, as nnU-Net validates its folds. In three stages (:class:`Evaluator`, which cross-validation also
uses, with the first stage run per fold and the others once on the pooled out-of-fold cases):

1. every case's probabilities on its input grid are counted at every point of the operating-point grid
   (:mod:`medseg.metrics.operating_point`) and kept (``<out>/.probabilities/``, float32 and removed at the end, or
   float16 and kept for cross-validation; where the disk has no room for them, the cases are predicted a second
   time in stage 3 instead);
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
from collections.abc import Callable, Sequence
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
from medseg.distributed import gather_objects, group_rank_and_size, on_rank_zero, raise_if_any_failed
from medseg.evaluation import evaluate_case, label_channels, spacing_mm, summarise, write_report
from medseg.io import write_json_atomic
from medseg.metrics.matching import MatchingRule
from medseg.metrics.operating_point import OperatingPointSweep
from medseg.module import SegmentationModule
from medseg.postprocess import OperatingPoint
from medseg.prediction import SUMMARY_NAME, PredictOptions, PreparedCase, output_name, predict_cases, write_labels

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
        rows: the per-case rows of the label files kept (every process).
    """

    point: OperatingPoint
    summary: dict[str, Any]
    untuned: dict[str, Any] | None = None
    sweep_table: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


class Evaluator:
    """The three stages of a final evaluation for one model config and output folder (see the module docstring).

    Args:
        model: the trained module (its weights as they are); ``None`` where only stored probabilities are finished.
        cfg: the run's composed config (``data`` for the preprocessing and labels; ``model`` for flips, the
            operating-point grid, lesion metrics and the empty convention).
        out: the folder of the label files and reports.
        device: where the network runs.
        prefetch: cases read ahead and written behind the one in the sliding window.
    """

    def __init__(self, model: SegmentationModule | None, cfg: DictConfig, out: str | Path, device: torch.device | str = "cpu", prefetch: int = 1) -> None:
        from medseg.data.labels import LabelSpec

        self.model, self.cfg, self.out, self.prefetch = model, cfg, Path(out), prefetch
        self.spec = LabelSpec.from_config(cfg.data.labels)
        model_cfg = cfg.model
        self.lesion_options = OmegaConf.to_container(model_cfg.lesion_metrics, resolve=True) if model_cfg.get("lesion_metrics") else None
        self.empty_score = float(model_cfg.get("empty_score", 1.0))
        self.flips = tuple(int(a) for a in model_cfg.get("tta_flip_axes") or ())
        self.connectivity = int(model_cfg.get("connectivity") or (self.lesion_options or {}).get("connectivity", 26))
        component_score = str((model_cfg.get("operating_point") or {}).get("component_score") or "max")
        self.untuned = replace(OperatingPoint.uniform(self.spec.names, float(model_cfg.threshold), float(model_cfg.get("min_component_mm3") or 0.0), component_score=component_score), tta_flip_axes=self.flips)
        self.criterion = (model_cfg.get("operating_point") or {}).get("criterion")
        self.transform = preprocessing_from_config(cfg.data, with_label=False)
        self.options = PredictOptions(output=self.out, device=torch.device(device), flip_axes=self.flips, point=self.untuned, connectivity=self.connectivity,
                                      in_channels=cfg.data.get("in_channels"))
        # On the network's device: the counts are synced across processes there (NCCL syncs CUDA tensors only).
        self.sweep = self._sweep().to(self.options.device) if self.criterion else None

    def _sweep(self) -> OperatingPointSweep:
        """The grid of ``model.operating_point`` (softmax: the argmax, with the configured threshold kept so that the
        untuned point can win)."""
        model_cfg, lesion = self.cfg.model, self.lesion_options or {}
        options = model_cfg.operating_point
        thresholds = list(options.get("thresholds") or [model_cfg.threshold]) if self.spec.mode == "sigmoid" else [model_cfg.threshold]
        return OperatingPointSweep(self.spec.names, self.spec.mode, thresholds, list(options.get("min_component_mm3") or [0.0]), self.connectivity,
                                   lesion.get("size_buckets_mm3", ()), lesion.get("bucket_names"), self.empty_score, MatchingRule.from_options(lesion),
                                   list(options.get("min_component_score") or [0.0]), str(options.get("component_score") or "max"))

    # -- stage 1 ------------------------------------------------------------------------------------------------

    def predict(self, cases: Sequence[CaseRecord], store: Path | None, compact: bool = False, stage: str = "predict") -> list[dict[str, Any]]:
        """Stage 1 of this process's ``cases``: probabilities counted at every grid point (added to :attr:`sweep`) and,
        with ``store``, saved there (``compact``: float16 ``.npz``, kept; else float32 ``.npy``).

        Returns:
            Per case ``{"case", "prepared", "probabilities": path or None, "counts"}``.
        """
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)

        def count(case: PreparedCase, probs: torch.Tensor) -> dict[str, Any]:  # in the writer thread
            path = None
            if store is not None:
                path = store / (f"{case.target.name}.npz" if compact else f"{case.target.name}.npy")
                save_probabilities(path, probs, compact)
            counts = self.case_counts(case.record, probs) if self.sweep is not None else None
            return {"case": case.record["case"], "prepared": PreparedCase(case.record, case.target, {}, case.seconds), "probabilities": path, "counts": counts}

        results = self.run(cases, count, stage)
        if self.sweep is not None:
            for result in results:
                self.sweep.add(result["counts"])
        return results

    def case_counts(self, record: CaseRecord, probs: torch.Tensor) -> Any:
        """The grid's counts of one case's probabilities ``(C_out, X, Y, Z)`` on its input grid against its label file
        (not added to :attr:`sweep`)."""
        reference = label_channels(nib.load(record["label"]), self.spec, str(record["label"])).numpy()
        return self.sweep.case_counts(probs, reference, spacing_mm(nib.load(record["image"][0])))

    def run(self, cases: Sequence[CaseRecord], finish: Callable[[PreparedCase, torch.Tensor], dict[str, Any]], stage: str) -> list[dict[str, Any]]:
        """:func:`medseg.prediction.predict_cases` over ``cases`` with ``finish`` as the writer's work; a failed case
        fails the final evaluation on every process (a collective)."""
        rank = group_rank_and_size()[0]
        self.model.to(self.options.device).eval()  # (Lightning may have moved the module back to the CPU after fit)
        options = replace(self.options, inputs=frozenset(Path(f).resolve() for c in cases for f in c["image"]))
        results, errors = [], []
        progress = tqdm(predict_cases(list(cases), self.model, self.transform, self.spec, options, self.prefetch, finish=finish), total=len(cases), desc=f"final evaluation: {stage}", unit="case", disable=rank != 0)
        for result in progress:
            if "error" in result:
                errors.append(f"{result['case']}: {result['error']}")
            else:
                results.append(result)
        raise_if_any_failed(errors, f"the final evaluation ({stage}) of the validation cases")
        return results

    # -- stage 2 ------------------------------------------------------------------------------------------------

    def choose(self) -> tuple[OperatingPoint, list[dict[str, Any]]]:
        """The point maximising the criterion on every process's counts (DDP: all choose alike) and the grid table;
        the untuned point and no table without a criterion."""
        if self.sweep is None:
            return self.untuned, []
        with self.sweep.sync_context():
            point = replace(self.sweep.choose(str(self.criterion), default_threshold=float(self.cfg.model.threshold)), tta_flip_axes=self.flips)
            return point, self.sweep.table()

    # -- stage 3 ------------------------------------------------------------------------------------------------

    def write_and_score(self, case: PreparedCase, probs: torch.Tensor, point: OperatingPoint) -> dict[str, Any]:
        """One case's label file at ``point`` (``case.target``), scored from the file; with a sweep, the untuned
        point's file too (``<out>/.untuned/``, kept until :meth:`finish` says which point the files keep)."""
        record = case.record
        written = write_labels(case, probs, self.spec, replace(self.options, point=point))
        rows = evaluate_case(str(record["case"]), case.target, record["label"], self.spec, self.lesion_options, self.empty_score)
        rows_before = []
        if self.sweep is not None:
            shadow = replace(case, target=self.out / UNTUNED_DIR / case.target.name)
            shadow.target.parent.mkdir(parents=True, exist_ok=True)
            write_labels(shadow, probs, self.spec, replace(self.options, point=self.untuned))
            rows_before = evaluate_case(str(record["case"]), shadow.target, record["label"], self.spec, self.lesion_options, self.empty_score)
        return {"case": record["case"], "record": written, "rows": rows, "rows_before": rows_before}

    def write_stored(self, results: Sequence[dict[str, Any]], point: OperatingPoint, keep: bool = False) -> list[dict[str, Any]]:
        """Stage 3 from stored probabilities (removed after unless ``keep``)."""
        finished, errors = [], []
        for result in tqdm(results, desc="final evaluation: write and score", unit="case", disable=group_rank_and_size()[0] != 0):
            try:
                finished.append(self.write_and_score(result["prepared"], load_probabilities(result["probabilities"]), point))
            except Exception as err:  # reported by every process below, not left for the others to wait on
                errors.append(f"{result['case']}: {type(err).__name__}: {err}")
            finally:
                if not keep:
                    Path(result["probabilities"]).unlink(missing_ok=True)
        raise_if_any_failed(errors, "the final evaluation of the validation cases")
        return finished

    def finish(self, results: Sequence[dict[str, Any]], point: OperatingPoint, table: list[dict[str, Any]], order: Sequence[str], checkpoint: str | None = None, extra_columns: dict[str, dict[str, Any]] | None = None) -> FinalEvaluation:
        """Gather every process's stage-3 results, keep the grid's point only if its files beat the untuned point's
        (rank 0 moves the untuned files into place otherwise), write ``predictions.json`` and the reports.

        Args:
            order: case ids in report order.
            extra_columns: per case id, columns added to its rows (cross-validation: its fold).
        """
        records = gather_objects([r["record"] for r in results])
        rows = gather_objects([row for r in results for row in r["rows"]])
        rows_before = gather_objects([row for r in results for row in r["rows_before"]])
        position = {str(c): i for i, c in enumerate(order)}
        for items in (records, rows, rows_before):
            items.sort(key=lambda r: position[str(r["case"])])
        for row in rows + rows_before:
            row.update((extra_columns or {}).get(str(row["case"]), {}))
        criterion, names, out = self.criterion, self.spec.names, self.out

        def reports() -> tuple[dict[str, Any], dict[str, Any] | None, bool, list[dict[str, Any]]]:
            kept_rows, keep_untuned = rows, False
            if self.sweep is not None:
                tuned_value = criterion_value(summarise(rows, self.spec, self.lesion_options, self.empty_score), str(criterion), names)
                untuned_value = criterion_value(summarise(rows_before, self.spec, self.lesion_options, self.empty_score), str(criterion), names)
                keep_untuned = untuned_value > tuned_value
                if keep_untuned:
                    log.info("On the written files the grid's point scores %s %.4f, the configured point %.4f: the configured point is kept", criterion, tuned_value, untuned_value)
                    for record in records:
                        os.replace(out / UNTUNED_DIR / Path(record["prediction"]).name, record["prediction"])
                    kept_rows = rows_before
            shutil.rmtree(out / PROBABILITY_DIR, ignore_errors=True)
            shutil.rmtree(out / UNTUNED_DIR, ignore_errors=True)
            chosen = self.untuned if keep_untuned else point
            write_json_atomic(out / SUMMARY_NAME, {"checkpoint": checkpoint, "input": "validation cases", "options": {"tta_flip_axes": list(self.flips), "operating_point": chosen.to_dict()}, "failed": 0, "cases": records})
            summary = write_report(kept_rows, out / "evaluation", self.spec, self.lesion_options, self.empty_score)
            untuned_summary = write_report(rows_before, out / "evaluation_before_postprocessing", self.spec, self.lesion_options, self.empty_score) if self.sweep is not None else None
            return summary, untuned_summary, keep_untuned, kept_rows

        summary, untuned_summary, keep_untuned, kept_rows = on_rank_zero(reports)
        if self.sweep is not None:
            if keep_untuned:
                point = replace(self.untuned, criterion=str(criterion))
            # The criterion of the label files as written (regions were swept independently; nested ones are kept nested).
            point = replace(point, score=tuple(float(summary["metrics"].get(f"{criterion}_{n}", float("nan"))) for n in names))
        return FinalEvaluation(point, summary, untuned_summary, table, kept_rows)


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
    evaluator = Evaluator(model, cfg, out, device, prefetch)
    rank, world = group_rank_and_size()
    mine = cases[rank::world]
    order = [str(c["case"]) for c in cases]
    if evaluator.sweep is None:  # nothing to tune: one pass
        results = evaluator.run(mine, lambda case, probs: evaluator.write_and_score(case, probs, evaluator.untuned), "predict, write and score")
        return evaluator.finish(results, evaluator.untuned, [], order, checkpoint)
    # Keep every case's probabilities on disk until the point is chosen, where there is room for them (float32,
    # the values prediction thresholds); else predict the cases a second time after choosing.
    store = evaluator.out / PROBABILITY_DIR if room_for_probabilities(mine, evaluator.spec.num_outputs, evaluator.out) else None
    results = evaluator.predict(mine, store)
    point, table = evaluator.choose()
    if store is not None:
        results = evaluator.write_stored(results, point)
    else:
        results = evaluator.run(mine, lambda case, probs: evaluator.write_and_score(case, probs, point), "predict again, write and score")
    return evaluator.finish(results, point, table, order, checkpoint)


def case_target(out: Path, case: str) -> Path:
    """Where a case's label file goes in ``out`` (``medseg.predict``'s naming)."""
    return out / output_name(case)


def save_probabilities(path: Path, probs: torch.Tensor, compact: bool = False) -> None:
    """Probabilities ``(C_out, X, Y, Z)``: float32 ``.npy``, or with ``compact`` float16 in a compressed ``.npz``
    (cross-validation keeps every out-of-fold case's: about a quarter of the bytes for typical probability maps)."""
    if compact:
        np.savez_compressed(path, probabilities=probs.numpy().astype(np.float16))
    else:
        np.save(path, probs.numpy())


def load_probabilities(path: str | Path) -> torch.Tensor:
    """What :func:`save_probabilities` wrote, as float32."""
    path = Path(path)
    array = np.load(path)["probabilities"] if path.suffix == ".npz" else np.load(path)
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def criterion_value(summary: dict[str, Any], criterion: str, names: Sequence[str]) -> float:
    """The operating-point criterion of a summary, averaged over regions (NaN regions left out; -inf when none)."""
    values = [float(summary["metrics"].get(f"{criterion}_{n}", float("nan"))) for n in names]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("-inf")


def room_for_probabilities(cases: Sequence[CaseRecord], channels: int, out: Path, margin_bytes: float = 2**30, bytes_per_value: int = 4) -> bool:
    """Whether ``out``'s file system holds the probabilities of every case at once (from the images' headers), with
    ``margin_bytes`` to spare."""
    needed = sum(bytes_per_value * channels * int(np.prod(nib.load(c["image"][0]).shape[:3])) for c in cases)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if needed + margin_bytes > free:
        log.warning("The cases' probabilities need %.1f GiB, %.1f GiB are free under %s: the cases are predicted a second time instead", needed / 2**30, free / 2**30, out)
        return False
    return True
