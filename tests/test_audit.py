"""audit on generated photos with planted problems: a wrong label, an exact duplicate, a leak into the test folder."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pipeline
from pipeline.cache.feature_cache import newest_cache
from pipeline.cli import cli
from pipeline.reports.audit import AuditResult
from tests.conftest import COLOURS, make_image_folder

TINY = {"backbone": "tiny", "weights": "none", "workers": 0}
TINY_ARGS = ["--backbone", "tiny", "--weights", "none", "--workers", "0"]


def photos(root, per_class=15, seed=0, classes=("blue", "green", "red")):
    """Photos of a class colour, each with its own shade and gradient (so no two are near copies)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = 40 + int(rng.integers(0, 16)), 48 + int(rng.integers(0, 16))
            shade = np.array(COLOURS[c]) + rng.normal(0, 25, 3)
            ramp = np.linspace(-1, 1, w)[None, :, None] * rng.normal(0, 40, 3)
            arr = np.clip(shade + ramp + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}.{i}.jpg", quality=90)
    return root


def planted(tmp_path):
    data, test = photos(tmp_path / "data"), photos(tmp_path / "test", per_class=5, seed=1)
    shutil.move(data / "blue" / "blue.3.jpg", data / "red" / "blue.3.jpg")  # a wrong label
    shutil.copy(data / "green" / "green.1.jpg", data / "green" / "copy.jpg")  # an exact duplicate
    shutil.copy(data / "red" / "red.2.jpg", test / "red" / "leak.jpg")  # a leak, same bytes
    Image.open(data / "green" / "green.4.jpg").save(test / "green" / "leak2.jpg", quality=60)  # re-encoded
    return data, test


def test_audit_finds_the_planted_problems(tmp_path):
    data, test = planted(tmp_path)
    r = pipeline.audit_folder(data, test_data=str(test), folds=3, threshold=0.999, cache_dir=str(tmp_path / "features"),
                       runs_dir=str(tmp_path / "runs"), **TINY)
    assert isinstance(r, AuditResult) and r.label_issues[0]["path"] == "red/blue.3.jpg"
    assert (r.label_issues[0]["given"], r.label_issues[0]["suggested"]) == ("red", "blue")
    exact = [g for g in r.duplicates if g["exact"]]
    assert [sorted(g["paths"]) for g in exact] == [["green/copy.jpg", "green/green.1.jpg"]]
    # the two planted leaks are the most similar pairs: the copy first (same bytes), then the re-encoded one
    top = [(lk["test"], lk["train"], lk["exact"]) for lk in r.leaks[:2]]
    assert top == [("red/leak.jpg", "red/red.2.jpg", True), ("green/leak2.jpg", "green/green.4.jpg", False)]
    # the report is self-contained and written outside the data folder
    out = tmp_path / "runs"
    html = (next(out.glob("*-audit")) / "report.html").read_text()
    assert "data:image/jpeg;base64," in html and "http://" not in html and "https://" not in html
    saved = json.loads((next(out.glob("*-audit")) / "report.json").read_text())
    assert saved["label_issues"][0] == {k: r.label_issues[0][k] for k in saved["label_issues"][0]}
    assert not list(data.rglob("*.json")) and not list(data.rglob("*.html"))


def test_unreadable_files_are_listed_on_every_run_not_only_when_extracted(tmp_path):
    """audit never named the folder's unreadable files: extract's 'skipping' line showed once, on the run that
    extracted it, and a cache hit said nothing. Listed from the cache on stdout, in report.json and the page."""
    data = photos(tmp_path / "data", per_class=6)
    (data / "blue" / "broken.jpg").write_bytes(b"")
    args = ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "features"), "--runs-dir",
            str(tmp_path / "runs"), "--backbone", "tiny", "--weights", "none", "--workers", "0"]
    for _ in ("extracted", "a cache hit"):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, r.output
        assert "unreadable: 1" in r.stdout and "\n  blue/broken.jpg: " in r.stdout, r.stdout
    report = sorted((tmp_path / "runs").glob("*-audit"))[-1]
    assert [u["path"] for u in json.loads((report / "report.json").read_text())["unreadable"]] == ["blue/broken.jpg"]
    assert "Unreadable files, not audited (1)" in (report / "report.html").read_text()


