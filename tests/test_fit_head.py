import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipeline
from pipeline.cache.feature_cache import FeatureCache
from pipeline.cli import cli
from pipeline.errors import PipelineError, UsageError
from pipeline.extraction.extract import ExtractConfig, extract
from pipeline.heads.epoch_loop import split_indices
from pipeline.heads.cache_views import evaluate_head
from pipeline.heads.fit_head import FitHeadConfig, FitHeadResult, fit_head
from pipeline.heads.probe_heads import ProbeHead
from pipeline.reports.present import fit_head_text
from tests.conftest import make_image_folder


@pytest.fixture
def cache(tmp_path, make_cache):
    data = make_image_folder(tmp_path / "d", per_class=16)
    return make_cache(data).cache


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 400 + [1] * 400)
    train, val = split_indices(labels, 0.125, seed=0)
    assert (len(train), len(val)) == (700, 100)
    assert np.bincount(labels[val]).tolist() == [50, 50]
    assert not set(train) & set(val)
    assert (split_indices(labels, 0.125, 0)[1] == val).all() and not (split_indices(labels, 0.125, 1)[1] == val).all()


def test_fit_head_learns_separable_features_and_saves_a_safe_checkpoint(cache, tmp_path, capsys):
    r = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=5, runs_dir=str(tmp_path / "runs"), val_fraction=0.25,
                               calibrate="none"))  # the val loss is the fitted head's, before any temperature
    assert r.val_acc == 1.0 and r.train_rows == 24 and r.val_rows == 8
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Epoch ")]
    assert len(lines) == 5 and lines[0].startswith("Epoch 1, Train acc=") and "Val loss=" in lines[0]
    ckpt = torch.load(r.checkpoint, weights_only=True)
    assert ckpt["classes"] == ["blue", "red"] and ckpt["in_shape"] == [8, 8, 8] and ckpt["backbone"] == "tiny"
    assert ckpt["head"]["view"] == "avg" and ckpt["head"]["normalize"] == "l2"  # the defaults
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])  # raw cached features in, as saved
    with FeatureCache(cache) as c:
        acc, loss, _ = evaluate_head(head, c, split_indices(c.labels, 0.25, 0)[1], "cpu", 1024)
    assert acc == r.val_acc and loss == pytest.approx(r.val_loss, rel=1e-3, abs=1e-5)
    assert json.loads((tmp_path / "runs").glob("*/history.json").__next__().read_text())[0]["epoch"] == 1


def test_a_head_fitted_with_a_relative_cache_dir_is_evaluated_and_exported_from_any_folder(tmp_path, monkeypatch):
    """fit-head --cache-dir features (relative) recorded 'features/...' in head.pt: from another folder
    evaluate said the cache 'does not exist' and export found no photos for its parity check. The checkpoint
    now records where the cache is, one head on one cache and a fused one alike."""
    from pipeline.reports.evaluate import EvaluateConfig, evaluate
    from pipeline.heads.checkpoints import read_checkpoint
    from pipeline.serving.export import training_photos

    data = make_image_folder(tmp_path / "d", per_class=16)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    for backbone in ("tiny", "tiny_wide"):
        extract(ExtractConfig(data=str(data), n=0, backbone=backbone, weights="none", workers=0, cache_dir="features"))
    caches = sorted(str(p.relative_to(project)) for p in (project / "features").glob("*.h5"))
    one = fit_head(FitHeadConfig(head="logreg", cache_dir="features", runs_dir="runs")).checkpoint
    fused = fit_head(FitHeadConfig(head="logreg", cache=caches, runs_dir="runs")).checkpoint
    monkeypatch.chdir(elsewhere)
    for head in (one, fused):
        r = evaluate(EvaluateConfig(model=str(project / head), runs_dir=str(tmp_path / "runs")))
        assert r.rows == 4
    assert len(training_photos(read_checkpoint(project / one), 2)) == 2  # export's parity check photos


def test_dropout_and_the_seed_make_runs_reproducible(cache, tmp_path):
    a = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, dropout=0.5, runs_dir=str(tmp_path / "a")))
    b = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, dropout=0.5, runs_dir=str(tmp_path / "b")))
    for key in ("train_loss", "val_loss", "train_acc"):
        assert [h[key] for h in a.history] == pytest.approx([h[key] for h in b.history])
    # ... and both matter: without dropout, or with another seed, the same run trains differently
    no_dropout = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, dropout=0.0,
                                        runs_dir=str(tmp_path / "c")))
    other_seed = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=2, dropout=0.5, seed=1,
                                        runs_dir=str(tmp_path / "e")))
    for other in (no_dropout, other_seed):
        assert [h["train_loss"] for h in other.history] != pytest.approx([h["train_loss"] for h in a.history])


def test_a_runs_dir_inside_the_caches_photos_is_refused(cache, tmp_path):
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache), "--runs-dir", str(tmp_path / "d" / "blue")])
    assert r.exit_code == 2 and "--runs-dir" in r.output and "is inside the data folder" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "d" / "blue").iterdir()) == sorted(f"blue.{i}.jpg" for i in range(16))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc to write in")
def test_a_runs_dir_where_nothing_can_be_written_is_refused_before_the_fit(cache, monkeypatch):
    """--runs-dir /proc/nope failed after the whole fit (minutes with --tune), when the run folder was made, as
    'unexpected FileNotFoundError ... (a bug?)'; now one line naming it, before the fit (exit 1, as a full disk)."""
    monkeypatch.setattr("pipeline.heads.fit_head.fit_on_rows", lambda *a, **k: pytest.fail("fitted first"))
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache), "--runs-dir", "/proc/nope"])
    assert r.exit_code == 1 and r.output == ("Error: cannot write --runs-dir '/proc/nope': nothing can be written in "
                                             "'/proc' (no such file or directory)\n"), r.output


def test_fit_head_warns_when_the_source_folder_changed(cache, tmp_path, caplog):
    (tmp_path / "d" / "red" / "red.0.jpg").unlink()
    r = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, runs_dir=str(tmp_path / "runs")))
    assert "1 removed (e.g. red/red.0.jpg)" in r.source_changed
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
    assert r.rows == 40 and r.feature_shape == [512, 7, 7]
    with FeatureCache(r.cache) as c:
        assert np.bincount(c.labels).tolist() == [20, 20] and c.attrs["weights"] == "file:vgg16_features_imagenet.pt"
        assert c.attrs["mean"][0] == pytest.approx(0.485, abs=1e-3)  # from the sidecar, not hand-copied
    fit = fit_head(FitHeadConfig(head="linear", cache=r.cache, epochs=10, val_fraction=0.25,
                                 runs_dir=str(tmp_path / "runs")))
    assert fit.val_rows == 10 and fit.val_acc >= 0.9


@pytest.mark.parametrize("features", ["flat", "avg", "max", "avgmax"])
def test_every_view_trains_and_the_checkpoint_takes_raw_features(cache, tmp_path, features):
    r = fit_head(FitHeadConfig(head="linear", cache=cache, features=features, epochs=30, val_fraction=0.25,
                               runs_dir=str(tmp_path / "runs")))
    assert r.val_acc == 1.0
    ckpt = torch.load(r.checkpoint, weights_only=True)
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])
    assert head.linear.in_features == {"flat": 512, "avg": 8, "max": 8, "avgmax": 16}[features]


def test_a_pooled_cache_allows_only_the_avg_view(tmp_path, make_cache, image_folder):
    pooled = make_cache(image_folder, pool="avg", cache_dir=str(tmp_path / "pooled")).cache
    with pytest.raises(ValueError, match="^features: view 'max' needs the spatial map.*allowed views: avg, flat"):
        fit_head(FitHeadConfig(cache=pooled, features="max", runs_dir=str(tmp_path / "runs")))
    pooled_fit = fit_head(FitHeadConfig(head="linear", cache=pooled, features="avg", epochs=2,
                                        runs_dir=str(tmp_path / "runs")))
    assert pooled_fit.val_rows


