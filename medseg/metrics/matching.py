"""Lesion matching rules: which predicted components detect which reference lesions, and the one pooling of
detection counts into recall, precision and F1.

Every rule works on the same *overlap table* of one case and region: the connected components of the prediction
(``1..N_pred``) and of the reference (``1..N_ref``), their sizes in voxels, and for every overlapping pair its
intersection in voxels (:func:`component_pairs`). A rule turns the table into two boolean vectors: which reference
lesions are *detected* and which predicted components are *true positives*; everything else is counted from them
(:func:`detection_counts`). Three rules (``model.lesion_metrics.matching``):

* ``one_to_one`` (default): predicted and reference components are matched one-to-one, as panoptica
  (Kofler et al. 2023, ``MaxBipartiteMatching``) and MetricsReloaded (Maier-Hein et al. 2024, Nat. Methods 21:
  "assignment" step) count. A pair is *eligible* when its localisation criterion reaches ``match_threshold``
  (``>=``): ``iou`` = intersection / union, or ``ior`` = intersection / reference lesion. Among eligible pairs the
  assignment maximises the total criterion score (``scipy.optimize.linear_sum_assignment`` per connected group of
  eligible pairs; panoptica's objective, so one pair of high IoU is kept where two pairs of lower IoU would match
  one lesion more). Matched pairs are true positives on both sides; unmatched reference
  lesions are misses, unmatched predicted components false positives, so ``F1 = 2 TP / (2 TP + FP + FN)``. A flood
  touching N lesions matches at most one of them (F1 <= 2 / (N + 1)); a lesion found as two fragments gives one TP
  and one FP.
  Default criterion ``iou >= 0.1``: panoptica's ``iou >= 0.5`` (the panoptic-quality convention for large
  instances) misses small lesions that were found, since a boundary voxel is a large part of them: a 5-voxel lesion
  predicted as 8 voxels sharing 4 has IoU 4/9 = 0.44. At 0.1 a prediction must still share a tenth of the union, so
  a component ten times a lesion's size, or a tenth of it, does not count as finding it; MetricsReloaded lists
  low IoU thresholds among its localisation criteria for small structures.
* ``msseg``: the MSSEG-2016/2021 rules of Anima's ``animaSegPerfAnalyzer`` (Commowick et al. 2018, Sci. Rep. 8:13650,
  section "Detection"). Components of at most ``min_lesion_mm3`` (3 mm^3) are removed from both masks first (their
  voxels become background). A reference lesion is detected when the predicted components cover more than
  ``alpha`` (10%) of it and, going through the components overlapping it by decreasing overlap until they make up
  at least ``gamma`` (65%) of the covered part, none lies more than ``beta`` (70%) outside every reference lesion.
  The same test with prediction and reference swapped makes a predicted component a true positive. Recall and
  precision come from the two sides' counts; ``F1 = 2 P R / (P + R)``. Anima labels components with
  6-connectivity (ITK's default), so the ``ms_lesions`` preset sets ``connectivity: 6``; unlike Anima's C++ loop,
  the number of components examined is not capped at the number of lesions of the tested side (a loop bound,
  not part of the published rules).
* ``overlap``: any overlap detects (the WMH 2017 rule; medseg's earlier default): a reference lesion touched by
  a predicted component is detected, a component touching no reference voxel is a false positive. **Gameable**: one
  predicted blob touching every lesion scores recall = precision = F1 = 1. Kept to compare with earlier figures.

Empty convention (one for every consumer: per-case values, pooled values, the operating-point sweep, the reports,
``medseg.evaluate`` and ``medseg.ablation``): a ratio whose denominator is zero takes ``empty_score`` (recall with no
reference lesion, precision with no predicted component); F1 is ``2 P R / (P + R)`` of those, 0 when both are 0 and
NaN when either is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MATCHING_RULES = ("one_to_one", "msseg", "overlap")
MATCH_CRITERIA = ("iou", "ior")


@dataclass(frozen=True)
class MatchingRule:
    """How predicted components are matched to reference lesions (see the module docstring).

    Attributes:
        matching: ``"one_to_one"``, ``"msseg"`` or ``"overlap"``.
        match_criterion: ``one_to_one``: ``"iou"`` or ``"ior"`` (intersection over the reference lesion).
        match_threshold: ``one_to_one``: a pair is eligible when its criterion is at least this, in [0, 1].
        msseg: ``msseg``: ``alpha``, ``beta``, ``gamma`` (fractions) and ``min_lesion_mm3``.
    """

    matching: str = "one_to_one"
    match_criterion: str = "iou"
    match_threshold: float = 0.1
    msseg: Mapping[str, float] = field(default_factory=lambda: {"alpha": 0.1, "beta": 0.7, "gamma": 0.65, "min_lesion_mm3": 3.0})

    def __post_init__(self) -> None:
        if self.matching not in MATCHING_RULES:
            raise ValueError(f"expected lesion matching in {MATCHING_RULES}, got {self.matching!r}")
        if self.match_criterion not in MATCH_CRITERIA:
            raise ValueError(f"expected match_criterion in {MATCH_CRITERIA}, got {self.match_criterion!r}")
        if not 0.0 <= float(self.match_threshold) <= 1.0:
            raise ValueError(f"expected match_threshold in [0, 1], got {self.match_threshold}")
        unknown = sorted(set(self.msseg) - {"alpha", "beta", "gamma", "min_lesion_mm3"})
        if unknown:
            raise ValueError(f"expected msseg options among alpha, beta, gamma, min_lesion_mm3, got {unknown}")
        for key in ("alpha", "beta", "gamma"):
            if not 0.0 <= float(self.msseg.get(key, 0.0)) <= 1.0:
                raise ValueError(f"expected msseg.{key} in [0, 1], got {self.msseg[key]}")
        if not float(self.msseg.get("min_lesion_mm3", 0.0)) >= 0:
            raise ValueError(f"expected msseg.min_lesion_mm3 >= 0, got {self.msseg['min_lesion_mm3']}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> MatchingRule:
        """The rule of a ``model.lesion_metrics`` node (its ``matching``, ``match_criterion``, ``match_threshold``,
        ``msseg`` keys; the defaults for those it lacks)."""
        options = options or {}
        msseg = {**cls().msseg, **{k: float(v) for k, v in dict(options.get("msseg") or {}).items()}}
        return cls(
            matching=str(options.get("matching", cls.matching)),
            match_criterion=str(options.get("match_criterion", cls.match_criterion)),
            match_threshold=float(options.get("match_threshold", cls.match_threshold)),
            msseg=msseg,
        )

    def describe(self) -> str:
        """One line for reports: the rule and its parameters."""
        if self.matching == "one_to_one":
            return f"one-to-one, {self.match_criterion} >= {self.match_threshold:g}"
        if self.matching == "msseg":
            m = self.msseg
            return f"MSSEG (alpha {m['alpha']:g}, beta {m['beta']:g}, gamma {m['gamma']:g}, lesions > {m['min_lesion_mm3']:g} mm^3)"
        return "any overlap"

    def min_counted_voxels(self, voxel_mm3: float) -> int:
        """The fewest voxels a component must have to be counted: 1, or under ``msseg`` more than
        ``min_lesion_mm3`` (Anima's ``floor(min / voxel) + 1``)."""
        if self.matching != "msseg" or self.msseg["min_lesion_mm3"] <= 0:
            return 1
        return int(math.floor(self.msseg["min_lesion_mm3"] / voxel_mm3 * (1.0 + 1e-9))) + 1


def component_pairs(pred_labels: np.ndarray, n_pred: int, ref_labels: np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlapping (predicted, reference) component pairs of two label volumes and their intersections.

    Args:
        pred_labels, ref_labels: integer component labels of the same shape, 0 = background, ``1..N``.

    Returns:
        ``(pair_pred, pair_ref, intersection)``: 0-based component indices and voxel counts, int64 ``(P,)`` each,
        sorted by predicted then reference index.
    """
    both = (pred_labels > 0) & (ref_labels > 0)
    key = pred_labels[both].astype(np.int64) * (n_ref + 1) + ref_labels[both]
    pairs, counts = np.unique(key, return_counts=True)
    return pairs // (n_ref + 1) - 1, pairs % (n_ref + 1) - 1, counts.astype(np.int64)


def detect(
    rule: MatchingRule,
    pair_pred: np.ndarray,
    pair_ref: np.ndarray,
    intersection: np.ndarray,
    pred_sizes: np.ndarray,
    ref_sizes: np.ndarray,
    pred_counted: np.ndarray | None = None,
    ref_counted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which reference lesions are detected and which predicted components are true positives under ``rule``.

    Args:
        pair_pred, pair_ref, intersection: the overlap table (:func:`component_pairs`).
        pred_sizes, ref_sizes: voxels of each component ``(N_pred,)``, ``(N_ref,)``.
        pred_counted, ref_counted: components that take part (``None``: all); the others are background, as a
            component removed by a minimum size is (the operating-point sweep passes its size filter here).

    Returns:
        ``(ref_detected (N_ref,), pred_true (N_pred,))`` booleans; False for components not counted.
    """
    n_pred, n_ref = len(pred_sizes), len(ref_sizes)
    pred_counted = np.ones(n_pred, bool) if pred_counted is None else np.asarray(pred_counted, bool)
    ref_counted = np.ones(n_ref, bool) if ref_counted is None else np.asarray(ref_counted, bool)
    keep = pred_counted[pair_pred] & ref_counted[pair_ref]
    pair_pred, pair_ref, intersection = pair_pred[keep], pair_ref[keep], intersection[keep]
    ref_detected, pred_true = np.zeros(n_ref, bool), np.zeros(n_pred, bool)
    if rule.matching == "overlap":
        ref_detected[pair_ref] = True
        pred_true[pair_pred] = True
    elif rule.matching == "one_to_one":
        matched_pred, matched_ref = one_to_one_pairs(rule, pair_pred, pair_ref, intersection, pred_sizes, ref_sizes)
        ref_detected[matched_ref] = True
        pred_true[matched_pred] = True
    else:
        alpha, beta, gamma = (float(rule.msseg[k]) for k in ("alpha", "beta", "gamma"))
        ref_detected = _anima_side(pair_ref, pair_pred, intersection, ref_sizes, pred_sizes, n_ref, alpha, beta, gamma)
        pred_true = _anima_side(pair_pred, pair_ref, intersection, pred_sizes, ref_sizes, n_pred, alpha, beta, gamma)
    return ref_detected & ref_counted, pred_true & pred_counted


def one_to_one_pairs(rule: MatchingRule, pair_pred: np.ndarray, pair_ref: np.ndarray, intersection: np.ndarray, pred_sizes: np.ndarray, ref_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The matched (predicted, reference) pairs of the ``one_to_one`` rule among overlapping pairs of counted
    components (the overlap table of :func:`component_pairs`, restricted to them): 0-based index arrays."""
    if rule.match_criterion == "iou":
        score = intersection / (pred_sizes[pair_pred] + ref_sizes[pair_ref] - intersection)
    else:
        score = intersection / ref_sizes[pair_ref]
    eligible = score >= rule.match_threshold
    return _max_score_matching(pair_pred[eligible], pair_ref[eligible], score[eligible], len(pred_sizes), len(ref_sizes))


def _max_score_matching(pair_pred: np.ndarray, pair_ref: np.ndarray, score: np.ndarray, n_pred: int, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-to-one assignment of eligible pairs maximising the total score: pairs whose components take part in
    no other eligible pair are matched as they are; each connected group of the rest is solved with
    ``linear_sum_assignment``."""
    if pair_pred.size == 0:
        return pair_pred, pair_ref
    shared = (np.bincount(pair_pred, minlength=n_pred)[pair_pred] > 1) | (np.bincount(pair_ref, minlength=n_ref)[pair_ref] > 1)
    out_pred, out_ref = [pair_pred[~shared]], [pair_ref[~shared]]
    if shared.any():
        gp, gr, gs = pair_pred[shared], pair_ref[shared], score[shared]
        graph = coo_matrix((np.ones(gp.size), (gp, n_pred + gr)), shape=(n_pred + n_ref, n_pred + n_ref))
        _, component = connected_components(graph, directed=False)
        group = component[gp]
        for g in np.unique(group):
            members = group == g
            preds, pred_index = np.unique(gp[members], return_inverse=True)
            refs, ref_index = np.unique(gr[members], return_inverse=True)
            matrix = np.zeros((preds.size, refs.size))
            matrix[pred_index, ref_index] = gs[members]
            rows, cols = linear_sum_assignment(matrix, maximize=True)
            chosen = matrix[rows, cols] > 0  # a zero is no eligible pair
            out_pred.append(preds[rows[chosen]])
            out_ref.append(refs[cols[chosen]])
    return np.concatenate(out_pred), np.concatenate(out_ref)


def _anima_side(
    own: np.ndarray, other: np.ndarray, intersection: np.ndarray, own_sizes: np.ndarray, other_sizes: np.ndarray, n_own: int, alpha: float, beta: float, gamma: float
) -> np.ndarray:
    """Anima's test for every component of one side (reference lesions, or predicted components with the sides
    swapped): covered above ``alpha``, and the other side's components overlapping it, by decreasing overlap until
    they make up at least ``gamma`` of the covered part, none more than ``beta`` outside the own side."""
    covered = np.bincount(own, weights=intersection, minlength=n_own)  # (n_own,) voxels covered by the other side
    positive = np.zeros(n_own, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        positive = covered / own_sizes > alpha if n_own else positive
    if own.size == 0:
        return positive
    # The part of each other-side component lying outside every counted own-side component.
    other_inside = np.bincount(other, weights=intersection, minlength=len(other_sizes))
    outside_ratio = (other_sizes - other_inside) / np.maximum(other_sizes, 1)  # (n_other,)
    order = np.lexsort((other, -intersection, own))  # by own component, decreasing overlap, then index
    own_s, other_s, inter_s = own[order], other[order], intersection[order].astype(np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(own_s)) + 1]
    running = np.cumsum(inter_s)  # exact integer sums
    group_offset = np.repeat(running[starts] - inter_s[starts], np.diff(np.r_[starts, own_s.size]))
    before = (running - inter_s - group_offset) / covered[own_s]  # share of the covered part before each pair
    # A pair is examined while the overlaps before it make up less than gamma (Anima's loop runs while the sum is
    # below gamma); an examined pair whose other component lies too far outside rejects the component.
    examined = before < gamma
    rejected = np.zeros(n_own, bool)
    rejected[own_s[examined & (outside_ratio[other_s] > beta)]] = True
    return positive & ~rejected


def detection_counts(ref_detected: np.ndarray, pred_true: np.ndarray, pred_counted: np.ndarray | None = None, ref_counted: np.ndarray | None = None) -> dict[str, int]:
    """Counts of one case from a rule's result: ``n_ref_lesions``, ``detected``, ``n_pred_lesions``, ``false_positives``."""
    n_ref = int(len(ref_detected) if ref_counted is None else np.count_nonzero(ref_counted))
    n_pred = int(len(pred_true) if pred_counted is None else np.count_nonzero(pred_counted))
    return {"n_ref_lesions": n_ref, "detected": int(np.count_nonzero(ref_detected)), "n_pred_lesions": n_pred, "false_positives": n_pred - int(np.count_nonzero(pred_true))}


def detection_scores(n_ref: Any, detected: Any, n_pred: Any, false_positives: Any, empty_score: float = 1.0) -> dict[str, Any]:
    """Lesion recall, precision and F1 from detection counts: THE pooling of medseg (per case, pooled over cases,
    at every point of the operating-point sweep, in reports and ablations).

    Args:
        n_ref, detected, n_pred, false_positives: counts (numbers, or numpy arrays of one shape for many at once).
        empty_score: the value of a ratio whose denominator is zero (see the module docstring).

    Returns:
        ``lesion_recall = detected / n_ref``, ``lesion_precision = (n_pred - false_positives) / n_pred`` and
        ``lesion_f1 = 2 P R / (P + R)`` (0 when both are 0, NaN when either is NaN): floats for number inputs,
        arrays for array inputs.
    """
    n_ref, detected, n_pred, false_positives = (np.asarray(v, dtype=np.float64) for v in (n_ref, detected, n_pred, false_positives))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_ref > 0, detected / np.where(n_ref > 0, n_ref, 1), empty_score)
        precision = np.where(n_pred > 0, (n_pred - false_positives) / np.where(n_pred > 0, n_pred, 1), empty_score)
        total = precision + recall
        f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
    scores = {"lesion_recall": recall, "lesion_precision": precision, "lesion_f1": f1}
    return {k: float(v) for k, v in scores.items()} if recall.ndim == 0 else scores
