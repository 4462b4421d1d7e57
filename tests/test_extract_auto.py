"""--precision auto for a network with depthwise convolutions: bf16 (or fp32), never int8, compiled only for
long runs; its cache is found again on a hit; a dense network keeps today's rules."""
from __future__ import annotations

import pytest
import torch

from pipeline.extraction import extract as extract_mod
from pipeline.extraction import extract_range
from pipeline.extraction.backbones import bare_features, has_depthwise

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


def test_depthwise_networks_are_recognised():
    assert has_depthwise(bare_features("test_efficientnet", "meta"))
    assert has_depthwise(bare_features("mobilenet_v3_small", "meta"))
    assert not has_depthwise(bare_features("tiny", "meta")) and not has_depthwise(bare_features("vgg16", "meta"))


def test_compile_auto_waits_longer_for_a_dense_network():
    cpu = torch.device("cpu")
    assert not extract_range.should_compile("auto", "bf16", cpu, 1000, depthwise=True)
    assert extract_range.should_compile("auto", "bf16", cpu, extract_range.COMPILE_MIN_IMAGES_DEPTHWISE, depthwise=True)
    assert not extract_range.should_compile("auto", "bf16", cpu, extract_range.COMPILE_MIN_IMAGES_DEPTHWISE)


@pytest.fixture
def int8_regime(monkeypatch):
    """A run where --precision auto would pick int8 for a dense network (VNNI, torchao, enough images)."""
    pytest.importorskip("torchao")
    monkeypatch.setattr(extract_mod, "INT8_AUTO_MIN_IMAGES", 4)
    monkeypatch.setattr(extract_mod, "cpu_flags", lambda: {"avx512_vnni"})


def test_auto_keeps_a_depthwise_network_in_float_and_finds_its_cache_again(make_cache, image_folder, int8_regime):
    first = make_cache(image_folder, backbone="test_efficientnet", flip=False)
    assert first.precision in ("bf16", "fp32") and not first.compiled
    again = make_cache(image_folder, backbone="test_efficientnet", flip=False)
    assert again.hit and again.cache == first.cache
    assert make_cache(image_folder, backbone="tiny", flip=False, calib_n=4).precision == "int8"  # dense: int8


def test_auto_never_picks_int8_without_torchao(monkeypatch, tmp_path, no_torchao):
    """Without the optional torchao, --precision auto chose int8 on a CPU with VNNI for 1,000 photos (package_version
    says 'unknown', which read as installed), and the default `extract --data catsdogs` failed: 'int8 quantisation
    of the backbone failed (ModuleNotFoundError ...)'. It stays in float, saying why."""
    from pipeline.extraction.extract import ExtractConfig

    monkeypatch.setattr(extract_mod, "cpu_flags", lambda: {"avx512_vnni"})
    c = ExtractConfig(data=str(tmp_path))
    assert extract_mod.auto_precision(c, extract_mod.INT8_AUTO_MIN_IMAGES) == (
        "auto", "precision auto: bf16 or fp32, not int8: no torchao")
    assert not extract_mod.one_offs_paid(c, None)  # nothing asked of a listing: torchao is not there
