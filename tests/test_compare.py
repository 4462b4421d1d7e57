from dataclasses import replace

import numpy as np
import pytest

from pipeline.cache.feature_cache import FeatureCache
from pipeline.heads.compare import CompareConfig, CompareResult, compare_sklearn
from pipeline.reports.present import compare_text
from pipeline.heads.fit_head import FitHeadConfig
from tests.conftest import make_image_folder


def test_both_models_on_the_same_split(tmp_path, monkeypatch, make_cache):
    data = make_image_folder(tmp_path / "d", per_class=16, classes=("blue", "green", "red"))
    cache = make_cache(data).cache
    import pipeline.heads.compare as compare

    seen = []
    real_split = compare.split_indices

    def spy(labels, val_fraction, seed):
        out = real_split(labels, val_fraction, seed)
        seen.append((val_fraction, seed, out[1].tolist()))
        return out

    monkeypatch.setattr(compare, "split_indices", spy)
    monkeypatch.setattr("pipeline.heads.fit_head.split_indices", spy)
    r = compare_sklearn(CompareConfig(cache=cache, val_fraction=0.25, seed=3,
                                      head=FitHeadConfig(head="linear", epochs=20, runs_dir=str(tmp_path / "runs"))))
    assert len(seen) == 7 and all(s == seen[0] for s in seen)  # auto, linear, logreg, kernel, 3 x sklearn: one split
    assert isinstance(r, CompareResult) and r.split["val_rows"] == 12 and r.test_cache is None
    auto, linear, logreg, kernel, sk, svc, plain_lr = r.models
    assert all(m["val_rows"] == 12 for m in r.models)
    assert [m["val_acc"] for m in r.models] == [1.0] * 7
    assert 0 <= sk["val_loss"] < 0.5 and svc["val_loss"] is None  # an SVC gives no probabilities
    assert 0 < plain_lr["val_loss"] < np.log(3)  # better than a uniform guess (l2 rows: soft probabilities)
    table = compare_text(r)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "val", "acc", "val", "log-loss", "fit", "time"]
    assert lines[2].startswith("auto Linear+LogSoftmax (avg, l2, RBF SVM C=") and "+ logreg C=" in lines[2]
    assert "by 5-fold CV)" in lines[2]
    assert lines[3].startswith("linear Linear+LogSoftmax (avg, l2, Adam lr=0.03, wd=0.0001, best epoch ")
    assert lines[4].startswith("logreg Linear+LogSoftmax (avg, l2, C=100)")
    assert lines[5].startswith("kernel Linear+LogSoftmax (avg, l2, C=100, RBF gamma=scale")
    assert lines[6].startswith("sklearn LogisticRegression (flat, standardized, C=1)")
    assert lines[7].startswith("sklearn SVC (avg, l2, RBF gamma=scale, C=") and " - " in lines[7]
    assert lines[8].startswith("sklearn LogisticRegression (avg, l2, C=") and "by 5-fold CV)" in lines[8]
    assert f"{sk['val_loss']:.4f}" in lines[6] and f"{linear['val_loss']:.4f}" in lines[3]
    assert lines[-1].startswith("(same split: 36 train / 12 val rows, seed 3; cache ")
    per_class = [line.split(":")[0] for line in lines if line.startswith("per-class val acc, ")]
    assert len(set(per_class)) == len(per_class) == 7  # the two LogisticRegressions named apart by their view
    assert {"per-class val acc, sklearn LogisticRegression (flat)", "per-class val acc, auto Linear+LogSoftmax (avg)",
            "per-class val acc, sklearn LogisticRegression (avg)"} <= set(per_class)


def test_bad_C_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="--C must be positive"):
        compare_sklearn(CompareConfig(cache=str(tmp_path / "x.h5"), C=0))


def test_compare_sklearn_C_is_the_baselines_never_the_heads(tmp_path, make_cache):
    import pipeline

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=8)).cache
    rows = pipeline.compare_sklearn(cache, C=0.5, val_fraction=0.25, runs_dir=str(tmp_path / "runs"))
    by_kind = {r["model"].split()[0] + " " + r["model"].split()[1]: r["model"] for r in rows}
    assert "C=100" in by_kind["logreg Linear+LogSoftmax"] and "C=100" in by_kind["kernel Linear+LogSoftmax"]
    flat, plain = (r["model"] for r in rows if r["model"].startswith("sklearn LogisticRegression"))
    assert "(flat, standardized, C=0.5)" in flat and "C=0.5" not in plain  # the plain recipe's C is by CV


