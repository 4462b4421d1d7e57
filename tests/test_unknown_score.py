"""The unknown score: blocked k-NN cosine distances, the threshold, and a third kind of photo flagged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cli
from pipeline.cache.feature_cache import FeatureCache
from pipeline.heads.cache_views import head_scores
from pipeline.heads.epoch_loop import split_indices
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.heads.probe_heads import ProbeHead
from pipeline.errors import UsageError
from pipeline.heads.unknown_score import (
    fit_unknown,
    held_out_scores,
    kept_indices,
    knn_distance,
    known_rows,
    pooled_rows,
    pooled_rows_np,
    threshold_for,
)
from pipeline.reports.evaluate import EvaluateConfig, evaluate
from tests.conftest import make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


def test_knn_distance_in_blocks_is_the_brute_force_kth_neighbour():
    rng = np.random.default_rng(0)
    known, q = pooled_rows_np(rng.normal(size=(50, 6))), pooled_rows_np(rng.normal(size=(7, 6)))
    brute = 1 - np.sort(q @ known.T, axis=1)[:, ::-1][:, 4]  # the 5th most similar
    got = knn_distance(torch.from_numpy(q), torch.from_numpy(known), k=5, block=8).numpy()  # 7 blocks of 8 rows
    assert np.allclose(got, brute, atol=1e-6)
    assert np.allclose(knn_distance(torch.from_numpy(q), torch.from_numpy(known), k=500).numpy(),
                       1 - (q @ known.T).min(1), atol=1e-6)  # k beyond the rows: the farthest


def test_threshold_keeps_the_stated_share_and_held_out_rows_exclude_themselves():
    scores = np.random.default_rng(1).random(200)
    for share in (0.5, 0.95, 1.0):
        t = threshold_for(scores, share)
        assert (scores <= t).mean() >= share and (scores < t).mean() < share
    rows = np.random.default_rng(2).normal(size=(30, 4))
    known = known_rows(rows)
    assert np.all(held_out_scores(rows, known, 1) > 1e-3)  # not the row itself (distance 0)
    assert known.dtype == np.float16
    kept = kept_indices(np.arange(100, 130), 10, 0)
    assert len(set(kept)) == 10 and set(kept) <= set(range(100, 130)) and list(kept) == sorted(kept)
    assert list(kept_indices(np.arange(5), 10, 0)) == list(range(5))
    assert list(kept_indices(np.arange(5), 0, 0)) == list(range(5))


@pytest.fixture
def colours(tmp_path, make_cache):
    """A cache of blue and red photos (2 x 40), and folders of new blue/red photos and of green ones."""
    known = make_image_folder(tmp_path / "known", per_class=40, classes=("blue", "red"), seed=0)
    new = make_image_folder(tmp_path / "new", per_class=10, classes=("blue", "red"), seed=5)
    green = make_image_folder(tmp_path / "green", per_class=12, classes=("green",), seed=7)
    return {"cache": make_cache(known).cache, "new": new, "green": green}


def test_a_head_on_two_colours_flags_the_third_and_keeps_the_stated_share(tmp_path, colours):
    r = fit_head(FitHeadConfig(cache=colours["cache"], head="logreg", known_share=0.9, val_fraction=0.25,
                               runs_dir=str(tmp_path / "runs")))
    assert r.trust["known_rows"] == r.train_rows and r.trust["unknown_k"] == 10
    ckpt = torch.load(r.checkpoint, weights_only=True)
    head = ProbeHead.from_checkpoint(ckpt["head"], ckpt["state_dict"])
    assert head.has_unknown and ckpt["state_dict"]["known_rows"].dtype == torch.float16
    with FeatureCache(colours["cache"]) as c:  # validation rows + each training row against the others
        train, val = split_indices(c.labels, 0.25, 0)
        _, val_ood = head_scores(head, c, val, "cpu", 1024)
        feats = c.features[:].astype(np.float32).mean((2, 3))
    held = np.concatenate([val_ood, held_out_scores(feats[train], known_rows(feats[train]), 10)])
    assert (held <= r.trust["unknown_threshold"]).mean() >= 0.9
    out = CliRunner().invoke(cli.cli, ["predict", str(colours["green"]), str(colours["new"]), "--model",
                                       r.checkpoint, "--format", "json", "--workers", "0"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert all({"class", "probability", "unknown", "ood_score"} <= set(row) for row in rows)
    green = [row for row in rows if "/green/" in row["path"]]
    known = [row for row in rows if "/green/" not in row["path"]]
    assert len(green) == 12 and all(row["unknown"] for row in green)
    assert all(row["class"] in ("blue", "red") for row in green)  # the best class is still named
    assert np.mean([row["unknown"] for row in known]) <= 0.2
    assert min(row["ood_score"] for row in green) > max(row["ood_score"] for row in known)
    # evaluate on a folder of none of the classes: the share flagged
    e = evaluate(EvaluateConfig(model=r.checkpoint, data=str(colours["green"]), workers=0,
                                runs_dir=str(tmp_path / "runs")))
    assert e.foreign and e.rows == 12 and e.unknown["share"] == 1.0 and e.accuracy is None
    with open(f"{e.run_dir}/metrics.json") as saved:
        assert list(e.to_dict()) == list(json.load(saved))  # a foreign folder's keys: no scores
    text = CliRunner().invoke(cli.cli, ["evaluate", "--model", r.checkpoint, "--data", str(colours["green"]),
                                        "--workers", "0", "--runs-dir", str(tmp_path / "runs")])
    assert text.exit_code == 0 and "unknown: 12 of 12 photos (100.0%)" in text.stdout


def test_a_cache_of_other_photos_is_scored_for_unknown_as_a_folder_of_them_is(tmp_path, colours, make_cache):
    """A cache of photos of none of the head's classes (extracted once, the costly part) was refused by evaluate
    --cache, and by the API's predict, predict_proba and unknown_score: "has classes ['green'] the model does not
    know", the one thing the unknown score is for. Now it is scored as --data scores such a folder."""
    r = fit_head(FitHeadConfig(cache=colours["cache"], head="logreg", val_fraction=0.25,
                               runs_dir=str(tmp_path / "runs")))
    other = make_image_folder(tmp_path / "other", per_class=6, classes=("green",), seed=7)
    make_image_folder(tmp_path / "more", per_class=6, classes=("green",), seed=8)
    (tmp_path / "more" / "green").rename(other / "lime")  # extract takes two classes: two of green photos
    green = make_cache(other).cache
    e = evaluate(EvaluateConfig(model=r.checkpoint, cache=green, runs_dir=str(tmp_path / "runs")))
    assert e.foreign and e.rows == 12 and e.unknown["share"] == 1.0 and e.accuracy is None
    text = CliRunner().invoke(cli.cli, ["evaluate", "--model", r.checkpoint, "--cache", green,
                                        "--runs-dir", str(tmp_path / "runs")])
    assert text.exit_code == 0 and "unknown: 12 of 12 photos (100.0%)" in text.stdout, text.output
    import pipeline

    head = pipeline.Head.load(r.checkpoint)
    assert list(head.predict(green, unknown=True)) == ["unknown"] * 12
    assert head.predict_proba(green).shape == (12, 2) and np.all(head.unknown_score(green) > head.unknown_threshold_)
    with pytest.raises(pipeline.UsageError, match="none of the head's classes"):  # no accuracy of 0.0
        head.score(green)


