import pytest

from pipeline.compare import CompareConfig, compare_sklearn, format_table
from pipeline.extract import ExtractConfig, extract
from pipeline.head import FitHeadConfig
from tests.conftest import make_image_folder


def test_both_models_on_the_same_split(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "d", per_class=16, classes=("blue", "green", "red"))
    cache = extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none",
                                  cache_dir=str(tmp_path / "f"), workers=0))["cache"]
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
    assert "sklearn LogisticRegression" in table and "torch Linear+LogSoftmax" in table and "36" not in table.split("\n")[0]


def test_bad_C_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="--C must be positive"):
        compare_sklearn(CompareConfig(cache=str(tmp_path / "x.h5"), C=0))
