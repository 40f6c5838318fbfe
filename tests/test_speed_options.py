"""The opt-in speed options, on the CPU: model.compile, mixed precision through Lightning (GradScaler for
float16 only), sliding-window device options with the CPU fallback when the GPU runs out of memory, and
data.pin_memory. Each must give the results of the plain path within float tolerance."""

from __future__ import annotations

import copy
import functools
import logging
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from torch.utils.data import DataLoader

from medseg.config import compose
from test_channels_last import assert_same_results
from medseg.losses import FocalDiceLoss
from medseg.module import SegmentationModule

LABELS = {"mode": "softmax", "names": ["a", "b"], "values": [0, 1, 2]}
INFERER = {"roi_size": [16, 16, 16], "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}


def tiny_net() -> DynUNet:
    torch.manual_seed(0)
    return DynUNet(3, 2, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name="INSTANCE", res_block=True)


def module(net, **options) -> SegmentationModule:
    return SegmentationModule(net=net, loss=FocalDiceLoss("softmax"), optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), labels=LABELS, inferer=dict(INFERER), **options)


def test_compiled_network_gives_the_same_logits_gradients_and_checkpoint_keys():
    net = tiny_net()
    plain, compiled = module(copy.deepcopy(net)), module(copy.deepcopy(net), compile="default", compile_backend="aot_eager")
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # the compiled wrapper is not a submodule
    assert_same_results(plain, compiled)
    assert compiled._compiled_net is not None and compiled.network is not compiled.net
    # A checkpoint of the compiled module loads into a plain one.
    module(tiny_net()).load_state_dict(compiled.state_dict())


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile's inductor backend needs a C++ compiler on a CPU")
def test_inductor_compiled_network_gives_the_same_logits():
    net = tiny_net().eval()
    plain, compiled = module(copy.deepcopy(net)), module(copy.deepcopy(net), compile="default")
    image = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(image), compiled(image), rtol=1e-4, atol=1e-4)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="model.compile false or one of"):
        module(tiny_net(), compile="fast")


def test_compile_and_device_options_reach_the_module_from_the_config(tmp_path):
    cfg = compose("train", ["+experiment=demo", f"paths.output_dir={tmp_path}", "model.compile=max-autotune", "model.inferer.device=cpu", "model.inferer.sw_device=cpu"])
    from medseg.build import build_model

    model = build_model(cfg)
    assert model.compile_mode == "max-autotune" and model.inferer["device"] == "cpu" and model.inferer["sw_device"] == "cpu"
    assert compose("train", ["+experiment=demo", f"paths.output_dir={tmp_path}"]).model.compile is False


def test_stitching_falls_back_to_the_cpu_when_the_gpu_runs_out_of_memory(monkeypatch, caplog):
    m = module(tiny_net().eval())
    volume = torch.randn(1, 2, 24, 20, 28)
    with torch.no_grad():
        expected = m.predict_volume(volume)
    calls = []

    def out_of_memory_unless_stitched_on_the_cpu(image, predictor, **kwargs):
        calls.append(kwargs.get("device"))
        if kwargs.get("device") != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return sliding_window_inference(image, predictor=predictor, **kwargs)

    monkeypatch.setattr("medseg.module.sliding_window_inference", out_of_memory_unless_stitched_on_the_cpu)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="medseg"):
        first = m.predict_volume(volume)
        second = m.predict_volume(volume)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert calls == [None, "cpu", "cpu"]  # one failed try, then the CPU for the rest of the run
    assert "stitching on the CPU from now on" in caplog.text
    m.inferer["device"] = "cpu"
    monkeypatch.setattr("medseg.module.sliding_window_inference", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        m.predict_volume(volume)  # already on the CPU: nothing left to fall back to


@pytest.mark.parametrize("failing_pass", [1, 3])
def test_out_of_memory_in_any_test_time_flip_pass_redoes_every_pass_stitched_on_the_cpu(monkeypatch, caplog, failing_pass):
    import medseg.postprocess

    m = module(tiny_net().eval())
    volume = torch.randn(1, 2, 24, 20, 28)
    with torch.no_grad():
        expected = m.predict_probabilities(volume, (0, 1))
    calls, real = [], medseg.postprocess.probabilities

    def out_of_memory_once(logits, mode, **kwargs):  # the activation of one flip pass (outside the sliding window)
        calls.append(m.inferer.get("device"))
        if len(calls) == failing_pass:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(logits, mode, **kwargs)

    monkeypatch.setattr(medseg.postprocess, "probabilities", out_of_memory_once)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="medseg"):
        got = m.predict_probabilities(volume, (0, 1))
    torch.testing.assert_close(got, expected)
    assert calls == [None] * failing_pass + ["cpu"] * 4  # the failed passes, then all 4 again
    assert "averaging test-time flips" in caplog.text