def test_an_unreadable_file_moved_out_since_the_cache_was_made_is_no_longer_listed(tmp_path):
    """A file whose name is not UTF-8 is in no listing's fingerprint: moved out of the folder after the audit, the
    next audit was a cache hit and still listed it under 'unreadable files' (from the cache's record of its
    skips). Now only the skipped files still in the folder are listed; the cache stays a hit."""
    import os

    data = photos(tmp_path / "data", per_class=6)
    (data / "blue" / "broken.jpg").write_bytes(b"")
    odd = os.path.join(os.fsencode(data / "blue"), b"caf\xe9.jpg")
    shutil.copy(data / "blue" / "blue.0.jpg", odd)
    args = ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "features"), "--runs-dir",
            str(tmp_path / "runs"), "--backbone", "tiny", "--weights", "none", "--workers", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "\n  blue/caf\\xe9.jpg: " in r.stdout and "\n  blue/broken.jpg: " in r.stdout, r.output
    os.rename(odd, os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "caf\\xe9" not in r.stdout and "\n  blue/broken.jpg: " in r.stdout, r.stdout
    assert len(list((tmp_path / "features").glob("*.h5"))) == 1  # a hit: nothing extracted again
    report = sorted((tmp_path / "runs").glob("*-audit*"))[-1]
    assert [u["path"] for u in json.loads((report / "report.json").read_text())["unreadable"]] == ["blue/broken.jpg"]


def test_cli_audit_json_and_apply_undo_round_trip(tmp_path):
    data, _ = planted(tmp_path)
    before = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    args = ["--backbone", "tiny", "--weights", "none", "--workers", "0", "--cache-dir", str(tmp_path / "features"),
            "--runs-dir", str(tmp_path / "runs")]
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--folds", "3", "--json", *args])
    assert run.exit_code == 0, run.output
    r = json.loads(run.stdout)
    assert set(r["label_issues"][0]) >= {"path", "given", "suggested", "score"}
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nred/blue.3.jpg,relabel,blue\ngreen/copy.jpg,remove,\n"
                     "red/red.5.jpg,keep,\n")
    import h5py

    for made in (tmp_path / "features").glob("*.h5"):  # made earlier than the apply's cache, as in real use
        with h5py.File(made, "r+") as f:
            f.attrs["created"] = "2026-01-01T00:00:00+0000"
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--apply", str(fixes), *args])
    assert run.exit_code == 0, run.output
    assert (data / "blue" / "blue.3.jpg").is_file() and not (data / "green" / "copy.jpg").exists()
    assert (tmp_path / "data.quarantine" / "green" / "copy.jpg").is_file()
    assert "0 computed" in run.stdout  # the folder's rows were found by content: nothing recomputed
    undo = [line for line in run.stdout.splitlines() if "audit --undo" in line][0].split("to undo: ")[1]
    journal, cache_dir = undo.split("--undo ")[1].split(" --cache-dir ")  # the undo refreshes the same caches
    assert cache_dir == str(tmp_path / "features")
    relabelled = [line for line in run.stdout.splitlines() if line.startswith("cache ")][0].split()[1].rstrip(":")
    other = CliRunner().invoke(cli, ["audit", "--undo", journal, "--data", str(tmp_path), "--no-refresh"])
    assert other.exit_code == 2 and "not of --data" in other.output  # --data pins the folder an undo may touch
    run = CliRunner().invoke(cli, ["audit", "--undo", journal, "--data", str(data),
                                   "--cache-dir", str(tmp_path / "features"), "--json"])
    assert run.exit_code == 0, run.output
    # an undo's answer: no --apply keys (relabel, quarantine, undo, moves), the refreshed cache
    assert list(json.loads(run.stdout)) == ["what", "root", "moved", "journal", "refreshed"]
    # fit-head's default is the cache of the folder as it is again, a hit, not the newer one of the relabelled
    # folder (it was: fit-head trained on the labels the undo took back, warning only that the folder changed)
    hit = json.loads(run.stdout)["refreshed"]
    assert hit["hit"] and newest_cache(cache_dir).path == Path(hit["cache"]) != Path(relabelled)
    after = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "data.quarantine").exists()
    again = CliRunner().invoke(cli, ["audit", "--undo", journal])
    assert again.exit_code == 2 and "undone already" in again.output


def test_audit_needs_a_folder_or_cache():
    run = CliRunner().invoke(cli, ["audit"])
    assert run.exit_code == 2 and "--data" in run.output


def test_too_small_a_class_names_it_and_gives_advice_that_works(tmp_path, make_cache):
    """A class of one photo: no --folds can help (the advice was "pass --folds 2", which fails the same way)."""
    make_image_folder(tmp_path / "data", per_class=4)
    for p in sorted((tmp_path / "data" / "red").iterdir())[1:]:
        p.unlink()
    cache = make_cache(tmp_path / "data").cache
    for folds, advice in [(5, "add photos to it"), (2, "add photos to it")]:
        run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", str(folds)])
        assert run.exit_code == 2 and "class 'red'" in run.output and "has 1 (" + advice in run.output, run.output
    shutil.copy(next((tmp_path / "data" / "red").iterdir()), tmp_path / "data" / "red" / "again.jpg")
    cache = make_cache(tmp_path / "data").cache
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "3"])
    assert run.exit_code == 2 and "has 2 (pass --folds 2)" in run.output, run.output


def test_a_cache_made_before_digests_still_shows_exact_copies(tmp_path, make_cache):
    import h5py

    data, _ = planted(tmp_path)
    cache = make_cache(data).cache
    with h5py.File(cache, "r+") as f:
        del f["sha256"]
    r = pipeline.audit_folder(cache=cache, folds=3, threshold=1.0, runs_dir=str(tmp_path / "runs"))
    assert [sorted(g["paths"]) for g in r.duplicates if g["exact"]] == [["green/copy.jpg", "green/green.1.jpg"]]


def test_the_report_never_goes_into_the_data_folder(tmp_path, make_cache):
    data, _ = planted(tmp_path)
    cache = make_cache(data).cache
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "3", "--output", str(data / "report")])
    assert run.exit_code == 2 and "inside the data folder" in run.output
    assert not (data / "report").exists()
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "3", "--runs-dir", str(data / "green")])
    assert run.exit_code == 2 and "--runs-dir" in run.output and "inside the data folder" in run.output
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\ngreen/copy.jpg,remove,\n")
    run = CliRunner().invoke(cli, ["audit", "--apply", str(fixes), "--data", str(data), "--output", str(data / "j")])
    assert run.exit_code == 2 and "inside the data folder" in run.output  # the journal would join the photos
    assert not (data / "j").exists() and (data / "green" / "copy.jpg").exists()
    assert [p.name for p in (data / "green").iterdir() if not p.name.endswith(".jpg")] == []


def test_a_refused_list_leaves_no_empty_run_folder(tmp_path):
    data, _ = planted(tmp_path)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,action,new_class\nno/such.jpg,remove,\n")
    runs = tmp_path / "runs"
    run = CliRunner().invoke(cli, ["audit", "--apply", str(fixes), "--data", str(data), "--runs-dir", str(runs)])
    assert run.exit_code == 2 and "nothing was moved" in run.output, run.output
    assert not runs.exists() or list(runs.iterdir()) == []
    run = CliRunner().invoke(cli, ["audit", "--apply", str(fixes), "--data", str(data), "--output",
                                   str(tmp_path / "review" / "apply")])  # an --output the refused apply made: gone too
    assert run.exit_code == 2 and not (tmp_path / "review" / "apply").exists(), run.output
    (tmp_path / "mine").mkdir()  # one the user made: kept, empty as it was
    run = CliRunner().invoke(cli, ["audit", "--apply", str(fixes), "--data", str(data), "--output",
                                   str(tmp_path / "mine")])
    assert run.exit_code == 2 and (tmp_path / "mine").is_dir()


