"""ONNX Runtime as extract's fp32 CPU runtime for networks with depthwise convolutions.

Why: PyTorch's CPU depthwise convolutions run far below what their FLOPs allow, and networks built
from them (EfficientNet-Lite, MobileNet, ConvNeXt) are the ones where this shows: EfficientNet-Lite0's
features ran 2x faster under ONNX Runtime than in bf16 autocast and 1.5x faster than compiled fp32,
with a one-off export of seconds instead of a compile of a minute, and the same rows to ~2e-5
(docs/performance.md). Dense networks (VGG, ResNet) are faster in PyTorch's bf16 / int8, so
``--precision auto`` picks this runtime only where the network has depthwise convolutions, only on the
CPU, and only when onnxruntime is installed; the cache records precision fp32, and its key is that of
``--precision auto`` (a runtime changes the last bits of a row at most, as ``--compile`` does).
"""
from __future__ import annotations

import importlib.util
import io
import logging
import time
import warnings

import torch

log = logging.getLogger(__name__)


def has_depthwise(net) -> bool:
    """True when ``net`` holds a depthwise convolution (one group per input channel)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in net.modules())


def available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def prefers_onnxruntime(net, device) -> bool:
    """Whether ``--precision auto`` runs ``net`` under ONNX Runtime here (see the module's docstring)."""
    return device.type == "cpu" and available() and has_depthwise(net)


class OrtNet(torch.nn.Module):
    """``net`` exported to ONNX (dynamic batch) and run by an ONNX Runtime CPU session: tensor in, tensor out."""

    def __init__(self, net, input_shape, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        started = time.perf_counter()
        example = torch.zeros((2, *[int(d) for d in input_shape]))
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes (export.py uses it too)
            torch.onnx.export(net.eval(), (example,), buf, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        self.export_seconds = time.perf_counter() - started
        log.info("running the network under ONNX Runtime (exported in %.1f s)", self.export_seconds)

    def forward(self, x):
        y = self.session.run(None, {"x": x.float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(y)
