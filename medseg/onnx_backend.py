"""ONNX export of a segmentation network and an onnxruntime network that stands in for it.

- :func:`export_network`: a MONAI network (``SegmentationModule.net``: ``UNet``, ``DynUNet``, ``SegResNet``) in eval
  mode to one ``.onnx`` file: input ``"image"`` ``(B, C_in, H, W, D)`` float32, output ``"logits"``
  ``(B, C_out, H, W, D)``, the batch and the three spatial axes dynamic, string ``metadata`` as the model's
  ``metadata_props``, checked by ``onnx.checker``, written atomically (:func:`medseg.io.atomic_path`).
- :class:`OnnxNetwork`: an ``nn.Module`` running such a file with onnxruntime; a drop-in replacement for
  ``SegmentationModule.net`` (sliding windows, test-time flips, ``channels_last`` inputs, ``.to()`` / ``.eval()`` /
  ``state_dict()`` all work; the weights live in the file, so ``load_state_dict`` refuses).
- :func:`use_onnxruntime`: puts an :class:`OnnxNetwork` in a module's place of its torch network.

Numerical agreement (float32 on the CPU, ``tests/test_onnx_backend.py``): onnxruntime's logits equal torch's within
``LOGIT_TOLERANCE`` (1e-4) times the logits' scale ``max(1, max |logit|)``, and the probabilities of a whole volume
(sliding window and test-time flips) within ``PROBABILITY_TOLERANCE`` (1e-4) absolute. Measured on the tiny test
networks and on the benchmark's: differences of 1e-6 to 1e-5 at logits of magnitude 2 to 10 (the two libraries sum
convolutions in different orders; nothing is approximated).

Exporter: ``torch.onnx.export(dynamo=True)`` with ``dynamic_shapes``. Both exporters were tried on torch 2.13 with
the three networks of ``conf/model/`` and give the same graphs (Conv, InstanceNormalization, ConvTranspose / Resize,
...) and the same logits at sizes other than the example's. The ``torch.export`` one is chosen because it is torch's
maintained default (the TorchScript one warns that it is deprecated) and because it checks shapes instead of
tracing them: a network that bakes in a spatial size fails to export here rather than exporting a model that
silently computes something else at another size (the TorchScript tracer records Python shape arithmetic as
constants). Its cost: about 7-10 s per export on 2 CPU cores against 0.2-2.5 s (once per model, not per case).

Packages: ``onnx`` and ``onnxscript`` (export), ``onnxruntime`` (inference; ``onnxruntime-gpu`` for CUDA), the
``onnx`` extra of medseg; each is imported where it is used, and a missing one raises ``ImportError`` with
:data:`ONNX_EXTRA_HELP`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medseg.io import atomic_path

ONNX_EXTRA_HELP = "ONNX export and the onnxruntime backend need the packages onnx, onnxscript and onnxruntime (onnxruntime-gpu for CUDA): pip install 'medseg[onnx]'"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The dynamic axes of the input (and output): the batch (sw_batch_size windows) and the three spatial axes.
DYNAMIC_AXES = {0: "batch", 2: "H", 3: "W", 4: "D"}
# The example batch of the export: 2, since torch.export specialises a dimension of size 0 or 1 to a constant.
EXAMPLE_BATCH = 2
LOGIT_TOLERANCE = 1e-4  # max |onnxruntime - torch| / max(1, max |logit|)
PROBABILITY_TOLERANCE = 1e-4  # max |onnxruntime - torch| of probabilities
log = logging.getLogger("medseg")


def require(package: str) -> Any:
    """``import package``, or ``ImportError`` with :data:`ONNX_EXTRA_HELP` (the package named) when it is absent."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"{ONNX_EXTRA_HELP} (missing: {package})") from error