def test_the_scikit_learn_fits_say_they_are_still_running(tmp_path, monkeypatch, make_cache, capsys):
    """compare-sklearn on 23,792 rows was silent for 33 s (the flat LogisticRegression) and 14 s (the SVC's grid
    search): each now says it is still running (the interval shortened here, slow fits simulated)."""
    import time

    import pipeline.heads.compare as compare
    import pipeline.progress as pg

    class SlowLogisticRegression(compare.LogisticRegression):
        def fit(self, *a, **k):
            time.sleep(0.35)
            return super().fit(*a, **k)

    class SlowGridSearchCV(compare.GridSearchCV):
        def fit(self, *a, **k):
            time.sleep(0.35)
            return super().fit(*a, **k)

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=12)).cache
    monkeypatch.setattr(compare, "LogisticRegression", SlowLogisticRegression)
    monkeypatch.setattr(compare, "GridSearchCV", SlowGridSearchCV)
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    with FeatureCache(cache) as c:
        compare.fit_sklearn(CompareConfig(cache=cache), c)
        compare.fit_plain(CompareConfig(cache=cache), c, "svc")
    err = capsys.readouterr().err
    assert "fitting scikit-learn's LogisticRegression on 20 flat rows: still running, " in err
    assert "fitting scikit-learn's SVC, C by 5-fold GridSearchCV, on 20 rows: still running, " in err


