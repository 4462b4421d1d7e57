import json

import numpy as np
import pytest
import torch

from pipeline.cache import FeatureCache
from pipeline.extract import ExtractConfig, extract
from pipeline.head import FitHeadConfig, evaluate_head, fit_head
from pipeline.probes import ProbeHead
from pipeline.training import split_indices
from tests.conftest import make_image_folder


@pytest.fixture
def cache(tmp_path, make_cache):
    data = make_image_folder(tmp_path / "d", per_class=16)
    return make_cache(data)["cache"]


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 400 + [1] * 400)
    train, val = split_indices(labels, 0.125, seed=0)
    assert (len(train), len(val)) == (700, 100)
    assert np.bincount(labels[val]).tolist() == [50, 50]
    assert not set(train) & set(val)
    assert (split_indices(labels, 0.125, 0)[1] == val).all() and not (split_indices(labels, 0.125, 1)[1] == val).all()


def test_fit_head_learns_separable_features_and_saves_a_safe_checkpoint(cache, tmp_path, capsys):
    r = fit_head(FitHeadConfig(cache=cache, epochs=5, runs_dir=str(tmp_path / "runs"), val_fraction=0.25))
    assert r["val_acc"] == 1.0 and r["train_rows"] == 24 and r["val_rows"] == 8
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("Epoch ")]
    assert len(lines) == 5 and lines[0].startswith("Epoch 1, Train acc=") and "Val loss=" in lines[0]
    ckpt = torch.load(r["checkpoint"], weights_only=True)
    assert ckpt["classes"] == ["blue", "red"] and ckpt["in_shape"] == [8, 8, 8] and ckpt["backbone"] == "tiny"
    assert ckpt["head"]["view"] == "avg" and ckpt["head"]["normalize"] == "l2"  # the defaults
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])  # raw cached features in, as saved
    with FeatureCache(cache) as c:
        acc, loss, _ = evaluate_head(head, c, split_indices(c.labels, 0.25, 0)[1], "cpu", 1024)
    assert acc == r["val_acc"] and loss == pytest.approx(r["val_loss"], rel=1e-3, abs=1e-5)
    assert json.loads((tmp_path / "runs").glob("*/history.json").__next__().read_text())[0]["epoch"] == 1


def test_dropout_and_the_seed_make_runs_reproducible(cache, tmp_path):
    a = fit_head(FitHeadConfig(cache=cache, epochs=2, dropout=0.5, runs_dir=str(tmp_path / "a")))
    b = fit_head(FitHeadConfig(cache=cache, epochs=2, dropout=0.5, runs_dir=str(tmp_path / "b")))
    for key in ("train_loss", "val_loss", "train_acc"):
        assert [h[key] for h in a["history"]] == pytest.approx([h[key] for h in b["history"]])
    # ... and both matter: without dropout, or with another seed, the same run trains differently
    no_dropout = fit_head(FitHeadConfig(cache=cache, epochs=2, dropout=0.0, runs_dir=str(tmp_path / "c")))
    other_seed = fit_head(FitHeadConfig(cache=cache, epochs=2, dropout=0.5, seed=1, runs_dir=str(tmp_path / "d")))
    for other in (no_dropout, other_seed):
        assert [h["train_loss"] for h in other["history"]] != pytest.approx([h["train_loss"] for h in a["history"]])


def test_fit_head_warns_when_the_source_folder_changed(cache, tmp_path, caplog):
    (tmp_path / "d" / "red" / "red.0.jpg").unlink()
    r = fit_head(FitHeadConfig(cache=cache, epochs=1, runs_dir=str(tmp_path / "runs")))
    assert "1 removed (e.g. red/red.0.jpg)" in r["source_changed"]
    assert "changed since extraction" in caplog.text


@pytest.mark.parametrize("field, value, message", [
    ("val_fraction", 1.0, "--val-fraction"), ("epochs", 0, "--epochs"), ("lr", -1.0, "--lr"),
    ("dropout", 1.0, "--dropout"),
])
def test_bad_options_are_value_errors(cache, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        fit_head(FitHeadConfig(cache=cache, runs_dir=str(tmp_path / "runs"), **{field: value}))


@pytest.mark.slow
def test_real_vgg16_features_separate_cats_and_dogs(shared_available, tmp_path):
    from tests.conftest import SHARED_CATSDOGS, SHARED_WEIGHTS

    r = extract(ExtractConfig(data=str(SHARED_CATSDOGS), n=40, weights=str(SHARED_WEIGHTS),
                              cache_dir=str(tmp_path / "f"), batch_size=20, workers=1))
    assert r["rows"] == 40 and r["feature_shape"] == [512, 7, 7]
    with FeatureCache(r["cache"]) as c:
        assert np.bincount(c.labels).tolist() == [20, 20] and c.attrs["weights"] == "file:vgg16_features_imagenet.pt"
        assert c.attrs["mean"][0] == pytest.approx(0.485, abs=1e-3)  # from the sidecar, not hand-copied
    fit = fit_head(FitHeadConfig(cache=r["cache"], epochs=10, val_fraction=0.25, runs_dir=str(tmp_path / "runs")))
    assert fit["val_rows"] == 10 and fit["val_acc"] >= 0.9
