import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import pipeline.data.folders
from pipeline.cache.feature_cache import FeatureCache
from pipeline.cli import cli
from pipeline.errors import DiskFull
from pipeline.extraction.extract import ExtractConfig, ExtractResult, extract
from tests.conftest import ROOT, make_image_folder
from tests.tiny import CLI


def cfg(data, tmp_path, **kw):
    base = dict(data=str(data), n=0, backbone="tiny", weights="none", cache_dir=str(tmp_path / "f"),
                workers=0, batch_size=5, dtype="float32")
    return ExtractConfig(**{**base, **kw})


def test_extract_writes_every_row_including_the_partial_last_batch(image_folder, tmp_path):
    r = extract(cfg(image_folder, tmp_path, batch_size=5))  # 24 images: 4 full batches + 4
    assert not r.hit and r.rows == 24 and r.feature_shape == [8, 8, 8]
    with h5py.File(r.cache, "r") as f:
        assert f["features"].shape == (24, 8, 8, 8) and f["labels"].dtype == np.int64
        paths = [p.decode() for p in f["paths"][:]]
        assert len(set(paths)) == 24 and all((image_folder / p).is_file() for p in paths)
        labels = f["labels"][:]
        assert all(p.startswith(("blue/", "red/")[label]) for p, label in zip(paths, labels))
        a = f.attrs
        assert a["backbone"] == "tiny" and a["weights"] == "none" and a["complete"] == 1
        assert json.loads(a["classes"]) == ["blue", "red"] and "Normalize" in a["transform"]
        assert "torch" in json.loads(a["versions"]) and a["data_root"] == str(image_folder.resolve())



def test_the_result_is_a_dataclass_whose_dict_has_each_shapes_keys(image_folder, tmp_path):
    """--json prints to_dict(): a computed cache's keys, a hit's (with verified), a torchrun rank's (rank third)."""
    made = extract(cfg(image_folder, tmp_path, precision="fp32"))
    assert isinstance(made, ExtractResult) and list(made.to_dict()) == [*ExtractResult.COMPUTED[:-2]]
    hit = extract(cfg(image_folder, tmp_path, precision="fp32"))
    assert list(hit.to_dict()) == [*ExtractResult.HIT[:-1]] and hit.rows == made.rows == 24
    rank = ExtractResult(cache="c.h5", hit=False, rank=1, skipped=0, rows=5, computed=5, resumed_from=0, seconds=1.0,
                         img_per_s=5.0)
    assert list(rank.to_dict()) == ["cache", "hit", "rank", "skipped", "rows", "computed", "resumed_from", "seconds",
                                    "img_per_s"]

def test_rows_match_a_direct_forward_pass(image_folder, tmp_path):
    import torch

    from pipeline.data.folders import load_rgb
    from pipeline.extraction.backbones import load_backbone

    r = extract(cfg(image_folder, tmp_path, precision="fp32"))
    bb = load_backbone("tiny", "none")
    with FeatureCache(r.cache) as c:
        x = torch.stack([bb.transform(load_rgb(image_folder / p)) for p in c.paths[:3]])
        with torch.inference_mode():
            want = bb.features(x).numpy()
        np.testing.assert_allclose(c.features[:3], want, rtol=1e-5, atol=1e-5)


def test_flip_rows_are_the_mean_of_a_photo_and_its_mirror_image_and_heads_predict_the_same(image_folder,
                                                                                           tmp_path):
    import torch

    import pipeline
    from pipeline.data.folders import load_rgb
    from pipeline.extraction.backbones import load_backbone

    plain = extract(cfg(image_folder, tmp_path, precision="fp32"))
    r = extract(cfg(image_folder, tmp_path, precision="fp32", flip=True))
    assert r.cache != plain.cache  # another network: another cache
    bb = load_backbone("tiny", "none")
    with FeatureCache(r.cache) as c:
        assert c.attrs["flip"]
        x = torch.stack([bb.transform(load_rgb(image_folder / p)) for p in c.paths[:3]])
        with torch.inference_mode():
            want = ((bb.features(x) + bb.features(x.flip(-1)).flip(-1)) / 2).numpy()
        np.testing.assert_allclose(c.features[:3], want, rtol=1e-5, atol=1e-5)
        # a photo and its mirror image give one row
        mirrored = tmp_path / "m" / "blue"
        mirrored.mkdir(parents=True)
        from PIL import ImageOps

        ImageOps.mirror(load_rgb(image_folder / c.paths[0])).save(mirrored / "m.png")
        xm = bb.transform(load_rgb(mirrored / "m.png"))[None]
        with torch.inference_mode():
            got = ((bb.features(xm) + bb.features(xm.flip(-1)).flip(-1)) / 2).flip(-1).numpy()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
        # a head fitted on flip rows runs the same network on images: predict == the head on the rows
        head = pipeline.Head(head="logreg", runs_dir=str(tmp_path / "runs")).fit(pipeline.Cache(r.cache))
        on_rows = head.predict_proba(np.asarray(c.features[:4]))
        on_images = head.predict_proba([image_folder / p for p in c.paths[:4]], precision="fp32", workers=0)
    np.testing.assert_allclose(on_images, on_rows, atol=1e-5)