def square(path, y, x, background=255):
    """A black 16-pixel square at (y, x) on a plain 72 x 72 background: its max-pooled features are the same
    wherever the square is (the conv sees the same edges), its layout is not."""
    arr = np.full((72, 72, 3), background, np.uint8)
    arr[y:y + 16, x:x + 16] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_a_leak_needs_the_same_layout_not_only_the_same_things(tmp_path):
    data, test = photos(tmp_path / "data", per_class=4), photos(tmp_path / "test", per_class=2, seed=1)
    square(data / "blue" / "square.png", 12, 12)
    square(test / "blue" / "square_lower.png", 44, 12)  # another photo of the same thing, elsewhere in the frame
    square(test / "blue" / "square_again.png", 12, 12, background=250)  # the same photo, its background retouched
    r = pipeline.audit_folder(data, test_data=str(test), folds=2, threshold=0.99, cache_dir=str(tmp_path / "features"),
                              runs_dir=str(tmp_path / "runs"), **TINY)
    leaks = {(lk["test"], lk["train"]) for lk in r.leaks}
    assert ("blue/square_again.png", "blue/square.png") in leaks
    assert ("blue/square_lower.png", "blue/square.png") not in leaks
    assert r.unconfirmed["leaks"] >= 1


def test_a_test_folder_of_other_classes_is_refused_before_its_extraction(tmp_path, make_cache):
    """The classes named, not a cache of the test folder refused afterwards as one 'made differently'."""
    cache = make_cache(make_image_folder(tmp_path / "data", per_class=4)).cache
    test = make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "green"))
    before = sorted((tmp_path / "features").iterdir())
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "2", "--test-data", str(test),
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and "(unknown: green)" in run.output, run.output
    assert sorted((tmp_path / "features").iterdir()) == before


def test_a_test_cache_of_other_classes_is_refused_naming_them(tmp_path, make_cache):
    """audit --test-cache is checked by the audit itself (fit-head's test_cache_for checks only the caches it
    extracts: fit-head checks a given one before its fit)."""
    cache = make_cache(make_image_folder(tmp_path / "data", per_class=4)).cache
    other = make_cache(make_image_folder(tmp_path / "t", per_class=3, classes=("blue", "green")),
                       cache_dir=str(tmp_path / "tf")).cache
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "2", "--test-cache", other,
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and run.output == (f"Error: cache {other} has classes ['green'] the model does not "
                                                 "know; its classes: blue, red\n"), run.output


def test_a_test_folder_of_some_of_the_classes_is_searched_for_leaks(tmp_path):
    """A test folder lacking some of the training folder's classes was refused ('missing: blue, green'), as
    fit-head refused it: a leak is a photo, whatever classes the test folder holds (one will do)."""
    data, test = photos(tmp_path / "data", per_class=4), photos(tmp_path / "test", per_class=2, seed=1,
                                                                 classes=("red",))
    shutil.copy(data / "red" / "red.2.jpg", test / "red" / "leak.jpg")
    r = pipeline.audit_folder(data, test_data=str(test), folds=2, threshold=0.999, cache_dir=str(tmp_path / "features"),
                              runs_dir=str(tmp_path / "runs"), **TINY)
    assert r.test_rows == 3 and (r.leaks[0]["test"], r.leaks[0]["train"], r.leaks[0]["exact"]) == (
        "red/leak.jpg", "red/red.2.jpg", True)


def test_a_test_folder_of_the_classes_in_another_unicode_form_is_searched_and_its_leaks_keep_their_class(tmp_path):
    """A test folder whose 'blé' was written e + accent (NFD, a Mac's) was refused as of a class the training folder
    does not know; it is that class, and its copies of training photos are leaks within their class, not across."""
    data, test = photos(tmp_path / "data", per_class=4), photos(tmp_path / "test", per_class=2, seed=1,
                                                                 classes=("red",))
    (data / "red").rename(data / "bl\u00e9")
    (test / "red").rename(test / "ble\u0301")
    shutil.copy(data / "bl\u00e9" / "red.2.jpg", test / "ble\u0301" / "leak.jpg")
    r = pipeline.audit_folder(data, test_data=str(test), folds=2, threshold=0.999, cache_dir=str(tmp_path / "features"),
                              runs_dir=str(tmp_path / "runs"), **TINY)
    assert r.test_rows == 3 and r.leaks[0]["exact"] and r.leaks_across_classes == 0