def test_early_stopping_keeps_the_best_epochs_weights(cache, tmp_path, capsys):
    r = fit_head(FitHeadConfig(cache=cache, head="linear", recipe="default", lr=0.5, epochs=60, patience=3,
                               val_fraction=0.25, runs_dir=str(tmp_path / "runs")))
    losses = [h["val_loss"] for h in r.history]
    best = int(np.argmin(losses))
    assert r.best_epoch == best + 1 and len(losses) <= best + 1 + 3  # stopped 3 epochs after the best
    assert r.val_loss == pytest.approx(losses[best], rel=1e-6)  # the saved head is the best epoch's
    assert f"Best epoch {best + 1} of {len(losses)}" in capsys.readouterr().err


def test_the_seed_recipe_is_the_tutorials_head(cache, tmp_path):
    r = fit_head(FitHeadConfig(cache=cache, recipe="seed", runs_dir=str(tmp_path / "runs")))
    assert len(r.history) == 10 and r.head.startswith("ProbeHead(view=flat, normalize=rms")


def test_a_logreg_head_is_sklearns_logistic_regression_as_a_linear_layer(cache, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from pipeline.reports.evaluate import EvaluateConfig, evaluate

    r = fit_head(FitHeadConfig(cache=cache, head="logreg", C=10.0, val_fraction=0.25, runs_dir=str(tmp_path / "r"),
                               calibrate="none"))  # sklearn's probabilities exactly, no temperature
    with FeatureCache(cache) as c:
        train, val = split_indices(c.labels, 0.25, 0)
        x = c.features[:].astype(np.float64).mean((2, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        clf = LogisticRegression(C=10.0, max_iter=1000, random_state=0).fit(x[train], c.labels[train])
        _, _, logp = evaluate_head(ProbeHead.from_checkpoint(*(lambda k: (k["head"], k["state_dict"]))(
            torch.load(r.checkpoint, weights_only=True))), c, val, "cpu", 1024)
    assert np.abs(np.exp(logp) - clf.predict_proba(x[val])).max() < 1e-5
    # ... and evaluate takes it like any head
    e = evaluate(EvaluateConfig(model=r.checkpoint, runs_dir=str(tmp_path / "e")))
    assert e.accuracy == r.val_acc and e.rows == r.val_rows


def test_tune_picks_by_cross_validation_and_is_deterministic(cache, tmp_path):
    a = fit_head(FitHeadConfig(cache=cache, tune=True, folds=3, runs_dir=str(tmp_path / "a")))
    b = fit_head(FitHeadConfig(cache=cache, tune=True, folds=3, runs_dir=str(tmp_path / "b")))
    assert a.tuning["choice"] == b.tuning["choice"] and a.tuning["table"] == b.tuning["table"]
    assert {row["key"].split("|")[0] for row in a.tuning["table"]} == {"logreg", "kernel", "svm", "torch"}
    ckpt = torch.load(a.checkpoint, weights_only=True)
    assert ckpt["tuning"]["choice"] == a.tuning["choice"] and a.metrics["cv_acc"] == ckpt["tuning"]["cv_acc"]
    assert ckpt["tuning"]["verdict"] == a.tuning["verdict"] and a.tuning["choice"] in a.tuning["verdict"]


def test_test_data_is_extracted_like_the_cache_scored_and_copies_are_reported(tmp_path, make_cache, image_folder):
    import shutil

    cache = make_cache(image_folder).cache
    other = make_image_folder(tmp_path / "other", per_class=5, seed=7)
    r = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=20, test_data=str(other),
                               runs_dir=str(tmp_path / "runs")))
    assert r.test["rows"] == 10 and r.metrics["test_acc"] == r.test["acc"] and r.test["overlap"] == []
    from pipeline.cache.feature_cache import newest_cache

    assert str(newest_cache(tmp_path / "features").path) == cache  # the newer test cache is never the default
    again = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, test_cache=r.test["cache"],
                                   runs_dir=str(tmp_path / "r")))
    assert again.test["rows"] == 10
    shutil.copy(image_folder / "red" / "red.0.jpg", other / "red" / "copy.jpg")
    shutil.copy(image_folder / "red" / "red.1.jpg", other / "red" / "copy2.jpg")
    r = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, test_data=str(other), val_fraction=0.125,
                               runs_dir=str(tmp_path / "runs")))
    assert len(r.test["overlap"]) >= 1  # a copy of a training image, whatever its name
    made_otherwise = make_cache(other, dtype="float32", cache_dir=str(tmp_path / "f32")).cache
    with pytest.raises(ValueError, match="made differently from the training cache.*dtype: float16 vs float32"):
        fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, test_cache=made_otherwise,
                               runs_dir=str(tmp_path / "runs")))


def test_the_training_folder_given_as_test_folder_is_said_as_audit_says_it(tmp_path, make_cache, image_folder):
    """fit-head and compare-sklearn --test-data D, D the training folder (or a link to it, or D/), said only that
    the test images have the same content as training images; now they say, as audit does, that the test folder is
    the training folder (compare-sklearn once, not once per head kind), and go on."""
    cache = make_cache(image_folder).cache
    (tmp_path / "link").symlink_to(image_folder, target_is_directory=True)
    said = "is the training folder {}: the test accuracy counts the photos the head was fitted on; pass a test folder"
    for test in (str(tmp_path / "link"), f"{image_folder}/"):
        r = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "linear", "--epochs", "1",
                                     "--test-data", test, "--runs-dir", str(tmp_path / "runs")])
        assert r.exit_code == 0, r.output
        assert f"--test-data {test!r} {said.format(image_folder)}" in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["compare-sklearn", "--cache", cache, "--epochs", "1", "--test-data", str(image_folder),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert r.stderr.count(said.format(image_folder)) == 1, r.stderr
    other = make_image_folder(tmp_path / "other", per_class=3, seed=7)
    r = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "linear", "--epochs", "1",
                                 "--test-data", str(other), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "training folder" not in r.stderr, r.output


def test_tune_on_a_pooled_cache_leaves_out_the_views_it_cannot_give(make_cache, image_folder, tmp_path):
    pooled = make_cache(image_folder, pool="avg", cache_dir=str(tmp_path / "pooled")).cache
    r = fit_head(FitHeadConfig(cache=pooled, tune=True, val_fraction=0.25, folds=3, runs_dir=str(tmp_path / "runs")))
    assert {row["key"].split("|")[1] for row in r.tuning["table"]} == {"avg"}


def test_tune_with_two_folds_on_a_few_rows_of_three_classes_fits(tmp_path, make_cache):
    """A fold of 9 rows of 3 classes held out 2 for the torch head's early stopping, and --tune failed in
    scikit-learn's words ('test_size = 2 should be greater or equal to the number of classes = 3')."""
    data = make_image_folder(tmp_path / "d", per_class=12, classes=("blue", "red", "green"))
    r = fit_head(FitHeadConfig(cache=make_cache(data).cache, tune=True, folds=2, runs_dir=str(tmp_path / "runs")))
    assert os.path.isfile(r.checkpoint)
    assert any(row["key"].startswith("torch") for row in r.tuning["table"])  # the head that held rows out


def test_too_few_rows_for_the_folds_names_the_options_that_fit_them(tmp_path, make_cache):
    """3 photos a class: 'the smallest class has 2' alone left the user to guess that --folds or --head fits it."""
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=3, classes=("blue", "red", "green"))).cache
    for args, other in (([], "another --head"), (["--tune"], "kernel, svm) without --tune")):
        run = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--runs-dir", str(tmp_path / "runs"), *args])
        assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
        assert "the smallest class has 2 (training rows: --val-fraction's share is held out); give fewer --folds" \
            in run.output and other in run.output
    run = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--folds", "2", "--runs-dir", str(tmp_path / "r")])
    assert run.exit_code == 0, run.output
    # from Python (a Head in cross_val_score, say), in its keywords: it said '--head auto', '--folds'
    with pytest.raises(ValueError, match=r"^head='auto': .* has 2 \(training rows: val_fraction's share is held out\); "
                                         r"give fewer folds \(at least 2\), another head \(linear"):
        pipeline.Head(runs_dir=str(tmp_path / "runs")).fit(cache)
    with pytest.raises(ValueError, match=r"^tune=True: .* without tune=True or more photos"):
        pipeline.Head(tune=True, runs_dir=str(tmp_path / "runs")).fit(cache)