def test_out_of_memory_scoring_a_validation_volume_scores_it_on_the_cpu(monkeypatch, caplog):
    import medseg.module

    def scores(fail: bool) -> dict:
        m = module(tiny_net().eval())
        generator = torch.Generator().manual_seed(1)
        image = torch.randn(1, 2, 24, 20, 28, generator=generator)
        batch = {"image": image, "label": (image[:, :1] > 0.5).float(), "spacing": torch.ones(1, 3), "padding": torch.tensor([False])}
        real, calls = medseg.module.target_channels, []

        def out_of_memory_once(*args, **kwargs):
            calls.append(1)
            if fail and len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return real(*args, **kwargs)

        monkeypatch.setattr(medseg.module, "target_channels", out_of_memory_once)
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="medseg"):
            m.validation_step(batch, 0)
        return {**m.metrics["val"].compute(), "loss": m.val_loss.compute()}

    expected, got = scores(False), scores(True)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    assert "scoring it on the CPU" in caplog.text


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 6) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            image = torch.randn(2, 16, 16, 16, generator=generator)
            label = (image[:1] > 0.3).float() + (image[1:] > 0.8).float()  # learnable from the image: classes 0-2
            self.items.append({"image": image, "label": label.clamp(max=2)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


@pytest.mark.slow
@pytest.mark.parametrize("precision, scaled", [("32-true", False), ("bf16-mixed", False), ("16-mixed", True)])
def test_mixed_precision_trains_through_lightning_with_a_scaler_for_float16_only(precision, scaled, tmp_path):
    m = module(tiny_net())
    losses = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train/loss_epoch"]))

    # Lightning turns precision="16-mixed" on a CPU into bf16-mixed; the plugin itself runs float16 autocast with a
    # GradScaler on a CPU as on a GPU (whose overflowing steps the module leaves to the scaler).
    plugin = {"precision": precision} if precision != "16-mixed" else {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    trainer = L.Trainer(accelerator="cpu", **plugin, max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=12.0, callbacks=[Record()], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(m, train_dataloaders=DataLoader(Batches(), batch_size=2))
    assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == scaled
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(torch.isfinite(p).all() for p in m.parameters()) and next(m.net.parameters()).dtype == torch.float32  # float32 master weights


class Volumes(torch.utils.data.Dataset):
    """Whole validation volumes (one per batch), larger than the 16^3 window."""

    def __init__(self, n: int = 2) -> None:
        generator = torch.Generator().manual_seed(1)
        self.items = []
        for _ in range(n):
            image = torch.randn(2, 24, 20, 28, generator=generator)
            self.items.append({"image": image, "label": ((image[:1] > 0.3).float() + (image[1:] > 0.8).float()).clamp(max=2), "spacing": torch.ones(3)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


@pytest.mark.slow
def test_a_compiled_network_trains_and_validates_inside_a_trainer_as_the_plain_one(tmp_path):
    # torch.compile (aot_eager: no C++ compiler needed) through Lightning: the sanity validation under inference
    # mode, training steps, validation; then the plain network with the trained weights validates the same.
    compiled = module(tiny_net(), compile="default", compile_backend="aot_eager")
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = L.Trainer(max_epochs=3, num_sanity_val_steps=1, **options)
    trainer.fit(compiled, train_dataloaders=DataLoader(Batches(), batch_size=2), val_dataloaders=DataLoader(Volumes(), batch_size=1))
    assert compiled._compiled_net is not None and torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    got = L.Trainer(**options).validate(compiled, DataLoader(Volumes(), batch_size=1), verbose=False)[0]
    plain = module(tiny_net())
    plain.load_state_dict(compiled.state_dict())
    expected = L.Trainer(**options).validate(plain, DataLoader(Volumes(), batch_size=1), verbose=False)[0]
    assert set(got) == set(expected) and "val/dice" in got and "val/loss" in got
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_pin_memory_auto_follows_cuda(monkeypatch, tmp_path):
    from hydra.utils import instantiate

    cfg = compose("train", ["+experiment=demo", f"paths.output_dir={tmp_path}"])
    assert cfg.data.pin_memory == "auto"
    assert instantiate(cfg.data).pin_memory is torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert instantiate(cfg.data).pin_memory is True
    cfg.data.pin_memory = False
    assert instantiate(cfg.data).pin_memory is False
