"""Experiment tracking (medseg.tracking): a tiny run with logger=mlflow / logger=wandb, read back from the tracker's
own store (MLflow's file store, W&B's offline run file); a missing tracker package is one clear message."""

from __future__ import annotations

import csv
import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger

from medseg.config import ConfigError, compose
from medseg.tracking import instantiate_loggers, log_final_report, run_name

# Two epochs of two steps, one validation, then the final evaluation of the best checkpoint (about 15 s on 2 cores).
TINY = ("trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=2")


def final_values(run: Path) -> dict[str, float]:
    """``metrics.json``'s final evaluation as the trackers name it."""
    return {f"final_val/{k}": float(v) for k, v in json.loads((run / "metrics.json").read_text())["metrics"].items()}


@pytest.fixture()
def wandb_env(tmp_path, monkeypatch):
    """wandb, offline and silent, its settings and caches in ``tmp_path``; torn down before and after, since wandb keeps
    the settings it read at its first run for the whole process (an offline test would make the next one offline)."""
    wandb = pytest.importorskip("wandb", reason="logger=wandb needs wandb: pip install 'medseg[tracking]'")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()
    yield wandb
    wandb.teardown()


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_is_a_clear_error(tracker, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # import <tracker> raises ImportError
    cfg = compose("train", ["+experiment=demo", f"logger={tracker}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"^logger={tracker} needs {tracker}: pip install 'medseg\[tracking\]'"):
        instantiate_loggers(cfg)


def test_run_name_is_the_run_folder_under_the_task():
    assert run_name("outputs/demo/runs/2024-05-01_12-00-00", "outputs/demo") == "2024-05-01_12-00-00"
    assert run_name("outputs/demo/multiruns/2024-05-01_12-00-00/3", "outputs/demo") == "multiruns/2024-05-01_12-00-00/3"
    assert run_name("/elsewhere/my_run", "outputs/demo") == "my_run"


def test_final_report_reaches_a_csv_logger_as_values_only(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    logger = CSVLogger(tmp_path, name="csv", version="")
    log_final_report(SimpleNamespace(loggers=[logger], global_step=7), tmp_path, {"dice_wt": 0.25, "lesion_f1_wt": float("nan"), "note": "text"})
    [row] = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert row["step"] == "7" and float(row["final_val/dice_wt"]) == 0.25 and math.isnan(float(row["final_val/lesion_f1_wt"]))
    assert "final_val/note" not in row and sorted(p.name for p in tmp_path.iterdir()) == ["csv", "metrics.json"]


@pytest.mark.slow
def test_mlflow_run_holds_config_curves_final_metrics_and_report(brats_tree, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="logger=mlflow needs mlflow: pip install 'medseg[tracking]'")
    from mlflow.tracking import MlflowClient
    from test_train import tiny_run

    from medseg.training import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so that the value medseg sets is undone after the test
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    outputs = tmp_path / "outputs"
    run = outputs / "demo" / "runs" / "2024-05-01_12-00-00"
    # The default store: outputs/mlruns, one for every task, the task an MLflow experiment.
    train(tiny_run(brats_tree, run, *TINY, "logger=mlflow", f"paths.log_dir={outputs}"))

    client = MlflowClient(tracking_uri=f"file:{outputs / 'mlruns'}")
    experiment = client.get_experiment_by_name("demo")
    [found] = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    assert found.info.run_name == "2024-05-01_12-00-00" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["seed"] == "42" and params["loss/_target_"] == "medseg.losses.FocalDiceLoss" and params["data/patch_size"] == "[32, 32, 32]"
    steps = {m.step for m in client.get_metric_history(run_id, "train/loss_step")}
    assert len(steps) == 4  # every training step (log_every_n_steps=1)
    expected = final_values(run)
    assert expected and {k: found.data.metrics[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    assert {"metrics.json", "operating_point.json", "config.yaml", "validation"} <= {a.path for a in client.list_artifacts(run_id)}
    assert "validation/evaluation/evaluation.csv" in {a.path for a in client.list_artifacts(run_id, "validation/evaluation")}
    local = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path / "downloaded")))
    assert local.read_text() == (run / "metrics.json").read_text()
    assert "final_val/dice_wt" in (run / "csv" / "metrics.csv").open().readline()  # the CSV logger stays, with the final values


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version), then
    protobuf ``Record``s in 32 KiB blocks, each chunk behind a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last), as LevelDB writes its log. wandb 0.31 has no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_holds_config_curves_final_metrics_and_report(brats_tree, tmp_path, wandb_env):
    from test_train import tiny_run

    from medseg.training import train

    run = tmp_path / "my_run"
    train(tiny_run(brats_tree, run, *TINY, "logger=wandb"))

    [folder] = (run / "wandb").glob("offline-run-*")  # save_dir is the run folder
    [run_file] = folder.glob("run-*.wandb")
    records = wandb_records(run_file)
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "my_run" and started.project == "demo"
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert config["seed"] == 42 and config["loss"]["_target_"] == "medseg.losses.FocalDiceLoss"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert len([h for h in history if "train/loss_step" in h]) == 4  # every training step
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    expected = final_values(run)
    assert expected and {k: float(summary[k]) for k in expected} == pytest.approx(expected, nan_ok=True)
    for name in ("metrics.json", "operating_point.json", "config.yaml", "validation/evaluation/evaluation.csv"):
        assert (folder / "files" / name).read_bytes() == (run / name).read_bytes(), name
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished
    assert "final_val/dice_wt" in (run / "csv" / "metrics.csv").open().readline()


def test_wandb_online_without_a_login_is_a_clear_error_before_training(tmp_path, monkeypatch, wandb_env):
    from medseg.tracking import log_config

    monkeypatch.delenv("WANDB_MODE")  # online
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored login (~/.netrc)
    cfg = compose("train", ["+experiment=demo", "logger=wandb", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^logger=wandb: No API key configured.*logger\.wandb\.offline=true or WANDB_MODE=offline$"):
        log_config(instantiate_loggers(cfg), cfg)


def test_an_open_wandb_run_of_an_earlier_training_is_finished_first(tmp_path, wandb_env):
    """Cross-validation trains its folds in one process without a final evaluation (which finishes the W&B run):
    fold 1 gets its own run, not fold 0's."""
    from medseg.tracking import log_config

    wandb = wandb_env
    earlier = wandb.init(project="demo", dir=tmp_path, name="fold_0")
    (tmp_path / "fold_1").mkdir()
    cfg = compose("train", ["+experiment=demo", "logger=wandb", f"paths.output_dir={tmp_path / 'fold_1'}"])
    loggers = instantiate_loggers(cfg)
    assert wandb.run is None  # fold 0's run is finished
    log_config(loggers, cfg)
    run = loggers[-1].experiment
    try:
        assert run.name == "fold_1" and run.id != earlier.id and run.config["seed"] == 42
    finally:
        run.finish()