def test_a_class_without_a_row_in_the_cache_is_named(tmp_path, make_cache):
    """extract --n 6 of a folder of 12 blue, 12 red and 1 green photo draws no green photo (a proportional sample):
    fit-head said 'the smallest class has 5' (of the classes it saw), --head linear fitted an output for green
    from no row, and audit failed inside scikit-learn ('needs samples of at least 2 classes')."""
    data = make_image_folder(tmp_path / "d", per_class=12)
    make_image_folder(tmp_path / "g", per_class=1, classes=("green",))
    (tmp_path / "g" / "green").rename(data / "green")
    cache = make_cache(data, n=6).cache
    c = FeatureCache(cache)
    assert c.classes.index("green") not in set(c.labels)
    for args in ([], ["--head", "linear"]):
        run = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--runs-dir", str(tmp_path / "runs"), *args])
        assert run.exit_code == 2 and run.output == (
            f"Error: cache {cache} has no row of class 'green': a head cannot learn it; extract's sample of --n 6 drew "
            "none of its photos: take a larger --n (--n 0: every photo)\n"), run.output
    assert not (tmp_path / "runs").exists()
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--output", str(tmp_path / "a")])
    assert run.exit_code == 2 and "has no row of class 'green': the audit cannot learn it" in run.output, run.output


def test_a_class_of_only_unreadable_photos_is_named_with_why(tmp_path, make_cache):
    """A class folder of a zero-byte and a truncated JPEG, extracted with --n 7: every one of its files was tried and
    skipped, yet the refusal said the --n sample drew none of its photos ('take a larger --n', which changes
    nothing); it now names one of them and why it was skipped."""
    data = make_image_folder(tmp_path / "d", per_class=3)
    (data / "broken").mkdir()
    (data / "broken" / "z.jpg").write_bytes(b"")
    (data / "broken" / "t.jpg").write_bytes((data / "blue" / "blue.0.jpg").read_bytes()[:300])
    cache = make_cache(data, n=7).cache
    run = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and re.fullmatch(
        rf"Error: cache {re.escape(cache)} has no row of class 'broken': a head cannot learn it; its photos were "
        r"skipped as unreadable \(e\.g\. broken/[tz]\.jpg: .*\): fix or remove them and extract again\n",
        run.output), run.output


@pytest.mark.parametrize("args, message", [
    (["--head", "svm", "--gamma", "nan"], "--gamma must be a positive number"),  # was scikit-learn's own message
    (["--head", "svm", "--gamma", "-2*scale"], "got '-2*scale'"),  # was 'got -3.71', a number never typed
    (["--gamma", "abc"], "--gamma must be a positive number"),  # the default head ignored it silently
    (["--folds", "1"], "--folds must be at least 2, got 1"),  # was '1-fold CV needs 2 rows; the smallest has 12'
    # 14 training rows a class, but a CV sample of 4: was "5-fold CV needs 5 rows of every class; the smallest has 2"
    (["--kernel-components", "4"], "--kernel-components 4: the cross-validation sample"),
])
def test_gamma_and_folds_are_checked_as_given_before_any_work(cache, tmp_path, args, message):
    """Each refusal names the option at fault, before a run folder is made."""
    run = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache), "--runs-dir", str(tmp_path / "runs"), *args])
    assert run.exit_code == 2 and message in run.output and not (tmp_path / "runs").exists(), run.output


def test_a_test_folder_of_other_classes_is_refused_before_any_fit_or_extraction(cache, tmp_path):
    test = make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "green"))
    before = sorted((tmp_path / "features").iterdir())
    run = CliRunner().invoke(cli, ["fit-head", "--cache", str(cache), "--test-data", str(test),
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and run.output == (
        f"Error: --test-data {str(test)!r} has the classes blue, green, the head's are blue, red (unknown: green): a "
        "test folder holds some or all of the head's class folders\n"), run.output
    assert not (tmp_path / "runs").exists() and sorted((tmp_path / "features").iterdir()) == before


def test_a_test_folder_of_the_heads_classes_in_another_unicode_form_is_scored(tmp_path, make_cache):
    """--test-data of the head's classes, its 'blé' written e + accent (NFD, a Mac's), was refused: 'has the classes
    blé, red, the head's are blé, red (unknown: blé)'. It is the same class, scored; a 'Red' for the head's 'red'
    is refused saying so."""
    nfc, nfd = "bl\u00e9", "ble\u0301"
    data = make_image_folder(tmp_path / "d", per_class=6, classes=("blue", "red"))
    (data / "blue").rename(data / nfc)
    test = make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "red"), seed=5)
    (test / "blue").rename(test / nfd)
    r = fit_head(FitHeadConfig(head="logreg", cache=make_cache(data).cache, test_data=str(test),
                               runs_dir=str(tmp_path / "runs")))
    assert r.test["rows"] == 6 and r.test["per_class"][nfc] is not None
    (test / "red").rename(test / "Red")
    with pytest.raises(UsageError, match="; 'Red' is the head's 'red' but for case or spaces: rename the folder to "
                                         "its class name$"):
        fit_head(FitHeadConfig(head="logreg", cache=r.cache, test_data=str(test), runs_dir=str(tmp_path / "runs")))


def _remapped_scores(checkpoint, test_cache) -> tuple[float, float]:
    """(accuracy, mean NLL) of a saved head on a test cache whose labels are matched to the head's classes by
    name: what fit-head's test figures must be (the cache's own label indices name its own classes)."""
    from pipeline.heads.cache_views import head_scores

    ckpt = torch.load(checkpoint, weights_only=True)
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])  # at its temperature, as fit-head scores
    with FeatureCache(test_cache) as t:
        logp, _ = head_scores(head, t, np.arange(t.n), "cpu", 1024)
        y = np.array([ckpt["classes"].index(t.classes[k]) for k in t.labels])
    return float((logp.argmax(1) == y).mean()), float(-logp[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("present", [("blue", "red"), ("red",)])
def test_a_test_folder_of_some_of_the_heads_classes_is_scored_against_them(tmp_path, make_cache, caplog, present):
    """A test folder lacking one of the head's classes was refused ('missing: green'), where evaluate scores such
    a folder: its photos are scored against the head's classes, their labels matched by name (the folder's own
    indices name other classes: red is 1 of blue, red and 2 of blue, green, red), the classes it lacks said in one
    warning and given no per-class accuracy. One class will do: its cache was refused as 'damaged'."""
    import shutil

    data = make_image_folder(tmp_path / "d", per_class=8, classes=("blue", "green", "red"))
    cache = make_cache(data).cache
    test = make_image_folder(tmp_path / "t", per_class=3, classes=present, seed=5)
    for name in ("red.0.jpg", "red.1.jpg"):  # copies of training photos: still found, by content
        shutil.copy(data / "red" / name, test / "red" / f"copy-{name}")
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "runs")))
    missing = ", ".join(c for c in ("blue", "green", "red") if c not in present)
    assert [m for m in caplog.messages if "no photos of" in m] == [
        f"the test set {r.test['cache']} has no photos of {missing}: those classes are not scored"]
    acc, loss = _remapped_scores(r.checkpoint, r.test["cache"])
    assert r.test["rows"] == 3 * len(present) + 2 and r.metrics["test_acc"] == r.test["acc"] == acc
    assert r.test["loss"] == pytest.approx(loss) and r.test["calibration"]["after"]["log_loss"] == pytest.approx(loss)
    assert list(r.test["per_class"]) == ["blue", "green", "red"]
    assert [c for c, a in r.test["per_class"].items() if a is None] == missing.split(", ")
    assert len(r.test["overlap"]) >= 1 and all(p.startswith("red/copy-") for p in r.test["overlap"])