def test_flip_is_opt_in_so_an_added_photo_keeps_every_row_and_a_test_folder_fits_the_head(tmp_path):
    """Flip was once decided from the folder (pretrained weights and at most 50 photos per class, counted
    over the whole folder): the 101st photo of two classes turned it off (every row recomputed, each meaning
    something else), and a small test folder extracted like its training folder got it on (evaluate then
    refused the test cache: "flip: False vs True"). Off unless asked, it can do neither."""
    import shutil

    import torch

    from pipeline.extraction.backbones import load_backbone
    from pipeline.heads.fit_head import FitHeadConfig, fit_head
    from pipeline.reports.evaluate import EvaluateConfig, evaluate

    weights = tmp_path / "tiny.pt"  # a weights file: pretrained, as far as extract can tell
    torch.save(load_backbone("tiny", "none").model.state_dict(), weights)
    train = make_image_folder(tmp_path / "train", per_class=50)
    first = extract(cfg(train, tmp_path, weights=str(weights)))
    assert not first.flip
    shutil.copy(make_image_folder(tmp_path / "one", per_class=1, seed=3) / "blue" / "blue.0.jpg",
                train / "blue" / "added.jpg")
    again = extract(cfg(train, tmp_path, weights=str(weights)))
    assert not again.flip and (again.reused, again.computed) == (100, 1)
    test = extract(cfg(make_image_folder(tmp_path / "test", per_class=6, seed=4), tmp_path, weights=str(weights)))
    assert not test.flip
    head = fit_head(FitHeadConfig(cache=again.cache, head="logreg", runs_dir=str(tmp_path / "runs")))
    result = evaluate(EvaluateConfig(model=head.checkpoint, cache=test.cache, split="all",
                                     runs_dir=str(tmp_path / "runs")))
    assert result.rows == 12
    flipped = extract(cfg(train, tmp_path, weights=str(weights), flip=True))  # asked for: a cache of its own
    assert flipped.flip and flipped.cache != again.cache
    with FeatureCache(flipped.cache) as c:
        assert c.attrs["flip"] and json.loads(c.attrs["config"])["flip"] is True


def test_n_takes_a_seeded_stratified_sample(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=20)
    r = extract(cfg(data, tmp_path, n=10, seed=1))
    with FeatureCache(r.cache) as c:
        assert c.n == 10 and np.bincount(c.labels).tolist() == [5, 5]
        first = c.paths
    other = extract(cfg(data, tmp_path, n=10, seed=2))
    assert other.cache != r.cache
    with FeatureCache(other.cache) as c:
        assert c.paths != first


def test_same_request_is_a_cache_hit_without_decoding(image_folder, tmp_path, monkeypatch):
    first = extract(cfg(image_folder, tmp_path))

    def no_decoding(path):
        raise AssertionError("decoded an image on a cache hit")

    monkeypatch.setattr(pipeline.data.folders, "load_rgb", no_decoding)
    again = extract(cfg(image_folder, tmp_path, batch_size=7, workers=0))
    assert again.hit and again.cache == first.cache and again.rows == 24


def test_a_cache_dir_where_nothing_can_be_written_serves_a_hit_and_refuses_a_miss(image_folder, tmp_path, monkeypatch):
    """The output guard refuses a folder where nothing can be written (files.check_writable) before the work; a
    --cache-dir is only read on a hit (a shared, read-only folder of caches), so extract does not ask it."""
    import errno
    import tempfile

    first = extract(cfg(image_folder, tmp_path))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    again = extract(cfg(image_folder, tmp_path))
    assert again.hit and again.cache == first.cache
    # a miss there is refused in one line before the work (it was "unexpected FileNotFoundError ... (a bug?)")
    with pytest.raises(DiskFull, match=r"^cannot write cache_dir '.*': nothing can be written in '.*' "
                                       r"\(the file system is read-only\)$"):
        extract(cfg(image_folder, tmp_path, n=10))


