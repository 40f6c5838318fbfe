"""Aggregation of a loss-ablation multirun (medseg.ablation) on fabricated job folders with known numbers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from medseg.ablation import FINAL_ROWS, FINAL_ROWS_BEFORE, LEGACY_ROWS, aggregate, job_folders, main
from medseg.io import write_csv_atomic

BUCKETS = {"bucket_names": ["small", "large"], "size_buckets_mm3": [100.0]}


def fabricate_job(folder: Path, loss: str, seed: int, fold: int | None, cases: list[dict], extra: list[str] = (), lesion=BUCKETS, rows_file: str = FINAL_ROWS) -> None:
    """A job folder as ``medseg.train`` leaves it in a multirun: Hydra's records, config.yaml, the final evaluation's
    rows (``rows_file``: an earlier version's ``test_cases.csv`` also works)."""
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"loss={loss}", f"seed={seed}", "+experiment=loss_ablation", *extra, *([f"data.fold={fold}"] if fold is not None else [])]
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": {"loss": loss, "data": "msd"}}}}), folder / ".hydra" / "hydra.yaml")
    config = {"seed": seed, "data": {"fold": fold}, "model": {"lesion_metrics": {**lesion, "connectivity": 26}}}
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    rows = []
    for i, c in enumerate(cases):
        detected = c["det_small"] + c["det_large"]
        rows.append({
            "case": f"case{fold}{i}", "region": "lesion", "dice": c["dice"], "n_ref_lesions": c["ref_small"] + c["ref_large"],
            "n_pred_lesions": detected + c["fp"], "detected": detected, "false_positives": c["fp"],
            "lesion_recall": 0.0, "n_ref_lesions_small": c["ref_small"], "detected_small": c["det_small"],
            "n_ref_lesions_large": c["ref_large"], "detected_large": c["det_large"],
        })  # fmt: skip
    write_csv_atomic(rows, folder / rows_file)


def case(dice, ref_small, det_small, ref_large, det_large, fp) -> dict:
    return {"dice": dice, "ref_small": ref_small, "det_small": det_small, "ref_large": ref_large, "det_large": det_large, "fp": fp}


@pytest.fixture()
def multirun(tmp_path) -> Path:
    """``dice`` and ``focal_dice_g1``, seeds 1-3, folds 0-1 (one case each), plus one failed job.

    Per seed s of ``dice``: small lesions detected (s) + (s + 1) of 4 + 6 -> recall 0.3, 0.5, 0.7; the 2 large
    ones always; Dice (0.6 + 0.8 + 0.1 (s - 2)) / 2 -> 0.65, 0.70, 0.75; false positives s and s + 2 -> 2, 3, 4
    per case. ``focal_dice_g1`` finds every lesion with 10 false positives per case and Dice 0.5.
    """
    root = tmp_path / "multirun"
    job = 0
    for loss in ("dice", "focal_dice_g1"):
        for seed in (1, 2, 3):
            for fold in (0, 1):
                if loss == "dice":
                    cases = [case(0.6, 4, seed, 2, 2, seed)] if fold == 0 else [case(0.8 + 0.1 * (seed - 2), 6, seed + 1, 0, 0, seed + 2)]
                else:
                    cases = [case(0.5, 4, 4, 2, 2, 10)] if fold == 0 else [case(0.5, 6, 6, 0, 0, 10)]
                fabricate_job(root / str(job), loss, seed, fold, cases)
                job += 1
    (root / str(job) / ".hydra").mkdir(parents=True)  # a job that never finished
    (root / str(job) / ".hydra" / "overrides.yaml").write_text("- loss=ce\n")
    return root


def test_job_folders_in_job_number_order(multirun):
    assert [p.name for p in job_folders(multirun)] == [str(i) for i in range(13)]


def test_means_and_stds_over_seeds(multirun, tmp_path, capsys):
    summary = aggregate([multirun], tmp_path / "out")
    assert "skipped: expected a finished job" in capsys.readouterr().err  # job 12
    assert [(r["variant"], r["region"], r["n_seeds"], r["folds"], r["n_cases"]) for r in summary] == [
        ("dice", "lesion", 3, "0,1", 2), ("focal_dice_g1", "lesion", 3, "0,1", 2)
    ]
    dice, focal = summary
    assert (dice["n_ref_lesions"], dice["n_ref_lesions_small"], dice["n_ref_lesions_large"]) == (12, 10, 2)
    expected = {
        "recall_small": (0.5, 0.2), "recall_large": (1.0, 0.0), "dice": (0.7, 0.05), "fp_per_case": (3.0, 1.0),
        "lesion_recall": (7 / 12, 2 / 12),
        # predicted components: detected + false positives; precision = detected / predicted, per seed pooled
        "lesion_precision": tuple(_mean_std([(2 * s + 3) / (2 * s + 3 + 2 * s + 2) for s in (1, 2, 3)])),
        "lesion_f1": tuple(_mean_std(F1_PER_SEED)),
        "fp_per_case_before": (3.0, 1.0),  # no rows of an untuned point: the same rows
    }  # fmt: skip
    for score, (mean, std) in expected.items():
        assert dice[f"{score}_mean"] == pytest.approx(mean) and dice[f"{score}_std"] == pytest.approx(std, abs=1e-12), score
    assert (focal["recall_small_mean"], focal["recall_small_std"], focal["fp_per_case_mean"], focal["dice_mean"]) == (1.0, 0.0, 10.0, 0.5)


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