@pytest.mark.parametrize("option", [{"lr": 1e38}, {"weight_decay": 1e300}, {"C": 1e300}, {"lr": 0.0}])
def test_rates_out_of_range_are_usage_errors_naming_the_range(cache, tmp_path, option):
    (name, value), = option.items()
    with pytest.raises(UsageError, match=rf"--{name.replace('_', '-')} must be in .*got {re.escape(str(value))}"):
        fit_head(FitHeadConfig(cache=cache, runs_dir=str(tmp_path / "runs"), **option))


@pytest.mark.parametrize("head", ["auto", "linear"])
def test_a_non_finite_row_is_refused_before_any_checkpoint(tiny_cache, tmp_path, head):
    import h5py

    with h5py.File(tiny_cache, "r+") as f:
        f["features"][3, 0, 0, 0] = np.nan
    runs = tmp_path / "runs"
    with pytest.raises((UsageError, PipelineError), match="non-finite features|features for NaN") as e:
        fit_head(FitHeadConfig(cache=str(tiny_cache), head=head, features="flat" if head == "linear" else "avg",
                               epochs=2, val_fraction=0.25, runs_dir=str(runs)))
    assert not list(runs.glob("*/head.pt"))
    if "non-finite" in str(e.value):  # the rows as plain numbers, not 'e.g. rows [np.int64(3)]'
        assert "e.g. rows [3]: the cache is damaged; extract it again" in str(e.value), str(e.value)
        assert str(e.value).endswith("extract it again"), str(e.value)  # not '... give fewer --folds (at least 2)'


@pytest.mark.parametrize("challenger, wins", [
    ({"log_loss_mean": 0.08, "acc_mean": 0.975}, False),  # lower log-loss, accuracy tied: noise (caltech20's case)
    ({"log_loss_mean": 0.08, "acc_mean": 0.99}, True),  # clearly better on both counts
    ({"log_loss_mean": 0.119, "acc_mean": 0.99}, False),  # log-loss within one standard error
])
def test_tune_keeps_the_default_unless_beaten_on_log_loss_and_accuracy(challenger, wins):
    from pipeline.heads.model_selection import clearly_better

    default = {"log_loss_mean": 0.12, "log_loss_std": 0.015, "acc_mean": 0.973, "acc_std": 0.011}
    other = {"log_loss_std": 0.01, "acc_std": 0.01, **challenger}
    assert clearly_better(other, default, folds=5) == wins


def test_the_result_is_a_dataclass_and_to_dict_is_the_json_object(cache, tmp_path):
    """Callers read attributes; --json prints to_dict(): the trust's and metrics' keys at the top as before."""
    r = fit_head(FitHeadConfig(cache=cache, head="logreg", runs_dir=str(tmp_path / "runs")))
    assert isinstance(r, FitHeadResult) and r.val_acc == r.metrics["val_acc"] and r.caches == []
    d = r.to_dict()
    assert list(d)[:8] == ["cache", "run_dir", "checkpoint", "curves", "head", "train_rows", "val_rows", "temperature"]
    assert d["val_acc"] == r.val_acc and d["known_rows"] == r.trust["known_rows"] and d["trust"] == r.trust
    assert "caches" not in d and list(d)[-2:] == ["source_changed", "default_cache"]
    out = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "logreg", "--runs-dir",
                                   str(tmp_path / "runs"), "--json"])
    assert out.exit_code == 0 and list(json.loads(out.stdout)) == list(d)


def test_the_default_head_stacks_svm_and_logreg_chosen_by_cv_and_refits_on_every_row(cache, tmp_path):
    r = fit_head(FitHeadConfig(cache=cache, folds=3, runs_dir=str(tmp_path / "a")))
    assert r.tuning["choice"].startswith("stack|avg|l2|") and len(r.tuning["setting"]["weights"]) == 2
    assert {row["key"].split("|")[0] for row in r.tuning["table"]} == {"svm", "logreg"}
    assert r.fit_info["refit_rows"] == r.train_rows + r.val_rows == 32  # the validation rows too
    assert r.trust["calibrated_on"] == "cv+val" and r.trust["calibration_rows"] == r.train_rows + r.val_rows
    assert r.trust["val_known_kept"] is None and r.trust["known_rows"] == 32  # the threshold: rows held out one by one
    ckpt = torch.load(r.checkpoint, weights_only=True)
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])
    assert head.temperature_used == r.trust["temperature"] != 1.0
    kept = fit_head(FitHeadConfig(cache=cache, folds=3, refit=False, runs_dir=str(tmp_path / "b")))
    assert "refit_rows" not in kept.fit_info and kept.trust["known_rows"] == kept.train_rows == 28
    assert kept.val_acc == r.val_acc and kept.tuning["choice"] == r.tuning["choice"]


@pytest.mark.parametrize("wider_wins_nested", [True, False])
def test_tune_keeps_a_wider_choice_only_when_nested_cv_confirms_it(cache, tmp_path, monkeypatch, wider_wins_nested):
    from pipeline.heads import fit_head as fh

    def challenger(cfg, shape, result):  # the wide search's winner is not one of the default's settings
        default = fh._default_row(cfg, shape, result)
        return next(r for r in result["table"] if r["key"] != default["key"] and r["setting"]["head"] != "torch")

    good = {"acc_mean": 1.0, "acc_std": 0.0, "log_loss_mean": 0.01, "log_loss_std": 0.0}
    bad = {"acc_mean": 0.5, "acc_std": 0.0, "log_loss_mean": 0.7, "log_loss_std": 0.0}
    monkeypatch.setattr(fh, "_default_unless_beaten", challenger)
    monkeypatch.setattr(fh, "_nested", lambda *a: {"tune": good, "default": bad} if wider_wins_nested else
                        {"tune": bad, "default": good})
    r = fit_head(FitHeadConfig(cache=cache, tune=True, folds=3, runs_dir=str(tmp_path / "runs")))
    assert (not r.tuning["choice"].startswith("stack|")) == wider_wins_nested  # the default's choice: a stack
    assert r.tuning["nested"]["tune"] == (good if wider_wins_nested else bad)
    # the decision said in one line (the table showed the search's best and no stack row, so nothing said which)
    assert r.tuning["verdict"].startswith(f"--tune chose {r.tuning['choice']} (CV acc " if wider_wins_nested else
                                          f"--tune keeps the default head {r.tuning['choice']} (CV acc ")
    assert r.tuning["verdict"].endswith("better in nested CV too" if wider_wins_nested else "but not in nested CV "
                                        "(the search made again inside each outer fold)")


