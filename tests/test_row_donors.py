"""extract reuses rows by content: a relabelled or renamed photo is never recomputed, a new one is."""
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache.feature_cache import FeatureCache
from pipeline.data.folders import list_image_folder
from pipeline.extraction import inference


@pytest.fixture
def forward_passes(monkeypatch):
    """How many images went through the backbone."""
    seen = {"images": 0}
    call = inference.Inference.__call__

    def counting(self, images):
        seen["images"] += len(images)
        return call(self, images)

    monkeypatch.setattr(inference.Inference, "__call__", counting)
    return seen


def rows_by_digest(path):
    with FeatureCache(path) as c:
        return {d: (c.features[i], c.classes[c.labels[i]], p) for i, (d, p) in enumerate(zip(c.digests, c.paths))}


def test_relabel_and_a_new_photo_cost_one_forward_pass(make_cache, image_folder, forward_passes):
    first = make_cache(image_folder, dtype="float32")
    assert forward_passes["images"] == 24 and first.reused == 0
    for name in ("blue.0.jpg", "blue.1.jpg"):  # two relabelled photos
        shutil.move(image_folder / "blue" / name, image_folder / "red" / name)
    shutil.copy(image_folder / "red" / "red.0.jpg", image_folder / "red" / "renamed.jpg")  # same bytes, new name
    from PIL import Image
    Image.new("RGB", (40, 40), (10, 200, 10)).save(image_folder / "blue" / "new.jpg")  # a new photo
    forward_passes["images"] = 0
    second = make_cache(image_folder, dtype="float32")
    assert forward_passes["images"] == 1
    assert (second.computed, second.reused, second.label_changes, second.rows) == (1, 25, 2, 26)
    old, new = rows_by_digest(first.cache), rows_by_digest(second.cache)
    for d, (feats, cls, path) in new.items():
        if d in old:
            np.testing.assert_array_equal(feats, old[d][0])  # copied, bit for bit
    assert new[next(d for d, v in new.items() if v[2] == "red/blue.0.jpg")][1] == "red"
    with FeatureCache(second.cache) as c:  # the new cache's provenance is the new folder's
        assert c.attrs["data_fingerprint"] == list_image_folder(image_folder).fingerprint()
        assert '"reused": 25' in c.attrs["reuse"] and '"computed": 1' in c.attrs["reuse"]


def test_rows_made_differently_are_not_reused(make_cache, image_folder, forward_passes):
    make_cache(image_folder, dtype="float32")
    shutil.move(image_folder / "blue" / "blue.0.jpg", image_folder / "red" / "blue.0.jpg")
    forward_passes["images"] = 0
    other = make_cache(image_folder, dtype="float16")  # another storage dtype: other rows
    assert forward_passes["images"] == 24 and other.reused == 0


def test_a_cache_without_digests_still_reads_and_gives_rows_while_its_folder_is_unchanged(make_cache, image_folder,
                                                                                         forward_passes, tmp_path):
    first = make_cache(image_folder, dtype="float32")
    with h5py.File(first.cache, "r+") as f:  # as caches were made before they kept digests
        del f["sha256"]
    with FeatureCache(first.cache) as c:
        assert c.digests is None and c.n == 24
    forward_passes["images"] = 0
    again = make_cache(image_folder, dtype="float32", n=12)  # another request on the unchanged folder
    assert forward_passes["images"] == 0 and again.reused == 12
    (image_folder / "blue" / "blue.5.jpg").touch()  # now the old cache's rows cannot be vouched for
    forward_passes["images"] = 0
    shutil.move(image_folder / "blue" / "blue.0.jpg", image_folder / "red" / "blue.0.jpg")
    third = make_cache(image_folder, dtype="float32", seed=1, n=6)
    assert third.computed + third.reused == 6 and forward_passes["images"] == third.computed
    with FeatureCache(again.cache) as c:  # rows come from the n=12 cache only (it keeps digests)
        digests = set(c.digests)
    with FeatureCache(third.cache) as c:
        assert sum(d in digests for d in c.digests) == third.reused