def _while_reading(monkeypatch, position: int, before, after=None):
    """Run ``before(file)`` just before extract reads its candidate at ``position`` (and ``after(file)`` just after)."""
    from pipeline.data.image_reader import ImageListDataset

    read = ImageListDataset.__getitem__

    def reading(self, i):
        pos = self.start + i
        if pos != position:
            return read(self, i)
        file = self.root / self.items[pos][0]
        before(file)
        try:
            return read(self, i)
        finally:
            if after:
                after(file)

    monkeypatch.setattr(ImageListDataset, "__getitem__", reading)


def _move_away(file):
    file.rename(file.with_name(file.name + ".away"))


def _move_back(file):
    file.with_name(file.name + ".away").rename(file)


def _touch(file):
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _untouch(file):
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))


@pytest.mark.parametrize("change, undo", [(_move_away, _move_back),  # audit --apply moving it, then --undo
                                          (_touch, _untouch)], ids=["moved", "rewritten"])
def test_a_file_moved_or_rewritten_during_extraction_is_never_a_permanent_skip(image_folder, tmp_path, monkeypatch,
                                                                                change, undo):
    """A file moved away during extract (an audit --apply beside it) was recorded as skipped ("No such file or
    directory") and the cache marked complete; once moved back, the folder's listing was as before and every
    extract was a hit of one row fewer."""
    from pipeline.errors import PipelineError

    changed = []
    _while_reading(monkeypatch, 7, lambda f: (changed.append(f), change(f)))
    with pytest.raises(PipelineError, match="changed during extraction: 1 file gone or rewritten"):
        extract(cfg(image_folder, tmp_path))
    monkeypatch.undo()
    undo(changed[0])
    (cache,) = (tmp_path / "f").glob("*.h5")
    with FeatureCache(cache, allow_incomplete=True) as c:
        assert not c.info.complete and c.skipped() == []
    r = extract(cfg(image_folder, tmp_path))  # the folder as listed again: resumed
    assert not r.hit and r.resumed_from == 5 and (r.rows, r.skipped) == (24, 0)


def test_a_cache_whose_skipped_files_read_again_is_not_a_hit(image_folder, tmp_path, monkeypatch):
    """A file gone only while it was read (moved away and back between the read and the check of the
    batch) is skipped; the next extract finds it readable and extracts again, reusing every other row."""
    _while_reading(monkeypatch, 7, _move_away, _move_back)
    first = extract(cfg(image_folder, tmp_path))
    assert (first.rows, first.skipped) == (23, 1)
    monkeypatch.undo()
    again = extract(cfg(image_folder, tmp_path))
    assert not again.hit and again.cache == first.cache
    assert (again.rows, again.skipped, again.reused, again.computed) == (24, 0, 23, 1)
    assert [p.name for p in (tmp_path / "f").iterdir() if ".stale-" in p.name] == []  # set aside, then removed
    assert extract(cfg(image_folder, tmp_path)).hit


def test_a_large_jpeg_an_older_rule_refused_as_a_bomb_is_read_on_the_next_extract(image_folder, tmp_path,
                                                                                     monkeypatch):
    """A cache made before large baseline JPEGs were decoded reduced skipped a 108 MP phone photo as a
    decompression bomb; the folder unchanged, every extract was a hit without it. Now its next extract reads it,
    reusing every other row; a file refused in today's wording (a PNG bomb) keeps the cache a hit."""
    from PIL import Image

    from pipeline.data import portable
    from tests.badfiles import bomb_png

    Image.new("RGB", (12000, 9000), (200, 30, 30)).save(image_folder / "red" / "phone.jpg", quality=90)
    (image_folder / "blue" / "bomb.png").write_bytes(bomb_png(12000, 12000))

    def older_rule(im, min_short_side):  # Pillow's refusal, as the decoder before gave it
        raise portable.TooManyPixels("decompression bomb: Image size (108000000 pixels) exceeds limit of 89478485 "
                                     "pixels, could be decompression bomb DOS attack.")

    monkeypatch.setattr(portable, "draft_within_limit", older_rule)
    first = extract(cfg(image_folder, tmp_path))
    assert (first.rows, first.skipped) == (24, 2)
    monkeypatch.undo()
    again = extract(cfg(image_folder, tmp_path))
    assert not again.hit and again.cache == first.cache
    assert (again.rows, again.skipped, again.reused, again.computed) == (25, 1, 24, 1)
    assert extract(cfg(image_folder, tmp_path)).hit  # the PNG, refused in today's wording, is not tried again


