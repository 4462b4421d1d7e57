"""--precision auto runs a network with depthwise convolutions under ONNX Runtime on the CPU (fp32 rows),
and prefers that to int8; a dense one keeps PyTorch."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.extraction import extract as extract_mod
from pipeline.extraction import onnx_runtime
from pipeline.extraction.backbones import bare_features

pytestmark = [pytest.mark.filterwarnings("ignore:--weights none", "ignore:no sidecar"),
              pytest.mark.skipif(not onnx_runtime.available(), reason="onnxruntime is not installed")]


def test_depthwise_networks_are_recognised():
    assert onnx_runtime.has_depthwise(bare_features("test_efficientnet", "meta"))
    assert not onnx_runtime.has_depthwise(bare_features("tiny", "meta"))


def test_auto_runs_a_depthwise_network_under_onnxruntime_with_fp32_rows(make_cache, image_folder):
    auto = make_cache(image_folder, backbone="test_efficientnet", precision="auto", flip=False)
    fp32 = make_cache(image_folder, backbone="test_efficientnet", precision="fp32", flip=False)
    assert (auto["runtime"], auto["precision"]) == ("onnxruntime", "fp32")
    assert (fp32["runtime"], fp32["precision"]) == ("torch", "fp32")
    with h5py.File(auto["cache"], "r") as a, h5py.File(fp32["cache"], "r") as b:
        assert a.attrs["runtime"] == "onnxruntime"
        assert np.abs(a["features"][:] - b["features"][:]).max() < 1e-3
    assert make_cache(image_folder, backbone="tiny", precision="auto")["runtime"] == "torch"  # dense: PyTorch


def test_auto_prefers_onnxruntime_to_int8_and_finds_that_cache_again(make_cache, image_folder, monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr(extract_mod, "INT8_AUTO_MIN_IMAGES", 4)
    monkeypatch.setattr(extract_mod, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.setattr(extract_mod, "package_version", lambda p: "1.0")
    first = make_cache(image_folder, backbone="test_efficientnet", precision="auto", flip=False)
    assert (first["runtime"], first["precision"]) == ("onnxruntime", "fp32")
    again = make_cache(image_folder, backbone="test_efficientnet", precision="auto", flip=False)
    assert again["hit"] and again["cache"] == first["cache"]


def test_a_network_onnx_cannot_take_runs_in_pytorch(make_cache, image_folder, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset version 18 is not supported")

    monkeypatch.setattr(onnx_runtime.torch.onnx, "export", refuse)
    result = make_cache(image_folder, backbone="test_efficientnet", precision="auto", flip=False)
    assert (result["runtime"], result["precision"], result["rows"]) == ("torch", "fp32", 24)
