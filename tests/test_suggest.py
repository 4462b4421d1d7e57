"""suggest: which unlabelled photos to label next; the pool is cached like any folder and its rows reused by content."""
import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cache.feature_cache import newest_cache
from pipeline.cli import cli
from pipeline.reports.suggest import rank_pool, uncertainty
from tests.conftest import make_image_folder
from tests.test_row_donors import forward_passes  # noqa: F401  (the fixture)


def tiny_args(tmp_path):
    return ["--backbone", "tiny", "--weights", "none", "--workers", "0", "--cache-dir", str(tmp_path / "features")]


@pytest.fixture
def pool(tmp_path, image_folder):
    """A folder of 9 unlabelled photos (blue, red and green ones, loose and in a sub-folder) and one byte copy
    of a labelled photo."""
    made = make_image_folder(tmp_path / "made", per_class=3, classes=("blue", "red", "green"), seed=7)
    root = tmp_path / "pool"
    (root / "day2").mkdir(parents=True)
    for i, p in enumerate(sorted(made.rglob("*.jpg"))):
        shutil.copy(p, (root / "day2" if i % 2 else root) / f"p{i}.jpg")
    shutil.copy(image_folder / "blue" / "blue.0.jpg", root / "copy_of_blue0.jpg")
    return root


def test_suggest_writes_the_ranked_list_and_its_page(tmp_path, image_folder, pool):
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["suggest", "--data", str(image_folder), "--pool", str(pool), "--k", "5",
                                   "--output", str(out), "--json", *tiny_args(tmp_path)])
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["pool"] == 10 and result["labelled"] == 24 and result["skipped"] == 1
    with open(out / "suggestions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    paths = [r["path"] for r in rows]
    assert len(set(paths)) == 5 and all((pool / p).is_file() for p in paths)
    assert "copy_of_blue0.jpg" not in paths  # the labelled folder holds these bytes already
    assert {r["predicted"] for r in rows} <= {"blue", "red"}
    page = (out / "suggestions.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and "src=\"http" not in page
    # the pool's cache is an ordinary cache, but never the default one to train on
    assert newest_cache(tmp_path / "features").attrs["data_root"] == str(image_folder.resolve())


def test_photos_of_no_labelled_class_are_flagged_and_said_on_stderr(tmp_path, image_folder, pool):
    """A pool of sign-digit photos with a few food photos (labelled: the digits): 5 of the top 6 suggestions were
    food, and nothing but their distance said so; a user labelled them as digits. Here the pool's green photos
    are of no labelled class (blue, red): each suggested photo says whether it looks like none of the classes
    (the unknown score fit-head's heads carry), in the CSV, the page, the JSON rows, and one line on stderr."""
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["suggest", "--data", str(image_folder), "--pool", str(pool), "--k", "9",
                                   "--output", str(out), "--json", *tiny_args(tmp_path)])
    assert run.exit_code == 0, run.output
    green = {"day2/p3.jpg", "p4.jpg", "day2/p5.jpg"}  # the pool fixture's names of made/green/*
    with open(out / "suggestions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["unknown"] for r in rows} == {"true", "false"}
    assert {r["path"] for r in rows if r["unknown"] == "true"} == green
    assert all(float(r["ood_score"]) >= 0 for r in rows)
    result = json.loads(run.stdout)
    assert {r["path"] for r in result["rows"] if r["unknown"] is True} == green and result["unknown"] == 3
    warning = [line for line in run.stderr.splitlines() if "look like none of the classes" in line]
    ranks = ", ".join(r["rank"] for r in rows if r["unknown"] == "true")
    assert len(warning) == 1 and f"3 of the 9 suggested photos (ranks {ranks})" in warning[0], run.stderr
    assert "new class" in warning[0] and "out of the pool" in warning[0]
    page = (out / "suggestions.html").read_text()
    assert page.count("<b class='given'>none of the classes</b>") == 3 and "3 of these 9 look like none" in page


def test_a_pool_of_the_labelled_classes_is_not_flagged(tmp_path, image_folder):
    from pipeline import api

    pool = make_image_folder(tmp_path / "pool", per_class=4, seed=5)  # blue and red, as labelled
    result = api.suggest(image_folder, pool, k=8, output=tmp_path / "out", backbone="tiny", weights="none",
                         workers=0, cache_dir=tmp_path / "features")
    assert len(result.rows) == 8 and not any(r["unknown"] for r in result.rows) and result.unknown == 0
    assert "none of the classes" not in result.html.read_text()


def test_a_suggested_photo_moved_into_its_class_costs_no_forward_pass(tmp_path, image_folder, pool, make_cache,
                                                                     forward_passes):  # noqa: F811
    from pipeline import api

    result = api.suggest(image_folder, pool, k=3, output=tmp_path / "out", backbone="tiny", weights="none",
                         workers=0, cache_dir=tmp_path / "features")
    assert forward_passes["images"] == 24 + 9  # the pool's copy of a labelled photo: its row reused too
    first = result.rows[0]["path"]
    shutil.move(pool / first, image_folder / "red" / "labelled_now.jpg")
    forward_passes["images"] = 0
    again = make_cache(image_folder)  # extract of the labelled folder: its row comes from the pool's cache
    assert (again.computed, again.reused, forward_passes["images"]) == (0, 25, 0)


def test_a_new_class_folder_costs_only_its_photos(tmp_path, image_folder, make_cache, forward_passes):  # noqa: F811
    make_cache(image_folder)
    make_image_folder(image_folder, per_class=4, classes=("green",), seed=3)
    forward_passes["images"] = 0
    again = make_cache(image_folder)
    assert (again.computed, again.reused, forward_passes["images"]) == (4, 24, 4)


def test_the_default_rule_skips_near_copies_that_margin_alone_would_all_pick():
    rng = np.random.default_rng(0)
    labelled = np.eye(8)[:2]
    base = rng.normal(size=(6, 8))
    pool = np.concatenate([np.repeat(base[:1], 3, 0), base[1:]])  # three copies of one photo, five others
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    proba = np.array([[0.5, 0.5]] * 3 + [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [0.95, 0.05]])
    assert uncertainty(proba)[0] == 1.0
    assert sorted(rank_pool(pool, labelled, proba, 3, "margin")) == [0, 1, 2]
    picked = rank_pool(pool, labelled, proba, 3)  # the default: spread among the 6 least certain
    assert len(set(picked.tolist()) & {0, 1, 2}) == 1 and len(set(picked.tolist())) == 3
    assert (rank_pool(pool, labelled, proba, 4, "random", seed=1) == rank_pool(pool, labelled, proba, 4, "random",
                                                                                seed=1)).all()


@pytest.mark.parametrize("where", ["pool_inside_data", "output_inside_pool"])
def test_overlapping_folders_are_refused(tmp_path, image_folder, pool, where):
    if where == "pool_inside_data":
        args = ["--data", str(image_folder), "--pool", str(image_folder / "blue")]
    else:
        args = ["--data", str(image_folder), "--pool", str(pool), "--output", str(pool / "out")]
    run = CliRunner().invoke(cli, ["suggest", *args, *tiny_args(tmp_path)])
    assert run.exit_code == 2 and ("overlap" in run.output or "inside the data folder" in run.output), run.output
    assert not (pool / "out").exists()


@pytest.mark.parametrize("name", ["suggestions.csv", "suggestions.html"])
def test_a_file_of_the_users_named_as_an_output_is_refused_an_earlier_suggests_replaced(tmp_path, image_folder, pool,
                                                                                        name):
    """suggest --output DIR replaced any suggestions.csv or suggestions.html there, a user's own file too. Now one
    of the user's is refused before any work (exit 2); an earlier suggest's list and page are replaced."""
    args = ["suggest", "--data", str(image_folder), "--pool", str(pool), "--k", "3", "--output", str(tmp_path / "out"),
            *tiny_args(tmp_path)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    theirs = tmp_path / "out" / name
    theirs.write_text("name,price\nbike,300\n" if name.endswith(".csv") else "<html>my page</html>")
    shutil.rmtree(tmp_path / "features")
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 2 and f"--output '{theirs}' exists and is not a " in run.output, run.output
    assert theirs.read_text().startswith(("name,price", "<html>my page")) and not (tmp_path / "features").exists()


def test_a_cache_dir_inside_the_pool_is_refused_before_anything_is_written(tmp_path, image_folder, pool):
    """The labelled folder's extraction used to write its cache into the pool before the pool's refused it."""
    args = ["--data", str(image_folder), "--pool", str(pool), "--output", str(tmp_path / "out"), "--backbone", "tiny",
            "--weights", "none", "--workers", "0", "--cache-dir", str(pool / "features")]
    run = CliRunner().invoke(cli, ["suggest", *args])
    assert run.exit_code == 2 and "--cache-dir" in run.output and "(--pool)" in run.output, run.output
    assert not (pool / "features").exists()


def test_a_copy_of_the_pool_is_named_and_shown_as_itself(tmp_path, image_folder, pool):
    """A copy keeping names, sizes and times hits the original's cache; its page named the original pool."""
    copy = shutil.copytree(pool, tmp_path / "elsewhere")
    for folder in (pool, copy):
        out = tmp_path / f"out-{folder.name}"
        run = CliRunner().invoke(cli, ["suggest", "--data", str(image_folder), "--pool", str(folder), "--k", "3",
                                       "--output", str(out), "--json", *tiny_args(tmp_path)])
        assert run.exit_code == 0, run.output
    assert len(list((tmp_path / "features").glob("*.h5"))) == 2  # the copy's pool: the original's cache, a hit
    page = (out / "suggestions.html").read_text()
    assert str(copy.resolve()) in page and str(pool.resolve()) not in page


def test_scoring_the_pool_says_it_is_still_running(tmp_path, image_folder, pool, monkeypatch, capsys):
    """A pool of 20,000 photos against a head of 6,000 support rows took 8 s without a line (19 s of silence with
    the refit before it); the interval is shortened here and the scoring slowed."""
    import time

    import pipeline.progress as pg
    from pipeline.heads.probe_heads import ProbeHead

    score = ProbeHead.log_proba_of_rows
    monkeypatch.setattr(ProbeHead, "log_proba_of_rows", lambda self, rows: time.sleep(0.35) or score(self, rows))
    monkeypatch.setattr(pg, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(pg, "_QUIET", False)
    run = CliRunner().invoke(cli, ["suggest", "--data", str(image_folder), "--pool", str(pool), "--k", "3",
                                   "--output", str(tmp_path / "out"), *tiny_args(tmp_path)])
    assert run.exit_code == 0, run.output
    assert "suggest: scoring the 10 pool photos: still running, " in capsys.readouterr().err + run.output


def test_photos_the_head_is_all_but_sure_of_are_ranked_by_the_runner_up_not_by_file_order():
    """The default (stacked) head gave 90 of 100 caltech20 pool photos probabilities of 1.0 - 1e-10 and less:
    1 - margin was exactly 0.0 for all of them, so 'margin' and the default rule's 2k candidates took them in
    the pool's file order. The runner-up class's probability orders them (the least sure first)."""
    second = np.array([1e-30, 1e-20, 1e-25, 1e-18, 1e-40])
    proba = np.stack([1.0 - second, second, np.zeros(5)], axis=1)
    assert (uncertainty(proba) == 0).all()  # the tie as float64 sees it
    assert rank_pool(np.eye(5), np.zeros((0, 5)), proba, 2, rule="margin").tolist() == [3, 1]
    from pipeline.reports.suggest import least_certain_first

    assert least_certain_first(proba).tolist() == [3, 1, 2, 0, 4]
    # the default rule's candidates are the 2k least sure: rows 3, 1, 2, 0, never the surest (4)
    assert 4 not in rank_pool(np.eye(5), np.zeros((0, 5)), proba, 2).tolist()
    mixed = np.vstack([proba, [[0.6, 0.4, 0.0]]])  # a plainly unsure photo still comes first
    assert least_certain_first(mixed)[0] == 5


def test_a_class_folder_of_only_unreadable_files_is_left_out_of_the_head_not_a_crash(tmp_path, image_folder, pool):
    """A class folder whose one file is not an image: the labelled cache lists the class with no row, and suggest
    stopped with 'unexpected ValueError: the training rows hold 2 of the 3 classes (a bug?)', exit 1."""
    data = tmp_path / "labelled"
    shutil.copytree(image_folder, data)
    (data / "zzz").mkdir()
    (data / "zzz" / "bad.jpg").write_bytes(b"not a photo")
    run = CliRunner().invoke(cli, ["suggest", "--data", str(data), "--pool", str(pool), "--k", "3",
                                   "--output", str(tmp_path / "out"), "--json", *tiny_args(tmp_path)])
    assert run.exit_code == 0, run.output
    assert "no readable photo of zzz" in run.stderr
    rows = json.loads(run.stdout)["rows"]
    assert len(rows) == 3 and {r["predicted"] for r in rows} <= {"blue", "red"}


def test_labelling_costs_no_forward_pass_where_precision_auto_is_int8(tmp_path, image_folder, pool, monkeypatch,
                                                                      forward_passes):  # noqa: F811
    """On a CPU where --precision auto picks int8 (1,000+ photos), each folder was calibrated on itself, as it is: a
    photo moved from the pool into the labelled folder changed both calibrations, so both networks, and the next
    suggest computed every row of both folders again. The labelled folder is now extracted with its earlier
    cache's network, and the pool with the labelled cache's: the moved photo's row is the pool cache's."""
    pytest.importorskip("torchao", reason="int8 needs the optional torchao (in the dev extra)")
    from pipeline import api
    from pipeline.extraction import extract as stage

    monkeypatch.setattr(stage, "auto_precision", lambda cfg, images, paid=False: ("int8", "precision auto: int8"))
    monkeypatch.setattr("pipeline.extraction.extract_range.should_compile", lambda *a, **k: False)  # seconds
    opts = dict(k=3, backbone="tiny", weights="none", workers=0, cache_dir=tmp_path / "features")
    result = api.suggest(image_folder, pool, output=tmp_path / "out", **opts)
    assert forward_passes["images"] == 24 + 9
    shutil.move(pool / result.rows[0]["path"], image_folder / "red" / "labelled_now.jpg")
    forward_passes["images"] = 0
    api.suggest(image_folder, pool, output=tmp_path / "out2", **opts)
    assert forward_passes["images"] == 0
    calibrations = []
    for path in (tmp_path / "features").glob("*.h5"):
        with h5py.File(path, "r") as f:
            calibrations.append(json.loads(f.attrs["calibration"])["calib_data"])
    assert len(calibrations) == 4 and len(set(calibrations)) == 1  # one network, the first calibration


def test_the_share_of_labelled_photos_flagged_is_known_share_and_said(tmp_path):
    """The unknown threshold keeps 95 % of held-out labelled photos, so about 1 in 20 photos of the labelled classes
    is flagged by design (measured on scenes6 and dogbreeds20 with classes held out: 3-4 %); suggest had no way to
    change it. --known-share sets it (as fit-head's and train's), and the line says the rate it gives."""
    rng = np.random.default_rng(3)  # photos of one class unlike each other (the fixtures' are near copies)
    for folder, n in ((tmp_path / "varied" / "blue", 12), (tmp_path / "varied" / "red", 12), (tmp_path / "vpool", 10)):
        folder.mkdir(parents=True)
        for i in range(n):
            noise = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(noise).resize((48, 48)).save(folder / f"{i}.jpg")

    def flagged(*share):
        out = tmp_path / f"out{len(share)}"
        run = CliRunner().invoke(cli, ["suggest", "--data", str(tmp_path / "varied"), "--pool", str(tmp_path / "vpool"),
                                       "--k", "10",
                                       "--output", str(out), "--json", *share, *tiny_args(tmp_path)])
        assert run.exit_code == 0, run.output
        result = json.loads(run.stdout)
        return result, {r["path"] for r in result["rows"] if r["unknown"]}, run.stderr

    default, some, said = flagged()
    assert "(about 1 in 20 are flagged by design, --known-share 0.95)" in said
    loose, more, said = flagged("--known-share", "0.5")
    assert loose["unknown_threshold"] < default["unknown_threshold"] and more > some
    assert "(about 1 in 2 are flagged by design, --known-share 0.5)" in said