def test_nested_cv_scores_both_searches_on_rows_no_choice_saw(cache):
    from pipeline.heads.cache_views import CacheViews
    from pipeline.heads.fit_head import _nested

    cfg = FitHeadConfig(tune=True, folds=3)
    with FeatureCache(cache) as c:
        rows = CacheViews(c, np.arange(c.n))
        out = _nested(cfg, rows, ({"head": ["logreg"], "view": ["avg", "avgmax"], "normalize": ["l2"], "C": [1.0]},
                                  {"head": ["svm"], "view": ["avg"], "normalize": ["l2"], "C": [1.0]}), 2)
    assert set(out) == {"tune", "default"} and 0.5 <= out["default"]["acc_mean"] <= 1.0
    assert out["default"]["log_loss_mean"] > 0


@pytest.mark.parametrize("k", [2, 3])
def test_the_default_stacks_svcs_own_pairs_too_when_there_are_several_classes(k):
    from pipeline.heads.fit_head import _auto_grid, _default_row
    from pipeline.heads.model_selection import CVOptions, fit_setting, tune

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k), 20)
    rows = {"avg": rng.normal(0, 1, (len(y), 8)) + np.eye(8)[y] * 1.5}
    cfg = FitHeadConfig()
    result = tune(rows, y, _auto_grid(cfg), CVOptions(folds=3, threads=1, score="accuracy"), in_shape=(8, 1, 1))
    row = _default_row(cfg, (8, 1, 1), result)
    setting = row["setting"]
    # several classes: one-vs-rest SVM, SVC's one-vs-one pairs (coupled at a fitted scale) and logreg, three weights;
    # two classes: the pairs are the one-vs-rest SVM, so two
    assert (len(setting["weights"]), setting["C_pairs"] > 0) == ((3, True) if k > 2 else (2, False))
    assert (setting["pair_scale"] != 1.0) == (k > 2)
    head, _ = fit_setting(rows, y, setting, in_shape=(8, 1, 1), n_classes=k)
    assert head.config["pairs"] == (k > 2) and head.config["linear_skip"]
    assert (head.log_proba_of_rows(rows["avg"]).argmax(1) == y).mean() > 0.8


def test_a_few_photos_all_right_out_of_fold_the_default_takes_the_smallest_equally_accurate_logreg_c():
    """Every out-of-fold row right (a few photos a class): every C of logistic regression ties on CV accuracy, and
    the log-loss tie-break took the largest (C=1000: the largest logits, the lowest log-loss on rows all right),
    whose wrong test photos got 0.96-0.99 on the wrong class; of the equally accurate Cs the smallest now."""
    from pipeline.heads.fit_head import _auto_grid, _default_row
    from pipeline.heads.model_selection import CVOptions, tune

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 12)
    rows = {"avg": rng.normal(0, 0.3, (len(y), 8)) + np.eye(8)[y] * 3}
    cfg = FitHeadConfig()
    result = tune(rows, y, _auto_grid(cfg), CVOptions(folds=3, threads=1, score="accuracy"), in_shape=(8, 1, 1))
    logreg = [r for r in result["table"] if r["setting"]["head"] == "logreg"]
    tied = sorted(r["setting"]["C"] for r in logreg if r["acc_mean"] == 1.0)
    assert len(tied) == len(logreg) == 5  # every C right on every out-of-fold row
    assert min(logreg, key=lambda r: r["log_loss_mean"])["setting"]["C"] == 1000  # what the log-loss prefers
    assert _default_row(cfg, (8, 1, 1), result)["setting"]["C_logreg"] == tied[0] == 0.1


def test_five_photos_a_class_keep_the_pairs_scale_off_its_bound_and_the_head_below_certainty():
    """suggest with 5 labelled photos a class: every out-of-fold pair right, the pairs' scale ran towards its bound
    (100) as their NLL fell for ever, the stack's weights stayed at their start (1, 1, 1: nothing left to fit), and
    the head gave 1.0 (uncertainty 0 in float64) to 99 % of the photos of its classes, the point halfway between
    two classes too. The scale now pays the temperature's prior below PAIR_PRIOR_BELOW_ROWS rows a class."""
    from pipeline.heads.fit_head import _auto_grid, _default_row
    from pipeline.heads.model_selection import CVOptions, fit_setting, tune
    from pipeline.reports.suggest import uncertainty

    rng = np.random.default_rng(0)
    k, d = 4, 16
    centres = rng.normal(0, 1, (k, d))
    y = np.repeat(np.arange(k), 5)
    rows = {"avg": centres[y] + rng.normal(0, 0.5, (len(y), d))}
    cfg = FitHeadConfig()
    result = tune(rows, y, _auto_grid(cfg), CVOptions(folds=5, threads=1, score="accuracy"), in_shape=(d, 1, 1))
    setting = _default_row(cfg, (d, 1, 1), result)["setting"]
    assert 1.0 < setting["pair_scale"] < 20  # was 68.7
    head, _ = fit_setting(rows, y, setting, in_shape=(d, 1, 1), n_classes=k)
    test = np.repeat(np.arange(k), 50)
    p = np.exp(head.log_proba_of_rows(centres[test] + rng.normal(0, 0.5, (len(test), d))))
    assert (p.argmax(1) == test).mean() > 0.95
    assert (uncertainty(p) < 1e-9).mean() < 0.05  # was 0.99: suggest ranked them by its tie-break
    assert np.exp(head.log_proba_of_rows(centres[:2].mean(0, keepdims=True))).max() < 1 - 1e-6


@pytest.mark.parametrize("per_class, prior", [(8, True), (9, False)])
def test_the_pairs_scale_pays_the_prior_only_below_pair_prior_below_rows_a_class(monkeypatch, per_class, prior):
    """10 photos a class through fit-head's validation split leave 9 cross-validated: there and above, the pairs'
    scale is their NLL's alone, as before (the measurements of docs/heads.md rest on it)."""
    from pipeline.heads import model_selection
    from pipeline.heads.calibration import PRIOR_ROWS

    assert model_selection.PAIR_PRIOR_BELOW_ROWS == 9
    seen, fit = [], model_selection.fit_pair_scale
    monkeypatch.setattr(model_selection, "fit_pair_scale",
                        lambda *a, **kw: seen.append(kw.get("prior_rows", 0.0)) or fit(*a, **kw))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), per_class)
    rows = {"avg": rng.normal(0, 1, (len(y), 8)) + np.eye(8)[y] * 1.5}
    model_selection.tune(rows, y, {"head": ["svm"], "C": [1.0], "scheme": ["ovo"]},
                         model_selection.CVOptions(folds=4, threads=1), in_shape=(8, 1, 1))
    assert seen == [PRIOR_ROWS if prior else 0.0]


def test_fit_pair_scale_without_the_prior_runs_to_its_bound_on_pairs_all_right():
    from pipeline.heads.model_selection import fit_pair_scale

    y = np.repeat(np.arange(3), 5)
    sign = np.array([[1, 1, 0], [-1, 0, 1], [0, -1, -1]])[y]  # pairs (0,1), (0,2), (1,2): > 0 for the first class
    margins = sign * np.random.default_rng(0).uniform(0.5, 1.5, (len(y), 1)) + (sign == 0) * 0.3
    assert fit_pair_scale(margins, y, 3) > 50  # the NLL is flat at 1e-30 long before the bound, 100
    assert 1.0 < fit_pair_scale(margins, y, 3, prior_rows=1.0) < 20