def test_the_plain_recipes_are_the_issues_and_the_head_tables(tmp_path, make_cache):
    """compare-sklearn's SVC searched C in [1, 10, 100] and had no logistic-regression recipe, so it showed
    neither bar the default head is measured against in bench/head_table.py (SVC() and LogisticRegression,
    C by 5-fold CV from [0.1 .. 100] and [0.1 .. 1000], on avg-pooled l2 rows); scored as the bench scores them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from pipeline.heads.cache_views import CacheViews
    from pipeline.heads.compare import PLAIN_RECIPES, fit_plain
    from pipeline.heads.epoch_loop import split_indices
    from pipeline.heads.feature_views import Normalizer

    bench = _head_table()
    assert {k: list(g) for k, (_, g) in PLAIN_RECIPES.items()} == {k: g for k, (_, g) in bench.RECIPES.items()}

    data = make_image_folder(tmp_path / "d", per_class=14, classes=("blue", "green", "red"), seed=4)
    cache = make_cache(data).cache
    cfg = CompareConfig(cache=cache, val_fraction=0.25, seed=1)
    with FeatureCache(cache) as c:
        tr, va = split_indices(c.labels, cfg.val_fraction, cfg.seed)
        rows = {k: Normalizer("l2").transform(CacheViews(c, i, 64)["avg"]) for k, i in (("tr", tr), ("va", va))}
        for kind, est, grid in (("svc", SVC(), [0.1, 1, 10, 100]),
                                ("logreg", LogisticRegression(max_iter=2000), [0.1, 1, 10, 100, 1000])):
            ref = GridSearchCV(est, {"C": grid}, cv=5).fit(rows["tr"], c.labels[tr])
            row = fit_plain(cfg, c, kind)
            assert f"C={ref.best_params_['C']:g} by 5-fold CV" in row["model"]
            assert row["val_acc"] == (ref.predict(rows["va"]) == c.labels[va]).mean()


def _head_table():
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("head_table", ROOT / "bench" / "head_table.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_head_tables_calibration_pairs_each_candidate_with_the_base_on_their_common_splits():
    """Issue 33's calibration bar on paired splits: a candidate's ECE (and its floor), log-loss and Brier against
    another checkout's defaults, split by split, only where both have the split (a recipe's row, without
    probabilities, is left out)."""
    rng = np.random.default_rng(0)
    metrics = ("ece", "ece_floor", "ece_best_t", "log_loss", "brier")
    store, base, new = {}, rng.uniform(0.01, 0.05, (5, 5)), rng.uniform(0.01, 0.05, (5, 5))
    for i in range(5):
        store[f"p|defaults old|{i}"] = {"acc": 0.9, **dict(zip(metrics, base[i]))}
        if i:  # split 0 missing: not paired
            store[f"p|defaults new|{i}"] = {"acc": 0.9, **dict(zip(metrics, new[i]))}
        store[f"p|svc|{i}"] = {"acc": 0.9}
    store["p|older|1"], store["p|older|2"] = ({"acc": 0.9, **dict(zip(metrics[:2] + metrics[3:], base[i, :4]))}
                                              for i in (1, 2))  # kept before ece_best_t was
    table = _head_table().calibration_markdown(store, "defaults old").splitlines()
    row = next(line for line in table if "| defaults new |" in line)
    d = new[1:] - base[1:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "4" and not any("svc" in line for line in table)
    for k in range(5):
        se = d[:, k].std(ddof=1) / 2
        assert cells[3 + k] == f"{new[1:, k].mean():.4f} ({d[:, k].mean():+.4f} ± {se:.4f})"
    older = [c.strip() for c in next(line for line in table if "| older |" in line).strip("|").split("|")]
    assert older[2] == "2" and older[5] == "-" and older[3] != "-"
    unpaired = _head_table().calibration_markdown(store, "older").splitlines()  # a base without the column
    row = [c.strip() for c in next(line for line in unpaired if "| defaults new |" in line).strip("|").split("|")]
    assert row[2] == "2" and row[5] == "-" and row[3] != "-"


def test_the_flat_baseline_fits_a_stratified_sample_that_fits_its_memory_and_says_so(tmp_path, make_cache,
                                                                                    monkeypatch, caplog):
    """The flat LogisticRegression held every training row twice (the rows and the scaler's copy: 4.4 GB at 25,000
    VGG-16 rows), and past 40,000 the flat view was refused with a ValueError: now rows past FLAT_FIT_BYTES are a
    stratified sample (every class kept), said in its row and the log; validation is scored in blocks, the same."""
    import logging

    import pipeline.heads.compare as compare

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=12, classes=("blue", "green", "red"))).cache
    cfg = CompareConfig(cache=cache, val_fraction=0.25)
    with FeatureCache(cache) as c:
        whole = compare.fit_sklearn(cfg, c)
        assert whole["fit_rows"] == whole["train_rows"] == 27 and "sample" not in whole["model"]
        monkeypatch.setattr(compare, "FLAT_FIT_BYTES", 10 * int(np.prod(c.feature_shape)) * 4)
        with caplog.at_level(logging.WARNING, logger="pipeline.heads.compare"):
            part = compare.fit_sklearn(replace(cfg, block_rows=4), c)
    assert part["fit_rows"] == 9 and part["train_rows"] == 27 and part["val_rows"] == 9  # 3 of each class's 9
    assert part["model"].endswith("a stratified sample of 9 of 27 training rows)")
    assert "fits a stratified sample of 9 of 27 training rows" in caplog.text
    assert set(part["per_class_val_acc"]) == {"blue", "green", "red"} and part["val_acc"] == 1.0


def test_the_default_heads_row_gives_each_part_of_its_stack_its_own_weight():
    """With several classes the stack's weights are (one-vs-rest SVM, one-vs-one SVM, logreg): the row showed the
    one-vs-one weight as the logreg's ('logreg C=10 x 0' for a stack that was all logreg) and left the pairs out."""
    from types import SimpleNamespace

    from pipeline.heads.compare import _describe

    setting = {"head": "stack", "C": 1.0, "C_logreg": 10.0, "C_pairs": 1.0, "weights": (0.0, 0.25, 1.34)}
    config = {"head": "auto", "folds": 5, "features": "avg", "normalize": "l2", "recipe": "default"}
    row = _describe(SimpleNamespace(tuning={"setting": setting}), config)
    assert "RBF SVM C=1 x 0 + one-vs-one SVM C=1 x 0.25 + logreg C=10 x 1.3, by 5-fold CV" in row
    two_classes = _describe(SimpleNamespace(tuning={"setting": {**setting, "C_pairs": 0.0, "weights": (0.5, 1.1)}}),
                            config)
    assert "(avg, l2, RBF SVM C=1 x 0.5 + logreg C=10 x 1.1, by 5-fold CV)" in two_classes