def test_a_cache_dir_inside_the_test_folder_is_refused_before_anything_is_written(tmp_path):
    """The training folder's extraction used to write its cache into --test-data, whose listing then took
    the cache's folder for an empty class."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    test = make_image_folder(tmp_path / "t", per_class=3)
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--test-data", str(test), "--folds", "2",
                                   "--cache-dir", str(test / "features"), "--runs-dir", str(tmp_path / "runs"),
                                   "--backbone", "tiny", "--weights", "none", "--workers", "0"])
    assert run.exit_code == 2 and "--cache-dir" in run.output and "(--test-data)" in run.output, run.output
    assert not (test / "features").exists()


def test_a_pool_cache_is_refused_in_one_line(tmp_path, make_cache):
    """suggest's pool cache (one unlabelled class) used to end in 'unexpected ValueError ... (a bug?)', exit 1."""
    cache = make_cache(make_image_folder(tmp_path / "pool", per_class=3), purpose="pool").cache
    run = CliRunner().invoke(cli, ["audit", "--cache", cache, "--folds", "2", "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and "the unlabelled photos of a pool (suggest's)" in run.output, run.output


def test_a_training_cache_of_the_old_decoding_rule_is_refused_before_the_test_folder_is_extracted(
        tmp_path, make_cache, old_decoding):
    """audit --test-data extracted the whole test folder, then refused the pair as caches 'made differently'."""
    data = make_image_folder(tmp_path / "d", per_class=6)
    test = make_image_folder(tmp_path / "t", per_class=3, seed=5)
    with old_decoding():
        old = make_cache(data, dtype="float32").cache
    before = sorted((tmp_path / "features").iterdir())
    run = CliRunner().invoke(cli, ["audit", "--cache", old, "--test-data", str(test),
                                   "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 2 and run.output.count("\n") == 1, run.output
    assert "would differ in decode_version: 2 vs 3" in run.output
    assert sorted((tmp_path / "features").iterdir()) == before and not (tmp_path / "runs").exists()


def test_the_printed_apply_command_runs_as_printed_in_a_shell(tmp_path):
    """The 'to fix' line's command, for a folder 'my pets' audited with --cache-dir and --runs-dir of its own, was
    'python cli.py audit --data /.../my pets --apply ...': two words to a shell, and without the audit's --cache-dir
    its refresh found no cache of the folder (the next fit-head trained on the old labels), its run folder going
    to runs/. Now its paths are quoted and those options passed on: pasted into a shell, it applies and refreshes."""
    import shlex

    data = photos(tmp_path / "my pets", per_class=6)
    args = ["--cache-dir", str(tmp_path / "my features"), "--runs-dir", str(tmp_path / "my runs")]
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--folds", "2", *TINY_ARGS, *args])
    assert run.exit_code == 0, run.output
    words = shlex.split(run.stdout.rstrip().splitlines()[-1].split(", then ")[1])
    assert words[:3] == ["python", "cli.py", "audit"] and words[words.index("--data") + 1] == str(data.resolve())
    fixes = Path(words[words.index("--apply") + 1])
    fixes.write_text("path,action,new_class\nred/red.0.jpg,relabel,blue\n")
    applied = CliRunner().invoke(cli, [*words[2:], "--json"])
    assert applied.exit_code == 0, applied.output
    result = json.loads(applied.stdout)
    assert result["refreshed"] and Path(result["refreshed"]["cache"]).parent == tmp_path / "my features"
    assert (data / "blue" / "red.0.jpg").is_file() and list((tmp_path / "my runs").glob("*-audit-apply"))


def test_read_maps_reads_runs_of_rows_as_slices_in_the_order_asked():
    """h5py's list indexing read 512 scattered VGG-16 maps in 1 s (slices: 0.05 s): the second check of 25,000
    photos' candidate pairs took a quarter of an hour."""
    from types import SimpleNamespace

    from pipeline.reports.audit import read_maps

    class SlicesOnly:
        def __init__(self, a):
            self.a, self.reads = a, []

        def __getitem__(self, key):
            assert isinstance(key, slice), f"read {key!r}: not a slice"
            self.reads.append((key.start, key.stop))
            return self.a[key]

    maps = np.arange(10 * 2 * 3 * 3, dtype=np.float16).reshape(10, 2, 3, 3)
    cache = SimpleNamespace(features=SlicesOnly(maps), feature_shape=maps.shape[1:])
    rows = np.array([7, 2, 3, 3, 9, 2])
    got = read_maps(cache, rows)
    assert got.dtype == np.float32 and np.array_equal(got, maps[rows].astype(np.float32))
    assert cache.features.reads == [(2, 4), (7, 8), (9, 10)]
    assert read_maps(cache, np.array([], np.int64)).shape == (0, 2, 3, 3)


def test_a_copy_of_the_folder_is_audited_and_named_as_itself(tmp_path):
    """A copy keeping names, sizes and times hits the original's cache: the audit named the original folder, and
    its 'to fix' line told the user to --apply the list there."""
    from pipeline.reports.present import audit_text

    data = photos(tmp_path / "data", per_class=6)
    copy = shutil.copytree(data, tmp_path / "elsewhere")
    kw = dict(folds=2, cache_dir=str(tmp_path / "features"), runs_dir=str(tmp_path / "runs"), **TINY)
    first, second = (pipeline.audit_folder(folder, **kw) for folder in (data, copy))
    assert second.cache == first.cache  # the same cache: a hit
    assert second.data_root == str(copy.resolve())
    assert f"--data {copy.resolve()} --apply" in audit_text(second)
    assert str(copy.resolve()) in (Path(second.output) / "report.html").read_text()


def test_a_refresh_of_an_int8_cache_where_torchao_is_missing_only_warns(tmp_path, request, caplog):
    """The moves are done when the refresh runs: an int8 cache in an environment without torchao ended audit --apply
    in exit 1 after the files had moved, where a missing device only warns."""
    pytest.importorskip("torchao", reason="the int8 cache is made first")
    from pipeline.extraction.extract import ExtractConfig, extract
    from pipeline.reports.audit import AuditConfig, refresh

    data = photos(tmp_path / "data", per_class=4)
    extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none", workers=0, precision="int8",
                          calib_n=4, compile="off", cache_dir=str(tmp_path / "features")))
    shutil.move(data / "red" / "red.0.jpg", data / "blue" / "red.0.jpg")  # what an --apply does
    request.getfixturevalue("no_torchao")
    assert refresh(AuditConfig(data=str(data), cache_dir=str(tmp_path / "features")), str(data)) is None
    assert "could not extract" in caplog.text and "needs torchao" in caplog.text


def test_a_refresh_whose_cache_was_made_on_a_device_this_machine_lacks_only_warns(tmp_path, monkeypatch, caplog):
    """After an --apply the folder is extracted again as its cache was made; a cache made with --device cuda, on a
    machine without CUDA: the moves are done, so a warning (as for any request that cannot be repeated), not a
    failure once the missing device became the environment's error (exit 1) rather than a usage error."""
    import h5py
    import torch

    from pipeline.extraction.extract import ExtractConfig, extract
    from pipeline.reports.audit import AuditConfig, refresh

    data = photos(tmp_path / "data", per_class=4)
    made = extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none", workers=0, device="cpu",
                                 cache_dir=str(tmp_path / "features"))).cache
    with h5py.File(made, "r+") as f:  # as made on a GPU machine
        f.attrs["config"] = f.attrs["config"].replace('"device": "cpu"', '"device": "cuda"')
    shutil.move(data / "red" / "red.0.jpg", data / "blue" / "red.0.jpg")  # what an --apply does
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refresh(AuditConfig(data=str(data), cache_dir=str(tmp_path / "features")), str(data)) is None
    assert "could not extract" in caplog.text and "CUDA is not available" in caplog.text


def test_no_label_issue_writes_no_gallery_and_names_none(tmp_path):
    """With no label issue, audit wrote gallery.png, a picture of nothing but 'no label issues found', and named it
    on stdout and in report.json: now none is written or named and stderr says so, as evaluate does."""
    data = photos(tmp_path / "data", per_class=6)
    args = ["audit", "--data", str(data), "--folds", "2", "--cache-dir", str(tmp_path / "features"), "--backbone",
            "tiny", "--weights", "none", "--workers", "0"]
    run = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "a"), "--json"])
    assert run.exit_code == 0, run.output
    r = json.loads(run.stdout)
    assert r["label_issues"] == [] and "gallery" not in r
    assert "gallery" not in json.loads((tmp_path / "a" / "report.json").read_text())
    assert not (tmp_path / "a" / "gallery.png").exists() and (tmp_path / "a" / "report.html").is_file()
    assert "no label issues: no gallery.png" in run.stderr
    text = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "b")])
    assert text.exit_code == 0 and "gallery" not in text.stdout and "report: " in text.stdout, text.output
    assert not (tmp_path / "b" / "gallery.png").exists()


