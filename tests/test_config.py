"""Every config composes and instantiates; the documented command lines are accepted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from medseg.config import CONFIG_DIR, compose
from medseg.train import build_model

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
