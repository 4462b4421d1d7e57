import h5py
import numpy as np
import pytest

from pipeline.cache import CacheError, CacheWriter, FeatureCache, read_info


def _attrs(fp="abc"):
    return {"fingerprint": fp, "backbone": "tiny", "weights": "none", "mean": np.zeros(3), "std": np.ones(3),
            "transform": "t", "classes": '["a", "b"]', "seed": 0, "n_requested": 0, "data_root": "/x",
            "data_fingerprint": "d", "dtype": "float32", "created": "now", "versions": "{}"}


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


def test_incomplete_cache_is_refused_with_the_command_that_finishes_it(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, {**_attrs(), "command": "python cli.py extract --n 8"}) as w:
        w.append(np.ones((2, 2, 1, 1), np.float32), [0, 1], ["a", "b"], next_candidate=2)
    with pytest.raises(CacheError, match=r"incomplete \(2 of all rows.*python cli.py extract --n 8"):
        FeatureCache(path)


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
    with h5py.File(r["cache"], "a") as f:
        f["labels"][0] = 7
    with pytest.raises(CacheError, match="labels outside"):
        read_info(r["cache"])
    with h5py.File(r["cache"], "a") as f:
        f["labels"][0] = 0
        del f["paths"]
    with pytest.raises(CacheError, match="no dataset 'paths'"):
        read_info(r["cache"])


def test_iter_blocks_streams_each_row_once(image_folder, tmp_path, make_cache):
    r = make_cache(image_folder, dtype="float32")
    with FeatureCache(r["cache"]) as c:
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