def test_auditing_again_after_an_int8_apply_is_the_refreshed_cache_not_a_new_network(tmp_path, monkeypatch):
    """Where --precision auto is int8 (a CPU with AVX-512 VNNI, 1,000+ photos), audit, --apply, audit again: the second
    audit calibrated int8 on the changed folder, another network, and computed every row again (an hour for VGG-16
    on 25,000 photos), though the refresh had just made the folder's cache. It now extracts with the network of the
    folder's newest int8 cache: the refreshed one, a hit."""
    import pytest

    pytest.importorskip("torchao", reason="int8 needs the optional torchao (in the dev extra)")
    from pipeline.extraction import extract as stage

    monkeypatch.setattr(stage, "auto_precision", lambda cfg, images, paid=False: ("int8", "precision auto: int8"))
    monkeypatch.setattr("pipeline.extraction.extract_range.should_compile", lambda *a, **k: False)  # seconds
    data = photos(tmp_path / "data", per_class=6)
    args = ["--data", str(data), "--cache-dir", str(tmp_path / "features"), "--runs-dir", str(tmp_path / "runs"),
            "--backbone", "tiny", "--weights", "none", "--workers", "0", "--json"]
    first = CliRunner().invoke(cli, ["audit", "--folds", "3", *args])
    assert first.exit_code == 0, first.output
    (tmp_path / "fixes.csv").write_text("path,action,new_class\nred/red.3.jpg,relabel,blue\n")
    applied = CliRunner().invoke(cli, ["audit", "--apply", str(tmp_path / "fixes.csv"), *args])
    assert applied.exit_code == 0, applied.output
    refreshed = json.loads(applied.stdout)["refreshed"]
    assert refreshed["computed"] == 0
    again = CliRunner().invoke(cli, ["audit", "--folds", "3", *args])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["cache"] == refreshed["cache"]  # a hit: another network is another name


def audit_into(tmp_path, data, out, *more):
    return CliRunner().invoke(cli, ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "f"),
                                    "--backbone", "tiny", "--weights", "none", "--workers", "0", "--output", str(out),
                                    "--json", *more])


@pytest.mark.parametrize("made", ["marked", "before the mark"])
def test_no_label_issue_leaves_no_earlier_gallery_in_the_same_output(tmp_path, made):
    """--output may be a folder an earlier audit wrote to: its gallery.png (the issues since fixed by --apply) was
    overwritten while every audit wrote one; once a clean audit wrote none, the old picture stayed beside a report
    of no label issues. A gallery of an audit from before audit marked its PNG is known by its report."""
    data, _ = planted(tmp_path)
    first = audit_into(tmp_path, data, tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["label_issues"] and (tmp_path / "a" / "gallery.png").is_file()
    if made == "before the mark":  # as figures.save wrote it: matplotlib's PNG, no text of audit's
        from pipeline.runs.figures import label_issues_figure, save
        save(label_issues_figure([]), tmp_path / "a" / "gallery.png")
    clean = photos(tmp_path / "clean", per_class=6)
    run = audit_into(tmp_path, clean, tmp_path / "a")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["label_issues"] == [] and not (tmp_path / "a" / "gallery.png").exists()


@pytest.mark.parametrize("name", ["gallery.png", "report.json", "report.html", "fixes.csv"])
def test_a_file_of_the_users_named_as_an_output_is_refused_not_replaced_or_deleted(tmp_path, name):
    """audit --output DIR deleted any gallery.png in DIR when it found no label issue (a user's own picture so
    named was lost), and replaced a report.json or report.html of the user's, or moved their fixes.csv aside. Now
    refused before any work, naming the file (exit 2); nothing in DIR changes."""
    data = photos(tmp_path / "data", per_class=6)
    out = tmp_path / "mine"
    out.mkdir()
    theirs = out / name
    if name == "gallery.png":
        Image.new("RGB", (30, 20), (200, 10, 10)).save(theirs)
    elif name == "fixes.csv":
        theirs.write_text("name,price\nbike,300\n")
    else:
        theirs.write_text('{"notes": "mine"}' if name.endswith(".json") else "<html><body>my page</body></html>")
    before = theirs.read_bytes()
    run = audit_into(tmp_path, data, out)
    assert run.exit_code == 2, run.output
    assert f"--output '{theirs}' exists and is not " in run.output and "move it away" in run.output, run.output
    assert theirs.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [name]
    assert not (tmp_path / "f").exists()  # before any work


def test_an_earlier_audits_outputs_are_replaced_and_its_edited_list_kept(tmp_path):
    """The same --output audited again: report, page and gallery replaced, an edited fixes.csv kept aside."""
    data, _ = planted(tmp_path)
    assert audit_into(tmp_path, data, tmp_path / "a").exit_code == 0
    fixes = tmp_path / "a" / "fixes.csv"
    fixes.write_text(fixes.read_text().replace("relabel", "keep"))
    again = audit_into(tmp_path, data, tmp_path / "a")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fixes-earlier.csv", "fixes.csv", "gallery.png",
                                                                  "report.html", "report.json"]