def test_from_svm_floor_rows_a_class_the_stacks_svms_keep_their_floor_share_of_the_vote():
    """The NLL weights lean on the better calibrated member (logistic regression, last); from SVM_FLOOR_ROWS
    rows a class the SVMs keep SVM_SHARE_FLOOR of the vote (each member at its own temperature), split as the
    NLL split it; below, or where the NLL gives them more already, the NLL weights stand."""
    from pipeline.heads.calibration import fit_stack_weights, fit_temperature
    from pipeline.heads.model_selection import SVM_FLOOR_ROWS, SVM_SHARE_FLOOR, stack_weights

    rng = np.random.default_rng(0)

    def log_softmax(z):
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def members(per_class, svm_noise):  # two SVMs with confident mistakes, a calibrated logistic regression
        y = np.repeat(np.arange(3), per_class)
        svms = [log_softmax(8.0 * (np.eye(3)[y] + rng.normal(0, svm_noise, (len(y), 3)))) for _ in range(2)]
        return [*svms, log_softmax(np.eye(3)[y] + rng.normal(0, 0.5, (len(y), 3)))], y

    def svm_share(w, logps, y):
        shares = [wi * fit_temperature(lp, y) for wi, lp in zip(w, logps)]
        return sum(shares[:-1]) / sum(shares)

    logps, y = members(SVM_FLOOR_ROWS, 0.5)
    nll_weights = fit_stack_weights(logps, y)
    assert svm_share(nll_weights, logps, y) < SVM_SHARE_FLOOR - 0.1  # the NLL leans on logistic regression
    w = stack_weights(logps, y)
    assert svm_share(w, logps, y) == pytest.approx(SVM_SHARE_FLOOR)
    assert w[0] / w[1] == pytest.approx(nll_weights[0] / nll_weights[1])  # the SVMs split it as the NLL did
    few, y_few = members(SVM_FLOOR_ROWS - 1, 0.5)
    assert stack_weights(few, y_few) == fit_stack_weights(few, y_few)
    sure, y_sure = members(SVM_FLOOR_ROWS, 0.1)  # accurate SVMs: the NLL gives them the vote by itself
    assert stack_weights(sure, y_sure) == fit_stack_weights(sure, y_sure)


def test_past_max_pair_classes_the_default_leaves_the_pairs_out(monkeypatch):
    """The pairs' head grows with the square of the classes: above MAX_PAIR_CLASSES the stack is the
    one-vs-rest SVM and logreg alone, so 200 classes never make a head of half a gigabyte."""
    from pipeline.heads import model_selection
    from pipeline.heads.fit_head import _auto_grid, _default_row

    monkeypatch.setattr(model_selection, "MAX_PAIR_CLASSES", 2)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    rows = {"avg": rng.normal(0, 1, (len(y), 8)) + np.eye(8)[y] * 1.5}
    cfg = FitHeadConfig()
    result = model_selection.tune(rows, y, _auto_grid(cfg), model_selection.CVOptions(folds=3, threads=1),
                                  in_shape=(8, 1, 1))
    assert result["table"] and all(r["setting"].get("scheme") != "ovo" for r in result["table"])
    setting = _default_row(cfg, (8, 1, 1), result)["setting"]
    assert len(setting["weights"]) == 2 and setting["C_pairs"] == 0.0


def test_a_long_search_and_fit_say_how_far_they_are(cache, tmp_path, monkeypatch, capsys):
    """fit-head on 23,792 rows was silent for 11 s (the default head's final fit and refit) and --tune for 54 s
    (its cross-validation): the search now has a progress bar over its fits, and each long fit says it is still
    running (the interval shortened here; a slow fit simulated)."""
    import time

    import pipeline.heads.fit_head as fh
    import pipeline.progress as pg

    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    real = fh.fit_setting

    def slow(*a, **k):
        time.sleep(0.35)
        return real(*a, **k)

    monkeypatch.setattr(fh, "fit_setting", slow)
    fit_head(FitHeadConfig(cache=cache, runs_dir=str(tmp_path / "runs"), folds=2))
    err = capsys.readouterr().err.splitlines()
    cv = [line for line in err if line.startswith("cross-validation: ")]
    assert cv and cv[-1].startswith("cross-validation: 30/30 (100%)")  # 2 folds x the default's 15 settings
    fitting = [line for line in err if line.startswith("fitting the head on ") and ": still running, " in line]
    rows = {line.split()[4] for line in fitting}
    assert rows == {"28", "32"}  # the fit on the 28 training rows, then the refit on all 32


def test_the_default_head_on_rows_in_memory_cross_validates_a_sample_of_many_rows(monkeypatch):
    """suggest's default head cross-validated every labelled row: exact SVMs on 19,000 rows per fold for a folder of
    23,792 (minutes, silent). As fit-head, the search runs on a stratified sample of --kernel-components rows, every
    row of a class the sample would leave short of the folds kept; the choice is then fitted on every row."""
    import pipeline.heads.fit_head as fh
    from pipeline.heads.fit_head import default_head_on_rows

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 60, 6])
    avg = (np.eye(3)[labels] * 3 + rng.normal(0, 0.3, (len(labels), 3))).astype(np.float32)
    searched, fitted = [], []
    real_tune, real_fit = fh.tune, fh.fit_setting

    def tune(rows, y, *a, **k):
        searched.append(np.bincount(y))
        return real_tune(rows, y, *a, **k)

    def fit_setting(rows, y, *a, **k):
        fitted.append(len(y))
        return real_fit(rows, y, *a, **k)

    monkeypatch.setattr(fh, "tune", tune)
    monkeypatch.setattr(fh, "fit_setting", fit_setting)
    head, key = default_head_on_rows({"avg": avg}, labels, 3, (3, 1, 1), FitHeadConfig(kernel_components=40))
    (counts,) = searched
    assert counts.sum() < 60 and counts[2] == 6 and counts.min() >= 5  # the small class whole
    assert fitted == [len(labels)] and key.startswith("stack|avg|l2")