def test_a_class_too_small_for_the_default_heads_folds_is_said_as_compare_sklearns(tmp_path, make_cache):
    """compare-sklearn has no --head: its refusal of a 2-photo class named '--head auto', which it does not take."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    data = make_image_folder(tmp_path / "d", per_class=12)
    make_image_folder(data, per_class=2, classes=("green",), seed=3)
    out = CliRunner().invoke(cli, ["compare-sklearn", "--cache", make_cache(data).cache,
                                   "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "--head" not in out.output and out.output.count("\n") == 1, out.output
    assert ("compare-sklearn's first row, fit-head's default head: 5-fold cross-validation needs at least 5 rows "
            "of every class; the smallest class has 1 (training rows: --val-fraction's share is held out); add photos "
            "to the smallest class") in out.output


def test_a_test_cache_of_some_of_the_classes_is_scored_on_the_training_caches_classes(tmp_path, make_cache):
    """fit-head scores a test set lacking a class (its labels matched by name); compare-sklearn's scikit-learn rows
    read the same test cache with its own label indices and class count: red, 1 of (blue, red), was scored as green,
    1 of (blue, green, red), and the flat LogisticRegression's three columns overflowed the test cache's two."""
    from pipeline.heads.compare import fit_plain, fit_sklearn

    cache = make_cache(make_image_folder(tmp_path / "d", per_class=12, classes=("blue", "green", "red"))).cache
    test = make_cache(make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "red"), seed=5),
                      cache_dir=str(tmp_path / "tf")).cache
    cfg = CompareConfig(cache=cache)
    with FeatureCache(cache) as c:
        rows = [fit_sklearn(cfg, c, test), fit_plain(cfg, c, "svc", test), fit_plain(cfg, c, "logreg", test)]
    assert [r["test_acc"] for r in rows] == [1.0] * 3
    assert rows[0]["test_loss"] < 0.1 and rows[2]["test_loss"] < np.log(3)


def test_the_test_sets_warnings_are_said_once_per_command_not_once_per_head(tmp_path, make_cache):
    """compare-sklearn fits four head kinds through fit-head, each scoring the test set: 'the test set ... has no
    photos of green', 'photos changed since' and 'test images have the same content as training images' were each
    logged four times, once per kind."""
    import shutil

    from click.testing import CliRunner

    from pipeline.cli import cli

    data = make_image_folder(tmp_path / "d", per_class=12, classes=("blue", "green", "red"))
    cache = make_cache(data).cache
    photos = make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "red"), seed=5)
    one = next(p for p in sorted((data / "blue").iterdir()))
    shutil.copy(one, photos / "blue" / f"copy{one.suffix}")
    test = make_cache(photos, cache_dir=str(tmp_path / "tf")).cache
    shutil.copy(one, data / "red" / f"new{one.suffix}")  # the training folder changed since its cache
    out = CliRunner().invoke(cli, ["compare-sklearn", "--cache", cache, "--test-cache", test, "--epochs", "2",
                                   "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    lines = out.stderr.splitlines()
    said = [line for line in lines if "has no photos of" in line]
    assert said == [f"the test set {test} has no photos of green: those classes are not scored"], said
    assert len([line for line in lines if "1 test image has the same content as a training image (" in line]) == 1
    assert len([line for line in lines if "added" in line and cache in line]) == 1, lines


def test_test_photos_copied_from_training_are_said_once_with_the_default_heads_count(tmp_path, make_cache):
    """A test folder of copies of the training photos: compare-sklearn said two overlap lines with different counts
    (the default head, refitted on every row, saw them all; the other kinds not the validation rows)."""
    import re
    import shutil

    from click.testing import CliRunner

    from pipeline.cli import cli

    data = make_image_folder(tmp_path / "d", per_class=12, classes=("blue", "red"))
    shutil.copytree(data, tmp_path / "t")
    cache = make_cache(data).cache
    test = make_cache(tmp_path / "t", cache_dir=str(tmp_path / "tf")).cache
    out = CliRunner().invoke(cli, ["compare-sklearn", "--cache", cache, "--test-cache", test, "--epochs", "2",
                                   "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    said = [line for line in out.stderr.splitlines() if re.search(r"test images? (has|have) the same content", line)]
    assert len(said) == 1 and "24 test images have the same content as training images" in said[0], said
