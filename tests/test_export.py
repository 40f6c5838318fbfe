"""Model zips that travel (medseg.export / medseg.model_package): everything prediction needs, no machine paths, a card
whose numbers are the report's, and predictions from the zip on a fresh folder identical to the source run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medseg.config import ConfigError
from medseg.export import export
from medseg.model_card import definition
from medseg.model_package import CARD, MANIFEST, installed_checkpoints, is_machine_path, without_machine_paths
from medseg.prediction import predict
from test_predict import compose_predict, predict_config

REPO = Path(__file__).resolve().parents[1]


def compose_export(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from medseg.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("export", list(overrides))


@pytest.fixture(scope="module")
def trained_run(brats_tree, tmp_path_factory) -> Path:
    """A run folder of medseg.train: two short epochs, the final evaluation (metrics.json, operating point)."""
    from test_train import tiny_run

    from medseg.training import train

    out = tmp_path_factory.mktemp("run") / "tiny-run"
    train(tiny_run(brats_tree, out, "trainer.max_epochs=2", "trainer.limit_train_batches=2", "logger=csv"))
    assert (out / "metrics.json").is_file()
    return out


@pytest.fixture(scope="module")
def model_zip(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.zip"
    export(compose_export(f"ckpt_path={trained_run}", f"output={out}"))
    return out


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def test_machine_paths_are_recognised_and_removed():
    node = {"a": "/data/x", "b": ["./outputs", "~/y", "C:\\data", "relu", "val/dice", "epoch{epoch:03d}-dice{val/dice:.4f}"], "c": {"d": "../z", "e": 3}}
    assert without_machine_paths(node) == {"a": None, "b": [None, None, None, "relu", "val/dice", "epoch{epoch:03d}-dice{val/dice:.4f}"], "c": {"d": None, "e": 3}}
    assert not is_machine_path("brats") and is_machine_path("/")


def test_zip_holds_what_prediction_needs_and_no_machine_path(model_zip, trained_run, brats_tree):
    with zipfile.ZipFile(model_zip) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read(MANIFEST))
        texts = {n: zf.read(n).decode() for n in names if n.endswith((".json", ".yaml", ".md", ".csv"))}
        checkpoint = torch.load(__import__("io").BytesIO(zf.read("checkpoints/0.ckpt")), weights_only=True)
    assert {MANIFEST, CARD, "config.yaml", "operating_point.json", "labels.json", "preprocessing.json", "checkpoints/0.ckpt", "report/metrics.json"} <= names
    assert not [n for n in names if n.endswith(("evaluation.csv", "splits.json", "dice_per_case.png"))]  # case ids stay home (case_reports=false)
    assert checkpoint["medseg_operating_point"]["tuned_on"] in ("", "0.ckpt")  # tuned on these weights (renamed in the zip)
    assert set(checkpoint) == {"state_dict", "medseg_config", "medseg_operating_point"}  # no optimizer state, no callbacks
    machine = [str(trained_run.parent), str(brats_tree), os.getcwd(), str(Path.home())]
    for name, text in {**texts, "checkpoints/0.ckpt config": json.dumps(checkpoint["medseg_config"])}.items():
        assert not [m for m in machine if m in text], f"{name} names a path of this machine"
    config = yaml.safe_load(texts["config.yaml"])
    assert config["data"]["root"] is None and config["model"]["net"] == checkpoint["medseg_config"]["model"]["net"]
    assert json.loads(texts["labels.json"])["names"] == ["wt", "tc", "et"]
    assert manifest["name"] == "tiny-run" and manifest["members"] == ["checkpoints/0.ckpt"] and set(manifest["files"]) == names - {MANIFEST}


def test_model_card_reports_the_runs_metrics_with_definitions(model_zip, trained_run):
    with zipfile.ZipFile(model_zip) as zf:
        card = zf.read(CARD).decode()
    metrics = json.loads((trained_run / "metrics.json").read_text())["metrics"]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in card.splitlines() if line.startswith("| ") and line.count("|") == 4}
    assert rows["dice_wt"] == f"{metrics['dice_wt']:.4g}" and rows["lesion_recall_et"] == (f"{metrics['lesion_recall_et']:.4g}" if metrics["lesion_recall_et"] == metrics["lesion_recall_et"] else "n/a")
    assert definition("dice_wt").startswith("Dice overlap") and definition("lesion_recall_small_wt").startswith("lesion-wise recall of the small")
    assert all(definition(key) for key in metrics)  # every metric of the report is defined
    for heading in ("## Training", "## Operating point", "## Metrics", "## Intended use", "## Limits"):
        assert heading in card


@pytest.mark.slow
def test_prediction_from_the_zip_in_a_fresh_folder_equals_the_source_run(model_zip, trained_run, brats_tree, tmp_path):
    """Predicted by ``python -m medseg.predict ckpt_path=<zip>`` in an empty folder with an empty model cache, after the
    source run folder is gone: the same labels as the run itself gave."""
    case = sorted(p for p in brats_tree.iterdir() if p.is_dir())[0]
    reference = predict(predict_config(trained_run, case, tmp_path / "from_run"))[0]
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    shutil.copy(model_zip, fresh / "model.zip")
    moved = trained_run.with_name("moved-away")
    trained_run.rename(moved)
    try:
        env = {**os.environ, "MEDSEG_CACHE": str(fresh / "cache"), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-m", "medseg.predict", "ckpt_path=model.zip", f"input={case}", "output=predictions"], cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    finally:
        moved.rename(trained_run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carries the operating point" not in done.stdout + done.stderr  # the zip's point belongs to its weights
    (entry,) = json.loads((fresh / "predictions" / "predictions.json").read_text())["cases"]
    np.testing.assert_array_equal(np.asarray(nib.load(entry["prediction"]).dataobj), np.asarray(nib.load(reference["prediction"]).dataobj))
    from medseg.model_package import sha256_file

    assert [p.name for p in (fresh / "cache" / "models").iterdir()] == [sha256_file(model_zip)[:16]]  # unpacked once, named by its checksum


def test_damaged_zip_and_bad_requests_are_refused(model_zip, trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(model_zip) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, data + b"x" if item.filename == "labels.json" else data)
    with pytest.raises(ConfigError, match="differ from the manifest"):
        installed_checkpoints(damaged)
    assert not any((tmp_path / "cache" / "models").iterdir())  # nothing left of the refused zip
    with pytest.raises(ConfigError, match="exists"):
        export(compose_export(f"ckpt_path={trained_run}", f"output={model_zip}"))
    with pytest.raises(ConfigError, match="<name>.zip"):
        export(compose_export(f"ckpt_path={trained_run}", f"output={tmp_path / 'model.tar'}"))
    with pytest.raises(ConfigError, match="fold="):
        checkpoint = trained_run / "checkpoints" / "last.ckpt"
        export(compose_export(f"ckpt_path=[{checkpoint},{checkpoint}]", f"output={tmp_path / 'net.onnx'}", "format=onnx"))
    assert not (tmp_path / "net.onnx").exists()
    assert compose_predict("ckpt_path=x", "input=y", "output=z").backend == "torch"


@pytest.mark.slow
def test_onnxruntime_backend_predicts_the_labels_of_torch(model_zip, trained_run, brats_tree, tmp_path, monkeypatch):
    """A zip with the ONNX networks (include_onnx=true), predicted with backend=onnxruntime: the probabilities of torch's
    prediction within PROBABILITY_TOLERANCE and the same labels (voxels near the threshold excepted: none here)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
    from medseg.onnx_backend import PROBABILITY_TOLERANCE

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    with_onnx = tmp_path / "with_onnx.zip"
    export(compose_export(f"ckpt_path={trained_run}", f"output={with_onnx}", "include_onnx=true"))
    with zipfile.ZipFile(with_onnx) as zf:
        assert "onnx/0.onnx" in zf.namelist()
    case = sorted(p for p in brats_tree.iterdir() if p.is_dir())[1]
    torch_result = predict(predict_config(trained_run, case, tmp_path / "torch", "save_probabilities=true"))[0]
    onnx_result = predict(predict_config(with_onnx, case, tmp_path / "onnx", "save_probabilities=true", "backend=onnxruntime"))[0]
    torch_probs, onnx_probs = (np.asarray(nib.load(r["probabilities"]).dataobj) for r in (torch_result, onnx_result))
    assert np.abs(torch_probs - onnx_probs).max() <= PROBABILITY_TOLERANCE
    labels = [np.asarray(nib.load(r["prediction"]).dataobj) for r in (torch_result, onnx_result)]
    near = np.abs(torch_probs - 0.5).min(-1) < PROBABILITY_TOLERANCE  # (X, Y, Z): a voxel whose label may flip
    np.testing.assert_array_equal(labels[0][~near], labels[1][~near])
    record = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert record["options"]["backend"] == "onnxruntime"