def test_a_file_the_disk_cannot_read_stays_skipped_and_the_cache_a_hit(image_folder, tmp_path, monkeypatch):
    """An I/O error is a reason that may pass, but a file untouched since (its ctime before the cache was begun)
    has not been fixed: re-extracting it on every run would never give a hit."""
    import time

    from pipeline.data.image_reader import ImageListDataset, Item

    decode = ImageListDataset._decode
    monkeypatch.setattr(ImageListDataset, "_decode", lambda self, pos, path, label: (
        Item(pos, None, label, path, "unreadable image: Input/output error") if pos == 7
        else decode(self, pos, path, label)))
    time.sleep(1.1)  # the photos' ctime a second before the cache's creation (kept in whole seconds)
    first = extract(cfg(image_folder, tmp_path))
    assert (first.rows, first.skipped) == (23, 1)
    monkeypatch.undo()
    assert extract(cfg(image_folder, tmp_path)).hit


def _rewrite_keeping_size_and_mtime(file, like):
    """Put another photo's bytes in ``file`` (padded after its end, where JPEG decoders stop reading), keeping
    the file's size and mtime: its listing is as before."""
    st, data = file.stat(), like.read_bytes()
    assert len(data) <= st.st_size
    file.write_bytes(data + bytes(st.st_size - len(data)))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


def _solid_jpeg(path, colour):
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_a_photo_rewritten_in_place_with_size_and_mtime_kept_is_found_by_its_sha256(image_folder, tmp_path,
                                                                                   monkeypatch):
    """Such a photo (os.utime restoring the mtime) leaves the listing's fingerprint as it was: a hit with stale
    features. The sha256 the cache keeps per row finds it: on every hit of a small folder, and with --verify."""
    from pipeline.data.image_reader import file_digest

    first = extract(cfg(image_folder, tmp_path))
    with FeatureCache(first.cache) as c:
        target = image_folder / c.paths[3]
    _rewrite_keeping_size_and_mtime(target, _solid_jpeg(tmp_path / "green.jpg", (0, 255, 0)))
    again = extract(cfg(image_folder, tmp_path))  # a small folder: every hit checks
    assert not again.hit and again.cache == first.cache and (again.reused, again.computed) == (23, 1)
    with FeatureCache(again.cache) as c:
        assert c.digests[c.paths.index(target.relative_to(image_folder).as_posix())] == file_digest(target)
    assert extract(cfg(image_folder, tmp_path)).verified

    from pipeline.cache import freshness

    monkeypatch.setattr(freshness, "VERIFY_AUTO_MAX_BYTES", 0)  # as for a large folder: hashed only when asked
    _rewrite_keeping_size_and_mtime(target, _solid_jpeg(tmp_path / "dark.jpg", (0, 90, 0)))
    hit = extract(cfg(image_folder, tmp_path))
    assert hit.hit and not hit.verified
    third = extract(cfg(image_folder, tmp_path, verify=True))
    assert not third.hit and (third.reused, third.computed) == (23, 1)


def test_asking_for_a_hit_leaves_a_stale_cache_in_place(image_folder, tmp_path, caplog):
    """hit_only (choose-backbone asks each candidate before it checks the weights of those to extract) is 'nothing
    written on a miss': a stale cache was set aside and called 'extracting again' by the question, then by a run
    refused (offline, say) before any extraction. The extraction that follows sets it aside and reuses its rows."""
    import logging

    first = extract(cfg(image_folder, tmp_path))
    with FeatureCache(first.cache) as c:
        target = image_folder / c.paths[3]
    _rewrite_keeping_size_and_mtime(target, _solid_jpeg(tmp_path / "green.jpg", (0, 255, 0)))
    with caplog.at_level(logging.WARNING):
        assert extract(cfg(image_folder, tmp_path), hit_only=True) is None
    assert [p.name for p in (tmp_path / "f").iterdir()] == [Path(first.cache).name] and "stale" not in caplog.text
    again = extract(cfg(image_folder, tmp_path))
    assert not again.hit and (again.reused, again.computed) == (23, 1)


def test_precision_autos_line_is_said_once_by_the_run_not_by_the_question(image_folder, tmp_path, caplog,
                                                                          monkeypatch):
    """choose-backbone asks each candidate for a hit (hit_only) before extracting the misses: 'precision auto: int8
    + compile (...)' was said by the question and again by the extraction, both before the first 'extracting' line.
    Said once: by the extraction on a miss, by the question on a hit (its only run)."""
    import logging

    from pipeline.extraction import extract as extract_mod

    monkeypatch.setattr(extract_mod, "auto_precision", lambda c, images, paid=False: (c.precision, "the choice"))
    monkeypatch.setattr(extract_mod, "INT8_AUTO_MIN_IMAGES", 1)  # said at INFO, as for a sample of 1,000 photos

    def said(**kw) -> int:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline"):
            extract(cfg(image_folder, tmp_path), **kw)
        return caplog.messages.count("the choice")

    assert (said(hit_only=True), said(), said(hit_only=True)) == (0, 1, 1)


