"""trainer.precision: auto, resolved per device: bf16 mixed on GPUs with native bf16, float16 mixed on older GPUs,
float32 on any CPU; explicit values pass through."""

from __future__ import annotations

import pytest
import torch

import medseg.precision
from medseg.config import compose
from medseg.precision import resolve_precision, resolve_trainer_precision


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_on_a_cpu_is_float32_whatever_the_cpu(monkeypatch, bf16):
    monkeypatch.setattr(medseg.precision, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cpu") == resolve_precision("auto", "auto") == "32-true"


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_follows_its_native_bf16_support(monkeypatch, native_bf16, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native_bf16 or including_emulation  # an older GPU that only emulates bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", "gpu") == resolve_precision("auto", "auto") == expected
    assert asked == {"including_emulation": False}
    assert resolve_precision("auto", "cpu") == "32-true"  # a CPU run on a GPU machine


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_explicit_values_pass_through(value):
    assert resolve_precision(value, "gpu") == value


@pytest.mark.parametrize("group", ["default", "gpu", "ddp", "cpu"])
def test_every_trainer_group_resolves_auto_into_the_config(group, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose("train", [f"trainer={group}", "trainer.accelerator=cpu", f"paths.output_dir={tmp_path}", "data.root=/x"])
    assert cfg.trainer.precision == "auto"
    assert resolve_trainer_precision(cfg) == cfg.trainer.precision == "32-true"
