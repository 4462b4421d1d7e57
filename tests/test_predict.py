"""predict (model.pt and fit-head head.pt, bad files, table/CSV/JSON) and imagenet-check."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from pipeline.extraction import backbones as bb
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.models.predict import PredictConfig, PredictResult, predict
from pipeline.models.whole_models import build_model, save_model

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


@pytest.fixture
def model_pt(tmp_path):
    torch.manual_seed(0)
    lm = build_model("tiny", "none", ["blue", "red"])
    with torch.no_grad():  # a head that tells the colours apart: red channel minus blue channel
        w = torch.zeros(2, 8, 8, 8)
        w[1, :, :, :] = lm.model.features[0].weight[:, 0].mean((1, 2)).view(8, 1, 1)
        w[0] = -w[1]
        lm.model.head.linear.weight.copy_(w.flatten(1))
        lm.model.head.linear.bias.zero_()
    path = tmp_path / "model.pt"
    save_model(lm, path, "train", {}, {}, [])
    return path


def _folder_with_bad_files(image_folder):
    (image_folder / "red" / "empty.jpg").write_bytes(b"")
    (image_folder / "blue" / "text.png").write_text("not an image")
    (image_folder / "blue" / "notes.txt").write_text("ignored: not an image name")
    return image_folder


def test_predict_folder_reports_bad_files_per_row(tmp_path, image_folder, model_pt):
    data = _folder_with_bad_files(image_folder)
    result = predict(PredictConfig(paths=[str(data)], model=str(model_pt), workers=0, batch_size=5))
    rows = result.rows
    assert isinstance(result, PredictResult) and result.files == 26 and result.output is None
    assert len(rows) == 26 and result.errors == 2  # 24 images + 2 bad ones, notes.txt left out
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # input order kept around the bad ones
    bad = {r["path"].rsplit("/", 1)[1]: r for r in rows if r["error"]}
    assert bad["empty.jpg"]["error"] == "zero-byte file" and bad["empty.jpg"]["class"] is None
    assert bad["text.png"]["error"].startswith("not an image")
    good = [r for r in rows if not r["error"]]
    assert all(0.5 <= r["probability"] <= 1 for r in good)
    assert sum(r["class"] == r["path"].split("/")[-2] for r in good) >= 20


def test_a_broken_link_named_alone_gets_its_row_as_in_a_folder(tmp_path, image_folder, model_pt):
    """predict photos/*.jpg, the glob holding a dangling link or a link loop: 'does not exist' (exit 2), the whole
    run refused, though the file is there (ls shows it) and predict photos/ gave it a row saying what it is."""
    blue = image_folder / "blue"
    (blue / "gone.jpg").symlink_to("nowhere.jpg")
    (blue / "a.jpg").symlink_to("b.jpg")
    (blue / "b.jpg").symlink_to("a.jpg")
    named = [str(blue / n) for n in ("gone.jpg", "a.jpg", "blue.0.jpg")]
    r = CliRunner().invoke(cli.cli, ["predict", *named, "--model", str(model_pt), "--json", "--workers", "0"])
    assert r.exit_code == 0, r.output
    rows = {Path(row["path"]).name: row for row in json.loads(r.stdout)}
    assert rows["gone.jpg"]["error"] == "a dangling symlink (to 'nowhere.jpg')"
    assert rows["a.jpg"]["error"] == "a symlink loop, not a file" and rows["blue.0.jpg"]["class"] == "blue"
    folder = predict(PredictConfig(paths=[str(blue)], model=str(model_pt), workers=0))
    assert {Path(row["path"]).name: row["error"] for row in folder.rows if row["error"]} == {
        n: rows[n]["error"] for n in ("gone.jpg", "a.jpg")} | {"b.jpg": "a symlink loop, not a file"}


def test_a_named_pipe_named_alone_gets_its_row_as_in_a_folder(tmp_path, image_folder, model_pt):
    """predict photos/*.jpg, the glob holding a named pipe: 'is neither a file nor a folder' (exit 2), the whole run
    refused, where predict photos/ gave it a row 'not a regular file (a named pipe)'. Now that row; never opened."""
    import os
    import signal

    os.mkfifo(image_folder / "blue" / "pipe.jpg")
    named = [str(image_folder / "blue" / n) for n in ("pipe.jpg", "blue.0.jpg")]
    signal.alarm(60)  # an open of the pipe would block: fail instead of hanging
    try:
        r = CliRunner().invoke(cli.cli, ["predict", *named, "--model", str(model_pt), "--json", "--workers", "0"])
    finally:
        signal.alarm(0)
    assert r.exit_code == 0, r.output
    rows = {Path(row["path"]).name: row for row in json.loads(r.stdout)}
    assert rows["pipe.jpg"]["error"] == "not a regular file (a named pipe)" and rows["blue.0.jpg"]["class"] == "blue"


def test_predict_same_rows_whatever_the_batch_size(image_folder, model_pt):
    data = _folder_with_bad_files(image_folder)
    a = predict(PredictConfig(paths=[str(data)], model=str(model_pt), workers=0, batch_size=3, precision="fp32"))
    b = predict(PredictConfig(paths=[str(data)], model=str(model_pt), workers=0, batch_size=64, precision="fp32"))
    assert [(r["path"], r["class"], r["error"]) for r in a.rows] == [(r["path"], r["class"], r["error"])
                                                                       for r in b.rows]
    # unreadable files have no probability (None): compare those positions exactly, the rest with a tolerance
    assert [r["probability"] is None for r in a.rows] == [r["probability"] is None for r in b.rows]
    good = [(x["probability"], y["probability"]) for x, y in zip(a.rows, b.rows) if x["probability"] is not None]
    assert len(good) >= 20
    assert [x for x, _ in good] == pytest.approx([y for _, y in good], rel=1e-5)


def test_predict_cli_writes_csv_and_json(tmp_path, image_folder, model_pt):
    data = _folder_with_bad_files(image_folder)
    out = tmp_path / "pred.csv"
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["predict", str(data / "red"), str(data / "blue" / "blue.0.jpg"),
                                     "--model", str(model_pt), "--format", "csv", "--output", str(out),
                                     "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and "1 unreadable" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "class", "probability", "unknown", "ood_score", "error", "note"]
    assert len(rows) == 14
    assert rows[0]["error"] == "zero-byte file" and rows[-1]["path"].endswith("blue.0.jpg")
    as_json = runner.invoke(cli.cli, ["predict", str(data / "red" / "red.1.jpg"), "--model", str(model_pt),
                                      "--format", "json", "--workers", "0"])
    first = json.loads(as_json.stdout)[0]
    assert first["class"] in ("red", "blue")
    assert first["unknown"] is None and first["ood_score"] is None  # a model saved before the unknown score
    table = runner.invoke(cli.cli, ["predict", str(data / "red"), "--model", str(model_pt), "--workers", "0"])
    assert table.stdout.splitlines()[0].split() == ["path", "class", "probability", "unknown", "ood_score", "error"]
    missing = runner.invoke(cli.cli, ["predict", str(tmp_path / "nope"), "--model", str(model_pt)])
    assert missing.exit_code == 2 and "nope' does not exist" in missing.output


def test_predict_with_a_fit_head_checkpoint(tmp_path, image_folder, make_cache):
    cache = make_cache(image_folder).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=10, runs_dir=str(tmp_path / "runs")))
    result = predict(PredictConfig(paths=[str(image_folder)], model=head.checkpoint, workers=0))
    assert result.kind == "fit-head" and result.errors == 0
    correct = [r["class"] == r["path"].split("/")[-2] for r in result.rows]
    assert sum(correct) / len(correct) >= 0.9


def test_imagenet_check_refuses_weights_without_the_classifier(tmp_path, image_folder):
    features_only = tmp_path / "tiny_features.pt"
    torch.save({f"features.{k}": v for k, v in bb.load_backbone("tiny", "none").features.state_dict().items()},
               features_only)
    image = str(image_folder / "red" / "red.0.jpg")
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["imagenet-check", image, "--backbone", "tiny", "--weights", str(features_only)])
    assert result.exit_code == 2
    assert "cover only the features of tiny, not its ImageNet classifier" in result.output
    result = runner.invoke(cli.cli, ["imagenet-check", image, "--backbone", "tiny", "--weights", "none"])
    assert result.exit_code == 2 and "are random" in result.output


@pytest.mark.parametrize("name, content", [("missing.jpg", None), ("empty.jpg", b""), ("text.jpg", b"not a photo")])
def test_imagenet_check_refuses_a_bad_image_before_loading_the_weights(tmp_path, monkeypatch, name, content):
    """A typo in the image's name first downloaded VGG-16's 528 MB, then failed."""
    def no_load(*a, **kw):
        raise AssertionError("the weights were loaded for an image that cannot be read")

    monkeypatch.setattr(bb, "load_backbone", no_load)
    image = tmp_path / name
    if content is not None:
        image.write_bytes(content)
    result = CliRunner().invoke(cli.cli, ["imagenet-check", str(image)])
    assert result.exit_code == 2 and result.output.startswith(f"Error: {image}: "), result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_imagenet_check_refuses_a_bad_device_before_loading_the_weights(image_folder, monkeypatch, device):
    """--device tpu first downloaded VGG-16's 528 MB (or failed offline), and only then was refused."""
    def no_load(*a, **kw):
        raise AssertionError("the weights were loaded for a device that does not exist")

    monkeypatch.setattr(bb, "load_backbone", no_load)
    result = CliRunner().invoke(cli.cli, ["imagenet-check", str(image_folder / "red" / "red.0.jpg"),
                                          "--device", device])
    assert result.exit_code == 2 and result.output.startswith(f"Error: unknown device '{device}'; allowed: ")
    assert len(result.output.strip().splitlines()) == 1


def test_imagenet_check_top5_names_from_the_weights_meta(tmp_path, image_folder):
    full = tmp_path / "resnet18_full.pt"
    torch.save(bb.load_backbone("resnet18", "none").model.state_dict(), full)  # random, but with a classifier
    result = CliRunner().invoke(cli.cli, ["imagenet-check", str(image_folder / "red" / "red.0.jpg"),
                                          "--backbone", "resnet18", "--weights", str(full), "--json"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.stdout)["top"]
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert all(isinstance(t["class"], str) and t["class"] for t in top)
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert top[0]["class"] == bb.torchvision_weights(bb.get_spec("resnet18"), "DEFAULT").meta["categories"][
        top[0]["index"]]
    from pipeline.models.predict import ImagenetCheckResult, imagenet_check

    r = imagenet_check(str(image_folder / "red" / "red.0.jpg"), backbone="resnet18", weights=str(full), top=2)
    assert isinstance(r, ImagenetCheckResult) and [t["index"] for t in r.top] == [t["index"] for t in top[:2]]
    # an animated GIF was classified by its first frame without a word: now the one warning predict gives
    from tests.test_image_reader import several_frames

    several_frames(tmp_path / "anim.gif", "GIF", 4)
    result = CliRunner().invoke(cli.cli, ["imagenet-check", str(tmp_path / "anim.gif"), "--backbone", "resnet18",
                                          "--weights", str(full), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert ("1 file holds more than one frame (an animated GIF, PNG or WebP, a multi-page TIFF) and was read from the "
            f"first frame alone (e.g. {tmp_path / 'anim.gif'}: 4 frames)") in result.stderr, result.stderr
    assert result.stderr.count("more than one frame") == 1


def test_predict_exits_1_when_no_input_could_be_classified(tmp_path, model_pt):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    result = CliRunner().invoke(cli.cli, ["predict", str(bad), "--model", str(model_pt), "--workers", "0"])
    assert result.exit_code == 1
    assert "1 image, all unreadable" in result.stderr  # singular, and no speed where nothing was classified
    assert "none of the 1 input could be classified" in result.stderr


def test_an_empty_name_is_refused_not_taken_for_the_working_folder(tmp_path, image_folder, model_pt, monkeypatch):
    """predict "$PHOTOS" with PHOTOS unset classified the working folder (Path('') is '.'), recursively; an empty
    --explain wrote no heatmap and an empty --output wrote to stdout, both exiting 0."""
    import pipeline

    monkeypatch.chdir(image_folder)  # a folder of photos: an empty name must not mean it
    model = str(model_pt)
    for args, message in (([""], "'' is an empty name: give an image file or a folder"),
                          (["red", "--explain", ""], "'--explain': '' is an empty name; give a folder"),
                          (["red", "--output", ""], "'--output': '' is an empty name; give a file")):
        r = CliRunner().invoke(cli.cli, ["predict", *args, "--model", model, "--workers", "0"])
        assert r.exit_code == 2 and message in r.stderr and r.stdout == "", (args, r.output)
    with pytest.raises(pipeline.UsageError, match=r"^'' is an empty name"):
        pipeline.predict_files(model, [""], workers=0)
    with pytest.raises(pipeline.UsageError,
                       match=r"^predict_files: explain '' is an empty name; give a folder, or leave explain out"):
        pipeline.predict_files(model, ["red"], workers=0, explain="")  # the keyword passed, not '--explain'
    with pytest.raises(pipeline.UsageError, match=r"^predict_files: output '' is an empty name; give a file"):
        pipeline.predict_files(model, ["red"], workers=0, output="")
    assert sorted(p.name for p in image_folder.iterdir()) == ["blue", "red"]  # nothing written among the photos


def test_predict_output_never_overwrites_an_input_and_is_never_half_written(tmp_path, image_folder, model_pt):
    image = image_folder / "red" / "red.0.jpg"
    before = image.read_bytes(), model_pt.read_bytes()
    for target in (image, model_pt):
        r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt),
                                         "--output", str(target), "--workers", "0"])
        assert r.exit_code == 2 and "is one of the inputs" in r.stderr
    assert (image.read_bytes(), model_pt.read_bytes()) == before
    out = tmp_path / "rows.csv"
    out.write_text("the previous results\n")

    def broken(*a, **k):
        yield {"path": "x", "class": "red", "probability": 0.9, "error": None}
        raise OSError(28, "No space left on device")

    import pipeline.models.predict as predict_mod

    real = predict_mod.iter_predictions
    predict_mod.iter_predictions = broken
    try:
        r = CliRunner().invoke(cli.cli, ["predict", str(image), "--model", str(model_pt), "--format", "csv",
                                         "--output", str(out), "--workers", "0"])
    finally:
        predict_mod.iter_predictions = real
    assert r.exit_code == 1 and "rows.csv: no space left" in r.stderr
    assert out.read_text() == "the previous results\n"  # the old file stands; no half-written one
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_predict_output_never_replaces_what_a_head_reads(tmp_path, image_folder, make_cache):
    """A head's cache and training photos are its inputs too, even when predict is given other photos."""
    cache = make_cache(image_folder, dtype="float32").cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, runs_dir=str(tmp_path / "runs"))).checkpoint
    photo = image_folder / "red" / "red.0.jpg"
    elsewhere = tmp_path / "new.jpg"
    elsewhere.write_bytes(photo.read_bytes())
    before = {p: open(p, 'rb').read() for p in (cache, photo)}
    for target, why in ((cache, "is one of the inputs (the model's cache"), (photo, "is inside the data folder"),
                        (image_folder / "red" / "rows.csv", "is inside the data folder")):
        r = CliRunner().invoke(cli.cli, ["predict", str(elsewhere), "--model", head, "--output", str(target),
                                         "--format", "csv", "--workers", "0"])
        assert r.exit_code == 2 and why in r.stderr, (target, r.output)
    assert {p: open(p, 'rb').read() for p in before} == before and not (image_folder / "red" / "rows.csv").exists()


def test_a_name_that_is_not_utf8_is_refused_before_any_work(tmp_path, image_folder):
    import os

    from pipeline.models.predict import list_inputs

    (image_folder / "red" / "red.0.jpg").rename(image_folder / "red" / os.fsdecode(b"caf\xe9.jpg"))
    with pytest.raises(ValueError) as e:
        list_inputs([str(image_folder)])
    # the name as the other messages show it: one backslash (repr of the escaped name wrote 'caf\\\\xe9.jpg')
    assert str(e.value).startswith(f"'{image_folder / 'red'}/caf\\xe9.jpg': the file name is not valid UTF-8"), e.value
    assert "\\\\" not in str(e.value)


def test_a_folder_that_cannot_be_read_or_is_reached_twice_is_said(tmp_path, image_folder, monkeypatch, caplog):
    """predict DIR left out a sub-folder the OS would not list, and a link back up the tree, in silence: their
    photos had no rows and nothing said why. Each is one line naming it."""
    import logging

    from pipeline.models.predict import list_inputs
    from tests.fsfaults import unlistable

    (image_folder / "red" / "locked").mkdir()
    (image_folder / "red" / "up").symlink_to("..", target_is_directory=True)
    unlistable(monkeypatch, image_folder / "red" / "locked")
    with caplog.at_level(logging.WARNING):
        files = list_inputs([str(image_folder)])
    assert len(files) == 24 and not any("locked" in f or "/up/" in f for f in files)
    said = [r.getMessage() for r in caplog.records]
    assert f"{image_folder / 'red' / 'locked'}: cannot be read (Permission denied): its files are left out" in said
    assert any(m.startswith(f"{image_folder / 'red' / 'up'}: a link to a folder listed already") for m in said)


def test_the_table_keeps_one_line_per_file_whatever_its_name_holds():
    from pipeline.models.predict import format_rows

    rows = [{"path": "cats/a\nb.jpg", "class": "cat\x1b[31m", "probability": 0.9, "error": None},
            {"path": "cats/c.jpg", "class": None, "probability": None, "error": "unreadable:\nmore"}]
    lines = format_rows(rows, "table").splitlines()
    assert len(lines) == 3 and "cats/a\\nb.jpg" in lines[1] and "cat\\x1b[31m" in lines[1]
    assert lines[2].endswith("unreadable:\\nmore")


def test_predict_csv_never_starts_a_cell_with_a_formula(tmp_path, image_folder, model_pt, monkeypatch):
    """A photo named like a spreadsheet formula, given by its relative name: the cell is written behind a
    single quote (OWASP), in the file and on stdout, so a spreadsheet shows the name instead of running it."""
    odd = "=cmd|' calc'!A0.jpg"
    shutil.copy(image_folder / "red" / "red.0.jpg", image_folder / "red" / odd)
    monkeypatch.chdir(image_folder / "red")
    out = tmp_path / "pred.csv"
    args = ["predict", odd, "--model", str(model_pt), "--format", "csv", "--workers", "0"]
    written = CliRunner().invoke(cli.cli, [*args, "--output", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text().splitlines()[1].startswith("'=cmd|' calc'!A0.jpg,")
    printed = CliRunner().invoke(cli.cli, args)
    assert printed.stdout.splitlines()[1].startswith("'=cmd|' calc'!A0.jpg,")


def _rows(n: int) -> list[dict]:
    """``n`` rows as predict makes them, unknown true, false, true..."""
    return [{"path": f"p{i}.jpg", "class": "red", "probability": 0.9, "unknown": i % 2 == 0, "ood_score": 0.5,
             "error": None} for i in range(n)]


def _rows_then(stop, n: int = 3):
    """A stand-in for iter_predictions: ``n`` rows, then ``stop`` raised (Ctrl-C)."""

    def rows(*a, **k):
        yield from _rows(n)
        raise stop

    return rows


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_ctrl_c_keeps_the_rows_already_computed(tmp_path, image_folder, model_pt, monkeypatch, fmt):
    """Ctrl-C lost every row (the temporary file was removed): now the file holds them, complete and valid."""
    import pipeline.models.predict as predict_mod

    monkeypatch.setattr(predict_mod, "iter_predictions", _rows_then(KeyboardInterrupt()))
    out = tmp_path / f"rows.{fmt}"
    r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--format", fmt,
                                     "--output", str(out), "--workers", "0"])
    assert r.exit_code == 130 and "interrupted: 3 of 24 rows written to" in r.stderr
    rows = list(csv.DictReader(out.open())) if fmt == "csv" else json.loads(out.read_text())
    assert [row["path"] for row in rows] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    shown = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--format", "csv",
                                         "--workers", "0"])  # no --output: the rows so far on stdout
    assert shown.exit_code == 130 and len(list(csv.DictReader(shown.stdout.splitlines()))) == 3


def test_booleans_are_true_false_in_every_format(tmp_path, image_folder, model_pt, monkeypatch):
    """CSV wrote Python's True/False, JSON true/false and the table yes/no: one rule now, JSON's words."""
    import pipeline.models.predict as predict_mod

    monkeypatch.setattr(predict_mod, "iter_predictions", lambda *a, **k: iter(_rows(2)))
    out = tmp_path / "rows.csv"
    r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--format", "csv",
                                     "--output", str(out), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert [row["unknown"] for row in csv.DictReader(out.open())] == ["true", "false"]  # streamed
    rows = _rows(2)
    assert [row["unknown"] for row in csv.DictReader(predict_mod.format_rows(rows, "csv").splitlines())] == \
        ["true", "false"]
    assert [line.split()[3] for line in predict_mod.format_rows(rows, "table").splitlines()[1:]] == ["true", "false"]
    assert [row["unknown"] for row in json.loads(predict_mod.format_rows(rows, "json"))] == [True, False]


def test_quiet_predict_says_how_many_files_were_bad_in_one_line(image_folder, model_pt):
    """-q printed a warning per bad file (50,000 lines for 50,000): now one line with the count."""
    data = _folder_with_bad_files(image_folder)
    r = CliRunner().invoke(cli.cli, ["-q", "predict", str(data), "--model", str(model_pt), "--workers", "0"])
    assert r.exit_code == 0 and r.stderr.splitlines() == ["2 of 26 files could not be read (their rows say why)"]
    loud = CliRunner().invoke(cli.cli, ["predict", str(data), "--model", str(model_pt), "--workers", "0"])
    assert "empty.jpg: zero-byte file" in loud.stderr  # without -q each file is still named


def test_sigterm_while_writing_keeps_the_rows_too(tmp_path, image_folder, model_pt, monkeypatch):
    import pipeline.models.predict as predict_mod
    from pipeline.files import Terminated

    monkeypatch.setattr(predict_mod, "iter_predictions", _rows_then(Terminated(143), n=2))
    out = tmp_path / "rows.csv"
    r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--format", "csv",
                                     "--output", str(out), "--workers", "0"])
    assert r.exit_code == 143 and [row["path"] for row in csv.DictReader(out.open())] == ["p0.jpg", "p1.jpg"]


def test_the_one_loop_gives_every_item_in_order_and_reports_a_bad_file_once(image_folder, model_pt, caplog):
    """predict, evaluate --data, train's validation and the API all read images through iter_log_proba."""
    from PIL import Image

    from pipeline.models.predict import ImageOutputs, iter_log_proba, outputs_of_inputs, read_images
    from pipeline.models.whole_models import load_model, network

    data = _folder_with_bad_files(image_folder)
    lm = load_model(model_pt)
    model = network(lm, "cpu", "fp32")
    pairs = [(str(p), 0) for p in sorted(data.rglob("*.*g"))]
    got = ImageOutputs()
    for _ in range(2):  # two passes (train's epochs): each bad file is logged once
        got.clear()
        got.collect(iter_log_proba(model, read_images(pairs, lm.transform, model, 5, 0), 5))
    assert sorted(got.bad) == sorted(str(p) for p in (data / "red" / "empty.jpg", data / "blue" / "text.png"))
    assert sum("skipping" in r.message for r in caplog.records) == 2
    assert got.paths == [p for p, _ in pairs if p not in got.bad] and len(got.rows) == 24
    # the API's inputs: files, a folder and PIL images, through the same loop, in the order given
    good = got.paths[:2]
    mixed = outputs_of_inputs(lm, model, [good[0], Image.open(good[1]), good[1]], batch_size=2)
    assert np.allclose(mixed, np.stack([got.rows[0], got.rows[1], got.rows[1]]), atol=1e-6)


def test_an_output_named_csv_or_json_gets_that_format_without_format(tmp_path, image_folder, model_pt):
    """`predict DIR --output pred.json` wrote the table into pred.json (no JSON reader takes it), and pred.csv was
    a table too; the default table now follows the output's name. The other format asked for into such a file is
    refused, as export refuses one (--format csv --output pred.json wrote CSV into pred.json)."""
    def run(name, *more):
        out = tmp_path / name
        r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--output", str(out),
                                         "--workers", "0", *more])
        assert r.exit_code == 0, r.output
        return out.read_text()

    assert len(json.loads(run("pred.json"))) == 24
    rows = list(csv.DictReader(run("pred.CSV").splitlines()))
    assert len(rows) == 24 and list(rows[0])[:2] == ["path", "class"]
    assert run("pred.txt").split()[:2] == ["path", "class"] and "," not in run("pred.txt").splitlines()[0]
    r = CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--output",
                                     str(tmp_path / "o.json"), "--format", "csv"])
    assert r.exit_code == 2 and r.output == (f"Error: --output {str(tmp_path / 'o.json')!r} names a json file but "
                                             "--format is 'csv': give --format json, or an --output named .csv\n")
    assert not (tmp_path / "o.json").exists()
    assert run("pred.json", "--format", "json").startswith("[")


def test_a_photo_stored_sideways_with_its_orientation_tag_predicts_as_the_upright_photo(tmp_path):
    """Phone photos: before, predict saw the pixels as stored (sideways) and gave other probabilities; now the
    same photo stored turned with its EXIF Orientation predicts exactly as the upright photo (a random-weight
    head: its weights differ across the map, so a turn changes what it says)."""
    from PIL import Image

    from tests.test_image_reader import STORED_AS, photo_like, save_turned

    torch.manual_seed(1)
    lm = build_model("tiny", "none", ["a", "b", "c"])
    save_model(lm, tmp_path / "model.pt", "train", {}, {}, [])
    up = Image.fromarray(photo_like(60, 40, seed=4))
    up.save(tmp_path / "up.png")
    for k in (3, 6, 8):
        save_turned(up, tmp_path / f"turned{k}.png", k)
    up.transpose(STORED_AS[6]).save(tmp_path / "sideways.png")  # no tag: the photo is sideways
    names = ["up.png", "turned3.png", "turned6.png", "turned8.png", "sideways.png"]
    import pipeline

    probs = pipeline.Model.load(tmp_path / "model.pt").predict_proba([str(tmp_path / n) for n in names])
    np.testing.assert_allclose(probs[1:4], probs[[0, 0, 0]], atol=1e-6)
    assert np.abs(probs[4] - probs[0]).max() > 1e-3  # a turn does show
    from PIL import ImageOps

    from pipeline.data.folders import load_rgb

    opened = Image.open(tmp_path / "turned6.png")  # in memory, as opened (the tag kept; it was read sideways)
    turned = [ImageOps.exif_transpose(opened), load_rgb(tmp_path / "turned6.png")]  # upright already
    in_memory = pipeline.Model.load(tmp_path / "model.pt").predict_proba([opened, *turned])
    np.testing.assert_allclose(in_memory, probs[[0, 0, 0]], atol=1e-6)  # turned once, not twice
    rows = predict(PredictConfig(paths=[str(tmp_path / n) for n in names[:3]], model=str(tmp_path / "model.pt"),
                                 workers=0, precision="fp32")).rows  # the command: the same rows
    assert rows[1]["class"] == rows[0]["class"] and rows[1]["probability"] == pytest.approx(rows[0]["probability"])


def test_a_head_fitted_on_a_cache_of_the_old_decoding_rule_predicts_and_says_what_to_do(tmp_path, image_folder,
                                                                                        make_cache, old_decoding,
                                                                                        caplog):
    """A head fitted before photos were turned upright (decode_version 2) still predicts (same backbone, the
    photos decoded now), with one line saying what it learnt from and how to fit it on upright photos."""
    import logging

    with old_decoding():
        old = make_cache(image_folder, dtype="float32").cache
    head = fit_head(FitHeadConfig(head="linear", cache=old, epochs=1, runs_dir=str(tmp_path / "runs"))).checkpoint
    with caplog.at_level(logging.WARNING):
        rows = predict(PredictConfig(paths=[str(image_folder / "red" / "red.0.jpg")], model=head, workers=0)).rows
    assert rows[0]["class"] in ("blue", "red")
    said = [r.getMessage() for r in caplog.records if "older rule" in r.getMessage()]
    assert len(said) == 1 and "fitted on photos decoded by the older rule 2 (now 3" in said[0]
    assert "extract its data again and fit it on that cache" in said[0] and "\n" not in said[0]


def test_json_prints_the_rows_as_json_like_every_command(tmp_path, image_folder, model_pt):
    """Every command has --json for scripts but predict ('No such option: --json'): it is --format json."""
    def run(*more):
        return CliRunner().invoke(cli.cli, ["predict", str(image_folder), "--model", str(model_pt), "--workers", "0",
                                            *more])

    as_json, as_format = run("--json"), run("--format", "json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == json.loads(as_format.stdout)
    assert len(json.loads(as_json.stdout)) == 24
    both = run("--json", "--format", "csv")
    assert both.exit_code == 2 and both.output == "Error: --json and --format csv ask for two formats: give one\n"


def test_a_feature_cache_given_as_a_photo_is_named_so(tmp_path, tiny_cache, model_pt):
    """predict --model HEAD features.h5 said '0 x 0 pixels: an empty image' (Pillow's HDF5 stub knows the file):
    the user is told it is a feature cache and what scores one, before any image is read."""
    renamed = tmp_path / "features.bin"
    shutil.copy(tiny_cache, renamed)
    for cache in (tiny_cache, renamed):
        res = CliRunner().invoke(cli.cli, ["predict", str(cache), "--model", str(model_pt), "--workers", "0"])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert f"'{cache}' is a feature cache, not a photo" in res.output and "evaluate --model" in res.output
        assert "Head.load" in res.output and "pixels" not in res.output


def test_an_output_that_is_a_pipe_or_a_device_is_written_into_never_replaced(tmp_path, image_folder, model_pt):
    """predict --output /dev/null wrote its rows beside the device and renamed them onto it: as root, /dev/null
    became a regular file (every later '> /dev/null' on the machine then filled it). A pipe (what /dev/null and
    /dev/stdout are to a rename) now takes the rows as they come and stays a pipe."""
    import os
    import stat
    import threading

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    r = CliRunner().invoke(cli.cli, ["predict", str(image_folder / "red"), "--model", str(model_pt), "--workers", "0",
                                     "--output", str(fifo)])
    reader.join(10)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the pipe was replaced by a file"
    assert got and got[0].startswith("path,class,probability") and len(got[0].splitlines()) == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.pt", "rows.csv"]  # no temporary file left


def test_an_output_named_as_an_image_is_refused_and_the_photo_there_kept(tmp_path, image_folder, model_pt):
    """predict red.0.jpg --output red.1.jpg (one photo named, so its folder is no input) wrote the table over the
    photo red.1.jpg; a new out.png would be read as a photo by the next predict of its folder."""
    photo, other = image_folder / "red" / "red.0.jpg", image_folder / "red" / "red.1.jpg"
    before = other.read_bytes()
    for target in (other, tmp_path / "rows.PNG"):
        r = CliRunner().invoke(cli.cli, ["predict", str(photo), "--model", str(model_pt), "--output", str(target),
                                         "--workers", "0"])
        assert r.exit_code == 2 and "is named as an image" in r.stderr and ".csv, .json or .txt" in r.stderr
    assert other.read_bytes() == before and not (tmp_path / "rows.PNG").exists()
