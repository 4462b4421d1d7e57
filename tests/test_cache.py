import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.cache.feature_cache import (
    CacheBusy,
    CacheError,
    CacheWriter,
    FeatureCache,
    list_caches,
    newest_cache,
    read_info,
    source_changes,
    write_virtual_cache,
)
from pipeline.errors import PipelineError
from tests.conftest import make_image_folder
from tests.fsfaults import make_non_regular


def _attrs(fp="abc"):
    return {"fingerprint": fp, "backbone": "tiny", "weights": "none", "mean": np.zeros(3), "std": np.ones(3),
            "transform": "Resize([256], bilinear, antialias=True) CenterCrop([224]) ToTensor() "
                         "Normalize(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])",
            "classes": '["a", "b"]', "seed": 0, "n_requested": 0, "data_root": "/x",
            "data_fingerprint": "d", "dtype": "float32", "created": "2026-01-01T00:00:00+0000", "versions": "{}"}


def test_writer_commits_only_whole_batches_and_resume_truncates(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, _attrs()) as w:
        w.append(np.ones((4, 2, 1, 1), np.float32), [0, 1, 0, 1], list("abcd"), next_candidate=5,
                 skipped=[("bad.jpg", "zero-byte file")])
        # a batch cut off by a crash: rows written, counts not moved
        f = w.f
        for name in ("features", "labels", "paths"):
            f[name].resize(7, axis=0)
    assert read_info(path).rows == 4
    with CacheWriter(path, _attrs()) as w:
        assert (w.rows, w.next_candidate, w.skipped_rows) == (4, 5, 1)
        assert w.f["features"].shape[0] == 4
        w.append(np.zeros((2, 2, 1, 1), np.float32), [1, 1], ["e", "f"], next_candidate=7)
        w.finish()
    with FeatureCache(path) as c:
        assert c.n == 6 and c.paths == list("abcdef") and c.labels.tolist() == [0, 1, 0, 1, 1, 1]
        assert c.skipped() == [("bad.jpg", "zero-byte file")]
    with pytest.raises(CacheError, match="another extraction"):
        CacheWriter(path, _attrs("other"))


def test_a_writer_removes_what_a_killed_writer_left_beside_its_cache(tmp_path, caplog):
    """kill -9 while a cache was created (``.creating-PID``) or, resuming, copied (``.resuming-PID``: as large as
    the cache) left that file for good; the next writer of that cache removes it, saying so."""
    path = tmp_path / "c.h5"
    with CacheWriter(path, _attrs()) as w:
        w.append(np.ones((4, 2, 1, 1), np.float32), [0, 1, 0, 1], list("abcd"), next_candidate=4)
    shutil.copy(path, tmp_path / "c.h5.resuming-999999")
    (tmp_path / "c.h5.creating-999998").write_bytes(b"\x89HDF half")
    (tmp_path / "other.h5.resuming-999999").write_bytes(b"another cache's: kept")
    with caplog.at_level("INFO", logger="pipeline"), CacheWriter(path, _attrs()) as w:
        assert w.rows == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "other.h5.resuming-999999"]
    assert "c.h5.resuming-999999, left by an extraction killed" in caplog.text


