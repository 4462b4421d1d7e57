"""evaluate: hand-counted metrics, the checkpoint's own split, --data vs --cache, clear refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.reports.evaluate import EvaluateConfig, EvaluateResult, Predictions, evaluate, summarize
from pipeline.runs.ledger import read_runs
from tests.conftest import make_image_folder


def test_summarize_matches_a_hand_count():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.9, 0.05, 0.05],  # a -> a
        [0.2, 0.7, 0.1],  # a -> b (p 0.7)
        [0.6, 0.3, 0.1],  # a -> a
        [0.1, 0.8, 0.1],  # b -> b
        [0.05, 0.9, 0.05],  # b -> b
        [0.95, 0.03, 0.02],  # c -> a (p 0.95, the most confident error)
        [0.1, 0.1, 0.8],  # c -> c
    ])
    pred = Predictions(classes, Path("/data"), [f"x{i}.jpg" for i in range(7)], labels, np.log(probs), "hand")
    r = summarize(pred, top_k=5)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert r["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert r["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert [(w["path"], w["true"], w["pred"]) for w in r["wrong"]] == [("x5.jpg", "c", "a"), ("x1.jpg", "a", "b")]
    assert r["wrong"][0]["prob"] == pytest.approx(0.95) and r["errors"] == 2
    assert r["loss"] == pytest.approx(-np.log(probs[np.arange(7), labels]).mean())
    assert len(summarize(pred, top_k=1)["wrong"]) == 1


def test_macro_f1_leaves_out_classes_neither_in_the_photos_nor_called():
    """A folder of 2 of the model's 4 classes, all called one of those 2: macro F1 averages their F1s as
    scikit-learn does (it averaged in 0 for the 2 classes absent from both, halving it); a class that is called
    but absent counts, with F1 0."""
    from sklearn.metrics import f1_score

    classes = ["a", "b", "c", "d"]
    labels = np.array([0, 0, 1, 1])
    for called in ([0, 1, 1, 1], [0, 2, 1, 1]):
        probs = np.full((4, 4), 0.1)
        probs[np.arange(4), called] = 0.7
        r = summarize(Predictions(classes, Path("/data"), [f"x{i}.jpg" for i in range(4)], labels, np.log(probs),
                                  "hand"), top_k=5)
        assert r["macro_f1"] == pytest.approx(f1_score(labels, called, average="macro"))
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # a, b, and c (called once, absent)
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # called: wrong
    assert r["per_class"]["d"] == {"precision": None, "recall": None, "f1": None, "support": 0}  # no figures


def test_the_table_gives_no_figures_to_a_class_neither_in_the_photos_nor_called(tmp_path):
    """evaluate on a folder of some of the model's classes printed 0.000 precision, recall and F1 for the others,
    which read as classes always missed, under a macro F1 that rightly leaves them out."""
    from pipeline.reports.present import evaluate_text

    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    r = summarize(Predictions(["a", "b", "c"], Path("/data"), ["x0.jpg", "x1.jpg"], np.array([0, 1]), np.log(probs),
                              "hand"), top_k=5)
    from types import SimpleNamespace

    text = evaluate_text(SimpleNamespace(**r, foreign=False, source="hand", reliability_png="r.png",
                                         confusion_png="c.png", gallery_png="g.png"))
    assert "macro F1 1.000" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:5]}
    assert rows == {"a": ["1.000", "1.000", "1.000", "1"], "b": ["1.000", "1.000", "1.000", "1"],
                    "c": ["-", "-", "-", "0"]}


@pytest.fixture
def head_run(tmp_path, tiny_cache):
    return fit_head(FitHeadConfig(head="linear", cache=str(tiny_cache), epochs=3, val_fraction=0.25,
                                  runs_dir=str(tmp_path / "runs")))


def test_default_is_the_checkpoints_own_val_split(tmp_path, head_run):
    r = evaluate(EvaluateConfig(model=head_run.checkpoint, runs_dir=str(tmp_path / "runs")))
    assert r.rows == head_run.val_rows == 6
    assert r.accuracy == head_run.val_acc
    # the checkpoint is calibrated; without its temperature it gives exactly the fitted head's val loss
    assert r.calibration["before"]["log_loss"] == pytest.approx(head_run.val_loss, rel=1e-5)
    assert r.loss == r.calibration["after"]["log_loss"] and r.calibration["temperature"] != 1.0
    assert np.sum(r.confusion_matrix) == 6
    assert Path(r.confusion_png).is_file() and Path(r.reliability_png).is_file()
    # every row right: no gallery.png (it was a picture of 'no misclassified images'), and none named
    assert r.errors == 0 and r.gallery_png is None and not Path(r.run_dir, "gallery.png").exists()
    saved = json.loads(Path(r.run_dir, "metrics.json").read_text())
    assert isinstance(r, EvaluateResult) and saved["accuracy"] == r.accuracy
    assert list(r.to_dict()) == list(saved)  # --json's keys are metrics.json's, in its order


def test_val_split_of_a_held_out_cache_is_not_called_rows_the_refitted_head_saw(tmp_path, make_cache, image_folder,
                                                                                 caplog):
    """The default head is refitted on every row of its cache; on another cache (a held-out test folder's) the
    'val' rows are not rows it saw: the warning says the cache is not the model's and how few rows 'val' scores,
    not (as before) that the head saw them."""
    train = make_cache(image_folder).cache
    held_out = make_image_folder(tmp_path / "test", per_class=12, seed=5)
    test = make_cache(held_out, cache_dir=str(tmp_path / "test_features")).cache
    head = fit_head(FitHeadConfig(cache=train, runs_dir=str(tmp_path / "runs"))).checkpoint
    r = evaluate(EvaluateConfig(model=head, cache=test, split="val", runs_dir=str(tmp_path / "runs")))
    assert "is not the cache the model was trained on: 'val' scores 4 of its 24 rows" in caplog.text
    assert "rows it saw" not in caplog.text and r.rows == 4
    caplog.clear()  # by default (--split auto) a held-out cache is scored whole: its val slice was 4 of 24 rows
    r = evaluate(EvaluateConfig(model=head, cache=test, runs_dir=str(tmp_path / "runs")))
    assert r.rows == 24 and r.split == "all" and "not the cache" not in caplog.text
    caplog.clear()
    r = evaluate(EvaluateConfig(model=head, runs_dir=str(tmp_path / "runs")))  # its own cache: the refit note
    assert "these 'val' rows are rows it saw" in caplog.text and "not the cache" not in caplog.text
    # and where the figures are read (stdout's 'on 4 images (...)', --json's source): food10's default head read
    # 'accuracy 1.000 ... on 100 images (val rows of ...)' there, the note on stderr only
    assert r.source == f"val rows of {train}, rows the refitted head saw"
    assert evaluate(EvaluateConfig(model=head, split="all", runs_dir=str(tmp_path / "runs"))).source == \
        f"all rows of {train}, the head's training rows among them"


def test_a_cache_of_some_of_the_models_classes_is_scored_as_its_folder_is(tmp_path, make_cache):
    """evaluate --data took a test folder of 2 of the model's 3 classes, but --cache of the same folder was
    refused ('classes: (...) vs (...)'); now its labels are matched to the model's classes by name, the same
    figures as --data, and a cache with a class the model does not know is refused naming it."""
    classes = ("blue", "green", "red")
    train = make_cache(make_image_folder(tmp_path / "train", classes=classes), dtype="float32", precision="fp32")
    head = fit_head(FitHeadConfig(head="linear", cache=train.cache, epochs=3, runs_dir=str(tmp_path / "runs")))
    head = head.checkpoint
    some = make_image_folder(tmp_path / "some", per_class=6, classes=("blue", "red"), seed=3)
    cache = make_cache(some, dtype="float32", precision="fp32", cache_dir=str(tmp_path / "some_features")).cache
    on_cache = evaluate(EvaluateConfig(model=head, cache=cache, split="all", runs_dir=str(tmp_path / "runs")))
    on_data = evaluate(EvaluateConfig(model=head, data=str(some), precision="fp32", workers=0,
                                      runs_dir=str(tmp_path / "runs")))
    assert on_cache.classes == list(classes) and on_cache.rows == on_data.rows == 12
    assert [on_cache.per_class[c]["support"] for c in classes] == [6, 0, 6]
    assert on_cache.accuracy == on_data.accuracy and on_cache.loss == pytest.approx(on_data.loss, abs=1e-4)
    other = make_image_folder(tmp_path / "other", per_class=6, classes=("blue", "red"), seed=4)
    (other / "red").rename(other / "purple")
    wrong = make_cache(other, dtype="float32", precision="fp32", cache_dir=str(tmp_path / "other_features")).cache
    out = CliRunner().invoke(cli.cli, ["evaluate", "--model", head, "--cache", wrong, "--split", "all",
                                       "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "has classes ['purple'] the model does not know" in out.output
    assert out.output.count("\n") == 1


def test_class_names_in_another_unicode_form_are_the_models_and_in_another_case_are_named(tmp_path, make_cache):
    """A test folder of the model's classes whose 'blé' was written e + accent (NFD: unpacked from a Mac's archive)
    was a class the model did not know (--data refused; --cache refused), and one named 'Blé', 'Red' for a model of
    'blé', 'red' was taken for photos of none of its classes (exit 0, no accuracy, only the share flagged unknown).
    Now the same text in another Unicode form is the same class, scored as the folder written as the model's is,
    and a name that is the model's but for case is refused naming the two."""
    import shutil

    nfc, nfd = "bl\u00e9", "ble\u0301"
    train = make_image_folder(tmp_path / "train", per_class=6, classes=("blue", "red"))
    (train / "blue").rename(train / nfc)
    head = fit_head(FitHeadConfig(head="logreg", cache=make_cache(train).cache, runs_dir=str(tmp_path / "runs")))
    test = make_image_folder(tmp_path / "test", per_class=3, classes=("blue", "red"), seed=3)
    (test / "blue").rename(test / nfc)
    same = shutil.copytree(test, tmp_path / "mac")
    (same / nfc).rename(same / nfd)
    runs = str(tmp_path / "runs")
    want = evaluate(EvaluateConfig(model=head.checkpoint, data=str(test), workers=0, runs_dir=runs))
    got = evaluate(EvaluateConfig(model=head.checkpoint, data=str(same), workers=0, runs_dir=runs))
    on_cache = evaluate(EvaluateConfig(model=head.checkpoint, split="all", runs_dir=runs,
                                       cache=make_cache(same, cache_dir=str(tmp_path / "mac_features")).cache))
    assert not got.foreign and got.rows == on_cache.rows == 6 and got.accuracy == want.accuracy == on_cache.accuracy
    assert got.per_class[nfc]["support"] == 3
    (same / nfd).rename(same / "Bl\u00e9")
    (same / "red").rename(same / "Red")
    out = CliRunner().invoke(cli.cli, ["evaluate", "--model", head.checkpoint, "--data", str(same), "--workers", "0",
                                       "--runs-dir", runs])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output.endswith(f"its classes: {nfc}, red; 'Bl\u00e9' is the model's '{nfc}', 'Red' is the model's "
                               "'red' but for case or spaces: rename the folders to its class names\n"), out.output


