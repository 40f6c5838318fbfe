"""The model card of an exported model (``MODEL_CARD.md`` in the zip of :mod:`medseg.model_package`).

Generated from what the zip holds, never typed by hand: what the model reads and predicts, how it was trained
(data layout, cases, loss, steps), what its report measured with each metric's definition, the operating point,
intended use and limits. A number in the card is a number of the report files shipped beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# What each metric of medseg's reports means (matched on the key's start, the more specific first; the key's end names
# the region or class). n(.) counts voxels; P is the prediction, R the reference.
METRIC_DEFINITIONS = (
    ("dice", "Dice overlap 2·n(P∩R) / (n(P) + n(R)) of the final masks per case, averaged over cases (both masks empty: the report's empty_score)"),
    ("iou", "intersection over union n(P∩R) / n(P∪R) per case, averaged over cases"),
    ("recall", "voxel recall (sensitivity) n(P∩R) / n(R) per case, averaged over cases"),
    ("precision", "voxel precision n(P∩R) / n(P) per case, averaged over cases"),
    ("hd95_mm", "95th percentile of the symmetric surface distance in mm per case, averaged over cases"),
    ("lesion_f1_case_mean", "lesion-wise F1 computed per case, averaged over cases"),
    ("lesion_f1", "lesion-wise F1 of detection 2 TP / (2 TP + FP + FN), lesions (connected components) pooled over cases, under the lesion matching rule"),
    ("lesion_recall_small", "lesion-wise recall of the small reference lesions (below the first size bucket bound, mm^3)"),
    ("lesion_recall_medium", "lesion-wise recall of the medium reference lesions (between the size bucket bounds, mm^3)"),
    ("lesion_recall_large", "lesion-wise recall of the large reference lesions (above the last size bucket bound, mm^3)"),
    ("lesion_recall", "lesion-wise recall: the fraction of reference lesions detected under the lesion matching rule, pooled over cases"),
    ("lesion_precision", "lesion-wise precision: the fraction of predicted lesions that are true positives, pooled over cases"),
    ("lesion_dice", "Dice of the detected reference lesions with their matched predictions, averaged over lesions"),
    ("fp_per_case", "false positive lesions per case"),
    ("n_ref_lesions", "the number of reference lesions of that size bucket (a count, not a score)"),
)


def definition(key: str) -> str:
    """The definition of a report metric ``key`` (e.g. ``dice_wt``, ``lesion_recall_small_lesion``), or ``""``."""
    for prefix, text in METRIC_DEFINITIONS:
        if key.startswith(prefix):
            return text
    return ""


def model_card(manifest: Mapping[str, Any], config: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """The card as Markdown.

    Args:
        manifest: the zip's manifest (name, version, members, labels, operating point).
        config: the training config, machine paths removed.
        report: the report files' JSON contents by relative path (``metrics.json`` or ``crossval.json``, ...).
    """
    data, model = config.get("data", {}), config.get("model", {})
    labels = manifest["labels"]
    summary = report.get("crossval.json") or report.get("metrics.json") or {}
    measured_on = "out-of-fold predictions of the cross-validation (each case predicted by the fold that did not train on it)" if "crossval.json" in report else "the run's validation cases (held out of its training)"
    net = model.get("net", {})
    lines = [
        f"# {manifest['name']}",
        "",
        f"A 3D segmentation model trained with medseg {manifest['medseg_version']} ({manifest['source']}, {len(manifest['members'])} checkpoint(s)), exported {manifest['created']}.",
        "Predict with `python -m medseg.predict ckpt_path=<this zip> input=<scans> output=<folder>`.",
        "",
        "## What it reads and predicts",
        f"- Input: {data.get('in_channels', '?')} channel(s) {list(data.get('modalities') or []) or ''} per case, NIfTI or DICOM series; {('resampled to ' + str(list(data['spacing'])) + ' mm spacing') if data.get('spacing') else 'at its own voxel spacing'}, RAS orientation, "
        f"intensity `{data.get('intensity', 'zscore')}`{', cropped to the non-zero foreground' if data.get('crop_foreground') else ''}; predictions are mapped back to each input's own grid.",
        f"- Output: {labels.get('mode')} {'regions' if labels.get('mode') == 'sigmoid' else 'classes'} {list(labels.get('names', []))}, written as label values {list(labels.get('values', []))}"
        + (f" (regions: {dict(labels['regions'])})" if labels.get("regions") else "") + ".",
        f"- Network: `{net.get('_target_', '?')}`, sliding window {list(model.get('inferer', {}).get('roi_size') or data.get('patch_size') or [])}, test-time flips {manifest.get('tta_flip_axes') or 'none'}.",
        "",
        "## Training",
        f"- Data: layout `{data.get('layout', '?')}` (dataset root not recorded: machine paths are removed), validation fraction {data.get('val_fraction', '?')}, "
        f"{_count(summary.get('cases'))} evaluated case(s).",
        f"- Loss `{config.get('loss', {}).get('_target_', '?')}`, optimizer `{config.get('optimizer', {}).get('_target_', '?')}`, {_length(config.get('trainer', {}))}, seed {config.get('seed')}.",
        "",
        "## Operating point",
    ]
    point = manifest.get("operating_point") or {}
    regions = point.get("regions") or {}
    if regions:
        lines.append(f"Tuned on {measured_on}, maximising `{point.get('criterion')}`:")
        lines.append("")
        lines.append("| region | threshold | min component (mm^3) | min component score |")
        lines.append("| --- | --- | --- | --- |")
        for region, values in regions.items():
            lines.append(f"| {region} | {values.get('threshold')} | {values.get('min_component_mm3', 0)} | {values.get('min_component_score', 0)} |")
    else:
        lines.append("None stored: probabilities above 0.5 (sigmoid) or the argmax class, nothing removed.")
    lines += ["", "## Metrics", f"Measured on {measured_on}, at the operating point, in each case's original geometry.", ""]
    metrics = summary.get("metrics") or {}
    if metrics:
        lines.append("| metric | value | definition |")
        lines.append("| --- | --- | --- |")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"
                lines.append(f"| {key} | {shown} | {definition(key)} |")
    else:
        lines.append("No report was found beside the checkpoint(s): the model's accuracy is unknown to this card.")
    matching = summary.get("lesion_matching") or (model.get("lesion_metrics") or {}).get("matching")
    if matching:
        buckets = (model.get("lesion_metrics") or {}).get("size_buckets_mm3")
        lines += ["", f"Lesion matching rule: `{matching}`; lesions are connected components of {config.get('connectivity', 26)}-connected voxels"
                  + (f"; size buckets at {list(buckets)} mm^3." if buckets else ".")]
    lines += [
        "",
        "## Intended use",
        "Research: segmentation of the structures above in scans like the training data (same modality, channels, protocol family). "
        "Not a medical device; not for diagnosis or treatment decisions. A clinician reviews every output (the DICOM SEG opens in 3D Slicer, OHIF or a PACS viewer).",
        "",
        "## Limits",
        f"- The metrics above come from {measured_on}, not from an external test set; expect lower numbers on other scanners, sites or populations.",
        "- Inputs outside the training distribution (other modalities, contrasts, field of view, pathology) are not detected: the model segments whatever it is given.",
        "- Small lesions are the hardest part: see the lesion-wise recall by size in the report (report/) where the model reports it.",
        "- The training data itself is not included; its licence and provenance are the trainer's to state.",
        "",
    ]
    return "\n".join(lines)


def _length(trainer: Mapping[str, Any]) -> str:
    """How long training ran as configured: ``N steps`` or ``N epochs``."""
    steps = trainer.get("max_steps") or -1
    return f"{steps} steps" if steps > 0 else f"{trainer.get('max_epochs', '?')} epochs"


def _count(cases: Any) -> Any:
    """The number of evaluated cases of a report: its ``cases`` count or list."""
    return len(cases) if isinstance(cases, list) else cases if cases is not None else "?"