def test_three_byte_copies_are_one_exact_group_with_two_removals(tmp_path):
    """Of three byte copies, exact_pairs links each to the first only, and the pair of the two later copies
    (found by the similarity search) made the group 'near' (1.000): fixes.csv proposed no removal."""
    data = photos(tmp_path / "data", per_class=8)
    for name in ("copy1.jpg", "copy2.jpg"):
        shutil.copy(data / "green" / "green.1.jpg", data / "green" / name)
    r = pipeline.audit_folder(data, folds=3, threshold=0.999, cache_dir=str(tmp_path / "features"),
                              runs_dir=str(tmp_path / "runs"), **TINY)
    group = [g for g in r.duplicates if "green/copy1.jpg" in g["paths"]][0]
    assert sorted(group["paths"]) == ["green/copy1.jpg", "green/copy2.jpg", "green/green.1.jpg"] and group["exact"]
    removed = [row for row in csv.DictReader(open(r.fixes)) if row["action"] == "remove"]
    assert len(removed) == 2


def test_fixes_csv_names_each_photo_once_so_apply_takes_it_as_written(tmp_path):
    """A copy both doubted (relabel) and an extra exact copy (remove) was listed twice: --apply of the fixes.csv
    audit wrote refused the whole list ('the same file as line N'). Now the copy kept is one whose label is not
    in doubt, the others are removed and not relabelled, and the list applies."""
    from pipeline.reports.audit import write_fixes_csv

    data = photos(tmp_path / "data", per_class=4)
    shutil.copy(data / "blue" / "blue.1.jpg", data / "red" / "a.jpg")  # the photo saved again in the wrong class
    shutil.copy(data / "blue" / "blue.1.jpg", data / "red" / "b.jpg")
    group = {"paths": ["red/a.jpg", "blue/blue.1.jpg", "red/b.jpg"], "classes": ["red", "blue", "red"],
             "similarity": 1.0, "exact": True, "rows": [5, 1, 6]}
    issues = [{"path": p, "given": g, "suggested": s, "score": 0.9, "row": 0}
              for p, g, s in (("red/a.jpg", "red", "blue"), ("red/b.jpg", "red", "blue"),
                              ("red/red.2.jpg", "red", "green"))]
    write_fixes_csv({"label_issues": issues, "duplicates": [group], "outliers": []}, tmp_path / "fixes.csv")
    rows = list(csv.DictReader(open(tmp_path / "fixes.csv")))
    assert len({row["path"] for row in rows}) == len(rows), rows
    assert {(row["path"], row["action"]) for row in rows} == {
        ("red/a.jpg", "remove"), ("red/b.jpg", "remove"), ("red/red.2.jpg", "relabel")}
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--apply", str(tmp_path / "fixes.csv"),
                                   "--no-refresh", "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 0, run.output
    assert (data / "blue" / "blue.1.jpg").is_file() and (data / "green" / "red.2.jpg").is_file()
    assert sorted(p.name for p in (tmp_path / "data.quarantine" / "red").iterdir()) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("unreadable", [False, True])
def test_fixes_csv_names_a_free_name_where_the_class_holds_that_name_already(tmp_path, unreadable):
    """Two class folders each holding a 'blue.0.jpg' (a camera's IMG_0001.jpg): the relabel audit proposed moved
    onto a taken name, so --apply refused the list as written. fixes.csv now gives such a row a new_name; also
    where blue/'s file is unreadable (skipped by extract, so among no rows: it got none)."""
    data = photos(tmp_path / "data")
    shutil.move(data / "blue" / "blue.3.jpg", data / "red" / "blue.0.jpg")  # wrong label, a name blue/ holds
    if unreadable:
        (data / "blue" / "blue.0.jpg").write_bytes(b"not a jpeg")
    args = ["--folds", "3", "--threshold", "0.999", "--backbone", "tiny", "--weights", "none", "--workers", "0",
            "--cache-dir", str(tmp_path / "features")]
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--output", str(tmp_path / "out"), *args])
    assert run.exit_code == 0, run.output
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "out" / "fixes.csv"))}
    assert (rows["red/blue.0.jpg"]["new_class"], rows["red/blue.0.jpg"]["new_name"]) == ("blue", "blue.0-red.jpg")
    assert all(r["new_name"] == "" for p, r in rows.items() if p != "red/blue.0.jpg")
    run = CliRunner().invoke(cli, ["audit", "--data", str(data), "--apply", str(tmp_path / "out" / "fixes.csv"),
                                   "--no-refresh", "--runs-dir", str(tmp_path / "runs")])
    assert run.exit_code == 0, run.output
    assert (data / "blue" / "blue.0-red.jpg").is_file() and (data / "blue" / "blue.0.jpg").is_file()