# per seed s: recall (2s + 3) / 12, precision (2s + 3) / (4s + 5)
F1_PER_SEED = [_f1((2 * s + 3) / (4 * s + 5), (2 * s + 3) / 12) for s in (1, 2, 3)]


def _mean_std(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))]


def test_written_files(multirun, tmp_path):
    out = tmp_path / "out"
    aggregate([multirun], out)
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| loss | seeds | Dice | lesion recall (n=12) | recall small (< 100 mm³, n=10) | recall large (>= 100 mm³, n=2) |")
    precision = " ± ".join(f"{v:.3f}" for v in _mean_std([5 / 9, 7 / 13, 9 / 17]))
    f1 = " ± ".join(f"{v:.3f}" for v in _mean_std(F1_PER_SEED))
    assert table[2] == f"| `dice` | 3 | 0.700 ± 0.050 | 0.583 ± 0.167 | 0.500 ± 0.200 | 1.000 ± 0.000 | {precision} | {f1} | 3.000 ± 1.000 | 3.000 ± 1.000 |"
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert [r["variant"] for r in rows] == ["dice", "focal_dice_g1"] and float(rows[0]["recall_small_std"]) == pytest.approx(0.2)
    seeds = list(csv.DictReader((out / "ablation_seeds.csv").open()))
    assert [(r["variant"], r["seed"]) for r in seeds][:3] == [("dice", "1"), ("dice", "2"), ("dice", "3")]
    assert [float(r["recall_small"]) for r in seeds[:3]] == pytest.approx([0.3, 0.5, 0.7])
    png = out / "recall_by_lesion_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0


def test_loss_overrides_make_variants_and_one_seed_has_no_std(tmp_path):
    root = tmp_path / "multirun"
    fabricate_job(root / "0", "focal_dice", 1, None, [case(0.4, 2, 1, 1, 1, 3)], extra=["loss.gamma=3"])
    fabricate_job(root / "1", "focal_dice", 1, None, [case(0.6, 2, 2, 1, 1, 1)])
    fabricate_job(root / "2", "focal_dice", 1, None, [case(0.6, 2, 2, 1, 1, 1)], extra=["data.augment.sampling=lesion", "trainer.max_epochs=3"])
    summary = aggregate([root], tmp_path / "out")
    assert [(r["variant"], r["n_seeds"], r["folds"]) for r in summary] == [
        ("focal_dice loss.gamma=3", 1, ""), ("focal_dice", 1, ""), ("focal_dice data.augment.sampling=lesion", 1, "")
    ]  # other overrides (trainer.*) do not make a variant
    assert summary[0]["recall_small_mean"] == 0.5 and math.isnan(summary[0]["recall_small_std"])
    assert "| `focal_dice loss.gamma=3` | 1 | 0.400 | 0.667 | 0.500 | 1.000 | 0.400 | 0.500 | 3.000 | 3.000 |" in (tmp_path / "out" / "ablation.md").read_text()


def test_several_folders_pool_and_default_output(tmp_path):
    # The MS folds run as separate multiruns: their jobs are pooled per loss and seed.
    for fold in (0, 1):
        fabricate_job(tmp_path / f"fold{fold}" / "0", "dice", 1, fold, [case(0.5, 2, 1, 0, 0, 1)])
    summary = aggregate([tmp_path / "fold0", tmp_path / "fold1"])
    assert summary[0]["folds"] == "0,1" and summary[0]["n_cases"] == 2 and summary[0]["n_ref_lesions_small"] == 4
    assert (tmp_path / "fold0" / "ablation" / "ablation.md").is_file()