def test_one_kept_row_is_refused_not_a_threshold_at_the_floor(tmp_path, colours):
    """fit-head --unknown-rows 1 (the default head, refitted: no validation rows held out) scored its one kept row
    'against the others' at its distance to itself, 0: threshold 0.0010, every other photo 'unknown', said as
    "keeps 1 of 1 held-out photos (100%)". Now refused in one line, before the fit."""
    out = CliRunner().invoke(cli.cli, ["fit-head", "--cache", colours["cache"], "--unknown-rows", "1",
                                       "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "--unknown-rows 1: each kept training row is scored against the other" in out.output
    assert not (tmp_path / "runs").exists()
    rows = np.random.default_rng(0).normal(size=(5, 4))
    with pytest.raises(UsageError, match="give at least 2"):  # the API's arrays, fitted without the CLI's checks
        fit_unknown(rows[:1], rows[1:], 1, 0.95)
    assert fit_unknown(rows[:2], rows[2:], 1, 0.95).held_out == 5  # 2 kept rows: each against the other
    import pipeline

    with pytest.raises(UsageError, match=r"^(Head: )?unknown_rows=1: each kept training row"):  # not --unknown-rows
        pipeline.Head(unknown_rows=1, runs_dir=str(tmp_path / "runs")).fit(colours["cache"])


def test_no_unknown_score_when_asked_for_none(tmp_path, colours):
    r = fit_head(FitHeadConfig(cache=colours["cache"], head="logreg", unknown_rows=0, runs_dir=str(tmp_path / "r")))
    ckpt = torch.load(r.checkpoint, weights_only=True)
    assert "known_rows" not in ckpt["state_dict"] and "unknown_threshold" not in r.trust
    e = CliRunner().invoke(cli.cli, ["evaluate", "--model", r.checkpoint, "--data", str(colours["green"]),
                                     "--workers", "0", "--runs-dir", str(tmp_path / "r")])
    assert e.exit_code == 2 and "classes ['green'] the model does not know" in e.output


@pytest.mark.parametrize("option, value", [("--known-share", "0"), ("--known-share", "1.5"),
                                           ("--unknown-rows", "-1"), ("--unknown-k", "0")])
def test_bad_options_are_one_line(tmp_path, colours, option, value):
    e = CliRunner().invoke(cli.cli, ["fit-head", "--cache", colours["cache"], option, value,
                                     "--runs-dir", str(tmp_path)])
    assert e.exit_code == 2 and option in e.output


def test_identical_training_photos_get_a_threshold_above_rounding_noise_and_the_share_kept_is_measured(
        tmp_path, make_cache):
    """All-identical training photos once gave a threshold of -4.8e-7 (their distances to each other are
    rounding noise): the training photos themselves were unknown in fp32 (not in bf16), and the summary
    said "keeps 95 %" where it kept 2 of 2."""
    import shutil

    from pipeline.heads.unknown_score import THRESHOLD_FLOOR, fit_unknown

    assert threshold_for(np.full(20, -4.8e-7), 0.95) == THRESHOLD_FLOOR
    one = make_image_folder(tmp_path / "one", per_class=1)
    data = tmp_path / "same"
    for c in ("blue", "red"):
        (data / c).mkdir(parents=True)
        for i in range(16):  # more than k + 1 = 11 a class: every neighbour that counts is the same photo
            shutil.copy(one / c / f"{c}.0.jpg", data / c / f"{i}.jpg")
    cache = make_cache(data, dtype="float32").cache
    r = fit_head(FitHeadConfig(cache=cache, head="logreg", runs_dir=str(tmp_path / "runs")))
    assert r.trust["unknown_threshold"] >= THRESHOLD_FLOOR
    assert r.trust["known_kept"] == 1.0 and r.trust["held_out_rows"] == r.val_rows + r.train_rows
    out = CliRunner().invoke(cli.cli, ["predict", str(data), "--model", r.checkpoint, "--format", "json",
                                       "--precision", "fp32", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert not any(row["unknown"] for row in json.loads(out.stdout))  # its own training photos are known
    text = CliRunner().invoke(cli.cli, ["fit-head", "--cache", cache, "--head", "logreg",
                                        "--runs-dir", str(tmp_path / "runs")])
    n = r.trust["held_out_rows"]
    assert text.exit_code == 0 and f"keeps {n} of {n} held-out photos (100%; asked 95%)" in text.output
    rows = np.random.default_rng(0).normal(size=(40, 6))  # a spread of scores: kept is about the share asked
    fit = fit_unknown(rows[:30], rows[30:], 3, 0.9)
    assert 0.9 <= fit.kept < 0.95 and fit.held_out == 40


def test_a_photo_that_is_a_kept_row_is_at_distance_zero_never_below():
    """1 - cosine of a row with itself rounded to -3.6e-07 on a third of 200 rows: a negative 'distance'."""
    x = pooled_rows(torch.randn(200, 64, generator=torch.Generator().manual_seed(0)))
    d = knn_distance(x, x, k=1)
    assert d.min().item() == 0.0 and d.max().item() < 1e-6


def test_the_log_line_and_the_result_say_the_same_share_kept_of_named_rows(tmp_path, colours, caplog):
    """The log said 'keeps 100.0% of 20 val rows' and the result 'keeps 76 of 80 held-out photos (95%)':
    two figures of different rows (the validation rows alone; those and the training rows against the
    others), neither named. Both now give the one count and name its parts."""
    import logging

    from pipeline.reports.present import trust_lines

    with caplog.at_level(logging.INFO, logger="pipeline.heads.trust"):
        r = fit_head(FitHeadConfig(cache=colours["cache"], head="logreg", known_share=0.9, val_fraction=0.25,
                                   runs_dir=str(tmp_path / "runs")))
    t = r.trust
    kept, val_kept = round(t["known_kept"] * t["held_out_rows"]), round(t["val_known_kept"] * r.val_rows)
    said = (f"keeps {kept} of {r.val_rows + r.train_rows} held-out photos ({t['known_kept']:.0%}; asked 90%): "
            f"{val_kept} of {r.val_rows} validation rows, {kept - val_kept} of {r.train_rows} training rows "
            "scored against the others")
    logged = [m for m in caplog.messages if m.startswith("unknown score:")]
    assert len(logged) == 1 and said in logged[0], logged
    assert said in trust_lines(t)[1]
