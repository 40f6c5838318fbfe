"""The real-data and ablation presets: ms_lesions, ct_abdomen, small_lesions, loss_ablation."""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import shared_dataset
from medseg.config import CONFIG_DIR, compose
from medseg.build import build_model

TASKS = {"small_lesions": [], "ms_lesions": ["experiment@_global_=ms_lesions", "data.root=unused"]}


def preset(tmp_path: Path, *overrides: str):
    return compose("train", [f"paths.output_dir={tmp_path}", f"data.check.cache_dir={tmp_path / '.data_checks'}", *overrides])


def sweep_points() -> list[dict[str, str]]:
    """Every job of ``+experiment=loss_ablation``: its sweeper params expanded as Hydra's basic sweeper does."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["+experiment=loss_ablation"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    parser = OverridesParser.create()
    params = {key: [str(v) for v in parser.parse_override(f"{key}={value}").sweep_iterator()] for key, value in cfg.hydra.sweeper.params.items()}
    points = [{}]
    for key, values in params.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def test_ablation_sweeps_every_loss_with_three_seeds():
    points = sweep_points()
    losses = list(dict.fromkeys(p["loss"] for p in points))
    assert losses == ["dice", "focal_dice_g1", "focal_dice", "dice_ce", "ce", "focal", "topk_ce"]
    assert all(sorted(p["seed"] for p in points if p["loss"] == loss) == ["1", "2", "3"] for loss in losses)


@pytest.mark.parametrize("task", TASKS)
def test_every_ablation_job_composes_and_its_loss_runs(tmp_path, task):
    gammas = {}
    for point in sweep_points():
        cfg = preset(tmp_path, "+experiment=loss_ablation", *TASKS[task], *(f"{k}={v}" for k, v in point.items()))
        assert cfg.evaluate_best and cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs
        assert cfg.seed == int(point["seed"]) and cfg.model.lesion_metrics is not None
        loss = instantiate(cfg.loss)
        channels = cfg.data.out_channels
        logits = torch.randn(2, channels, 8, 8, 8, requires_grad=True)
        target = (torch.rand(2, channels, 8, 8, 8) > 0.9).float()  # sigmoid: one binary map per output
        value = loss(logits, target)
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(logits.grad).all(), point
        gammas[point["loss"]] = cfg.loss.get("gamma")
    assert (gammas["focal_dice_g1"], gammas["focal_dice"]) == (1.0, 2.0)


def test_ablation_task_is_small_lesions_unless_overridden(tmp_path):
    small = preset(tmp_path, "+experiment=loss_ablation")
    ms = preset(tmp_path, "+experiment=loss_ablation", *TASKS["ms_lesions"])
    assert small.task_name == ms.task_name == "loss_ablation"
    assert small.data.root.endswith("small_lesions") and small.data.synthetic.satellites == [15, 25]
    assert ms.data.synthetic is None and ms.data.in_channels == 4 and ms.data.num_folds == 3
    assert ms.model.lesion_metrics.bucket_names == ["tiny", "small", "medium", "large"]


def test_lesion_presets_follow_the_small_lesion_ablation(tmp_path):
    # docs/results.md sections 5 and 8: blob loss for the generated small-lesion tasks and on MS; voxel sampling
    # and an operating point tuned for lesion F1 in all.
    for experiment, target in (("small_lesions", "BlobLoss"), ("small_lesions_hard", "BlobLoss"), ("ms_lesions", "BlobLoss")):
        cfg = preset(tmp_path, f"+experiment={experiment}", "data.root=unused")
        assert cfg.loss._target_ == f"medseg.losses.{target}", experiment
        assert cfg.data.augment.sampling == "voxel" and cfg.model.operating_point.criterion == "lesion_f1", experiment
    # the ablations still choose every loss themselves
    assert preset(tmp_path, "+experiment=loss_ablation", "loss=dice").loss._target_ == "medseg.losses.DiceLoss"


def test_ms_lesions_preset(tmp_path):
    cfg = preset(tmp_path, "+experiment=ms_lesions", "data.root=unused")
    assert (cfg.data.layout, cfg.data.in_channels, cfg.data.out_channels) == ("msd", 4, 1)
    assert (cfg.data.fold, cfg.data.num_folds, cfg.data.crop_foreground) == (0, 3, True)
    assert cfg.model.lesion_metrics.size_buckets_mm3 == [10.0, 50.0, 500.0]
    assert cfg.model.lesion_metrics.min_lesion_volume_mm3 < 50.0
    assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs
    # section 8: a component score tuned with threshold and size (0 among the choices), test-time flips recorded
    assert cfg.model.operating_point.min_component_score[0] == 0.0 and max(cfg.model.operating_point.min_component_score) > 0.5
    assert cfg.model.tta_flip_axes == [0, 1, 2] and cfg.model.operating_point.component_score == "max"
    model = build_model(cfg)
    logits = model(torch.zeros(1, 4, *cfg.data.patch_size))
    assert logits.shape == (1, 1, *cfg.data.patch_size)


@pytest.mark.realdata
@pytest.mark.parametrize(("fold", "held_out"), [(0, "patient07"), (1, "patient19"), (2, "patient26")])
def test_ms_lesions_folds_leave_one_patient_out(tmp_path, fold, held_out):
    root = shared_dataset("MS_lesions")
    dm = instantiate(preset(tmp_path, "+experiment=ms_lesions", f"data.root={root}", f"data.fold={fold}").data)
    dm.setup("fit")
    assert [c["case"] for c in dm.val_cases] == [held_out] and len(dm.train_cases) == 2
    assert all(len(c["image"]) == 4 for c in dm.train_cases + dm.val_cases)


def test_ct_abdomen_preset(tmp_path):
    cfg = preset(tmp_path, "+experiment=ct_abdomen", "data.root=unused")
    assert (cfg.data.intensity, cfg.data.ct_window, cfg.data.spacing) == ("ct", [-175.0, 250.0], [4.5, 4.5, 4.5])
    assert cfg.data.crop_foreground is False and cfg.model.lesion_metrics is None
    assert (cfg.data.labels.mode, cfg.data.out_channels, cfg.data.labels["values"]) == ("softmax", 3, [0, 1, 2])
    assert 0 not in cfg.data.augment.flip_axes  # left and right organs differ
    dm = instantiate(cfg.data)
    assert dm.preprocess_options["ct_window"] == [-175.0, 250.0]


@pytest.mark.parametrize("window", ["[250,-175]", "[100,100]", "[-175]", "[-175,250,400]"])
def test_a_ct_window_that_is_not_low_then_high_is_refused(tmp_path, window):
    cfg = preset(tmp_path, "+experiment=ct_abdomen", "data.root=unused", f"data.ct_window={window}")
    # Hydra re-raises the data module's ValueError as an InstantiationException holding its message.
    with pytest.raises((ValueError, InstantiationException), match=r"expected data.ct_window = \[low, high\].*low < high, got"):
        instantiate(cfg.data)


def test_the_ct_window_is_not_checked_for_mri(tmp_path):
    cfg = preset(tmp_path, "+experiment=ms_lesions", "data.root=unused", "data.ct_window=[250,-175]")
    assert instantiate(cfg.data).preprocess_options["ct_window"] == [250, -175]


@pytest.mark.realdata
def test_ct_window_reaches_preprocessing(tmp_path):
    root = shared_dataset("CT_abdomen")
    cfg = preset(tmp_path, "+experiment=ct_abdomen", f"data.root={root}", "data.ct_window=[-100,200]")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert [c["case"] for c in dm.train_cases] == ["abdomen_sm"] and [c["case"] for c in dm.val_cases] == ["abdomen"]
    item = dm.preprocessing(dm.train_cases[0])
    hu = np.asarray(nib.load(dm.train_cases[0]["image"][0]).dataobj)
    spacing = item["image"].affine[:3, :3].pow(2).sum(0).sqrt()
    image = item["image"].as_tensor()  # (1, H, W, D) on the 4.5 mm grid
    torch.testing.assert_close(spacing.float(), torch.full((3,), 4.5))
    assert all(abs(n - m * 3 / 4.5) <= 1 for n, m in zip(image.shape[1:], hu.shape))  # 122x101x30 at 3 mm
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # -100..200 HU scaled to 0..1
    assert float((image == 0).float().mean()) == pytest.approx(float((hu <= -100).mean()), abs=0.05)


def test_small_lesions_generates_its_data_with_the_satellite_options(tmp_path):
    cfg = preset(tmp_path, "+experiment=small_lesions", f"data.root={tmp_path / 'data'}", "data.synthetic.cases=1")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    manifest = json.loads((tmp_path / "data" / "synthetic.json").read_text())
    assert (manifest["satellites"], manifest["satellite_radius_mm"]) == ([15, 25], [2.4, 5.0])
    assert manifest["shape"] == [88, 104, 76] and cfg.data.out_channels == 1
    label = np.asarray(nib.load(tmp_path / "data" / "SYN-0000" / "SYN-0000_seg.nii.gz").dataobj)
    n_lesions = int(cc3d.connected_components(label > 0, connectivity=26).max())
    assert 16 <= n_lesions <= 26  # the glioma and 15 to 25 satellites


@pytest.mark.parametrize(("experiment", "names"), [("ms_lesions", ["lesion"]), ("ct_abdomen", ["spleen", "liver"]), ("small_lesions", ["lesion"])])
def test_presets_give_medseg_evaluate_their_labels(experiment, names):
    cfg = compose("evaluate", [f"+experiment={experiment}", "pred=predictions", "ref=labels"])
    assert list(cfg.data.labels.names) == names and cfg.ref == "labels"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_preset_composes_with_medseg_evaluate_as_with_training(tmp_path, experiment):
    """A preset overrides groups (data, model, trainer) that medseg.evaluate must have too, else evaluate fails."""
    trained = preset(tmp_path, f"+experiment={experiment}")
    evaluated = compose("evaluate", [f"+experiment={experiment}", "pred=predictions", "ref=labels"])
    assert evaluated.data.labels == trained.data.labels
    assert evaluated.model.get("lesion_metrics") == trained.model.get("lesion_metrics")


@pytest.mark.slow
@pytest.mark.realdata
def test_ct_abdomen_trains_and_predicts_in_the_input_geometry(tmp_path):
    from medseg.prediction import predict
    from medseg.training import train

    root = shared_dataset("CT_abdomen")
    run = tmp_path / "run"
    cfg = preset(run, "+experiment=ct_abdomen", f"data.root={root}", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=2", "data.num_workers=0", "~callbacks.model_summary")
    metrics = train(cfg)
    assert 0.0 <= metrics["final_val/dice_liver"] <= 1.0 and 0.0 <= metrics["final_val/dice_spleen"] <= 1.0
    assert json.loads((run / "split.json").read_text())["val"] == ["abdomen"]

    out = tmp_path / "pred"
    results = predict(compose("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={root}", f"output={out}"]))
    assert sorted(r["case"] for r in results) == ["abdomen", "abdomen_sm"] and not any("error" in r for r in results)
    for case in ("abdomen", "abdomen_sm"):
        source, predicted = nib.load(root / "imagesTr" / f"{case}.nii.gz"), nib.load(out / f"{case}.nii.gz")
        assert predicted.shape == source.shape
        np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= {0, 1, 2}