def test_fixes_csv_free_names_differ_from_the_class_folders_names_in_more_than_case(tmp_path):
    """blue/ holding IMG_1.JPG and a relabel of red/img_1.jpg to blue: fixes.csv kept its name, the same file on a
    case-insensitive disk, so --apply there refused the list as written; two relabels to one name but for case the
    same. Each such row now gets a new_name apart from every name there, ignoring case."""
    issues = [{"path": p, "given": p.split("/")[0], "suggested": "blue", "score": 0.9, "row": 0}
              for p in ("red/img_1.jpg", "red/a.jpg", "green/A.JPG")]
    from pipeline.reports.audit import write_fixes_csv

    write_fixes_csv({"label_issues": issues, "duplicates": [], "outliers": [],
                     "_paths": ["blue/IMG_1.JPG", "red/img_1.jpg", "red/a.jpg", "green/A.JPG"]}, tmp_path / "f.csv")
    rows = {r["path"]: r["new_name"] for r in csv.DictReader(open(tmp_path / "f.csv"))}
    assert rows == {"red/img_1.jpg": "img_1-red.jpg", "red/a.jpg": "", "green/A.JPG": "A-green.JPG"}


def test_the_training_folder_given_as_test_folder_is_said_in_one_line(tmp_path):
    """audit --data D --test-data D listed every photo as a train/test leak of itself without a word that the two
    folders are one; now a warning says so (as fit-head and compare-sklearn warn of copies and go on), by any name."""
    data = photos(tmp_path / "data", per_class=4)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    for test in (data, tmp_path / "link"):
        r = CliRunner().invoke(cli, ["audit", "--data", str(data), "--test-data", str(test), "--folds", "3",
                                     "--cache-dir", str(tmp_path / "features"), "--runs-dir", str(tmp_path / "runs"),
                                     "--backbone", "tiny", "--weights", "none", "--workers", "0"])
        assert r.exit_code == 0, r.output
        assert (f"--test-data {str(test)!r} is the training folder {data}: its photos are listed as leaks of "
                "themselves; pass a test folder apart from it") in r.stderr
    cache = str(next((tmp_path / "features").glob("*.h5")))
    r = CliRunner().invoke(cli, ["audit", "--cache", cache, "--test-cache", cache, "--folds", "3", "--runs-dir",
                                 str(tmp_path / "runs")])
    assert r.exit_code == 0 and (f"--test-cache {cache!r} was made from {data}, which is the training folder "
                                 f"{data}: its photos") in r.stderr, r.output
    other = photos(tmp_path / "test", per_class=2, seed=1)
    r = CliRunner().invoke(cli, ["audit", "--data", str(data), "--test-data", str(other), "--folds", "3",
                                 "--cache-dir", str(tmp_path / "features"), "--runs-dir", str(tmp_path / "runs"),
                                 "--backbone", "tiny", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0 and "training folder" not in r.stderr, r.output


def test_a_second_audit_into_the_same_output_keeps_an_edited_fixes_csv(tmp_path):
    """A second audit --output DIR replaced DIR/fixes.csv, the list its user may have reviewed and edited: it is
    kept under a second name, said in one line; the same list again leaves no copy."""
    data, _ = planted(tmp_path)
    args = ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "f"), "--backbone", "tiny",
            "--weights", "none", "--workers", "0", "--output", str(tmp_path / "a")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    fixes = tmp_path / "a" / "fixes.csv"
    written = fixes.read_text()
    edited = written.replace(",relabel,", ",keep,")
    assert edited != written
    fixes.write_text(edited)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "fixes-earlier.csv").read_text() == edited and fixes.read_text() == written
    assert (f"kept the earlier fixes.csv of --output {tmp_path / 'a'} (another list than this audit's: perhaps "
            "edited) as fixes-earlier.csv") in r.stderr
    r = CliRunner().invoke(cli, args)  # the same list: replaced, nothing else kept
    assert r.exit_code == 0 and "kept the earlier" not in r.stderr, r.output
    assert sorted(p.name for p in (tmp_path / "a").glob("fixes*")) == ["fixes-earlier.csv", "fixes.csv"]


def test_a_near_copy_group_of_much_of_the_folder_is_said_to_be_chained(tmp_path):
    """signdigits10 with EfficientNet-Lite0 at 0.88: one 'near-copy group' of 756 of its 1,444 photos, of 9
    classes (photos alike pair by pair, chained), shown as copies without a word. Now a warning says so."""
    data = photos(tmp_path / "data", per_class=15)
    args = ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "features"), "--runs-dir",
            str(tmp_path / "runs"), "--backbone", "tiny", "--weights", "none", "--workers", "0", "--json"]
    run = CliRunner().invoke(cli, [*args, "--threshold", "0.9"])
    assert run.exit_code == 0, run.output
    biggest = max(json.loads(run.stdout)["duplicates"], key=lambda g: len(g["paths"]))
    assert len(biggest["paths"]) >= 20 and len(set(biggest["classes"])) > 1  # the tiny backbone's rows are alike
    said = [line for line in run.stderr.splitlines() if "chained" in line]
    assert len(said) == 1 and f"a near-copy group holds {len(biggest['paths'])} of the 45 photos" in said[0]
    assert "--threshold 0.9 may be low" in said[0]
    run = CliRunner().invoke(cli, [*args, "--threshold", "0.999"])
    assert run.exit_code == 0 and "chained" not in run.stderr