@pytest.mark.slow
def test_onnx_format_writes_one_network_with_the_config_as_metadata(trained_run, brats_tree, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
    out = tmp_path / "net.onnx"
    export(compose_export(f"ckpt_path={trained_run}", f"output={out}", "format=onnx"))
    proto = onnx.load(str(out))
    metadata = {p.key: p.value for p in proto.metadata_props}
    config = json.loads(metadata["medseg_config"])
    assert config["data"]["root"] is None and str(brats_tree) not in metadata["medseg_config"] and metadata["model"] == "tiny-run"
    assert json.loads(metadata["medseg_operating_point"])["regions"].keys() == {"wt", "tc", "et"}
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 4 and all(isinstance(d, str) for d in (dims[0], *dims[2:]))  # batch and spatial axes dynamic
    # The file alone predicts: its metadata rebuilds the pipeline (preprocessing, point), onnxruntime runs the network.
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
    from medseg.onnx_backend import PROBABILITY_TOLERANCE

    case = sorted(p for p in brats_tree.iterdir() if p.is_dir())[2]
    from_run = predict(predict_config(trained_run, case, tmp_path / "torch", "save_probabilities=true"))[0]
    from_file = predict(predict_config(out, case, tmp_path / "onnx", "save_probabilities=true", "backend=onnxruntime"))[0]
    difference = np.abs(np.asarray(nib.load(from_run["probabilities"]).dataobj) - np.asarray(nib.load(from_file["probabilities"]).dataobj))
    assert difference.max() <= PROBABILITY_TOLERANCE
    with pytest.raises(ConfigError, match="backend=onnxruntime"):
        predict(predict_config(out, case, tmp_path / "refused"))


@pytest.mark.slow
def test_cross_validation_zip_is_an_ensemble_also_under_onnxruntime(trained_run, brats_tree, tmp_path, monkeypatch):
    """A cross-validation folder (two folds) exports as a two-member zip whose card speaks of out-of-fold numbers; the
    zip predicts what the folder predicts, with torch and with one onnxruntime session per fold."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
    from medseg.onnx_backend import PROBABILITY_TOLERANCE

    monkeypatch.setenv("MEDSEG_CACHE", str(tmp_path / "cache"))
    cv = tmp_path / "outputs" / "demo" / "crossval" / "cv1"
    source = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    for fold in (0, 1):
        torch.manual_seed(fold)
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in source["state_dict"].items()}  # two different members
        (cv / f"fold_{fold}" / "checkpoints").mkdir(parents=True)
        torch.save({**source, "state_dict": state}, cv / f"fold_{fold}" / "checkpoints" / "last.ckpt")
    (cv / "crossval.json").write_text(json.dumps({"checkpoints": [f"fold_{k}/checkpoints/last.ckpt" for k in (0, 1)], "folds": 2, "cases": 6, "metrics": {"dice_wt": 0.5, "lesion_f1_wt": 0.25}}))
    out = tmp_path / "cv.zip"
    export(compose_export(f"ckpt_path={cv}", f"output={out}", "include_onnx=true"))
    with zipfile.ZipFile(out) as zf:
        manifest, card = json.loads(zf.read(MANIFEST)), zf.read(CARD).decode()
    assert manifest["name"] == "demo_cv1" and manifest["members"] == ["checkpoints/0.ckpt", "checkpoints/1.ckpt"] and manifest["onnx"] == ["onnx/0.onnx", "onnx/1.onnx"]
    assert "out-of-fold" in card and "| dice_wt | 0.5 |" in card and "| lesion_f1_wt | 0.25 |" in card
    case = sorted(p for p in brats_tree.iterdir() if p.is_dir())[0]
    results = [predict(predict_config(ckpt, case, tmp_path / name, "save_probabilities=true", *extra))[0]
               for name, ckpt, extra in (("folder", cv, ()), ("zip", out, ()), ("onnx", out, ("backend=onnxruntime",)))]  # fmt: skip
    probs = [np.asarray(nib.load(r["probabilities"]).dataobj) for r in results]
    np.testing.assert_array_equal(probs[1], probs[0])
    assert np.abs(probs[2] - probs[0]).max() <= PROBABILITY_TOLERANCE
    single = predict(predict_config(cv / "fold_0" / "checkpoints" / "last.ckpt", case, tmp_path / "fold0", "save_probabilities=true"))[0]
    assert np.abs(np.asarray(nib.load(single["probabilities"]).dataobj) - probs[0]).max() > 1e-4  # the ensemble averages two different folds


def test_a_point_tuned_on_the_exported_checkpoint_follows_it_into_the_zip(tmp_path):
    from medseg.model_package import portable_checkpoint

    state = {"w": torch.zeros(2)}
    for tuned_on, expected in (("epoch012-dice0.81.ckpt", "0.ckpt"), ("crossval", "crossval"), ("last.ckpt", "last.ckpt"), ("", "")):
        path = tmp_path / "epoch012-dice0.81.ckpt"
        torch.save({"state_dict": state, "medseg_config": {"data": {"root": "/data/x"}}, "medseg_operating_point": {"tuned_on": tuned_on}, "optimizer_states": [1]}, path)
        kept = portable_checkpoint(path, "0.ckpt")
        assert kept["medseg_operating_point"]["tuned_on"] == expected and kept["medseg_config"]["data"]["root"] is None and "optimizer_states" not in kept