def test_incomplete_cache_is_refused_with_the_command_that_finishes_it(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, {**_attrs(), "command": "python cli.py extract --n 8"}) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
    with pytest.raises(CacheError, match=r"incomplete \(2 of all rows.*python cli.py extract --n 8"):
        FeatureCache(path)
    # fit-head --cache-dir DIR said only "run extract first", as if nothing had been extracted
    res = CliRunner().invoke(cli.cli, ["fit-head", "--cache-dir", str(tmp_path), "--runs-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"Error: no complete feature cache in {str(tmp_path)!r}; cache {path} is incomplete (2 of all rows); "
        "finish it by running `python cli.py extract --n 8` again")


def test_foreign_and_damaged_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(CacheError, match="not a feature cache made by this tool"):
        read_info(foreign)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        read_info(tmp_path / "text.h5")
    with pytest.raises(CacheError, match="does not exist"):
        read_info(tmp_path / "missing.h5")


def test_validation_checks_shapes_and_labels(image_folder, tmp_path, make_cache):
    r = make_cache(image_folder)
    with h5py.File(r.cache, "a") as f:
        f["labels"][0] = 7
    with pytest.raises(CacheError, match="labels outside"):
        read_info(r.cache)
    with h5py.File(r.cache, "a") as f:
        f["labels"][0] = 0
        del f["paths"]
    with pytest.raises(CacheError, match="no dataset 'paths'"):
        read_info(r.cache)


def test_iter_blocks_streams_each_row_once(image_folder, tmp_path, make_cache):
    r = make_cache(image_folder, dtype="float32")
    with FeatureCache(r.cache) as c:
        full = c.features[:]
        want = np.array([0, 3, 4, 9, 10, 23])
        seen = []
        for rows, feats in c.iter_batches(want, batch_size=2, block_rows=5, rng=np.random.default_rng(0)):
            assert len(rows) <= 2 and len({r // 5 for r in rows}) == 1  # one block at a time
            np.testing.assert_array_equal(feats, full[rows])
            seen.extend(rows.tolist())
        assert sorted(seen) == want.tolist() and seen != want.tolist()
        in_order = [r for rows, _ in c.iter_batches(want, batch_size=4, block_rows=5) for r in rows]
        assert in_order == want.tolist()


def _rows_cache(tmp_path, n=100, append=7):
    """A float16 cache of ``n`` rows (3, 2, 2), each row's first feature its number, appended ``append`` at a time."""
    path = tmp_path / "rows.h5"
    with CacheWriter(path, {**_attrs(), "dtype": "float16"}) as w:
        for s in range(0, n, append):
            r = np.arange(s, min(s + append, n))
            x = r[:, None, None, None] + np.arange(12).reshape(3, 2, 2) / 16
            w.append(x.astype("float16"), (r % 2).tolist(), [str(i) for i in r], int(r[-1]) + 1)
        w.finish()
    return path


def test_every_training_row_once_per_epoch_in_an_order_the_seed_decides(tmp_path):
    with FeatureCache(_rows_cache(tmp_path)) as c:
        full = c.features[:]
        train = np.setdiff1d(np.arange(100), [0, 5, 17, 18, 19, 40, 64, 99])
        orders = {}
        for seed in (0, 0, 1, None):
            batches = list(c.iter_batches(train, 6, 20, None if seed is None else np.random.default_rng(seed)))
            for rows, x in batches:  # every batch still holds its rows after the epoch: none is overwritten
                assert 1 <= len(rows) <= 6 and len({r // 20 for r in rows}) == 1  # one block at a time
                np.testing.assert_array_equal(x, full[rows])
                np.testing.assert_array_equal(x[:, 0, 0, 0], rows)
            order = np.concatenate([rows for rows, _ in batches])
            assert sorted(order.tolist()) == train.tolist()  # each training row exactly once, no other row
            if seed in orders:
                np.testing.assert_array_equal(order, orders[seed])  # the same seed, the same epoch
            orders[seed] = order
        assert orders[None].tolist() == train.tolist()  # no rng: row order
        assert orders[0].tolist() != orders[1].tolist()
        for seed in (0, 1):
            blocks = [r // 20 for r in orders[seed]]
            assert blocks != sorted(blocks)  # blocks in a random order, and rows shuffled within each
            assert any((np.diff(orders[seed][[b == k for b in blocks]]) < 0).any() for k in set(blocks))


def _sharded(tmp_path):
    """A cache of 4 rows whose features live in two shard files of 2 rows each, as torchrun writes it."""
    path = tmp_path / "c.h5"
    rels = []
    for lo, hi in ((0, 2), (2, 4)):
        rel = f"c.shards/part-{lo:09d}-{hi:09d}.h5"
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        attrs = {**_attrs(), "shard_first": lo, "shard_stop": hi, "shard_of": path.name}
        with CacheWriter(tmp_path / rel, attrs) as w:
            w.append(np.full((2, 2, 1, 1), lo, np.float32), [0, 1], [f"{lo}", f"{lo + 1}"], next_candidate=hi)
            w.finish()
        rels.append((rel, 2))
    write_virtual_cache(path, _attrs(), None, rels, (2, 1, 1), "float32", [0, 1, 0, 1], list("0123"), [], 4)
    return path, [tmp_path / r for r, _ in rels]


def test_a_shard_copied_over_another_is_refused(tmp_path):
    path, (first, second) = _sharded(tmp_path)
    with FeatureCache(path) as c:
        assert c.features[:, 0, 0, 0].tolist() == [0, 0, 2, 2]
    shutil.copyfile(first, second)  # same fingerprint, complete, enough rows: only its place differs
    with pytest.raises(CacheError, match=r"shard .*part-000000002-000000004\.h5 holds candidates 0\.\.2 of 'c\.h5', "
                                         r"its name says 2\.\.4"):
        read_info(path)
    with h5py.File(second, "a") as f:
        f.attrs.update({"shard_first": 2, "shard_stop": 4, "shard_of": "other.h5"})
    with pytest.raises(CacheError, match="of 'other.h5'"):
        FeatureCache(path)


def test_a_hand_edited_created_attribute_hides_no_other_cache(tmp_path):
    for name, created in (("a.h5", "2026-01-01T00:00:00"), ("b.h5", 5), ("c.h5", "2026-02-01T00:00:00")):
        with CacheWriter(tmp_path / name, {**_attrs(name), "created": created}) as w:
            w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
            w.finish()
    good, bad = list_caches(tmp_path)
    assert [i.path.name for i in good] == ["c.h5", "a.h5"]
    assert [(p.name, "attribute 'created' is 5" in why) for p, why in bad] == [("b.h5", True)]
    assert newest_cache(tmp_path).path.name == "c.h5"
    res = CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "c.h5" in res.stdout and "not a usable cache" in res.stdout


def test_caches_says_what_a_bad_entry_is_and_escapes_a_name_that_is_not_utf8(tmp_path):
    """A folder, a pipe or a looping link named x.h5 was 'does not exist'; a latin-1 name went out raw
    (a lone surrogate in --json)."""
    (tmp_path / "dir.h5").mkdir()
    os.mkfifo(tmp_path / "pipe.h5")
    os.symlink("loop.h5", tmp_path / "loop.h5")
    (tmp_path / os.fsdecode(b"caf\xe9.h5")).write_bytes(b"junk")
    res = CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    why = {Path(b["path"]).name: b["why"] for b in json.loads(res.stdout)["unreadable"]}
    assert why["dir.h5"].endswith("is not a regular file (a folder)")
    assert why["pipe.h5"].endswith("is not a regular file (a named pipe)")
    assert why["loop.h5"].endswith("is a symlink loop, not a file")
    assert why["caf\\xe9.h5"].endswith("caf\\xe9.h5 is not an HDF5 file (damaged, or not a feature cache)")
    assert "\\ud" not in res.stdout


def test_a_cache_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "features").write_text("x")
    with pytest.raises(ValueError, match="^cache_dir '.*features' must be a folder"):
        list_caches(tmp_path / "features")
    res = CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path / "features")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def test_a_second_writer_is_busy_exit_1_not_a_usage_error(tmp_path):
    assert issubclass(CacheBusy, PipelineError) and not issubclass(CacheBusy, ValueError)
    with CacheWriter(tmp_path / "c.h5", _attrs()):
        with pytest.raises(CacheBusy, match="being written by another process"):
            CacheWriter(tmp_path / "c.h5", _attrs(), wait_s=0.3)
    with CacheWriter(tmp_path / "c.h5", _attrs()) as w:  # free again once the first closed
        assert w.rows == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no lock or temporary file left


def _create_and_fill(path, barrier, results):
    barrier.wait()
    try:
        with CacheWriter(path, _attrs()) as w:
            if w.complete:
                results.put("found complete")
                return
            assert w.rows == 0, f"found {w.rows} rows of an unfinished cache"
            w.append(np.ones((3, 2, 1, 1), np.float32), [0, 1, 0], list("abc"), next_candidate=3)
            w.finish()
            results.put("wrote")
    except BaseException as e:  # noqa: BLE001 - the test reports it
        results.put(f"{type(e).__name__}: {e}")


def test_two_writers_creating_the_same_cache_at_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for i in range(10):
        path = tmp_path / f"c{i}.h5"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_create_and_fill, args=(path, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = sorted(results.get(timeout=5) for _ in procs)
        assert got == ["found complete", "wrote"], got
        info = read_info(path)
        assert info.complete and info.rows == 3


def _hold_for_writing(path, held, done):
    with CacheWriter(path, _attrs("busy")):
        held.set()
        done.wait(60)


def test_listing_never_waits_on_a_cache_being_written(tmp_path):
    with CacheWriter(tmp_path / "a.h5", _attrs("a")) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
        w.finish()
    ctx = multiprocessing.get_context("fork")
    held, done = ctx.Event(), ctx.Event()
    writer = ctx.Process(target=_hold_for_writing, args=(tmp_path / "b.h5", held, done))
    writer.start()
    try:
        assert held.wait(30)
        started = time.monotonic()
        good, bad = list_caches(tmp_path)
        assert newest_cache(tmp_path).path.name == "a.h5"
        assert time.monotonic() - started < 5  # was about 20 s per look: open_h5 waited for the writer
        assert [i.path.name for i in good] == ["a.h5"]
        assert [(p.name, "being written by another process" in why) for p, why in bad] == [("b.h5", True)]
    finally:
        done.set()
        writer.join(30)


def test_the_default_cache_names_the_one_being_written(tmp_path, caplog):
    """fit-head without --cache while the only cache was still being extracted said 'no complete feature cache ...;
    run `python cli.py extract` first' (exit 2), the extract running beside it; beside an older complete cache it
    trained on that one without a word. Now: busy (exit 1) naming it, or a warning naming both."""
    with CacheWriter(tmp_path / "a.h5", _attrs("a")) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
        w.finish()
    with CacheWriter(tmp_path / "b.h5", _attrs("b")):  # its lock held: being written
        with caplog.at_level("WARNING", logger="pipeline"):
            assert newest_cache(tmp_path).path.name == "a.h5"
        assert "b.h5 is being written by another process (an extraction still running?); using " in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline"):
        assert newest_cache(tmp_path).path.name == "a.h5"
    assert "being written" not in caplog.text
    (tmp_path / "only").mkdir()
    with CacheWriter(tmp_path / "only" / "b.h5", _attrs("b")):
        res = CliRunner().invoke(cli.cli, ["fit-head", "--cache-dir", str(tmp_path / "only"),
                                           "--runs-dir", str(tmp_path / "r")])
    assert res.exit_code == 1, res.output
    assert "b.h5 is being written by another process" in res.output and "run this again when it" in res.output
    assert "extract` first" not in res.output and not (tmp_path / "r").exists()


def test_freshness_check_survives_links_and_pipes_in_the_data_folder(tiny_cache, image_folder):
    info = read_info(tiny_cache)
    make_non_regular(image_folder / "red")
    assert source_changes(info) is None  # not images: the listing, and so the fingerprint, is unchanged
    (image_folder / "green").mkdir()
    assert "holds no images" in source_changes(info)


@pytest.mark.parametrize("name, value, why", [
    ("classes", '[1, 2]', "at least 2 distinct class names"),
    ("classes", '["a"]', "at least 2 distinct"),
    ("classes", '["a", "a"]', "distinct"),
    ("rows", -1, "0 or more"),
    ("dtype", "int8", "one of float16, float32"),
    ("mean", np.array([np.nan, 0, 0]), "3 finite numbers"),
    ("mean", np.array([0.5, 0.5, 0.5]), "the preprocessing's mean"),
    ("created", "yesterday", "an ISO 8601 time"),
])
def test_every_hand_edited_attribute_is_refused_on_open(tmp_path, name, value, why):
    with CacheWriter(tmp_path / "c.h5", _attrs()) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
        w.finish()
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs[name] = value
    with pytest.raises(CacheError, match=f"attribute '{name}' .*{why}"):
        read_info(tmp_path / "c.h5")
    res = CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "not a usable cache" in res.stdout


def test_newest_compares_created_as_instants_whatever_the_time_zone(tmp_path):
    # b is an hour later than a as an instant, though earlier as text
    for name, created in (("a.h5", "2026-01-01T10:30:00+0000"), ("b.h5", "2026-01-01T10:00:00-0100")):
        with CacheWriter(tmp_path / name, {**_attrs(name), "created": created}) as w:
            w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
            w.finish()
    assert newest_cache(tmp_path).path.name == "b.h5"


def test_caches_names_each_unusable_file_and_its_reason(tmp_path):
    import json

    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    text = CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path)]).stdout
    assert f"not a usable cache: {tmp_path / 'junk.h5'}: " in text and "not an HDF5 file" in text
    out = json.loads(CliRunner().invoke(cli.cli, ["caches", "--cache-dir", str(tmp_path), "--json"]).stdout)
    assert out["unreadable"] == [{"path": str(tmp_path / "junk.h5"), "why": out["unreadable"][0]["why"]}]
    assert "not an HDF5 file" in out["unreadable"][0]["why"]


def test_the_caches_table_keeps_its_columns_in_line_whatever_the_names():
    """A path column 48 wide pushed every later column of a Lite0 cache's longer name out of line, and the classes
    were cut mid-word at 20 characters."""
    from pipeline.reports.present import caches_text

    def cache(path, backbone, classes):
        return {"path": path, "backbone": backbone, "rows": 12, "classes": classes, "size_bytes": 2e6,
                "created": "2026-12-06T16:00:00+0000", "complete": True}

    text = caches_text({"caches": [cache("features/vgg16-n30-6034216f2ed9.h5", "vgg16", ["a", "b"]),
                                   cache("features/tf_efficientnet_lite0-nall-34c5c2a52237.h5", "tf_efficientnet_lite0",
                                         [f"breed_number_{i}" for i in range(20)])], "unreadable": []}, "features")
    lines = text.splitlines()
    assert len({line.index("created") if i == 0 else line.index("2026") for i, line in enumerate(lines)}) == 1
    assert "20: breed_number_0,breed_number_1,..." in lines[2] and "2: a,b" in lines[1]


def test_newest_is_the_cache_finished_last_not_the_one_started_last(tmp_path):
    # extract of a big folder started first (a), an audit's smaller extraction started later (b) and
    # finished first: `extract a && fit-head` trained on b
    first = CacheWriter(tmp_path / "a.h5", {**_attrs("a"), "created": "2026-01-01T10:00:00+0000"})
    with CacheWriter(tmp_path / "b.h5", {**_attrs("b"), "created": "2026-01-01T10:05:00+0000"}) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
        w.finish()
    with first as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
        w.finish()
    assert newest_cache(tmp_path).path.name == "a.h5"


@pytest.mark.parametrize("later", [0, 1])
def test_caches_made_in_one_second_are_listed_newest_completed_first(tmp_path, make_cache, later):
    """``created`` is whole seconds: two caches made in one second were listed in their file names' order (a
    hash), so row reuse took either as the newest donor (its label-change count then flaky); the one completed
    later comes first."""
    paths = [Path(make_cache(make_image_folder(tmp_path / f"d{i}", per_class=2), dtype="float32").cache)
             for i in range(2)]
    for i, p in enumerate(paths):
        with h5py.File(p, "r+") as f:
            f.attrs["created"] = "2026-12-07T20:00:00+0000"
            f.attrs["completed"] = f"2026-12-07T20:00:00.{500000 if i == later else 100000:06d}+00:00"
    assert [i.path.name for i in list_caches(tmp_path / "features")[0]][0] == paths[later].name
