"""One checkpoint writer and reader for every kind: a recorded format version, weights_only loads, and the
checkpoints written before versions were recorded still read."""
import pytest
import torch

from pipeline.heads.checkpoints import FORMAT_VERSION, read_checkpoint, write_checkpoint
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.models.whole_models import build_model, load_model, save_model


@pytest.fixture
def head_pt(tiny_cache, tmp_path):
    r = fit_head(FitHeadConfig(head="logreg", cache=str(tiny_cache), runs_dir=str(tmp_path / "runs")))
    return r["checkpoint"]


def test_every_kind_records_its_kind_and_format_version(head_pt, tmp_path):
    lm = build_model("tiny", "none", ["blue", "red"])
    model_pt = save_model(lm, tmp_path / "model.pt", "train", {}, {}, [])
    for path, kind in ((head_pt, "fit-head"), (model_pt, "train")):
        ckpt = torch.load(path, weights_only=True)
        assert (ckpt["kind"], ckpt["format_version"]) == (kind, FORMAT_VERSION)
        assert read_checkpoint(path)["kind"] == kind


def test_a_fit_head_checkpoint_written_the_old_way_still_loads_and_predicts_the_same(head_pt, tmp_path, image_folder):
    """Before the one writer, fit-head saved its dict with torch.save and no format_version."""
    old = torch.load(head_pt, weights_only=True)
    old.pop("format_version")
    torch.save(old, tmp_path / "old.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_model(tmp_path / "old.pt").model(x), load_model(head_pt).model(x))


def test_a_newer_format_version_is_refused_in_one_line(head_pt, tmp_path):
    torch.save({**torch.load(head_pt, weights_only=True), "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="format version 2; this tool reads versions 0 to 1"):
        read_checkpoint(tmp_path / "new.pt")


def test_the_writer_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        write_checkpoint(tmp_path / "x.pt", "mystery", {})
    assert not (tmp_path / "x.pt").exists()
