import pytest

from pipeline.compare import CompareConfig, compare_sklearn, format_table
from pipeline.head import FitHeadConfig
from tests.conftest import make_image_folder


def test_both_models_on_the_same_split(tmp_path, monkeypatch, make_cache):
    data = make_image_folder(tmp_path / "d", per_class=16, classes=("blue", "green", "red"))
    cache = make_cache(data)["cache"]
    import pipeline.compare as compare

    seen = []
    real_split = compare.split_indices

    def spy(labels, val_fraction, seed):
        out = real_split(labels, val_fraction, seed)
        seen.append((val_fraction, seed, out[1].tolist()))
        return out

    monkeypatch.setattr(compare, "split_indices", spy)
    monkeypatch.setattr("pipeline.head.split_indices", spy)
    r = compare_sklearn(CompareConfig(cache=cache, val_fraction=0.25, seed=3,
                                      head=FitHeadConfig(epochs=3, runs_dir=str(tmp_path / "runs"))))
    assert len(seen) == 2 and seen[0] == seen[1]
    torch_head, sk = r["models"]
    assert torch_head["val_rows"] == sk["val_rows"] == 12
    assert sk["val_acc"] == 1.0 and torch_head["val_acc"] == 1.0
    assert 0 <= sk["val_loss"] < 0.5
    table = format_table(r)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "val", "acc", "val", "log-loss", "fit", "time"]
    assert lines[2].startswith("torch Linear+LogSoftmax") and lines[3].startswith("sklearn LogisticRegression")
    assert f"{sk['val_loss']:.4f}" in lines[3] and f"{torch_head['val_loss']:.4f}" in lines[2]
    assert lines[-1].startswith("(same split: 36 train / 12 val rows, seed 3; cache ")


def test_bad_C_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="--C must be positive"):
        compare_sklearn(CompareConfig(cache=str(tmp_path / "x.h5"), C=0))