def test_reuse_names_only_the_caches_rows_were_copied_from(make_cache, image_folder, tmp_path):
    """A cache's reuse record named every cache of the folder that offered digests in 'from' (a scenes6 cache
    listed a food10 cache none of its rows came from); now only the caches rows were copied from."""
    import json

    from tests.conftest import make_image_folder

    first = make_cache(image_folder, dtype="float32")
    other = make_cache(make_image_folder(tmp_path / "other", classes=("green", "red"), seed=5), dtype="float32")
    with FeatureCache(other.cache) as c:  # no photo in common: nothing copied, no cache named
        assert other.reused == 0 and json.loads(c.attrs["reuse"])["from"] == []
    shutil.move(image_folder / "blue" / "blue.0.jpg", image_folder / "red" / "blue.0.jpg")
    again = make_cache(image_folder, dtype="float32")
    with FeatureCache(again.cache) as c:
        assert again.reused == 24 and json.loads(c.attrs["reuse"])["from"] == [Path(first.cache).name]


def test_a_stopped_extraction_gives_its_committed_rows_to_the_folder_changed_since(make_cache, image_folder,
                                                                                    forward_passes, monkeypatch):
    """extract stopped (Ctrl-C, a kill, a file moved beside it) after 192 of 301 signdigits10 photos, then a photo
    added: another request, whose run computed all 301 again, the stopped cache's committed rows ignored. They
    are copied by content now; only the photos they lack go through the backbone."""
    from pipeline.extraction import extract_range

    real = extract_range.CacheWriter.append
    batches = []

    def stop_after_two(self, features, *args, **kwargs):  # Ctrl-C once two batches are committed
        if features is not None:
            batches.append(len(features))
            if len(batches) > 2:
                raise KeyboardInterrupt
        return real(self, features, *args, **kwargs)

    monkeypatch.setattr(extract_range.CacheWriter, "append", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        make_cache(image_folder, dtype="float32", batch_size=8)
    monkeypatch.setattr(extract_range.CacheWriter, "append", real)
    from PIL import Image
    Image.new("RGB", (40, 40), (10, 200, 10)).save(image_folder / "blue" / "new.jpg")  # the folder changed
    forward_passes["images"] = 0
    second = make_cache(image_folder, dtype="float32", batch_size=8)
    assert (second.reused, second.computed, second.rows) == (16, 9, 25)
    assert forward_passes["images"] == 9


def test_a_donor_replaced_after_its_digests_were_read_still_lends_its_own_rows(make_cache, image_folder, tmp_path):
    """A complete donor was closed once its digests were read and opened again by path for its rows: a cache set
    aside as stale and written anew at that path meanwhile (another extract of its folder) lent rows of other
    photos, silently. Its rows now come from the file its digests came from, kept open."""
    import os

    from pipeline.cache.row_donors import find_donors

    first = make_cache(image_folder, dtype="float32")
    with h5py.File(first.cache, "r") as f:
        attrs = dict(f.attrs)
    own = rows_by_digest(first.cache)
    donors = find_donors(Path(first.cache).parent, attrs)
    other = tmp_path / "other.h5"  # the same cache, its rows in another order, put in its place
    shutil.copy(first.cache, other)
    with h5py.File(other, "r+") as f:
        f["features"][...] = f["features"][:][::-1]
    os.replace(other, first.cache)
    digests = sorted(own)
    try:
        np.testing.assert_array_equal(donors.rows(digests), np.stack([own[d][0] for d in digests]))
    finally:
        donors.close()


def test_a_byte_copy_removed_from_another_class_leaves_its_original_unchanged(make_cache, image_folder):
    """audit --apply removing a copy of a red photo saved into blue/: the red original is still red, no label
    change (the count said 1: the copy's class was taken for the bytes' class)."""
    for original, other in (("red/red.0.jpg", "blue"), ("blue/blue.1.jpg", "red")):  # whichever row comes first
        for name in ("a-copy.jpg", "z-copy.jpg"):
            shutil.copy(image_folder / original, image_folder / other / name)
    make_cache(image_folder, dtype="float32")
    for copy in image_folder.glob("*/?-copy.jpg"):
        copy.unlink()
    second = make_cache(image_folder, dtype="float32")
    assert (second.reused, second.label_changes) == (24, 0)
    shutil.move(image_folder / "red" / "red.0.jpg", image_folder / "blue" / "red.0.jpg")  # now really relabelled
    assert make_cache(image_folder, dtype="float32").label_changes == 1