def test_leaks_mostly_across_classes_are_said_to_be_photos_alike(tmp_path):
    """signdigits10 with EfficientNet-Lite0 at 0.88: 2,152 'leaks' of 360 of the 618 test photos, 400 of them joining
    photos of different digits (photos alike, not copies), listed as copies without a word. Now a warning counts them
    (and --json carries the count); real copies, two of them in the wrong class, are not said to be alike."""
    data, test = photos(tmp_path / "data", per_class=15), photos(tmp_path / "test", per_class=10, seed=1)
    args = ["audit", "--data", str(data), "--test-data", str(test), "--folds", "3", "--cache-dir",
            str(tmp_path / "features"), "--runs-dir", str(tmp_path / "runs"), "--backbone", "tiny", "--weights", "none",
            "--workers", "0", "--json"]
    run = CliRunner().invoke(cli, [*args, "--threshold", "0.8"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    across = [lk for lk in out["leaks"] if lk["test"].split("/")[0] != lk["train"].split("/")[0]]
    assert len({lk["test"] for lk in across}) >= 10 and out["leaks_across_classes"] == len(across)
    said = [line for line in run.stderr.splitlines() if "different classes" in line]
    photos_reported = len({lk["test"] for lk in out["leaks"]})
    assert len(said) == 1 and (f"{len(across)} of the {len(out['leaks'])} leaks join photos of different classes "
                               f"({len({lk['test'] for lk in across})} of the {photos_reported} test photos") in said[0]
    assert "at --threshold 0.8 these features more likely find photos alike than copies" in said[0]
    copies = tmp_path / "copies"
    for n, src in enumerate(sorted(data.rglob("*.jpg"))[::3]):  # 15 real copies, 2 of them in the wrong class
        cls = {0: "green", 1: "red"}.get(n, src.parent.name)
        (copies / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, copies / cls / f"copy.{src.name}")
    run = CliRunner().invoke(cli, [*args[:4], str(copies), *args[5:], "--threshold", "0.999"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert len(out["leaks"]) >= 15 and out["leaks_across_classes"] == 2 and "different classes" not in run.stderr
    assert "leaks_across_classes" not in json.loads(CliRunner().invoke(cli, [*args[:3], *args[5:]]).stdout)


@pytest.mark.parametrize("photos_reported, crossing, exact, said",
                         [(40, 10, False, True), (41, 10, False, False), (9, 9, False, False), (12, 12, True, False)])
def test_leaks_across_classes_are_said_from_a_share_and_a_count(photos_reported, crossing, exact, said, caplog):
    """The rule: at least 10 test photos with a leak of another class, and a quarter of the test photos reported (a
    folder of real copies with a few label errors is not said to be alike); a byte copy in another class is a copy."""
    from pipeline.reports.audit import warn_across_classes

    leaks = [{"test": f"a/{i}.jpg", "train": f"{'b' if i < crossing else 'a'}/{i}.jpg", "exact": exact}
             for i in range(photos_reported)]
    leaks.append({"test": "a/0.jpg", "train": "a/x.jpg", "exact": False})  # two leaks of one test photo: one photo
    warn_across_classes(leaks, [lk for lk in leaks if lk["train"][0] == "b"], 0.88)
    assert ("different classes" in caplog.text) == said


def test_a_bad_entry_added_since_the_cache_was_made_is_listed(tmp_path):
    """A name that is not UTF-8 or a dangling link added after the cache was made is in no listing's fingerprint: the
    next audit was a cache hit whose 'unreadable' list (the cache's record of skips) left them out, though extract's
    warning on the same run named both. Now the list names them too; the cache stays a hit."""
    import os

    data = photos(tmp_path / "data", per_class=6)
    args = ["audit", "--data", str(data), "--folds", "3", "--cache-dir", str(tmp_path / "features"), "--runs-dir",
            str(tmp_path / "runs"), "--backbone", "tiny", "--weights", "none", "--workers", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "unreadable: 0" in r.stdout, r.output
    shutil.copy(data / "blue" / "blue.0.jpg", os.path.join(os.fsencode(data / "blue"), b"caf\xe9.jpg"))
    (data / "red" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "unreadable: 2" in r.stdout and "\n  blue/caf\\xe9.jpg: " in r.stdout, r.stdout
    assert "\n  red/gone.jpg: a dangling symlink" in r.stdout, r.stdout
    assert len(list((tmp_path / "features").glob("*.h5"))) == 1  # a hit: nothing extracted again
    report = sorted((tmp_path / "runs").glob("*-audit*"))[-1]
    assert sorted(u["path"] for u in json.loads((report / "report.json").read_text())["unreadable"]) == [
        "blue/caf\\xe9.jpg", "red/gone.jpg"]


def test_an_audit_run_folder_appears_with_all_its_files_naming_the_folder_they_are_in(tmp_path, monkeypatch):
    """audit's run folder was made first and filled after: a kill -9 while report.html, report.json and fixes.csv
    were written left a folder of some of them. It is written hidden and appears whole; where another run took its
    name meanwhile, report.json names the folder it got."""
    import pipeline.reports.audit as audit_mod
    from pipeline.runs import run_folders

    data, runs = photos(tmp_path / "data", per_class=6, classes=("blue", "red")), tmp_path / "runs"
    args = dict(folds=3, cache_dir=str(tmp_path / "features"), runs_dir=str(runs), **TINY)

    def killed(*a, **k):
        raise SystemExit(137)  # the process ends here, before fixes.csv

    monkeypatch.setattr(audit_mod, "write_fixes_csv", killed)
    with pytest.raises(SystemExit):
        pipeline.audit_folder(data, **args)
    assert not runs.exists() or [p.name for p in runs.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.undo()
    real = run_folders.publish_run_dir

    def taken_meanwhile(staged, before):
        (staged.parent / staged.name[1:].split(".")[0]).mkdir()  # another audit of the same second
        return real(staged, before)

    monkeypatch.setattr(audit_mod, "publish_run_dir", taken_meanwhile)
    r = pipeline.audit_folder(data, **args)
    out = Path(r.report).parent
    saved = json.loads(Path(r.report).read_text())
    assert out.name.endswith("-audit-2") and saved["output"] == r.output == str(out)
    assert saved["html"] == r.html == str(out / "report.html") and Path(r.fixes).is_file()