def test_a_changed_folder_or_setting_gives_a_new_cache(image_folder, tmp_path):
    first = extract(cfg(image_folder, tmp_path)).cache
    assert extract(cfg(image_folder, tmp_path, dtype="float16")).cache != first
    assert extract(cfg(image_folder, tmp_path, pool="avg")).cache != first
    img = image_folder / "red" / "red.3.jpg"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    changed = extract(cfg(image_folder, tmp_path))
    assert not changed.hit and changed.cache != first


def test_bad_files_are_skipped_recorded_and_replaced(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=10)
    (data / "red" / "zero.jpg").write_bytes(b"")
    (data / "blue" / "text.jpg").write_text("not a picture")
    good = (data / "blue" / "blue.0.jpg").read_bytes()
    (data / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    r = extract(cfg(data, tmp_path, n=0))
    assert r.rows == 20 and r.skipped == 3
    with FeatureCache(r.cache) as c:
        skipped = dict(c.skipped())
        assert set(skipped) == {"red/zero.jpg", "blue/text.jpg", "blue/truncated.jpg"}
        assert "zero-byte" in skipped["red/zero.jpg"] and "not an image" in skipped["blue/text.jpg"]
        assert not set(skipped) & set(c.paths)
    # --n counts good images: asking for all 20 good ones of 23 files works
    assert extract(cfg(data, tmp_path, n=20)).rows == 20


def test_a_cache_dir_inside_the_data_folder_is_refused(image_folder):
    r = CliRunner().invoke(cli, ["extract", "--data", str(image_folder), "--cache-dir", str(image_folder / "blue"),
                                 "--backbone", "tiny", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 2 and "--cache-dir" in r.output and "is inside the data folder" in r.output, r.output
    assert len(list((image_folder / "blue").iterdir())) == 12


def test_a_folder_of_only_bad_files_is_a_clear_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no image .* could be decoded"):
        extract(cfg(tmp_path / "d", tmp_path))


def test_n_larger_than_the_folder_says_how_many_there_are(image_folder, tmp_path):
    with pytest.raises(ValueError, match="^n=25 is more than the 24 images"):  # extract_features(data, n=25)
        extract(cfg(image_folder, tmp_path, n=25))
    r = CliRunner().invoke(cli, ["extract", "--data", str(image_folder), "--n", "25", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2 and "--n 25 is more than the 24 images" in r.output, r.output


def _extract_cmd(data, cache_dir, workers=0):
    return [sys.executable, *CLI, "-v", "extract", "--data", str(data), "--n", "0", "--backbone", "tiny",
            "--weights", "none", "--cache-dir", str(cache_dir), "--batch-size", "2", "--workers", str(workers),
            "--dtype", "float32", "--json"]


def _rows(path):
    with FeatureCache(path) as c:
        return c.paths, c.labels.copy(), c.features[:]


@pytest.mark.parametrize("kill_after, workers", [(1, 0), (25, 0), (7, 2)])
def test_sigkilled_extraction_resumes_to_the_uninterrupted_result(tmp_path, kill_after, workers):
    data = make_image_folder(tmp_path / "d", per_class=40)
    (data / "red" / "zero.jpg").write_bytes(b"")
    reference = extract(cfg(data, tmp_path, cache_dir=str(tmp_path / "ref"), batch_size=2))
    proc = subprocess.Popen(_extract_cmd(data, tmp_path / "f", workers), cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    commits = 0
    for line in proc.stderr:
        commits += b"committed rows=" in line
        if commits == kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    cache = Path(reference.cache.replace(str(tmp_path / "ref"), str(tmp_path / "f")))
    with h5py.File(cache, "r") as f:  # still readable, incomplete, holds at least the k batches
        committed = int(f.attrs["rows"])
        assert f.attrs["complete"] == 0 and committed >= 2 * kill_after
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(cache)
    # resume at once: the killed run's decoding workers may still be exiting
    run = subprocess.run(_extract_cmd(data, tmp_path / "f", workers), cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]  # the resumed run's own words, if it fails
    resumed = json.loads(run.stdout)
    assert resumed["resumed_from"] == committed and resumed["computed"] == 80 - committed
    got, want = _rows(resumed["cache"]), _rows(reference.cache)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert np.array_equal(got[2], want[2])  # bitwise
    with FeatureCache(resumed["cache"]) as c:
        assert c.skipped() == [("red/zero.jpg", "zero-byte file")]


def test_sigterm_during_extraction_says_in_one_line_the_rows_kept_and_the_command_that_goes_on(tmp_path,
                                                                                              image_folder,
                                                                                              monkeypatch):
    """A scheduler's SIGTERM ended extract at once, exit 143 and not a word; Ctrl-C said how to go on."""
    import pipeline.extraction.extract_range as extract_range
    real, batches = extract_range.refuse_changed, []

    def sigterm_in_batch_3(listing, batch):
        batches.append(batch)
        if len(batches) == 3:
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # it would end the process, and pytest with it
                raise AssertionError("SIGTERM would end the extraction without a word")
            signal.raise_signal(signal.SIGTERM)
        return real(listing, batch)

    monkeypatch.setattr(extract_range, "refuse_changed", sigterm_in_batch_3)
    args = ["extract", "--data", str(image_folder), "--n", "0", "--backbone", "tiny", "--weights", "none",
            "--cache-dir", str(tmp_path / "f"), "--batch-size", "2", "--workers", "0", "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", ["cli.py", *args])  # the command line the user typed
    stopped = CliRunner().invoke(cli, args)
    cache = next((tmp_path / "f").glob("*.h5"))
    with h5py.File(cache, "r") as f:
        assert int(f.attrs["rows"]) == 4 and not f.attrs["complete"]
    assert stopped.exit_code == 143, stopped.output
    assert stopped.stderr.strip().splitlines()[-1] == \
        f"terminated; 4 rows kept in {cache}. Resume with: {os.path.basename(sys.executable)} cli.py {' '.join(args)}"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_during_extraction_says_in_one_line_the_rows_kept_and_the_resume_computes_none_of_them(
        tmp_path, image_folder, monkeypatch):
    """Ctrl-C said 'committed rows are kept' and no count, while SIGTERM's line says how many and where."""
    import pipeline.extraction.extract_range as extract_range
    real, batches = extract_range.refuse_changed, []

    def ctrl_c_in_batch_3(listing, batch):
        batches.append(batch)
        if len(batches) == 3:
            raise KeyboardInterrupt  # where the signal would raise it
        return real(listing, batch)

    monkeypatch.setattr(extract_range, "refuse_changed", ctrl_c_in_batch_3)
    args = ["extract", "--data", str(image_folder), "--n", "0", "--backbone", "tiny", "--weights", "none",
            "--cache-dir", str(tmp_path / "f"), "--batch-size", "2", "--workers", "0", "--dtype", "float32", "--json"]
    monkeypatch.setattr(sys, "argv", ["cli.py", *args])  # the command line the user typed
    stopped = CliRunner().invoke(cli, args)
    cache = next((tmp_path / "f").glob("*.h5"))
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stderr.strip().splitlines()[-1] == \
        f"interrupted; 4 rows kept in {cache}. Resume with: {os.path.basename(sys.executable)} cli.py {' '.join(args)}"
    monkeypatch.setattr(extract_range, "refuse_changed", real)
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 4 and json.loads(resumed.stdout)["computed"] == 20


def test_ctrl_c_between_a_commits_counters_waits_for_the_commit_so_the_resume_takes_no_row_twice(
        tmp_path, image_folder, monkeypatch, ctrl_c_raises):
    """A Ctrl-C landing after 'rows' moved but before 'next_candidate' did: the resume started from the old
    candidate, so 4 photos were rows twice and 4 others never extracted."""
    from h5py._hl.attrs import AttributeManager

    real, moved = AttributeManager.modify, []

    def modify(self, name, value):
        real(self, name, value)
        if name == "rows":
            moved.append(value)
            if len(moved) == 3:
                signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, between two of the commit's counters

    monkeypatch.setattr(AttributeManager, "modify", modify)
    args = ["extract", "--data", str(image_folder), "--n", "0", "--backbone", "tiny", "--weights", "none",
            "--cache-dir", str(tmp_path / "f"), "--batch-size", "2", "--workers", "0", "--dtype", "float32", "--json"]
    stopped = CliRunner().invoke(cli, args)
    assert stopped.exit_code == 130 and "interrupted; 6 rows kept" in stopped.stderr, stopped.output
    monkeypatch.setattr(AttributeManager, "modify", real)
    resumed = CliRunner().invoke(cli, args)
    assert json.loads(resumed.stdout)["resumed_from"] == 6
    with h5py.File(json.loads(resumed.stdout)["cache"], "r") as f:
        paths = [p.decode() for p in f["paths"][:]]
    assert len(paths) == 24 and len(set(paths)) == 24


def test_the_count_of_files_includes_the_dangling_link_it_counts_as_skipped(tmp_path, image_folder):
    """'only 24 good images of the 27 files (4 skipped)': a dangling link was a skip but not a file."""
    for i in range(3):
        (image_folder / "red" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    (image_folder / "blue" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    r = CliRunner().invoke(cli, ["extract", "--data", str(image_folder), "--n", "0", "--backbone", "tiny",
                                 "--weights", "none", "--cache-dir", str(tmp_path / "f"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "only 24 good images of the 28 files (4 skipped)" in r.stderr


def test_the_bad_file_corpus_leaves_exactly_the_good_images(tmp_path):
    from tests.badfiles import make_bad_corpus, skipped_by_extract, usable

    data = make_image_folder(tmp_path / "d", per_class=4)
    corpus = make_bad_corpus(data)
    r = extract(cfg(data, tmp_path, n=0))
    with FeatureCache(r.cache) as c:
        generated = {p for p in c.paths if "." in p and p.split("/")[1].startswith(("blue.", "red."))}
        assert len(generated) == 8
        assert set(c.paths) - generated == usable(corpus)
        assert {p for p, _ in c.skipped()} == skipped_by_extract(corpus)


def test_non_finite_features_are_never_committed(image_folder, tmp_path, monkeypatch):
    import numpy as np

    from pipeline.errors import PipelineError
    from pipeline.extraction.inference import Inference

    real = Inference.__call__

    def poisoned(self, x):
        out = real(self, x)
        out[1] = np.inf
        return out

    cfg = ExtractConfig(data=str(image_folder), n=0, backbone="tiny", weights="none", workers=0, batch_size=8,
                        cache_dir=str(tmp_path / "f"))
    monkeypatch.setattr(Inference, "__call__", poisoned)
    with pytest.raises(PipelineError, match="NaN or infinite features for 1 images"):
        extract(cfg)
    monkeypatch.setattr(Inference, "__call__", real)
    r = extract(cfg)  # the same command again: nothing non-finite was written, the run completes
    assert r.rows == 24 and r.resumed_from == 0


def test_an_extract_hit_on_a_test_cache_makes_it_the_default(tmp_path, make_cache, image_folder):
    from pipeline.cache.feature_cache import newest_cache, read_info

    other = make_image_folder(tmp_path / "other", per_class=3, seed=7)
    test = make_cache(other, purpose="test").cache  # as fit-head --test-data makes it
    train = make_cache(image_folder).cache
    for path, created in ((test, "2026-01-01T00:00:00+0000"), (train, "2026-01-02T00:00:00+0000")):
        with h5py.File(path, "r+") as f:
            f.attrs["created"] = created
    assert str(newest_cache(tmp_path / "features").path) == train  # made for testing: never the default
    hit = make_cache(other)  # the user extracts that folder
    assert hit.hit and hit.cache == test and read_info(test).attrs["purpose"] == ""
    assert str(newest_cache(tmp_path / "features").path) == test  # fit-head now trains on what was just extracted


def test_a_cache_of_the_old_decoding_rule_is_extracted_again_never_resumed_or_reused(image_folder, tmp_path,
                                                                                     old_decoding):
    """decode_version 3 turns photos upright by their EXIF orientation: a cache made before (2) has another key, so
    another file (an interrupted one is never resumed either), and none of its rows is copied into the new one
    (rows are reused by content, but a phone photo's content now gives other pixels)."""
    from PIL import Image

    from tests.test_image_reader import save_turned

    up = Image.open(image_folder / "red" / "red.0.jpg")
    save_turned(up, image_folder / "red" / "phone.jpg", 6)
    with old_decoding():
        old = extract(cfg(image_folder, tmp_path))
    with h5py.File(old.cache, "r") as f:
        assert str(f.attrs["decode_version"]) == "2"
    new = extract(cfg(image_folder, tmp_path))
    assert not new.hit and new.cache != old.cache and new.reused == 0 and new.computed == 25
    with h5py.File(new.cache, "r") as f:
        assert str(f.attrs["decode_version"]) == "3"


def test_a_skipped_file_with_a_newline_in_its_name_is_one_log_line(make_cache, image_folder, caplog):
    """'skipping red/bad<newline>name.jpg: ...' broke the log line in two (and an ESC in a name reached the
    terminal raw); the name is escaped as predict's and check-images' tables escape it."""
    (image_folder / "red" / "bad\nname.jpg").write_bytes(b"junk")
    (image_folder / "red" / "gone\x1b[2J.jpg").symlink_to("/nonexistent")
    with caplog.at_level("WARNING"):
        make_cache(image_folder)
    lines = [r.getMessage() for r in caplog.records if "bad" in r.getMessage() or "gone" in r.getMessage()]
    assert any("red/bad\\nname.jpg" in m for m in lines) and any("gone\\x1b[2J" in m for m in lines)
    assert not any("\n" in m or "\x1b" in m for m in lines)


def test_int8_without_torchao_is_the_environments_error_before_any_work(image_folder, tmp_path, no_torchao):
    """--precision int8 where the optional torchao is not installed: the check read package_version's 'unknown' as
    installed, so the run listed the folder and failed in the quantiser ('int8 quantisation of the backbone failed
    (ModuleNotFoundError ...)'). A valid value that runs where torchao is installed: one line saying what to install,
    exit 1 (the environment's, as a missing CUDA device), nothing written."""
    run = CliRunner().invoke(cli, ["extract", "--data", str(image_folder), "-n", "0", "--backbone", "tiny",
                                   "--weights", "none", "--workers", "0", "--precision", "int8",
                                   "--cache-dir", str(tmp_path / "f")])
    assert run.exit_code == 1, run.output
    assert run.stderr.strip().splitlines() == ["Error: --precision int8 needs torchao (the maintained int8 route for "
                                               "x86), which is not installed: pip install 'transfer-pipeline[int8]' "
                                               "(or pip install torchao)"]
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


def test_a_cache_set_aside_twice_in_one_second_keeps_both(tmp_path, monkeypatch):
    """A damaged cache is renamed to <name>.unreadable-<time>; a second one set aside within the same
    second was renamed over the first (rename replaces without a word)."""
    from pipeline.extraction import extract_range
    monkeypatch.setattr(extract_range.time, "strftime", lambda fmt, *a: "20261207-000000")
    path = tmp_path / "c.h5"
    for text in (b"first", b"second"):
        path.write_bytes(text)
        assert extract_range.existing_cache(path, "key") is None and not path.exists()
    assert sorted(p.read_bytes() for p in tmp_path.glob("c.h5.unreadable-*")) == [b"first", b"second"]


def test_a_damaged_cache_set_aside_by_another_extraction_meanwhile_is_left_to_it(tmp_path, monkeypatch):
    """Two extractions of one request found the same damaged cache: the first renamed it aside while the second
    read it, and the second's rename failed as 'unexpected FileNotFoundError ... (a bug?)'. Now the second goes
    on (the file is set aside already); a name taken meanwhile is never renamed over."""
    from pipeline.extraction import extract_range
    monkeypatch.setattr(extract_range.time, "strftime", lambda fmt, *a: "20261207-000000")
    path = tmp_path / "c.h5"
    path.write_bytes(b"damaged")
    real = extract_range.read_info

    def set_aside_by_the_other(p, *a, **k):
        try:
            return real(p, *a, **k)
        finally:
            p.rename(p.with_name(f"{p.name}.unreadable-20261207-000000"))  # the other extraction, first

    monkeypatch.setattr(extract_range, "read_info", set_aside_by_the_other)
    assert extract_range.existing_cache(path, "key") is None
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5.unreadable-20261207-000000"]


def test_a_set_aside_name_taken_just_before_the_rename_is_kept(tmp_path, monkeypatch):
    """The free name was looked for, then renamed onto: a file set aside there by another process in between was
    replaced without a word. Now each name is taken in one step that never replaces."""
    from pipeline.data import moves
    from pipeline.extraction import extract_range
    monkeypatch.setattr(extract_range.time, "strftime", lambda fmt, *a: "20261207-000000")
    path = tmp_path / "c.h5"
    path.write_bytes(b"second")
    first = tmp_path / "c.h5.unreadable-20261207-000000"
    real_lexists, real_rename = os.path.lexists, Path.rename

    def lexists(p):  # the name looked free ...
        return False if Path(p) == first else real_lexists(p)

    def rename(self, target):  # ... and another process set its damaged copy aside there just before the rename
        if Path(target) == first and not real_lexists(first):
            first.write_bytes(b"first")
        return real_rename(self, target)

    monkeypatch.setattr(os.path, "lexists", lexists)
    monkeypatch.setattr(Path, "rename", rename)
    if moves.RENAMEAT2 is not None:  # the one step: renameat2's RENAME_NOREPLACE
        real_call = moves.RENAMEAT2

        def renameat2(a, src, b, dst, flags):
            if Path(os.fsdecode(dst)) == first and not real_lexists(first):
                first.write_bytes(b"first")
            return real_call(a, src, b, dst, flags)

        monkeypatch.setattr(moves, "RENAMEAT2", renameat2)
    assert extract_range.existing_cache(path, "key") is None
    assert sorted(p.read_bytes() for p in tmp_path.glob("c.h5.unreadable-*")) == [b"first", b"second"]
