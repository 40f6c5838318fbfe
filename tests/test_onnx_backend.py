"""medseg.onnx_backend: ONNX export of the repository's networks and onnxruntime in the network's place.

Known answers: a 1x1x1 convolution written as an ONNX graph by hand equals ``conv3d`` with the same weights (fast);
the unet, dynunet and segresnet configs of ``conf/model/``, composed small with random weights and exported, give torch's logits
at sizes other than the export's and torch's whole-volume probabilities (sliding window and a test-time flip) within
the tolerances the module states.
"""

from __future__ import annotations

import copy
import functools
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'medseg[onnx]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from medseg.build import build_model  # noqa: E402
from medseg.config import compose  # noqa: E402
from medseg.losses import FocalDiceLoss  # noqa: E402
from medseg.module import SegmentationModule  # noqa: E402
from medseg.onnx_backend import LOGIT_TOLERANCE, ONNX_EXTRA_HELP, PROBABILITY_TOLERANCE, OnnxNetwork, check_signature, export_network, use_onnxruntime  # noqa: E402

IN_CHANNELS, OUT_CHANNELS = 4, 3  # the BraTS data config: 4 modalities, 3 sigmoid regions
ROI = [16, 16, 16]
# Spatial sizes other than the export's example (ROI), divisible by 8 as SegResNet needs (4 does for the tiny U-Nets),
# with the batch.
SIZES = [(1, 24, 32, 40), (3, 8, 16, 24)]
VOLUME = (1, IN_CHANNELS, 40, 36, 28)  # whole volume: several windows of ROI, one smaller than a window along D
TINY = {
    "unet": ["model=unet", "model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1"],
    # deep supervision on: in eval mode only the main output may come out
    "dynunet": ["model=dynunet", "model.net.kernel_size=[3,3,3]", "model.net.strides=[1,2,2]", "model.net.upsample_kernel_size=[2,2]",
                "model.net.filters=[4,8,16]", "model.net.deep_supervision=true", "model.net.deep_supr_num=1", "loss=deep_supervision", "model.channels_last=true"],
    "segresnet": ["model=segresnet", "model.net.init_filters=8"],  # GroupNorm of 8 groups: 8 filters at least
}


def conv_onnx(path, weight: np.ndarray, bias: np.ndarray, metadata: dict[str, str] | None = None, fixed: bool = False) -> None:
    """An ONNX file of ``conv3d(image, weight, bias)`` with a 1x1x1 kernel, written by hand (no exporter)."""
    c_out, c_in = weight.shape[:2]
    dims = [2, c_in, 8, 8, 8] if fixed else ["batch", c_in, "H", "W", "D"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"])],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0], c_out, *dims[2:]])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path))


@pytest.fixture()
def conv(tmp_path) -> tuple[nn.Conv3d, str]:
    """A torch 1x1x1 convolution (4 -> 3 channels) and an ONNX file of the same weights."""
    torch.manual_seed(0)
    net = nn.Conv3d(IN_CHANNELS, OUT_CHANNELS, 1)
    path = tmp_path / "conv.onnx"
    conv_onnx(path, net.weight.detach().numpy(), net.bias.detach().numpy(), metadata={"medseg_config": '{"a": 1}'})
    return net, str(path)


def conv_module(net: nn.Module, **options) -> SegmentationModule:
    labels = {"mode": "sigmoid", "names": ["a", "b", "c"], "regions": {"a": [1], "b": [2], "c": [3]}, "values": [0, 1, 2, 3]}
    inferer = {"roi_size": ROI, "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}
    return SegmentationModule(net=net, loss=FocalDiceLoss("sigmoid"), optimizer=functools.partial(torch.optim.SGD, lr=0.1), labels=labels, inferer=inferer, **options)


def test_an_onnx_file_runs_as_its_torch_network(conv):
    net, path = conv
    onnx_net = OnnxNetwork(path, num_threads=1)
    assert onnx_net.metadata == {"medseg_config": '{"a": 1}'} and onnx_net.out_channels == OUT_CHANNELS
    for batch, *spatial in SIZES:
        image = torch.randn(batch, IN_CHANNELS, *spatial)
        with torch.no_grad():
            expected = net(image)
        for given in (image, image.contiguous(memory_format=torch.channels_last_3d), image.double()):
            logits = onnx_net(given)
            assert logits.dtype == torch.float32 and logits.device == image.device and logits.shape == expected.shape
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected an input of shape \(B, C_in, H, W, D\)"):
        onnx_net(torch.randn(IN_CHANNELS, 8, 8, 8))


def test_use_onnxruntime_makes_the_module_predict_through_the_file(conv):
    net, path = conv
    module = conv_module(copy.deepcopy(net), channels_last=True, compile="default", compile_backend="aot_eager").eval()
    image = torch.randn(*VOLUME)
    with torch.inference_mode():
        expected = conv_module(net).eval().predict_probabilities(image, flip_axes=(0, 2))  # (1, 3, H, W, D)
    assert use_onnxruntime(module, path) is module
    assert isinstance(module.net, OnnxNetwork) and module.network is module.net  # no torch.compile of the ONNX network
    module = module.to("cpu").eval()
    assert not any(key.startswith("net.") for key in module.state_dict())
    with torch.inference_mode():
        probs = module.predict_probabilities(image, flip_axes=(0, 2))
    torch.testing.assert_close(probs, expected, rtol=0, atol=PROBABILITY_TOLERANCE)
    clone = copy.deepcopy(module)  # sessions are not copied: the copy opens its own
    with torch.inference_mode():
        torch.testing.assert_close(clone.predict_probabilities(image), module.predict_probabilities(image), rtol=0, atol=0)


def test_loading_weights_into_an_onnx_network_is_refused(conv):
    net, path = conv
    module = use_onnxruntime(conv_module(copy.deepcopy(net)), path)
    with pytest.raises(RuntimeError, match="weights live in .*conv.onnx"):
        module.net.load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="weights live in .*conv.onnx"):  # a checkpoint's state dict, through the module
        module.load_state_dict(conv_module(net).state_dict())


def test_a_missing_package_names_the_extra(conv, monkeypatch, tmp_path):
    _, path = conv
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails as when absent
    with pytest.raises(ImportError, match="missing: onnxruntime") as raised:
        OnnxNetwork(path)
    assert ONNX_EXTRA_HELP in str(raised.value) and "pip install 'medseg[onnx]'" in ONNX_EXTRA_HELP
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="missing: onnx"):
        export_network(nn.Conv3d(IN_CHANNELS, OUT_CHANNELS, 1), IN_CHANNELS, tmp_path / "x.onnx", ROI)


