"""The GPU paths (skipped without CUDA): bf16 and float16 steps, channels_last_3d and torch.compile on the GPU give
the float32 results within tolerance, and validation stitches on the GPU as on the CPU."""

from __future__ import annotations

import functools

import pytest
import torch
from monai.networks.nets import DynUNet

from medseg.losses import FocalDiceLoss
from medseg.module import SegmentationModule

pytestmark = pytest.mark.gpu
LABELS = {"mode": "sigmoid", "names": ["wt", "tc", "et"], "values": [0, 1, 2, 4], "regions": {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}}


def module(**options) -> SegmentationModule:
    torch.manual_seed(0)
    net = DynUNet(3, 4, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[16, 32, 64, 128], norm_name="INSTANCE")
    inferer = {"roi_size": [64, 64, 64], "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian", **options.pop("inferer", {})}
    return SegmentationModule(net=net, loss=FocalDiceLoss("sigmoid"), optimizer=functools.partial(torch.optim.SGD, lr=0.01), labels=LABELS, inferer=inferer, **options).cuda()


def logits_and_grads(m: SegmentationModule, image: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None):
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = m(image)
    m.loss(logits.float(), target).backward()
    return logits.float().detach(), torch.cat([p.grad.flatten() for p in m.net.parameters()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_is_close_to_float32(dtype):
    image, target = torch.randn(2, 4, 64, 64, 64, device="cuda"), (torch.rand(2, 3, 64, 64, 64, device="cuda") > 0.9).float()
    reference = logits_and_grads(module(), image, target, None)
    mixed = logits_and_grads(module(), image, target, dtype)
    assert torch.nn.functional.cosine_similarity(reference[0].flatten(), mixed[0].flatten(), dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(reference[1], mixed[1], dim=0) > 0.95  # wrong bf16 conv3d kernels fail this


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": "default"}])
def test_channels_last_and_compile_match_on_the_gpu(options):
    image, target = torch.randn(2, 4, 64, 64, 64, device="cuda"), (torch.rand(2, 3, 64, 64, 64, device="cuda") > 0.9).float()
    plain, fast = logits_and_grads(module(), image, target, None), logits_and_grads(module(**options), image, target, None)
    torch.testing.assert_close(plain[0], fast[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(plain[1], fast[1], rtol=1e-2, atol=1e-3)


def test_validation_stitches_on_the_gpu_as_on_the_cpu():
    volume = torch.randn(1, 4, 160, 160, 120, device="cuda")
    on_gpu, on_cpu = module().eval(), module(inferer={"device": "cpu"}).eval()
    with torch.no_grad():
        a, b = on_gpu.predict_volume(volume), on_cpu.predict_volume(volume)
    assert a.device.type == "cuda" and b.device.type == "cpu"
    torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    assert on_gpu.inferer.get("device") is None  # no fallback was needed
