"""The conf/loss group: every option composes, instantiates and runs; the loss benchmark runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import medseg.losses as losses
from medseg.config import CONFIG_DIR

LOSS_DIR = CONFIG_DIR / "loss"
EXPECTED = {
    "focal_dice": losses.FocalDiceLoss,
    "focal_dice_g1": losses.FocalDiceLoss,
    "dice": losses.DiceLoss,
    "focal": losses.FocalLoss,
    "ce": losses.CrossEntropyLoss,
    "dice_ce": losses.DiceCELoss,
    "balanced_ce": losses.BalancedCELoss,
    "topk_ce": losses.TopKCELoss,
    "deep_supervision": losses.DeepSupervisionLoss,
    "deep_supervision_dice_ce": losses.DeepSupervisionLoss,
    "blob_focal_dice": losses.BlobLoss,
    "cc_dice_ce": losses.ConnectedComponentDiceCELoss,
}


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: one thread (see tests/test_losses.py); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_loss(name: str, mode: str, overrides: tuple[str, ...] = ()):
    """The ``loss`` node of a config made of the loss option and a minimal data node."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(overrides=[f"+loss={name}", f"+data.labels.mode={mode}", "+connectivity=26", *overrides])
    return cfg.loss


def random_batch(mode: str, deep: bool = False):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 3, 3, 8, 8, 8) if deep else (2, 3, 8, 8, 8), generator=g, requires_grad=True)
    if mode == "sigmoid":
        return logits, (torch.rand(2, 3, 8, 8, 8, generator=g) < 0.2).float()
    return logits, torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()


def test_every_loss_option_is_tested():
    assert {p.stem for p in LOSS_DIR.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_option_composes_and_runs(name, mode):
    loss = instantiate(compose_loss(name, mode))
    assert type(loss) is EXPECTED[name]
    deep = name.startswith("deep_supervision")
    inner = loss.loss if deep else loss
    assert inner.mode == mode  # from ${data.labels.mode}
    if name == "deep_supervision_dice_ce":
        assert type(inner) is losses.DiceCELoss
    logits, target = random_batch(mode, deep=deep)
    if hasattr(loss, "forward_with_terms"):
        value, terms = loss.forward_with_terms(logits, target)
        expected = {"dice_ce": {"ce", "dice"}, "deep_supervision_dice_ce": {"ce", "dice"}, "blob_focal_dice": {"focal", "dice", "blob"}, "cc_dice_ce": {"ce", "dice", "cc"}}.get(name, {"focal", "dice"})
        assert set(terms) == expected
    else:
        value = loss(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_command_line_overrides():
    loss = instantiate(compose_loss("focal_dice", "softmax", ("loss.gamma=1", "loss.alpha=[0.1,0.3,0.3]", "loss.lambda_dice=0.5")))
    assert (loss.gamma, loss.lambda_dice) == (1.0, 0.5)
    assert loss.alpha.tolist() == pytest.approx([0.1, 0.3, 0.3])
    assert loss.focal_background and not loss.dice_background  # include_background: null
    inner = instantiate(compose_loss("deep_supervision", "sigmoid", ("loss.loss.gamma=0.5",))).loss
    assert inner.gamma == 0.5
    with pytest.raises(Exception, match="expected gamma to be a finite number >= 0, got -1"):
        instantiate(compose_loss("focal", "sigmoid", ("loss.gamma=-1",)))


@pytest.mark.parametrize(
    "overrides, expected", [(["loss=dice"], losses.DiceLoss), (["loss=focal_dice", "loss.gamma=1"], losses.FocalDiceLoss)]
)
def test_train_config_selects_the_loss(overrides, expected):
    from medseg.config import compose as compose_train

    loss = instantiate(compose_train("train", overrides).loss)
    assert type(loss) is expected
    if expected is losses.FocalDiceLoss:
        assert loss.gamma == 1.0


def test_benchmark_quick_run(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss.py"
    spec = importlib.util.spec_from_file_location("bench_loss", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    results = bench.main(["--quick", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [case["mode"] for case in results["cases"]] == ["sigmoid", "softmax"]
    for case in results["cases"]:
        assert case["ratio_time_median"] > 0 and case["ratio_peak_memory"] > 0
        for impl in case["impls"].values():
            assert impl["peak_bytes"] > 0 and impl["time_min_s"] > 0
    sigmoid = results["cases"][0]["impls"]
    assert sigmoid["medseg"]["loss"] == pytest.approx(sigmoid["monai"]["loss"], rel=1e-5)  # same loss in sigmoid mode