def test_split_val_with_data_is_refused_not_ignored(tmp_path, head_run, image_folder):
    """--data DIR --split val scored every photo of DIR and reported split 'val' (--split picks cache rows)."""
    out = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--data", str(image_folder),
                                       "--split", "val", "--runs-dir", str(tmp_path / "ev")])
    assert out.exit_code == 2 and "--split val picks rows of a cache" in out.output
    assert out.output.count("\n") == 1 and not (tmp_path / "ev").exists()


def test_data_folder_agrees_with_all_cache_rows(tmp_path, head_run, image_folder):
    ckpt = head_run.checkpoint
    on_cache = evaluate(EvaluateConfig(model=ckpt, split="all", runs_dir=str(tmp_path / "runs")))
    on_data = evaluate(EvaluateConfig(model=ckpt, data=str(image_folder), workers=0, runs_dir=str(tmp_path / "runs")))
    assert on_cache.rows == on_data.rows == 24
    assert on_data.confusion_matrix == on_cache.confusion_matrix
    assert on_data.loss == pytest.approx(on_cache.loss, rel=1e-3, abs=1e-4)


def test_a_damaged_cache_row_is_refused_in_one_line_not_scored(tmp_path, head_run, tiny_cache):
    """A test cache with a NaN row and an inf row: evaluate --cache crashed ("unexpected ValueError: 'list'
    argument must have no negative elements (a bug?)"), and the API's predict_proba gave NaN probabilities and
    predict(unknown=True) named a class for them (a NaN score is never above the threshold); fit-head refuses
    such rows in one line, and now scoring does too."""
    import shutil

    import h5py

    import pipeline

    damaged = tmp_path / "damaged" / tiny_cache.name
    damaged.parent.mkdir()
    shutil.copy(tiny_cache, damaged)
    with h5py.File(damaged, "r+") as f:
        for row, value in ((3, np.nan), (9, np.inf)):
            x = f["features"][row]
            x.flat[0] = value
            f["features"][row] = x
    out = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--cache", str(damaged),
                                       "--split", "all", "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2, out.output
    assert "2 cache rows hold non-finite features (NaN or inf), e.g. rows [3, 9]" in out.output
    head = pipeline.Head.load(head_run.checkpoint)
    for ask in (head.predict_proba, lambda c: head.predict(c, unknown=True)):
        with pytest.raises(pipeline.UsageError, match="non-finite features"):
            ask(str(damaged))


