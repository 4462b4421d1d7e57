"""One checkpoint writer and reader for every kind: a recorded format version, weights_only loads, and the
checkpoints written before versions were recorded still read."""
import pytest
import torch

from pipeline.errors import UsageError
from pipeline.heads.checkpoints import FORMAT_VERSION, read_checkpoint, write_checkpoint
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.models.whole_models import build_model, load_model, save_model


@pytest.fixture
def head_pt(tiny_cache, tmp_path):
    r = fit_head(FitHeadConfig(head="logreg", cache=str(tiny_cache), runs_dir=str(tmp_path / "runs")))
    return r.checkpoint


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


def test_a_folder_given_as_the_model_is_said_to_be_a_folder(tmp_path):
    """pipeline.Model.load(run_dir) (the run folder, not its head.pt) said the folder 'does not exist'."""
    with pytest.raises(UsageError, match=r"model file '.*' is a folder: name the head.pt or model.pt in it"):
        read_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        read_checkpoint(tmp_path / "head.pt")


def test_the_writer_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        write_checkpoint(tmp_path / "x.pt", "mystery", {})
    assert not (tmp_path / "x.pt").exists()


def test_an_export_or_other_foreign_file_is_named_for_what_it_is(tmp_path, capfd):
    """A TorchScript export, an ONNX file, a JSON sidecar or an empty file given as a checkpoint: one line
    saying what the file is (not 'pickled Python objects', which they are not), and no torch warning."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "export.pt")
    (tmp_path / "export.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))
    (tmp_path / "export.onnx.json").write_text('{"classes": ["a", "b"]}')
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "photo.pt").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (tmp_path / "other.pt").write_bytes(b"text")
    for name, reason in [("export.pt", "TorchScript archive"),
                         ("export.onnx", "it is an ONNX export (run by onnxruntime: examples/predict_onnx.py), not a "
                                         "file torch.save wrote; give the checkpoint it was exported from"),
                         ("export.onnx.json", "it is JSON (an export's metadata?), not a file torch.save wrote"),
                         ("photo.pt", "it is an image, not a file torch.save wrote"),
                         ("other.pt", "it is not a file torch.save wrote: an ONNX export, JSON, an image?"),
                         ("empty.pt", "empty")]:
        with pytest.raises(ValueError, match="is not a loadable checkpoint") as e:
            read_checkpoint(tmp_path / name)
        assert reason in str(e.value) and "pickled" not in str(e.value), (name, str(e.value))
    assert "TorchScript" not in capfd.readouterr().err


def test_a_checkpoint_cut_short_is_said_to_be_cut_short_wherever_the_copy_stopped(tmp_path):
    """A head.pt copied in part read "...a high likelihood that your checkpoint file is)" (torch's line cut at
    200 characters) or "[Errno 22] Invalid argument", by where it stopped."""
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(64, 1024)}, whole)
    data = whole.read_bytes()
    for size in (100, len(data) // 3, len(data) - 100):
        (tmp_path / "cut.pt").write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"is not a loadable checkpoint \(it is cut short or damaged \(not the "
                                             r"whole zip archive torch.save writes\): copy or save it again\)$"):
            read_checkpoint(tmp_path / "cut.pt")


def test_a_models_record_of_its_photos_is_compact_and_a_damaged_one_refused_in_one_line(tmp_path):
    """model.pt keeps each training photo's sha256 as 32 bytes and its size (40 bytes a photo: 1 MB for 25,000,
    each photo once); a hand-edited record is refused naming the field, never a traceback in evaluate."""
    import hashlib

    from pipeline.models.trained_on import hex_digests, record

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(25_000)]
    rec = record(digests + digests[:10] + [""], list(range(25_000)) + list(range(10)) + [7])
    assert rec["sha256"].shape == (25_000, 32) and rec["sha256"].dtype == torch.uint8
    assert rec["sha256"].nbytes + rec["sizes"].nbytes == 25_000 * 40 and set(hex_digests(rec)) == set(digests)
    lm = build_model("tiny", "none", ["blue", "red"])
    path = save_model(lm, tmp_path / "model.pt", "train", {}, {}, [], trained_on=rec)
    assert torch.equal(read_checkpoint(path)["trained_on"]["sha256"], rec["sha256"])
    for bad in ({"sha256": rec["sha256"].long(), "sizes": rec["sizes"]}, {"sha256": rec["sha256"]},
                {"sha256": rec["sha256"], "sizes": rec["sizes"][:5]}):
        torch.save({**torch.load(path, weights_only=True), "trained_on": bad}, tmp_path / "bad.pt")
        with pytest.raises(UsageError, match="field 'trained_on' must be the training photos' sha256"):
            read_checkpoint(tmp_path / "bad.pt")