@pytest.mark.parametrize("command", ["fit-head", "compare-sklearn"])
def test_a_pool_cache_is_refused_naming_what_it_holds(tmp_path, make_cache, command):
    """suggest's pool cache (one unlabelled class) ended in the solver's 'needs samples of at least 2 classes'."""
    cache = make_cache(make_image_folder(tmp_path / "pool", per_class=3), purpose="pool").cache
    run = CliRunner().invoke(cli, [command, "--cache", cache, "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and "holds the unlabelled photos of a pool (suggest's): a head needs" in run.output
    assert not (tmp_path / "runs").exists()


def test_a_training_cache_of_the_old_decoding_rule_is_refused_with_what_to_do(tmp_path, make_cache, old_decoding):
    """fit-head --test-data extracts the test folder with the current rule (photos turned upright by EXIF): a
    training cache from before (decode_version 2) holds other pixels' rows; one line says to extract it again.
    evaluate --cache refuses a head fitted on it with the same words."""
    data = make_image_folder(tmp_path / "d", per_class=6)
    test = make_image_folder(tmp_path / "t", per_class=3, seed=5)
    with old_decoding():
        old = make_cache(data, dtype="float32").cache
    before = sorted((tmp_path / "features").iterdir())
    run = CliRunner().invoke(cli, ["fit-head", "--cache", old, "--test-data", str(test), "--head", "linear",
                                   "--epochs", "1", "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert ("would differ in decode_version: 2 vs 3 (photos decoded by the older rule 2: extract that data again "
            "with this version, and fit again a head made from it)") in run.output
    assert not (tmp_path / "runs").exists() and sorted((tmp_path / "features").iterdir()) == before  # no work
    head = fit_head(FitHeadConfig(head="linear", cache=old, epochs=1, runs_dir=str(tmp_path / "runs"))).checkpoint
    new = make_cache(data, dtype="float32", cache_dir=str(tmp_path / "new")).cache
    run = CliRunner().invoke(cli, ["evaluate", "--model", head, "--cache", new, "--split", "all",
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert "decode_version: 2 vs 3 (photos decoded by the older rule 2: extract that data again" in run.output


def test_a_test_copy_of_a_validation_photo_is_reported_once_the_head_is_refitted_on_it(tmp_path, make_cache):
    """The default head is refitted on every row, the validation rows included: a test photo equal to one of
    them was seen by the saved head, and the test accuracy counts it (it was reported only for the train rows)."""
    import shutil

    data = make_image_folder(tmp_path / "d", per_class=16)
    cache = make_cache(data).cache
    with FeatureCache(cache) as c:
        _, val_idx = split_indices(c.labels, 0.125, 0)
        val_photo = data / c.paths[val_idx[0]]
    other = make_image_folder(tmp_path / "other", per_class=5, seed=7)
    shutil.copy(val_photo, other / val_photo.parent.name / "copy.jpg")
    refitted = fit_head(FitHeadConfig(cache=cache, test_data=str(other), runs_dir=str(tmp_path / "runs")))
    assert refitted.test["overlap"] == [f"{val_photo.parent.name}/copy.jpg"]
    kept_apart = fit_head(FitHeadConfig(cache=cache, test_data=str(other), refit=False, runs_dir=str(tmp_path / "r")))
    assert kept_apart.test["overlap"] == []


def test_a_test_cache_of_other_classes_is_refused_before_the_fit_naming_the_classes(tmp_path, make_cache,
                                                                                     monkeypatch):
    """--test-cache was checked after the fit (minutes with --tune, and every head of compare-sklearn), and a
    cache of other classes was sent to '--test-data DIR extracts the test folder with the training cache's
    network', which would refuse that folder too."""
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8)).cache
    other = make_cache(make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "green", "red")),
                       cache_dir=str(tmp_path / "tf")).cache

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before the test cache was checked")

    monkeypatch.setattr("pipeline.heads.fit_head.fit_on_rows", no_fit)
    with pytest.raises(UsageError, match=rf"^cache {re.escape(other)} has classes \['green'\] the model does not know; "
                                         r"its classes: blue, red$"):
        fit_head(FitHeadConfig(head="logreg", cache=cache, test_cache=other, runs_dir=str(tmp_path / "runs")))


def test_a_test_cache_of_some_of_the_heads_classes_is_scored_from_the_command_line(tmp_path, make_cache):
    """fit-head --test-cache refused a cache of fewer classes than the training cache's ('classes: ... vs ...'),
    though made by the same network: its rows are scored against the head's classes, matched by name, and the
    class it lacks is shown as '-' among the per-class test figures."""
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8, classes=("blue", "green", "red"))).cache
    other = make_cache(make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "red"), seed=5),
                       cache_dir=str(tmp_path / "tf")).cache
    run = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "logreg", "--test-cache", other,
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 0, run.output
    acc, loss = _remapped_scores(re.search(r"^checkpoint: (.+)$", run.output, re.M)[1], other)
    assert f"test acc {acc:.3f}, test loss {loss:.4f} (6 images of {other})" in run.output, run.output
    assert re.search(r"^per-class test acc: blue \d\.\d{3}, green -, red \d\.\d{3}$", run.output, re.M), run.output


@pytest.mark.parametrize("args, said", [
    (["--tune", "--head", "svm"], "--tune chooses the head kind (svm, kernel, logreg or linear) by CV itself; drop "
                                  "--head svm, or --tune to fit that head"),
    (["--recipe", "seed", "--head", "logreg"], "--recipe seed is the tutorial's linear head on flat rows; drop --head "
                                               "logreg, or --recipe"),
    (["--recipe", "seed", "--tune"], "--recipe seed is the tutorial's linear head on flat rows; drop --tune, or "
                                     "--recipe"),
])
def test_a_head_kind_that_tune_or_the_seed_recipe_would_drop_is_refused(tmp_path, args, said):
    """--tune and --recipe seed choose the head themselves: a --head beside them was dropped without a word."""
    out = CliRunner().invoke(cli, ["fit-head", "--cache", str(tmp_path / "none.h5"), *args])
    assert out.exit_code == 2 and out.output == f"Error: {said}\n", out.output


def test_a_cache_inside_the_test_folder_is_refused_before_the_fit(tmp_path, make_cache, monkeypatch):
    """--test-data's cache goes beside the cache fitted on: one kept inside the test folder was refused after the fit,
    as '--cache-dir ... is inside the data folder ... (--data)', two options fit-head does not take."""
    test = make_image_folder(tmp_path / "test", per_class=3, seed=5)
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8), cache_dir=str(test / "red" / "features")).cache

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before the test folder was checked")

    monkeypatch.setattr("pipeline.heads.fit_head.fit_on_rows", no_fit)
    out = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "logreg", "--test-data", str(test),
                                   "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and out.output == (
        f"Error: --test-data {str(test)!r} holds the cache fitted on ({cache}), and its own cache would go beside it, "
        "among the test photos; move that cache out of the test folder\n"), out.output


def test_the_test_folder_is_extracted_at_the_precision_auto_gave_the_training_photos(tmp_path, make_cache,
                                                                                      monkeypatch):
    """--precision auto decides from the number of photos (int8 from 1,000 on a CPU with VNNI and torchao): a
    training cache of 40 photos in bf16 and a test folder of 1,020 were extracted in int8, then refused after the fit
    as 'made differently ... precision: bf16 vs int8 (--test-data DIR extracts the test folder with the training
    cache's network)'. Here auto is made to choose another precision for the test folder alone."""
    import pipeline.extraction.extract as ex

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8), precision="auto").cache
    with FeatureCache(cache) as c:
        trained_at = c.attrs["precision"]
    other = "fp32" if trained_at != "fp32" else "bf16"
    real = ex.auto_precision
    monkeypatch.setattr(ex, "auto_precision", lambda cfg, images, paid=False: (
        (other, "") if cfg.purpose == "test" and cfg.precision == "auto" else real(cfg, images, paid)))
    test = make_image_folder(tmp_path / "t", per_class=3)
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "runs")))
    with FeatureCache(r.test["cache"]) as t:
        assert t.attrs["precision"] == trained_at and r.test["rows"] == 6


def _tiny_weights_file(folder):
    from pipeline.extraction import backbones as bb

    folder.mkdir(parents=True, exist_ok=True)
    model = bb.load_backbone("tiny", "none").model
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, folder / "w.pt")
    (folder / "w.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "covers": "features"}))
    return folder / "w.pt"


def test_test_data_finds_the_weights_file_of_a_cache_made_with_a_relative_path(tmp_path, make_cache, monkeypatch):
    """extract --weights ../w.pt recorded the path as typed: fit-head --test-data run from another folder fitted the
    head, then stopped on "weights file '../w.pt' does not exist". The cache's absolute weights_path is used."""
    weights = _tiny_weights_file(tmp_path / "weights")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8), weights="../weights/w.pt").cache
    monkeypatch.chdir(tmp_path)
    test = make_image_folder(tmp_path / "t", per_class=3, seed=4)
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "runs")))
    assert r.test["rows"] == 6
    weights.unlink()  # moved away: said before the fit, naming whose file it is
    monkeypatch.setattr("pipeline.heads.fit_head.fit_on_rows", lambda *a, **k: pytest.fail("fitted first"))
    with pytest.raises(UsageError, match=r"^test_data is extracted with the weights the cache .* was made with, "
                                         r"'.*w\.pt', which no longer exists; put that file back"):
        fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(make_image_folder(tmp_path / "t2", seed=5)),
                               runs_dir=str(tmp_path / "runs")))


def _int8_cache_calibrated_elsewhere(tmp_path, make_cache) -> tuple:
    """(calibration folder, an int8 cache of another folder calibrated on it, a test folder, the int8 options)."""
    pytest.importorskip("torchao", reason="int8 needs the optional torchao (in the dev extra)")
    calib = make_image_folder(tmp_path / "calib", per_class=4, seed=3)
    int8 = {"precision": "int8", "calib_n": 8, "compile": "off"}
    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8), calib_data=str(calib), **int8).cache
    return calib, cache, make_image_folder(tmp_path / "t", per_class=3, seed=5), int8


