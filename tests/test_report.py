"""The console metrics table: one row per region, one recall column per lesion size bucket."""

from __future__ import annotations

import math

from medseg.report import metrics_table, size_buckets


def _metrics(buckets: dict[str, tuple[float, int]], names=("lesion",), stage="test") -> dict[str, float]:
    metrics = {f"{stage}/dice": 0.5}
    for name in names:
        metrics |= {f"{stage}/dice_{name}": 0.5, f"{stage}/lesion_recall_{name}": 0.25, f"{stage}/lesion_precision_{name}": 0.75}
        for bucket, (recall, count) in buckets.items():
            metrics[f"{stage}/lesion_recall_{bucket}_{name}"] = recall
            metrics[f"{stage}/n_ref_lesions_{bucket}_{name}"] = float(count)
    return metrics


def _columns(table) -> dict[str, list[str]]:
    return {str(c.header): list(c._cells) for c in table.columns}


def test_one_recall_column_per_size_bucket_whatever_its_name():
    metrics = _metrics({"tiny": (0.1, 59), "small": (0.2, 60), "medium": (0.9, 27), "large": (1.0, 8)})
    assert size_buckets(metrics, ["lesion"], "test") == ["tiny", "small", "medium", "large"]
    columns = _columns(metrics_table(metrics, ["lesion"], "test"))
    assert list(columns) == ["region", "Dice", "Lesion rec.", "Tiny rec.", "Small rec.", "Medium rec.", "Large rec.", "Lesion prec."]
    assert columns["Tiny rec."] == ["0.1000", "-"]  # the mean row has no bucket recall of its own
    assert columns["Large rec."][0] == "1.0000"


def test_a_bucket_without_reference_lesions_shows_a_dash_not_its_empty_score():
    metrics = _metrics({"small": (1.0, 0), "large": (math.nan, 3)}, names=("wt", "tc"))
    assert size_buckets(metrics, ["wt", "tc"], "test") == ["small", "large"]
    columns = _columns(metrics_table(metrics, ["wt", "tc"], "test"))
    assert columns["region"] == ["wt", "tc", "mean"]
    assert columns["Small rec."] == ["-", "-", "-"]
    assert columns["Large rec."] == ["-", "-", "-"]  # NaN
    assert columns["Dice"] == ["0.5000", "0.5000", "0.5000"]


def test_no_lesion_metrics_no_lesion_columns():
    metrics = {"val/dice": 0.8, "val/dice_et": 0.8, "val/iou_et": 0.7}
    assert size_buckets(metrics, ["et"]) == []
    assert list(_columns(metrics_table(metrics, ["et"]))) == ["region", "Dice", "IoU"]


def test_printed_to_a_pipe_the_numbers_are_not_cut_short(capsys):
    from medseg.report import print_metrics_table

    metrics = _metrics({"tiny": (0.123456, 59), "small": (0.2, 60), "medium": (0.9, 27), "large": (1.0, 8)})
    print_metrics_table(metrics, ["lesion"], "test")
    out = capsys.readouterr().out
    assert "0.1235" in out and "Lesion prec." in out and "…" not in out