def export_network(
    net: nn.Module,
    in_channels: int,
    path: str | os.PathLike,
    roi_size: Sequence[int],
    metadata: Mapping[str, str] | None = None,
    opset: int | None = None,
) -> Path:
    """Export ``net`` in eval mode to an ONNX file with dynamic batch and spatial axes.

    The network is copied to the CPU in float32 first, so the caller's (its device, dtype and train/eval mode) is left
    as it was. In eval mode a ``DynUNet`` with deep supervision returns its main output only: that is what is
    exported.

    Args:
        net: maps ``(B, C_in, H, W, D)`` to logits ``(B, C_out, H, W, D)`` (``SegmentationModule.net``; a
            ``torch.compile`` of it is unwrapped).
        in_channels: ``C_in``.
        path: the ``.onnx`` file to write (weights inside: a network under the 2 GB protobuf limit).
        roi_size: the example's spatial size ``(H, W, D)``, normally the sliding window's; every size the network
            accepts (divisible as its strides need) works with the file.
        metadata: strings stored as the model's ``metadata_props`` (:attr:`OnnxNetwork.metadata` reads them back).
        opset: the ONNX opset; ``None``: the exporter's recommended one.

    Returns:
        ``path``.

    Raises:
        ImportError: onnx or onnxscript is not installed (:data:`ONNX_EXTRA_HELP`).
        ValueError: ``roi_size`` is not three sizes >= 2, ``in_channels < 1``, a metadata key or value is not a string,
            or the exported model lost a dynamic axis (the network fixes a size) or has not one 5-D output.
    """
    onnx = require("onnx")
    require("onnxscript")  # the torch.export-based exporter translates through it
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 3 or min(roi) < 2:
        raise ValueError(f"expected roi_size of three spatial sizes >= 2 (a size of 1 would be exported as a constant), got {list(roi_size)}")
    if int(in_channels) < 1:
        raise ValueError(f"expected in_channels >= 1, got {in_channels}")
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"expected ONNX metadata of strings (serialise other values, e.g. as JSON), got non-string entries {bad}")
    net = getattr(net, "_orig_mod", net)  # a torch.compile wrapper: its plain network
    model = copy.deepcopy(net).to("cpu", torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((EXAMPLE_BATCH, int(in_channels), *roi), generator=generator)  # (2, C_in, H, W, D)
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, Tensor) or out.ndim != 5:
        raise ValueError(f"expected the network in eval mode to return one (B, C_out, H, W, D) tensor, got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    # The torch.export-based exporter, not the deprecated TorchScript tracer: it checks the dynamic axes instead of
    # recording shape arithmetic as constants (the module docstring gives the comparison on torch 2.13).
    with quiet_exporter():
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=(dict(DYNAMIC_AXES),), opset_version=opset, external_data=False)
    proto = program.model_proto  # weights inside the proto: one file, written atomically
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    check_signature(proto, int(in_channels), int(out.shape[1]))
    with atomic_path(path, keep_suffix=True) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporter's chatter out of medseg's output (errors still raise): its progress lines on stdout, its log
    of the torchvision operators it skips, the warnings of torch's own internals and DynUNet's deep-supervision heads
    (assigned in forward, unused in eval mode, and left out of the graph)."""
    # torch.onnx's, and the graph passes of onnxscript / onnx_ir (which log every initializer they deduplicate at INFO).
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The tensor attributes .* were assigned during export")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_signature(proto: Any, in_channels: int, out_channels: int) -> None:
    """Raise ``ValueError`` unless ``proto`` has one input ``image`` ``(batch, in_channels, H, W, D)`` and one output
    ``logits`` ``(batch, out_channels, ...)`` with the batch and spatial axes dynamic (a fixed one means the network
    fixed that size while exporting)."""
    for value, name, channels in ((proto.graph.input, INPUT_NAME, in_channels), (proto.graph.output, OUTPUT_NAME, out_channels)):
        if len(value) != 1 or value[0].name != name:
            raise ValueError(f"expected one ONNX {name!r}, got {[v.name for v in value]}")
        dims = value[0].type.tensor_type.shape.dim
        fixed = [axis for axis in DYNAMIC_AXES if axis < len(dims) and dims[axis].HasField("dim_value")]
        if len(dims) != 5 or fixed or dims[1].dim_value != channels:
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise ValueError(f"expected {name} of shape (batch, {channels}, H, W, D) with the batch and spatial axes dynamic, got {shape}: "
                             f"the network fixes axes {fixed} while exporting")


class OnnxNetwork(nn.Module):
    """An ONNX file of :func:`export_network` run by onnxruntime, as an ``nn.Module`` mapping ``(B, C_in, H, W, D)``
    to float32 logits ``(B, C_out, H, W, D)`` on the input's device.

    A drop-in replacement for ``SegmentationModule.net``: it has no parameters or buffers, so ``.to(device)``,
    ``.to(memory_format=...)``, ``.eval()`` and ``state_dict()`` (empty) work; ``load_state_dict`` raises, since the
    weights live in the file. Inputs of any memory format and dtype are converted to contiguous float32. No gradient
    flows through it (inference only).

    Execution: inputs on the CPU run on onnxruntime's CPU provider; inputs on a CUDA device run on its CUDA provider
    where onnxruntime has it (``onnxruntime-gpu``; input and output stay on the GPU, bound by pointer), else on the CPU
    provider with a copy each way (a warning says so once). Sessions are made on first use per device and are not
    pickled or deep-copied (a copy makes its own).

    Args:
        path: the ``.onnx`` file.
        num_threads: onnxruntime's ``intra_op_num_threads``; ``None``: ``torch.get_num_threads()``, as torch would use.

    Attributes:
        path: the file.
        metadata: the model's ``metadata_props`` (``{}`` when none).
        num_threads: as given (resolved).

    Raises:
        ImportError: onnxruntime is not installed (:data:`ONNX_EXTRA_HELP`).
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        super().__init__()
        require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"expected an ONNX model file (python -m medseg.export ... format=onnx writes one), got {self.path}: no such file")
        self.num_threads = int(num_threads) if num_threads is not None else torch.get_num_threads()
        if self.num_threads < 1:
            raise ValueError(f"expected num_threads >= 1, got {num_threads}")
        self._sessions: dict[str, Any] = {}
        self._warned_cpu_fallback = False
        session = self.session(torch.device("cpu"))  # reads the file now: a broken one fails here, not mid-prediction
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        self.input_name, self.output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
        channels = session.get_outputs()[0].shape[1]
        self.out_channels: int | None = channels if isinstance(channels, int) else None

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, num_threads={self.num_threads}"

    def session(self, device: torch.device) -> Any:
        """The onnxruntime session for inputs on ``device`` (made on first use): CUDA provider first for a CUDA device
        where available, else the CPU provider."""
        ort = require("onnxruntime")
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        key = f"cuda:{device.index or 0}" if cuda else "cpu"
        if key not in self._sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # No busy-waiting threads between runs: torch stitches the windows on the same cores meanwhile.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0})] if cuda else []
            self._sessions[key] = ort.InferenceSession(str(self.path), options, providers=[*providers, "CPUExecutionProvider"])
            if cuda:  # the CPU session __init__ read the file with holds a second copy of the weights: let it go
                self._sessions.pop("cpu", None)
        return self._sessions[key]

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``(B, C_out, H, W, D)`` float32 of ``image`` ``(B, C_in, H, W, D)``, on ``image``'s device."""
        if image.ndim != 5:
            raise ValueError(f"expected an input of shape (B, C_in, H, W, D), got {tuple(image.shape)}")
        x = image.detach().to(dtype=torch.float32).contiguous()  # (B, C_in, H, W, D), channels_last undone
        session = self.session(x.device)
        if x.device.type == "cuda" and "CUDAExecutionProvider" in session.get_providers():
            return self._run_cuda(session, x)
        if x.device.type != "cpu" and not self._warned_cpu_fallback:
            log.warning("onnxruntime has no provider for %s here (onnxruntime-gpu is not installed): running on its CPU provider", x.device)
            self._warned_cpu_fallback = True
        (logits,) = session.run([self.output_name], {self.input_name: x.cpu().numpy()})  # (B, C_out, H, W, D)
        return torch.from_numpy(logits).to(image.device)

    def _run_cuda(self, session: Any, x: Tensor) -> Tensor:
        """``x`` on a CUDA device through the CUDA provider, input and output bound by pointer (no host copy)."""
        if self.out_channels is None:
            raise ValueError(f"expected a fixed number of output channels in {self.path}, got {session.get_outputs()[0].shape}")
        out = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), device=x.device, dtype=torch.float32)  # (B, C_out, H, W, D)
        binding = session.io_binding()
        index = x.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # x is written before onnxruntime's stream reads it
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        raise RuntimeError(f"expected no weights for an OnnxNetwork: its weights live in {self.path}; load the checkpoint into the torch network "
                           "and export it again (medseg.onnx_backend.export_network)")

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # Reached through the owning module's load_state_dict (a checkpoint's "net." weights).
        if any(key.startswith(prefix) for key in state_dict):
            self.load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"] = {}  # onnxruntime sessions are not picklable: a copy opens its own
        return state



def use_onnxruntime(module: nn.Module, path: str | os.PathLike, num_threads: int | None = None) -> nn.Module:
    """Run ``module``'s network through onnxruntime: ``module.net`` becomes ``OnnxNetwork(path, num_threads)`` and a
    ``torch.compile`` of the old network (``model.compile``) is dropped and not made again.

    ``module.predict_probabilities``, ``predict_volume``, ``sliding_window`` and ``forward`` then run the ONNX file;
    ``module.state_dict()`` no longer holds network weights.

    Returns:
        ``module`` itself.
    """
    module.net = OnnxNetwork(path, num_threads=num_threads)
    if hasattr(module, "compile_mode"):
        module.compile_mode = None  # SegmentationModule.network would torch.compile the OnnxNetwork otherwise
    if getattr(module, "_compiled_net", None) is not None:
        object.__setattr__(module, "_compiled_net", None)
    return module