def _fit_head_test_data_unfitted(cache, test, tmp_path, monkeypatch):
    """``fit-head --test-data test`` where a fit fails the test: its CliRunner result; no run folder was made."""
    monkeypatch.setattr("pipeline.heads.fit_head.fit_on_rows", lambda *a, **k: pytest.fail("fitted first"))
    r = CliRunner().invoke(cli, ["fit-head", "--cache", cache, "--head", "logreg", "--test-data", str(test),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
    return r


def test_an_int8_cache_is_tested_with_its_own_network_whatever_became_of_its_calibration_photos(tmp_path, make_cache):
    """--test-data was extracted by the training cache's int8 network calibrated again on its calibration photos:
    moved or changed since, fit-head refused (or once stopped after the fit), though the cache stores the
    observers that rebuild that network bitwise. Now it is rebuilt from them: the same test cache as before."""
    calib, cache, test, int8 = _int8_cache_calibrated_elsewhere(tmp_path, make_cache)
    first = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "r1")))
    calib.rename(tmp_path / "moved")
    moved = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "r2")))
    assert moved.test["cache"] == first.test["cache"] and moved.test["acc"] == first.test["acc"]  # a hit
    photo = next(p for p in sorted((tmp_path / "moved").rglob("*")) if p.is_file())
    photo.write_bytes(photo.read_bytes() + b"\0")  # the calibration photos changed
    changed = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "r3")))
    assert changed.test["cache"] == first.test["cache"] and changed.test["rows"] == 6


def _without_observers(cache) -> None:
    """``cache`` as made before caches stored their int8 observers."""
    import h5py

    from pipeline.cache.feature_cache import OBSERVERS

    with h5py.File(cache, "r+") as f:
        del f[OBSERVERS]


def test_an_older_int8_cache_whose_calibration_photos_moved_is_refused_before_the_fit(tmp_path, make_cache,
                                                                                      monkeypatch):
    """A cache made before observers were stored is calibrated again on its calibration photos: moved since, the
    fit ran, then stopped on "calibration folder '...' does not exist" (an option fit-head does not take). Refused
    before the fit, naming the folder; the way out it gives (extract with --calib-data at the new place, then
    --test-cache) scores the test photos."""
    calib, cache, test, int8 = _int8_cache_calibrated_elsewhere(tmp_path, make_cache)
    _without_observers(cache)
    calib.rename(tmp_path / "moved")
    r = _fit_head_test_data_unfitted(cache, test, tmp_path, monkeypatch)
    assert r.exit_code == 2 and r.output == (
        f"Error: --test-data is extracted with the int8 network of the cache {cache}, calibrated on the photos in "
        f"{str(calib.resolve())!r}, which no longer exists; put that folder back (or extract the test folder yourself "
        "with that cache's options and --calib-data where those photos are now, and pass --test-cache)\n"), r.output
    monkeypatch.undo()
    made = make_cache(test, calib_data=str(tmp_path / "moved"), cache_dir=str(tmp_path / "tf"), **int8).cache
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_cache=made, runs_dir=str(tmp_path / "runs")))
    assert r.test["rows"] == 6


def test_an_older_int8_cache_whose_calibration_photos_changed_is_refused_before_the_fit(tmp_path, make_cache,
                                                                                        monkeypatch):
    """Changed since (a photo edited or added), the calibration photos of a cache made before observers were stored
    cannot make its int8 network again: fit-head fitted, extracted the whole test folder, then refused that test
    cache by two fingerprints that differ. Refused before the fit and the extraction, naming the folder and the way
    out (--calib-data: a plain extract lends itself the folder's newest int8 cache's network); as they were, it
    runs."""
    calib, cache, test, int8 = _int8_cache_calibrated_elsewhere(tmp_path, make_cache)
    _without_observers(cache)
    photo = next(p for p in sorted(calib.rglob("*")) if p.is_file())
    kept = photo.read_bytes(), photo.stat().st_mtime_ns
    photo.write_bytes(kept[0] + b"\0")
    r = _fit_head_test_data_unfitted(cache, test, tmp_path, monkeypatch)
    assert r.exit_code == 2 and r.output == (
        f"Error: --test-data is extracted with the int8 network of the cache {cache}, calibrated on the photos in "
        f"{str(calib.resolve())!r}, which have changed since (photos added, removed or edited), so that network "
        f"cannot be made again; put them back as they were, or extract the training photos again with --calib-data "
        f"{str(calib.resolve())!r} (a new cache, calibrated on the photos as they are now) and fit on it\n"), r.output
    assert [f for f in os.listdir(os.path.dirname(cache)) if f.endswith(".h5")] == [os.path.basename(cache)]
    monkeypatch.undo()
    again = make_cache(tmp_path / "d", calib_data=str(calib.resolve()), **int8).cache  # the way out said
    r = fit_head(FitHeadConfig(head="logreg", cache=again, test_data=str(test), runs_dir=str(tmp_path / "runs2")))
    assert r.test["rows"] == 6
    photo.write_bytes(kept[0])
    os.utime(photo, ns=(kept[1], kept[1]))
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_data=str(test), runs_dir=str(tmp_path / "runs")))
    assert r.test["rows"] == 6


def test_a_test_cache_is_checked_once_before_the_fit_not_again_after_it(tmp_path, make_cache, monkeypatch):
    """fit-head checked --test-cache before the fit (check_test_cache), then again when it opened it after the fit:
    the same file, read twice to the same answer (nothing in the command writes it)."""
    import pipeline.heads.fit_head as fh

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8)).cache
    test = make_cache(make_image_folder(tmp_path / "t", per_class=3, seed=5), cache_dir=str(tmp_path / "tf")).cache
    checked, real = [], fh.check_test_cache
    monkeypatch.setattr(fh, "check_test_cache", lambda path, c: checked.append(str(path)) or real(path, c))
    r = fit_head(FitHeadConfig(head="logreg", cache=cache, test_cache=test, runs_dir=str(tmp_path / "runs")))
    assert checked == [test] and r.test["rows"] == 6


def test_a_test_folders_left_out_files_are_said_once(cache, tmp_path):
    """fit-head --test-data said a dangling link of the test folder three times (its classes checked, then extract's
    hit check and listing); compare-sklearn four. Once each now."""
    test = make_image_folder(tmp_path / "t", per_class=3, seed=5)
    (test / "red" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    for command in ("fit-head", "compare-sklearn"):
        run = CliRunner().invoke(cli, [command, "--cache", cache, "--test-data", str(test), "--runs-dir",
                                       str(tmp_path / "runs"), "--epochs", "1"])
        assert run.exit_code == 0, run.output
        assert run.stderr.count("red/gone.jpg: a dangling symlink") == 1, run.stderr


def test_test_photos_kept_as_known_are_reported_as_the_saved_head_scores_them(tmp_path, make_cache, image_folder):
    """fit-head --test-data said nothing of the unknown score on the test photos, the direct check of
    --known-share (a separate evaluate measured it); it reports the share kept, as the saved head scores them."""
    import pipeline

    cache = make_cache(image_folder).cache
    other = make_image_folder(tmp_path / "other", per_class=5, seed=7)
    r = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=5, test_data=str(other),
                               runs_dir=str(tmp_path / "runs")))
    head = pipeline.Head.load(r.checkpoint)
    scores = head.unknown_score(pipeline.Cache(r.test["cache"]))
    kept = float(np.mean(scores <= head.unknown_threshold_))
    assert r.test["known_kept"] == pytest.approx(kept) and r.metrics["test_known_kept"] == r.test["known_kept"]
    assert f"test photos kept as known: {kept:.1%} (--known-share 95%" in fit_head_text(r)
