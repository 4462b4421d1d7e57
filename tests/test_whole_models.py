"""Whole models: heads, freezing, frozen BatchNorm, checkpoints (model.pt and fit-head head.pt), summary."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import cli_terms
from pipeline.errors import PipelineError, UsageError
from pipeline.extraction import backbones as bb
from pipeline.extraction.extract import ExtractConfig, extract
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.models.whole_models import (
    ALL,
    build_model,
    load_model,
    parse_unfreeze,
    read_checkpoint,
    save_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


def _head_pt(data, tmp_path, backbone="tiny", weights="none", pool="none"):
    cache = extract(ExtractConfig(data=str(data), n=0, backbone=backbone, weights=weights, workers=0, pool=pool,
                                  cache_dir=str(tmp_path / "features"))).cache
    return fit_head(FitHeadConfig(head="linear", cache=cache, epochs=3, runs_dir=str(tmp_path / "runs"))).checkpoint


def _batch(lm, data, k=4):
    from PIL import Image

    files = sorted(data.rglob("*.jpg"))[:k]
    return torch.stack([lm.transform(Image.open(f).convert("RGB")) for f in files])


def test_summary_cli_prints_table_and_totals():
    result = CliRunner().invoke(cli.cli, ["summary", "--backbone", "vgg16"])
    assert result.exit_code == 0, result.output
    assert "Total params:           14,764,866" in result.stdout
    assert "Trainable params:           50,178" in result.stdout
    assert "features.28" in result.stdout and "Linear" in result.stdout
    bad = CliRunner().invoke(cli.cli, ["summary", "--backbone", "vgg16", "--unfreeze", "6"])
    assert bad.exit_code == 2 and "vgg16 has 5" in bad.output


def test_parse_unfreeze():
    assert (parse_unfreeze("none"), parse_unfreeze("all"), parse_unfreeze("3")) == (0, ALL, 3)
    with pytest.raises(UsageError, match="unknown unfreeze value '²'"):  # was an internal ValueError from int()
        parse_unfreeze("²")
    with pytest.raises(ValueError, match="allowed: none, all"):
        parse_unfreeze("last")


def test_blocks_per_backbone():
    assert [len(b) for b in bb.feature_blocks(bb.get_spec("vgg16"), bb.bare_features("vgg16", "meta"))] == \
        [5, 5, 7, 7, 7]
    resnet = bb.feature_blocks(bb.get_spec("resnet18"), bb.bare_features("resnet18", "meta"))
    assert len(resnet) == 5 and len(resnet[0]) == 4  # stem, layer1..layer4
    assert len(bb.feature_blocks(bb.get_spec("efficientnet_b0"), bb.bare_features("efficientnet_b0", "meta"))) == 9


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model("tiny_bn", "none", ["a", "b"]).model
    bn1, bn2 = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    model.set_trainable(1)
    model.train()
    assert model.training and not bn1.training and bn2.training
    model.set_trainable(0)
    assert not bn1.training and not bn2.training and model.head.training
    model.set_trainable(ALL)
    assert bn1.training and bn2.training
    before = bn1.running_mean.clone()
    model.set_trainable(0)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn1.running_mean, before)


def test_checkpoint_round_trip_predicts_the_same(tmp_path, image_folder):
    torch.manual_seed(0)
    lm = build_model("tiny_bn", "none", ["blue", "red"])
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the seeded init: the state dict must really be loaded
        lm.model.features[1].running_mean.uniform_()
    lm.model.eval()
    x = _batch(lm, image_folder)
    expected = lm.model(x)
    save_model(lm, tmp_path / "model.pt", "train", {"lr": 0.1}, {"val_acc": 1.0}, [])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["kind"] == "train" and ckpt["classes"] == ["blue", "red"] and ckpt["pool"] == "avg"
    assert ckpt["preprocessing"]["crop_size"] == 32 and ckpt["config"] == {"lr": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilding must not warn about random weights
        again = load_model(tmp_path / "model.pt")
    assert again.kind == "train" and again.classes == ["blue", "red"]
    assert torch.equal(again.model(_batch(again, image_folder)), expected)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this tool"):
        read_checkpoint(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("field, value", [("classes", 5), ("classes", ["only-one"]), ("dropout", "x"),
                                          ("state_dict", "x"), ("weights", 123), ("in_shape", [8, -1, 8]),
                                          ("pool", "max"), ("preprocessing", {"crop_size": 3})])
def test_a_checkpoint_with_a_wrong_field_is_one_line_naming_it(tmp_path, field, value):
    lm = build_model("tiny", "none", ["blue", "red"])
    save_model(lm, tmp_path / "model.pt", "train", {}, {}, [])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    read_checkpoint(tmp_path / "model.pt")  # fine as saved
    torch.save({**ckpt, field: value}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"field '{field}' must be "):
        read_checkpoint(tmp_path / "bad.pt")


def test_a_pickled_object_is_refused_in_one_line_without_torchs_advice(tmp_path):
    import argparse

    torch.save({"kind": "train", "odd": argparse.Namespace(a=1)}, tmp_path / "p.pt")
    torch.save(argparse.Namespace(a=1), tmp_path / "q.pt")
    for name in ("p.pt", "q.pt"):
        with pytest.raises(ValueError) as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
        assert "never loaded" in str(e.value)


@pytest.mark.parametrize("backbone,pool", [("tiny", "none"), ("tiny_bn", "avg")])
def test_fit_head_checkpoint_loads_into_the_model(tmp_path, image_folder, backbone, pool):
    head_pt = _head_pt(image_folder, tmp_path, backbone, pool=pool)
    ckpt = read_checkpoint(head_pt)
    lm = load_model(head_pt)
    assert lm.kind == "fit-head" and lm.info["pool"] == pool
    assert isinstance(lm.model.pool, torch.nn.AdaptiveAvgPool2d) == (pool == "avg")
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(lm.model.head.state_dict()[k], v)
    # the model's log-probabilities = the head applied to the backbone's (pooled) features
    x = _batch(lm, image_folder)
    with torch.no_grad():
        feats = lm.model.features(x)
        if pool == "avg":
            feats = feats.mean((2, 3), keepdim=True)
        assert torch.allclose(lm.model(x), lm.model.head(feats))


def test_fit_head_checkpoint_finds_its_local_weights_file(tmp_path, image_folder):
    weights = tmp_path / "w" / "tiny.pt"
    weights.parent.mkdir()
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), weights)
    head_pt = _head_pt(image_folder, tmp_path, weights=str(weights))
    assert load_model(head_pt).info["weights_sha256"] == bb.file_sha256(weights)  # found via the cache's record
    moved = tmp_path / "elsewhere.pt"
    shutil.move(weights, moved)
    with pytest.raises(PipelineError, match="tiny.pt .*; pass weights=PATH to it$"):
        load_model(head_pt)  # from Python: Model.load(path, weights=...)
    with cli_terms(), pytest.raises(PipelineError, match="tiny.pt .*; pass --weights PATH to it$"):
        load_model(head_pt)
    assert load_model(head_pt, weights=str(moved)).info["weights_path"] == str(moved.resolve())
    other = tmp_path / "other.pt"
    state = torch.load(moved, weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, other)
    with pytest.raises(ValueError, match="^weights='.*other.pt' is not the file the head was fitted with"):
        load_model(head_pt, weights=str(other))


def test_a_head_runs_only_on_the_weights_and_preprocessing_it_was_fitted_with(tmp_path, image_folder):
    import json

    weights = tmp_path / "w" / "tiny.pt"
    weights.parent.mkdir()
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), weights)
    head_pt = _head_pt(image_folder, tmp_path, weights=str(weights))
    with pytest.raises(ValueError, match="fitted on other features.*weights: file:tiny.pt vs none"):
        load_model(head_pt, weights="none")
    weights.with_suffix(".json").write_text(json.dumps({"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}))
    with pytest.raises(ValueError, match="fitted on other features.*preprocessing"):
        load_model(head_pt)  # the same file, but an edited sidecar changes what the head sees
    random_head = _head_pt(image_folder, tmp_path / "r")  # fitted on --weights none: not any file goes
    with pytest.raises(ValueError, match="weights: none vs file:tiny.pt"):
        load_model(random_head, weights=str(weights))
    result = CliRunner().invoke(cli.cli, ["predict", "--model", str(random_head), "--weights", str(weights),
                                          str(image_folder)])
    assert result.exit_code == 2 and "fitted on other features" in result.output


def test_a_head_that_does_not_load_is_one_line_even_when_its_error_says_nothing_or_too_much(monkeypatch):
    """An empty message raised IndexError (splitlines()[0]); a long one was cut mid-word at 200 characters."""
    from pipeline.errors import UsageError
    from pipeline.models import whole_models

    for message, ends in (("", "its head does not load ()"), ("word " * 60, "word word ...)")):
        def refuse(*args, message=message):
            raise ValueError(message)

        monkeypatch.setattr(whole_models.ProbeHead, "from_checkpoint", refuse)
        with pytest.raises(UsageError) as e:
            whole_models.head_from_checkpoint({"head": {}}, {}, "m.pt")
        assert str(e.value).endswith(ends) and "\n" not in str(e.value)