def test_export_checks_its_arguments_and_the_graphs_axes(tmp_path):
    net = nn.Conv3d(IN_CHANNELS, OUT_CHANNELS, 1)
    with pytest.raises(ValueError, match="expected roi_size of three spatial sizes >= 2"):
        export_network(net, IN_CHANNELS, tmp_path / "x.onnx", [16, 16])
    with pytest.raises(ValueError, match="expected ONNX metadata of strings"):
        export_network(net, IN_CHANNELS, tmp_path / "x.onnx", ROI, metadata={"threshold": 0.5})
    fixed = tmp_path / "fixed.onnx"
    conv_onnx(fixed, np.ones((OUT_CHANNELS, IN_CHANNELS, 1, 1, 1), np.float32), np.zeros(OUT_CHANNELS, np.float32), fixed=True)
    with pytest.raises(ValueError, match=r"with the batch and spatial axes dynamic, got \[2, 4, 8, 8, 8\]"):
        check_signature(onnx.load(str(fixed)), IN_CHANNELS, OUT_CHANNELS)
    with pytest.raises(FileNotFoundError, match="expected an ONNX model file"):
        OnnxNetwork(tmp_path / "absent.onnx")


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    """(name, the module of the composed tiny config with random weights, its exported file); ~6 s to export each."""
    name = request.param
    cfg = compose("train", ["paths.output_dir=unused", "data.root=unused", "data.synthetic=null", f"data.patch_size={ROI}", *TINY[name]])
    torch.manual_seed(0)
    module = build_model(cfg)
    metadata = {"medseg_config": json.dumps(module.run_config), "operating_point": json.dumps({"threshold": [0.5, 0.5, 0.5]})}
    folder = tmp_path_factory.mktemp(name)
    path = export_network(module.net, int(cfg.data.in_channels), folder / "model.onnx", ROI, metadata=metadata)
    return name, module, path, metadata


@pytest.mark.slow
def test_exported_networks_give_torchs_logits_at_other_sizes(exported):
    name, module, path, metadata = exported
    assert module.net.training  # the caller's network is left in its mode; the export was of eval mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # one file, no temporary left
    onnx_net = OnnxNetwork(path)
    assert onnx_net.metadata == metadata and json.loads(onnx_net.metadata["medseg_config"]) == module.run_config
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props} == metadata
    net = module.net.eval()
    for batch, *spatial in SIZES:
        image = torch.randn(batch, IN_CHANNELS, *spatial)
        with torch.no_grad():
            expected = net(image)  # DynUNet with deep supervision: the main output only, in eval mode
        logits = onnx_net(image)
        assert logits.shape == expected.shape == (batch, OUT_CHANNELS, *spatial), name
        scale = max(1.0, float(expected.abs().max()))
        assert float((logits - expected).abs().max()) <= LOGIT_TOLERANCE * scale, name


@pytest.mark.slow
def test_exported_networks_give_torchs_whole_volume_probabilities(exported):
    name, module, path, _ = exported
    module = copy.deepcopy(module).eval()
    image = torch.randn(*VOLUME)
    with torch.inference_mode():
        expected = module.predict_probabilities(image, flip_axes=(0,))  # sliding window over 16^3 windows + a flip
        probs = use_onnxruntime(module, path).predict_probabilities(image, flip_axes=(0,))
    assert probs.shape == expected.shape == (1, OUT_CHANNELS, *VOLUME[2:])
    assert float((probs - expected).abs().max()) <= PROBABILITY_TOLERANCE, name