def test_inconsistent_jobs_are_errors(tmp_path):
    fabricate_job(tmp_path / "a" / "0", "dice", 1, 0, [case(0.5, 2, 1, 0, 0, 1)])
    fabricate_job(tmp_path / "b" / "0", "dice", 1, 0, [case(0.5, 2, 1, 0, 0, 1)])
    with pytest.raises(ValueError, match=r"expected one job per loss, seed and fold, got two for \('dice', 1, 0\)"):
        aggregate([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    fabricate_job(tmp_path / "c" / "0", "dice", 2, 0, [case(0.5, 2, 1, 0, 0, 1)], lesion={"bucket_names": ["s", "m", "l"], "size_buckets_mm3": [10.0, 50.0]})
    with pytest.raises(ValueError, match="expected every job to use the same lesion size buckets"):
        aggregate([tmp_path / "a", tmp_path / "c"], tmp_path / "out")


def test_cli_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 1
    assert "expected a multirun or job folder" in capsys.readouterr().err
    tmp_path.joinpath("empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "expected finished jobs" in capsys.readouterr().err
    fabricate_job(tmp_path / "run" / "0", "dice", 1, None, [case(0.5, 2, 1, 0, 0, 1)])
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "1 job(s) aggregated" in capsys.readouterr().out and (tmp_path / "out" / "ablation.csv").is_file()


def test_per_fold_rows(multirun, tmp_path):
    summary = aggregate([multirun], tmp_path / "out", per_fold=True)
    assert [(r["variant"], r["cases"], r["n_cases"]) for r in summary[:2]] == [("dice, fold 0", "case00", 1), ("dice, fold 1", "case10", 1)]
    fold0, fold1 = summary[:2]
    # fold 0: small lesions detected 1, 2, 3 of 4 over the seeds; fold 1: 2, 3, 4 of 6
    assert (fold0["recall_small_mean"], fold0["recall_small_std"]) == pytest.approx((0.5, 0.25))
    assert (fold1["recall_small_mean"], fold1["recall_small_std"]) == pytest.approx((0.5, 1 / 6))
    assert math.isnan(fold1["recall_large_mean"])  # no large lesion in fold 1
    table = (tmp_path / "out" / "ablation.md").read_text().splitlines()
    # the folds hold different lesions: their counts go in the cells, not the headers
    # (both folds hold 6 lesions, so that count stays in the header)
    assert table[0].startswith("| loss | validation cases | seeds | Dice | lesion recall (n=6) | recall small (< 100 mm³) | recall large (>= 100 mm³) |")
    assert table[2].startswith("| `dice, fold 0` | case00 | 3 | 0.600 ± 0.000 | 0.667 ± 0.167 | 0.500 ± 0.250 (n=4) | 1.000 ± 0.000 (n=2) |")
    assert table[3].startswith("| `dice, fold 1` | case10 | 3 | 0.800 ± 0.100 | 0.500 ± 0.167 | 0.500 ± 0.167 (n=6) | - (n=0) |")
    assert main([str(multirun), "--per-fold", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "ablation.md").read_text() == (tmp_path / "out" / "ablation.md").read_text()


def test_false_positives_before_post_processing(multirun, tmp_path):
    """Jobs that tuned their operating point also have the untuned rows: FP / case before comes from those."""
    for folder in job_folders(multirun)[:6]:  # the dice jobs
        rows = list(csv.DictReader((folder / FINAL_ROWS).open()))
        for row in rows:
            row["false_positives"] = str(int(row["false_positives"]) + 10)
            row["n_pred_lesions"] = str(int(row["n_pred_lesions"]) + 10)
        write_csv_atomic(rows, folder / FINAL_ROWS_BEFORE)
    dice, focal = aggregate([multirun], tmp_path / "out")
    assert (dice["fp_per_case_mean"], dice["fp_per_case_before_mean"]) == (pytest.approx(3.0), pytest.approx(13.0))
    assert focal["fp_per_case_before_mean"] == focal["fp_per_case_mean"] == 10.0
    dice, focal = aggregate([multirun], tmp_path / "untuned", before_postprocessing=True)  # the untuned rows as final
    assert dice["fp_per_case_mean"] == pytest.approx(13.0) and focal["fp_per_case_mean"] == 10.0


def test_job_folders_of_earlier_versions_and_mixed_rules(tmp_path):
    """An earlier version's job folder (test_cases.csv, any-overlap counts) is read and labelled with its rule; jobs
    counted under different matching rules are not pooled."""
    fabricate_job(tmp_path / "old" / "0", "dice", 1, None, [case(0.8, 2, 1, 1, 1, 3)], rows_file=LEGACY_ROWS)
    (summary,) = aggregate([tmp_path / "old"], tmp_path / "out_old")
    assert summary["lesion_recall_mean"] == pytest.approx(2 / 3)
    assert "Lesion matching: any overlap." in (tmp_path / "out_old" / "ablation.md").read_text()
    fabricate_job(tmp_path / "new" / "0", "dice", 2, None, [case(0.8, 2, 1, 1, 1, 3)], lesion={**BUCKETS, "matching": "one_to_one"})
    with pytest.raises(ValueError, match="same lesion matching rule"):
        aggregate([tmp_path / "old", tmp_path / "new"], tmp_path / "out_mixed")
    (summary,) = aggregate([tmp_path / "new"], tmp_path / "out_new")
    assert "one-to-one, iou >= 0.1" in (tmp_path / "out_new" / "ablation.md").read_text()


def test_a_case_scored_zero_stays_in_the_per_case_f1_mean(tmp_path):
    """A case with lesions and no prediction scores F1 0 per case (precision takes the empty score): it is averaged
    in, as training scores it, not dropped."""
    fabricate_job(tmp_path / "runs" / "0", "dice", 1, None, [case(0.8, 2, 2, 0, 0, 0), {**case(0.0, 3, 0, 0, 0, 0)}])
    (summary,) = aggregate([tmp_path / "runs"], tmp_path / "out")
    assert summary["lesion_f1_case_mean_mean"] == pytest.approx((1.0 + 0.0) / 2)