def test_refusals(tmp_path, head_run):
    ckpt = head_run.checkpoint
    other = make_image_folder(tmp_path / "other", per_class=2, classes=("blue", "green"))
    with pytest.raises(ValueError, match=r"classes \['green'\] the model does not know"):
        evaluate(EvaluateConfig(model=ckpt, data=str(other), workers=0, runs_dir=str(tmp_path / "r")))
    torch.save({"kind": "mystery"}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this tool"):
        evaluate(EvaluateConfig(model=str(tmp_path / "m.pt"), runs_dir=str(tmp_path / "r")))
    torch.save({"kind": "train"}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="damaged or outdated train checkpoint: it lacks state_dict"):
        evaluate(EvaluateConfig(model=str(tmp_path / "d.pt"), runs_dir=str(tmp_path / "r")))
    torch.save({"kind": "train", "state_dict": {}, "backbone": "tiny", "weights": "none", "classes": ["a", "b"],
                "in_shape": [8, 8, 8], "pool": "none", "dropout": 0.0, "head": {},
                "preprocessing": {"resize_size": 36, "crop_size": 32, "interpolation": "bilinear", "antialias": True,
                                  "mean": [0.5] * 3, "std": [0.25] * 3}}, tmp_path / "t.pt")
    # a whole model needs images, not cached features
    with pytest.raises(ValueError,
                       match="cannot evaluate a 'train' checkpoint on cache; known: .*fit-head on cache"):
        evaluate(EvaluateConfig(model=str(tmp_path / "t.pt"), cache=str(tmp_path / "c.h5"),
                                runs_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="'train' checkpoint is evaluated on photos: pass data=DIR$"):
        evaluate(EvaluateConfig(model=str(tmp_path / "t.pt"), runs_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(EvaluateConfig(model=str(tmp_path / "missing.pt")))


def test_a_runs_dir_inside_a_photo_folder_it_reads_is_refused(tmp_path, head_run, image_folder):
    """Issue 31 row 12: evaluate --runs-dir inside a class folder wrote its PNGs into the dataset."""
    before = sorted(image_folder.rglob("*"))
    other = make_image_folder(tmp_path / "other", per_class=2)
    for args in (["--runs-dir", str(image_folder / "blue")],  # the head's training photos (through its cache)
                 ["--runs-dir", str(image_folder)],
                 ["--data", str(other), "--runs-dir", str(other / "red" / "runs")]):
        r = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, *args])
        assert r.exit_code == 2 and "--runs-dir" in r.output and "data folder" in r.output, (args, r.output)
    assert sorted(image_folder.rglob("*")) == before and not (other / "red" / "runs").exists()


def test_cli_json_and_ledger(tmp_path, head_run):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--split", "all",
                                          "--runs-dir", str(runs), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["rows"] == 24 and set(r["per_class"]) == {"blue", "red"}
    assert [e["kind"] for e in read_runs(runs)] == ["evaluate", "fit-head"]  # newest first; every stage records
    entry = read_runs(runs)[0]
    assert entry["kind"] == "evaluate" and entry["metrics"]["accuracy"] == r["accuracy"]
    assert entry["backbone"] == "tiny"
    assert r["errors"] == 0 and "gallery_png" not in r  # no image wrong: no gallery.png written, none named
    assert entry["outputs"] == [r["confusion_png"], r["reliability_png"]]
    text = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--runs-dir", str(runs)])
    assert "precision" in text.stdout and "blue" in text.stdout
    assert "gallery" not in text.stdout and "no misclassified images: no gallery.png" in text.stderr
    bad = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--top-k", "0"])
    assert bad.exit_code == 2 and "--top-k must be positive" in bad.stderr


def test_a_trained_model_evaluates_on_images(tmp_path, image_folder):
    from pipeline.models.train import TrainConfig, train

    fast = dict(weights="none", workers=0, device="cpu", precision="fp32", batch_size=8)
    model = train(TrainConfig(data=str(image_folder), backbone="tiny", epochs=3, lr=0.01, val_fraction=0.25,
                              runs_dir=str(tmp_path / "runs"), **fast)).checkpoint
    r = evaluate(EvaluateConfig(model=model, data=str(image_folder), workers=0, runs_dir=str(tmp_path / "r")))
    assert r.kind == "train" and r.rows == 24 and sum(map(sum, r.confusion_matrix)) == 24
    assert r.accuracy >= 0.9
    # neither --data nor --cache: said as what it needs (it said "cannot evaluate ... on --cache", never passed)
    with pytest.raises(ValueError, match="'train' checkpoint is evaluated on photos: pass data=DIR$"):
        evaluate(EvaluateConfig(model=model, runs_dir=str(tmp_path / "r")))


@pytest.mark.parametrize("made_otherwise", [{"dtype": "float16"}, {"precision": "bf16"}])
def test_evaluate_cache_and_fit_head_test_cache_refuse_the_same_caches(tmp_path, make_cache, image_folder,
                                                                       made_otherwise):
    """One rule decides whether rows mean the same thing: a head refuses a cache made otherwise, both ways."""
    train = make_cache(image_folder, dtype="float32", precision="fp32").cache
    other = make_cache(image_folder, **{"dtype": "float32", "precision": "fp32", **made_otherwise},
                       cache_dir=str(tmp_path / "other")).cache
    same = make_cache(image_folder, dtype="float32", precision="fp32", cache_dir=str(tmp_path / "same")).cache
    head = fit_head(FitHeadConfig(head="linear", cache=train, epochs=1, runs_dir=str(tmp_path / "runs"))).checkpoint
    (field, value), = made_otherwise.items()
    with pytest.raises(ValueError, match=f"made differently.*{field}: .* vs {value}"):
        fit_head(FitHeadConfig(head="linear", cache=train, epochs=1, test_cache=other, runs_dir=str(tmp_path / "runs")))
    with pytest.raises(ValueError, match=f"does not fit the model.*{field}: .* vs {value}"):
        evaluate(EvaluateConfig(model=head, cache=other, split="all", runs_dir=str(tmp_path / "runs")))
    # and both take a cache made the same way
    assert fit_head(FitHeadConfig(head="linear", cache=train, epochs=1, test_cache=same,
                                  runs_dir=str(tmp_path / "runs"))).test
    assert evaluate(EvaluateConfig(model=head, cache=same, split="all", runs_dir=str(tmp_path / "runs"))).rows == 24


def test_evaluate_takes_precision_for_data(tmp_path, head_run, image_folder, monkeypatch):
    """--precision reaches the network that runs --data (as predict's), and int8 is refused there."""
    from pipeline import devices

    seen = []
    real = devices.resolve_precision
    monkeypatch.setattr(devices, "resolve_precision", lambda p, d, **k: seen.append(p) or real(p, d, **k))
    args = ["evaluate", "--model", head_run.checkpoint, "--data", str(image_folder), "--workers", "0",
            "--runs-dir", str(tmp_path / "runs"), "--json"]
    result = CliRunner().invoke(cli.cli, args + ["--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert seen == ["fp32"] and json.loads(result.stdout)["rows"] == 24
    bad = CliRunner().invoke(cli.cli, args + ["--precision", "int8"])
    assert bad.exit_code == 2 and "int8" in bad.stderr


def test_evaluating_on_the_folder_the_model_was_trained_on_says_so(tmp_path, image_folder, head_run, caplog):
    """A finetuned model evaluated with --data on its own training folder read accuracy 1.000 (dogbreeds20) and
    nothing said its training images were among the photos scored. A warning says it; another folder, none."""
    import shutil

    from pipeline.models.train import TrainConfig, train

    model = train(TrainConfig(data=str(image_folder), backbone="tiny", weights="none", epochs=1, workers=0,
                              device="cpu", precision="fp32", batch_size=8, runs_dir=str(tmp_path / "runs"))).checkpoint
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    for ckpt in (model, head_run.checkpoint):
        for data, said in ((image_folder, True), (other, False)):
            caplog.clear()
            with caplog.at_level("WARNING"):
                evaluate(EvaluateConfig(model=ckpt, data=str(data), workers=0, runs_dir=str(tmp_path / "r")))
            assert ("is the folder the model was trained on" in caplog.text) == said, (ckpt, data)


def test_evaluating_copies_of_a_heads_training_photos_says_how_many(tmp_path, image_folder, head_run, caplog):
    """evaluate --data on a copy of some of a fit-head head's photos read accuracy 1.000 with nothing said (only
    its own training folder was noticed), where fit-head --test-data finds them by content. Said, with how many;
    on photos it never saw, nothing."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    fresh = make_image_folder(tmp_path / "fresh", per_class=3, seed=11)
    for data, seen in ((copy, head_run.train_rows), (fresh, 0)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate(EvaluateConfig(model=head_run.checkpoint, data=str(data), workers=0, runs_dir=str(tmp_path / "r")))
        said = [r.message for r in caplog.records if "the same content as images the head was fitted on" in r.message]
        assert len(said) == (1 if seen else 0), caplog.text
        assert not seen or said[0].startswith(f"{seen} images of {data} have the same content as images the head")


def test_split_all_of_the_models_own_cache_says_it_scores_training_rows(tmp_path, make_cache, image_folder,
                                                                        head_run, caplog):
    """--split all of the cache the head was fitted on read accuracy 0.977 (scenes6, its 528 training rows among
    the 600) with nothing said, where --data on the same photos warns. Said; on a held-out cache, nothing."""
    held_out = make_cache(make_image_folder(tmp_path / "held", per_class=4, seed=9),
                          cache_dir=str(tmp_path / "held_features"), dtype="float32").cache
    for cache, said in ((None, True), (held_out, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            evaluate(EvaluateConfig(model=head_run.checkpoint, cache=cache, split="all", runs_dir=str(tmp_path / "r")))
        assert ("is the cache the model was trained on: split='all' scores its training rows too" in caplog.text
                ) == said, cache  # called from Python: its keyword (the CLI says --split all)


def test_a_head_whose_cache_moved_is_told_so_and_how_to_name_its_new_place(tmp_path, make_cache, image_folder):
    """evaluate on a head (no --cache) after its cache moved said "cache '...' does not exist", as if the user had
    named that cache; it is the head's recorded one: said so, with --cache for its new place, which then works."""
    cache = Path(make_cache(image_folder).cache)
    head = fit_head(FitHeadConfig(head="logreg", cache=str(cache), runs_dir=str(tmp_path / "runs"))).checkpoint
    moved = cache.rename(tmp_path / "moved.h5")
    args = ["evaluate", "--model", head, "--runs-dir", str(tmp_path / "runs")]
    out = CliRunner().invoke(cli.cli, args)
    assert out.exit_code == 2 and f"the cache this head was fitted on, {cache}, is no longer there" in out.output
    assert "pass --cache with its new place" in out.output and out.output.count("\n") == 1, out.output
    again = CliRunner().invoke(cli.cli, [*args, "--cache", str(moved)])
    assert again.exit_code == 0, again.output


def test_another_cache_of_a_heads_training_photos_says_how_many(tmp_path, make_cache, image_folder, head_run,
                                                                 caplog):
    """evaluate --cache on another cache holding the head's photos (a --n 120 cache of the signdigits10 folder a
    head was fitted on) read accuracy 1.000 with nothing said, where --data and fit-head --test-cache find them by
    content. Said, with how many; on a cache of photos it never saw, nothing."""
    import shutil

    fresh = make_image_folder(tmp_path / "fresh", per_class=3, seed=11)
    more = tmp_path / "more"  # the head's folder and a photo more: another cache, not the head's own
    shutil.copytree(image_folder, more)
    shutil.copy(next((fresh / "red").iterdir()), more / "red" / "new.jpg")
    for data, seen in ((more, head_run.train_rows), (fresh, 0)):
        cache = make_cache(data, cache_dir=str(tmp_path / "other_features"), dtype="float32").cache
        caplog.clear()
        with caplog.at_level("WARNING"):
            r = evaluate(EvaluateConfig(model=head_run.checkpoint, cache=cache, runs_dir=str(tmp_path / "r")))
        assert r.rows == (25 if seen else 6)  # every row: a held-out cache
        said = [r.message for r in caplog.records if "the same content as images the head was fitted on" in r.message]
        assert len(said) == (1 if seen else 0), caplog.text
        assert not seen or said[0].startswith(f"{seen} rows of {cache} have the same content as images the head")


def test_a_busy_own_cache_leaves_out_the_seen_warning_not_the_evaluation(tmp_path, make_cache, tiny_cache,
                                                                           head_run, monkeypatch):
    """evaluate --cache looks in the head's own cache for photos it was fitted on: where that cache was held by a
    writer, evaluate stopped with 'in use by another process' instead of leaving the optional warning out."""
    from pipeline.cache.feature_cache import CacheBusy
    from pipeline.reports import evaluate as evaluate_module

    cache = make_cache(make_image_folder(tmp_path / "fresh", per_class=3, seed=11),
                       cache_dir=str(tmp_path / "other_features"), dtype="float32").cache
    opened = evaluate_module.FeatureCache

    def busy_own(path, *args, **kwargs):
        if Path(path) == Path(tiny_cache):
            raise CacheBusy(f"{path} is in use by another process")
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "FeatureCache", busy_own)
    r = evaluate(EvaluateConfig(model=head_run.checkpoint, cache=cache, runs_dir=str(tmp_path / "r")))
    assert r.rows == 6


@pytest.mark.parametrize("copy_of", ["training folder", "its photos"])
def test_a_folder_with_a_class_the_model_does_not_know_is_refused_before_any_overlap_warning(tmp_path, image_folder,
                                                                                             head_run, copy_of):
    """evaluate --data on a copy of a head's photos plus a class it does not know first warned that the photos have
    'the same content as images the head was fitted on' (or that it is the folder the model was trained on), and
    only then refused on the class: a misleading line before the real error. Now the refusal alone, exit 2."""
    import shutil

    data = image_folder if copy_of == "training folder" else tmp_path / "copy"
    if data != image_folder:
        shutil.copytree(image_folder, data)
    make_image_folder(tmp_path / "more", per_class=2, classes=("green",), seed=9)
    shutil.copytree(tmp_path / "more" / "green", data / "purple")
    out = CliRunner().invoke(cli.cli, ["evaluate", "--model", head_run.checkpoint, "--data", str(data),
                                       "--workers", "0", "--runs-dir", str(tmp_path / "r")])
    assert out.exit_code == 2 and "has classes ['purple'] the model does not know" in out.output, out.output
    assert out.output.count("\n") == 1, out.output


TINY_RUN = dict(backbone="tiny", weights="none", epochs=1, workers=0, device="cpu", precision="fp32", batch_size=8,
                print_every=0)


def _seen_lines(caplog) -> list[str]:
    return [r.message for r in caplog.records if "the same content as images the head was fitted on" in r.message]


@pytest.mark.parametrize("kind", ["train", "finetune"])
def test_evaluating_a_renamed_copy_of_a_models_training_photos_says_how_many(tmp_path, image_folder, caplog, kind,
                                                                               monkeypatch):
    """evaluate --data on a copy of the photos a train or finetune model was trained on (renamed, elsewhere) read
    an inflated accuracy with nothing said: only a head's photos were found by content, a model.pt kept no record.
    Now it keeps their sha256 (those the run hashed for --resume: no photo read again) and evaluate says how many,
    as for a head; on photos it never saw, nothing."""
    import shutil

    from pipeline.data import image_reader
    from pipeline.models.train import FinetuneConfig, TrainConfig, finetune, train

    hashed = []
    real = image_reader.file_digest
    monkeypatch.setattr(image_reader, "file_digest", lambda p: hashed.append(p) or real(p))
    run = (train if kind == "train" else finetune)((TrainConfig if kind == "train" else FinetuneConfig)(
        data=str(image_folder), val_fraction=0.25, runs_dir=str(tmp_path / "runs"), **TINY_RUN))
    assert len(hashed) == 24  # each photo once, for the run's record, not again for the digests it keeps
    ckpt = torch.load(run.checkpoint, weights_only=True)
    assert ckpt["trained_on"]["sha256"].dtype == torch.uint8 and ckpt["trained_on"]["sha256"].shape == (18, 32)
    copy = tmp_path / "renamed"
    shutil.copytree(image_folder, copy)
    for f in list(copy.rglob("*.jpg")):
        f.rename(f.with_name("x" + f.name))
    fresh = make_image_folder(tmp_path / "fresh", per_class=3, seed=11)
    for data, seen in ((copy, 18), (fresh, 0)):
        caplog.clear()
        with caplog.at_level("INFO"):
            evaluate(EvaluateConfig(model=run.checkpoint, data=str(data), workers=0, runs_dir=str(tmp_path / "r")))
        said = _seen_lines(caplog)
        assert len(said) == (1 if seen else 0), caplog.text
        assert not seen or said[0].startswith(f"{seen} images of {data} have the same content as images the head")
        assert "cannot tell" not in caplog.text


def test_a_finetuned_model_keeps_the_photos_its_starting_head_was_fitted_on(tmp_path, image_folder, make_cache,
                                                                          caplog):
    """finetune --init-head HEAD on other photos: the model's head began as one fitted on the head's photos, so
    evaluate on a copy of those says so (it said nothing)."""
    import shutil

    from pipeline.models.train import FinetuneConfig, finetune

    head = fit_head(FitHeadConfig(head="linear", cache=str(make_cache(image_folder, dtype="float32").cache),
                                  epochs=1, runs_dir=str(tmp_path / "runs")))
    other = make_image_folder(tmp_path / "other", per_class=4, seed=5)
    model = finetune(FinetuneConfig(data=str(other), init_head=head.checkpoint, runs_dir=str(tmp_path / "runs"),
                                    **TINY_RUN)).checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    with caplog.at_level("WARNING"):
        evaluate(EvaluateConfig(model=model, data=str(copy), workers=0, runs_dir=str(tmp_path / "r")))
    said = _seen_lines(caplog)
    assert len(said) == 1 and said[0].startswith(f"{head.train_rows} images of {copy} have the same content"), said


def test_a_model_pt_written_before_it_kept_its_photos_still_evaluates_with_a_note(tmp_path, image_folder, caplog):
    """A model.pt of an older version (no record of its photos) loads and evaluates as before; a note says that
    overlap with its training photos cannot be checked, not a silence that reads as 'none'."""
    import shutil

    from pipeline.models.train import TrainConfig, train

    model = train(TrainConfig(data=str(image_folder), runs_dir=str(tmp_path / "runs"), **TINY_RUN)).checkpoint
    ckpt = torch.load(model, weights_only=True)
    del ckpt["trained_on"]
    torch.save(ckpt, model)
    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    with caplog.at_level("INFO"):
        r = evaluate(EvaluateConfig(model=model, data=str(copy), workers=0, runs_dir=str(tmp_path / "r")))
    assert r.rows == 24 and not _seen_lines(caplog)
    assert f"cannot tell whether photos of {copy} are ones the model was trained on ({model} was written before" \
           in caplog.text


def test_json_source_says_when_the_photos_scored_include_the_models_training_photos(tmp_path, image_folder, head_run,
                                                                                      make_cache):
    """--json (and the stdout line) said 'images of copy' beside accuracy 1.000 for a copy of the training photos,
    the warning only on stderr, where a script reading the figures never looks; --split all of the head's own cache
    said it there already ('the head's training rows among them'). Now --data and another --cache say it too."""
    import shutil

    from pipeline.models.train import TrainConfig, train

    model = train(TrainConfig(data=str(image_folder), val_fraction=0.25, runs_dir=str(tmp_path / "runs"),
                              **TINY_RUN)).checkpoint
    copy, fresh = tmp_path / "copy", make_image_folder(tmp_path / "fresh", per_class=3, seed=11)
    shutil.copytree(image_folder, copy)
    more = tmp_path / "more"  # the head's photos and one more: another cache than its own
    shutil.copytree(image_folder, more)
    shutil.copy(next((fresh / "red").iterdir()), more / "red" / "new.jpg")
    other_cache = make_cache(more, cache_dir=str(tmp_path / "other_features"), dtype="float32").cache

    def source(ckpt, *args):
        out = CliRunner().invoke(cli.cli, ["evaluate", "--model", ckpt, *args, "--workers", "0", "--runs-dir",
                                           str(tmp_path / "r"), "--json"])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["source"]

    assert source(model, "--data", str(image_folder)) == f"images of {image_folder}, the model's training images " \
                                                          "among them"
    assert source(model, "--data", str(copy)) == f"images of {copy}, 18 of them with the content of images the " \
                                                 "head was fitted on"
    assert source(head_run.checkpoint, "--cache", other_cache).endswith(
        f", {head_run.train_rows} of them with the content of images the head was fitted on")
    assert source(model, "--data", str(fresh)) == f"images of {fresh}"


def test_val_of_another_cache_counts_the_heads_training_photos_or_says_why_it_cannot(tmp_path, make_cache,
                                                                                      image_folder, caplog):
    """evaluate --cache OTHER --split val warned that the rows 'may include training images' even where the head's
    cache says which photos it was fitted on. Now counted by content, as the other overlap warnings are (how many,
    and examples, also in the figures' source); where the head's cache is gone, the old words and why."""
    import shutil

    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.epoch_loop import split_indices

    own = make_cache(image_folder).cache
    head = fit_head(FitHeadConfig(head="linear", epochs=2, cache=own, runs_dir=str(tmp_path / "runs"))).checkpoint
    more = tmp_path / "more"  # the head's photos and 6 others: another cache, whose 'val' split differs from the head's
    shutil.copytree(image_folder, more)
    fresh = make_image_folder(tmp_path / "fresh", per_class=3, seed=11)
    for p in fresh.rglob("*.jpg"):
        shutil.copy(p, more / p.parent.name / f"new-{p.name}")
    other = make_cache(more, cache_dir=str(tmp_path / "other_features")).cache
    with FeatureCache(own) as c:
        trained = {c.paths[i] for i in split_indices(c.labels, 0.125, 0)[0]}
    with FeatureCache(other) as c:
        val = [c.paths[i] for i in split_indices(c.labels, 0.125, 0)[1]]
    want = sum(p in trained for p in val)
    assert want > 0  # the split of the other cache holds photos the head was trained on
    with caplog.at_level("WARNING"):
        r = evaluate(EvaluateConfig(model=head, cache=other, split="val", runs_dir=str(tmp_path / "r")))
    assert r.rows == len(val) and "may include" not in caplog.text
    assert (f"is not the cache the model was trained on: 'val' scores {len(val)} of its 30 rows (split as the model's "
            f"cache was), {want} of them with the content of images the head was fitted on (e.g. ") in caplog.text
    assert f"{want} of them with the content of images the head was fitted on" in r.source
    Path(own).rename(tmp_path / "away.h5")
    caplog.clear()
    with caplog.at_level("WARNING"):
        r = evaluate(EvaluateConfig(model=head, cache=other, split="val", runs_dir=str(tmp_path / "r")))
    assert (f"'val' scores {len(val)} of its 30 rows (split as the model's cache was), which may include training "
            f"images: they cannot be counted (its cache {own} is gone); use ") in caplog.text
    caplog.clear()  # every row of it: a note that nobody can tell (it said nothing)
    with caplog.at_level("INFO"):
        evaluate(EvaluateConfig(model=head, cache=other, split="all", runs_dir=str(tmp_path / "r")))
    assert f"cannot tell whether rows of {other} are photos the head was fitted on (its cache {own} is gone)" \
        in caplog.text


def test_a_run_folder_appears_with_all_its_files_naming_the_folder_they_are_in(tmp_path, head_run, monkeypatch):
    """evaluate's run folder was made first and filled after: a kill -9 while its pictures were drawn left a
    folder of half of them, no metrics.json. It is written hidden and appears whole (as fit-head's); where another
    run took its name meanwhile, metrics.json names the folder it got."""
    import pipeline.reports.evaluate as ev
    from pipeline.runs import run_folders

    runs = tmp_path / "evaluations"

    def killed(*a, **k):
        raise SystemExit(137)  # the process ends here, before metrics.json

    monkeypatch.setattr(ev, "write_json", killed)
    with pytest.raises(SystemExit):
        evaluate(EvaluateConfig(model=head_run.checkpoint, runs_dir=str(runs)))
    assert [p.name for p in runs.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    real = run_folders.publish_run_dir

    def taken_meanwhile(staged, before):
        (staged.parent / staged.name[1:].split(".")[0]).mkdir()  # another evaluate of the same second
        return real(staged, before)

    monkeypatch.setattr(ev, "publish_run_dir", taken_meanwhile)
    r = evaluate(EvaluateConfig(model=head_run.checkpoint, runs_dir=str(runs)))
    saved = json.loads(Path(r.run_dir, "metrics.json").read_text())
    assert r.run_dir.endswith("-evaluate-2") and saved["run_dir"] == r.run_dir
    assert saved["confusion_png"] == r.confusion_png == str(Path(r.run_dir, "confusion.png"))
    assert Path(r.confusion_png).is_file() and read_runs(runs)[0]["outputs"][0] == r.confusion_png
