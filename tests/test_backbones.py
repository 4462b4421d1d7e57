import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.extraction import backbones as bb


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*resnet18.*vgg16"):
        bb.get_spec("alexnet9")


def test_unknown_weights_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed: DEFAULT, IMAGENET1K_V1"):
        bb.load_backbone("resnet18", "IMAGENET9K")


@pytest.mark.parametrize("name, shape", [("vgg16", (512, 7, 7)), ("resnet18", (512, 7, 7))])
def test_feature_maps_before_pooling(name, shape):
    loaded = bb.load_backbone(name, "none")
    assert list(loaded.transform.crop_size) == [224]
    with torch.inference_mode():
        assert tuple(loaded.features(torch.zeros(1, 3, 224, 224)).shape[1:]) == shape


def test_local_file_sidecar_and_strict_feature_part(tmp_path):
    model = bb.load_backbone("tiny", "none").model
    feats = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    path = tmp_path / "w.pt"
    torch.save(feats, path)
    (tmp_path / "w.json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1], "covers": "features"}))
    loaded = bb.load_backbone("tiny", str(path))
    assert loaded.mean == pytest.approx([0.1, 0.2, 0.3])
    assert loaded.covers == "features" and loaded.weights_id == "file:w.pt" and len(loaded.weights_sha256) == 64
    del feats["features.0.bias"]
    torch.save(feats, path)
    with pytest.raises(ValueError, match="lack 1 keys"):
        bb.load_backbone("tiny", str(path))


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r.pt"
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), path)
    with pytest.raises(ValueError, match="not for vgg16"):
        bb.load_backbone("vgg16", str(path))
    (tmp_path / "r.json").write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(ValueError, match="is for 'resnet18'"):
        bb.load_backbone("tiny", str(path))


def test_missing_file_and_pickled_junk(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bb.load_backbone("tiny", str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a loadable state dict"):
        bb.load_backbone("tiny", str(tmp_path / "junk.pt"))


def test_a_weights_file_with_pickled_objects_is_refused_in_one_line(tmp_path):
    import argparse

    import torch

    torch.save({"features.0.weight": argparse.Namespace(evil=True)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as e:
        bb.load_backbone("tiny", str(tmp_path / "evil.pt"))
    assert "pickled Python objects, which are never loaded" in str(e.value)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_offline_download_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PipelineError) as e:
        bb.load_backbone("resnet18", "DEFAULT")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights PATH" in msg
    assert "\n" not in msg
