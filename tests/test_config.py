"""Every config composes and instantiates; the documented command lines are accepted."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medseg.build import build_model, build_trainer
from medseg.config import CONFIG_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "module")


def test_train_config_does_not_list_experiment_in_defaults():
    # With `experiment: null` in the defaults, Hydra rejects the documented `+experiment=brats`.
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml").defaults)
    groups = {next(iter(d)) if isinstance(d, dict) else d for d in defaults}
    assert "experiment" not in groups and {"data", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths"} <= groups


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment, tmp_path):
    cfg = compose("train", [f"+experiment={experiment}", f"paths.output_dir={tmp_path}", "data.root=/some/data"])
    assert cfg.task_name == experiment
    model = build_model(cfg)
    x = torch.zeros(1, cfg.data.in_channels, *[32] * 3)
    assert model(x).shape == (1, cfg.data.out_channels, 32, 32, 32)


def test_brats_experiment_outputs_three_sigmoid_regions(tmp_path):
    cfg = compose("train", ["+experiment=brats", f"paths.output_dir={tmp_path}", "data.root=/x"])
    assert (cfg.data.in_channels, cfg.data.out_channels, cfg.data.labels.mode) == (4, 3, "sigmoid")
    assert list(cfg.data.labels.names) == ["wt", "tc", "et"]


def test_hippocampus_experiment_is_softmax_with_background(tmp_path):
    cfg = compose("train", ["+experiment=hippocampus", f"paths.output_dir={tmp_path}", "data.root=/x"])
    assert (cfg.data.in_channels, cfg.data.out_channels, cfg.data.labels.mode) == (1, 3, "softmax")


@pytest.mark.parametrize("model", MODELS)
def test_every_network_config(model, tmp_path):
    cfg = compose("train", [f"model={model}", f"paths.output_dir={tmp_path}", "data.root=/x"])
    net = instantiate(cfg.model.net)
    assert net(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_cli_accepts_documented_experiment_override():
    result = subprocess.run(
        [sys.executable, "-m", "medseg.train", "+experiment=brats", "data.root=/data/BraTS2021", "--cfg", "job", "--resolve"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "task_name: brats" in result.stdout and "root: /data/BraTS2021" in result.stdout


def test_cli_missing_data_root_is_one_readable_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medseg.train", "+experiment=brats", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=180,
    )
    assert result.returncode == 1
    output = result.stderr + result.stdout
    assert "data.root" in output and "synapse" in output and "Traceback" not in output


# Trainer arguments that medseg.train passes itself (from the callbacks and logger groups): not in the trainer node.
PASSED_BY_TRAIN = {"callbacks", "logger"}
# The arguments conf/trainer/default.yaml sets to this project's values; every other one holds Lightning's default.
PROJECT_TRAINER_VALUES = {"devices", "precision", "max_epochs", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps", "gradient_clip_val", "deterministic", "benchmark", "plugins", "default_root_dir"}
TRAINER_ARGUMENTS = {name: p.default for name, p in inspect.signature(L.Trainer.__init__).parameters.items() if name != "self"}
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_argument_is_a_key_of_the_trainer_node(trainer, tmp_path):
    # A Lightning release with a new Trainer argument fails here: add it to conf/trainer/default.yaml with its default.
    keys = set(compose("train", [f"trainer={trainer}", f"paths.output_dir={tmp_path}", "data.root=/x"]).trainer) - {"_target_"}
    assert set(TRAINER_ARGUMENTS) - PASSED_BY_TRAIN - keys == set()
    assert keys - set(TRAINER_ARGUMENTS) == set() and keys & PASSED_BY_TRAIN == set()


def test_the_trainer_defaults_are_lightnings_where_the_project_sets_none():
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "trainer" / "default.yaml"))  # interpolations unresolved
    differ = {name for name, value in node.items() if name != "_target_" and value != TRAINER_ARGUMENTS[name]}
    assert differ == PROJECT_TRAINER_VALUES


def test_any_trainer_argument_is_set_without_plus(tmp_path):
    overrides = ["trainer=cpu", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0.5", "trainer.max_steps=3", "trainer.enable_model_summary=false"]
    cfg = compose("train", [*overrides, f"paths.output_dir={tmp_path}", "data.root=/x"])
    trainer = build_trainer(cfg)  # as medseg.train builds it: callbacks and loggers from their groups
    assert (trainer.limit_train_batches, trainer.limit_val_batches, trainer.max_steps, trainer.max_epochs) == (2, 0.5, 3, cfg.trainer.max_epochs)
    assert len(trainer.loggers) == 2 and sum(type(c).__name__ == "ModelCheckpoint" for c in trainer.callbacks) == 2


def test_one_connectivity_setting_reaches_every_lesion_notion(tmp_path):
    """Lesion metrics, post-processing, blob loss and the sampling index read the one top-level connectivity."""
    cfg = compose("train", ["+experiment=small_lesions", "data.root=unused", "connectivity=6", f"paths.output_dir={tmp_path}"])
    assert cfg.model.connectivity == cfg.model.lesion_metrics.connectivity == cfg.loss.connectivity == cfg.data.sampling.connectivity == 6
    from medseg.build import build_model

    assert build_model(cfg).connectivity == 6
    assert compose("evaluate", ["pred=p", "ref=r"]).model.lesion_metrics.connectivity == 26


def test_metrics_and_post_processing_may_not_count_different_components(tmp_path):
    from medseg.build import build_model

    cfg = compose("train", ["+experiment=demo", "data.root=unused", "model.lesion_metrics.connectivity=6", f"paths.output_dir={tmp_path}"])
    with pytest.raises(Exception, match="model.lesion_metrics.connectivity equal to model.connectivity"):  # (Hydra wraps it)
        build_model(cfg)
