"""torchrun extraction on CPU with 2 gloo ranks: same rows as one process, per-shard resume, one virtual cache."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache.feature_cache import (
    CacheBusy,
    CacheError,
    ConsolidateResult,
    FeatureCache,
    _lock,
    _unlock,
    consolidate,
    read_info,
    shard_paths,
)
from pipeline.extraction.distributed import split
from pipeline.extraction.extract import ExtractConfig, extract
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from tests.badfiles import make_bad_corpus
from tests.conftest import ROOT, make_image_folder

COMMON = dict(backbone="tiny", weights="none", batch_size=4, workers=0, dtype="float32", precision="fp32")

LAUNCHER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
crash = int(os.environ.get("CRASH_RANK1_AFTER", 0))
if crash and os.environ.get("RANK") == "1":  # die like a killed rank after `crash` committed batches
    import pipeline.cache.feature_cache
    append, calls = pipeline.cache.feature_cache.CacheWriter.append, []
    def dying(self, *a, **k):
        append(self, *a, **k)
        calls.append(1)
        if len(calls) == crash:
            os._exit(3)
    pipeline.cache.feature_cache.CacheWriter.append = dying
import tests.tiny, cli
cli.cli()
"""


def torchrun(tmp: Path, data: Path, cache_dir: Path, n: int, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
            "extract", "--data", str(data), "-n", str(n), "--cache-dir", str(cache_dir), "--json",
            *(f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items())]
    import os

    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def single(data: Path, cache_dir: Path, n: int) -> str:
    return extract(ExtractConfig(data=str(data), n=n, cache_dir=str(cache_dir), **COMMON)).cache


def assert_same_rows(a: str, b: str, exact: bool = True) -> None:
    with FeatureCache(a) as x, FeatureCache(b) as y:
        assert y.paths == x.paths and y.labels.tolist() == x.labels.tolist() and y.skipped() == x.skipped()
        if exact:
            assert np.array_equal(y.features[:], x.features[:])
        else:  # a batch of one takes another CPU kernel: last-bit differences, same rows
            np.testing.assert_allclose(y.features[:], x.features[:], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """24 good images: a single-process cache and a 2-rank torchrun cache of them."""
    tmp = tmp_path_factory.mktemp("dist")
    data = make_image_folder(tmp / "data", per_class=12)
    one = single(data, tmp / "single", 0)
    res = result_of(torchrun(tmp, data, tmp / "sharded", 0))
    return tmp, data, one, res


def test_split_cuts_contiguous_equal_pieces():
    assert split(0, 24, 2) == [(0, 12), (12, 24)]
    assert split(30, 1, 2) == [(30, 31), (31, 31)]
    pieces = split(5, 23, 3)
    assert pieces == [(5, 13), (13, 21), (21, 28)]


def test_sharded_cache_holds_the_single_process_rows(clean):
    tmp, data, one, res = clean
    assert res["rows"] == 24 and res["world_size"] == 2 and res["computed"] == 24
    assert Path(res["cache"]).name == Path(one).name  # same name: a plain run finds it
    assert_same_rows(one, res["cache"])
    info = read_info(res["cache"])
    assert info.attrs["sharded"] == 1 and len(shard_paths(info)) == 2 and info.complete
    assert info.attrs["command"].startswith("torchrun --nproc_per_node=2 ")
    with h5py.File(res["cache"], "r") as f:
        assert f["features"].is_virtual
    with h5py.File(shard_paths(info)[1], "r") as f:
        assert f.attrs["shard_rank"] == 1 and f.attrs["rows"] == 12 and f.attrs["complete"] == 1


def test_fit_head_on_sharded_matches_single(clean):
    tmp, data, one, res = clean
    a = fit_head(FitHeadConfig(head="linear", cache=one, epochs=3, device="cpu", runs_dir=str(tmp / "runs1")))
    b = fit_head(FitHeadConfig(head="linear", cache=res["cache"], epochs=3, device="cpu", runs_dir=str(tmp / "runs2")))
    assert (b.val_acc, b.val_loss, b.metrics["train_loss"]) == (a.val_acc, a.val_loss, a.metrics["train_loss"])


def test_plain_run_is_a_hit_and_consolidate_makes_one_file(clean, tmp_path):
    _, data, one, res = clean
    again = extract(ExtractConfig(data=str(data), n=0, cache_dir=str(Path(res["cache"]).parent), **COMMON))
    assert again.hit and again.cache == res["cache"]
    copy = tmp_path / "c"
    shutil.copytree(Path(res["cache"]).parent, copy)
    path = copy / Path(res["cache"]).name
    out = consolidate(path)
    assert isinstance(out, ConsolidateResult) and out.rows == 24 and len(out.shards) == 2
    for s in out.shards:
        Path(s).unlink()
    with h5py.File(path, "r") as f:
        assert not f["features"].is_virtual and "sharded" not in f.attrs
    assert_same_rows(one, str(path))
    with pytest.raises(ValueError, match="not a sharded cache"):
        consolidate(path)


def test_consolidate_waits_for_the_caches_writer_lock(clean, tmp_path):
    """Two consolidations at once wrote one .consolidating file together; now the second waits for the
    first (here: for a held writer lock) and says the cache is busy, touching nothing."""
    _, _, _, res = clean
    copy = tmp_path / "c"
    shutil.copytree(Path(res["cache"]).parent, copy)
    path = copy / Path(res["cache"]).name
    before = sorted(p.name for p in copy.iterdir())
    fd = _lock(path, wait_s=1)
    try:
        with pytest.raises(CacheBusy, match="being written by another process"):
            consolidate(path, wait_s=0.3)
        assert sorted(p.name for p in copy.iterdir()) == sorted([*before, path.name + ".lock"])
    finally:
        _unlock(path, fd)
    assert consolidate(path).rows == 24


def test_killed_rank_resumes_and_a_lost_shard_is_refused_then_redone(tmp_path):
    """Bad files in the sample: replacements come in a second round; the set equals one process's."""
    data = make_image_folder(tmp_path / "data", per_class=16)
    make_bad_corpus(data)  # 5 files extract skips, 8 odd-but-good ones
    one = single(data, tmp_path / "single", 30)

    crashed = torchrun(tmp_path, data, tmp_path / "sharded", 30, env={"CRASH_RANK1_AFTER": "1"})
    assert crashed.returncode != 0
    shards = sorted((tmp_path / "sharded").glob("*.shards/part-*.h5"))
    assert shards and not list((tmp_path / "sharded").glob("*.h5"))
    committed = 0
    for s in shards:
        with h5py.File(s, "r") as f:
            committed += int(f.attrs["rows"])
            if f.attrs["shard_rank"] == 1:
                assert f.attrs["complete"] == 0 and f.attrs["rows"] > 0  # its first batch survived

    res = result_of(torchrun(tmp_path, data, tmp_path / "sharded", 30))
    assert res["rows"] == 30 and res["skipped"] == 5 and res["computed"] == 30 - committed
    assert_same_rows(one, res["cache"], exact=False)

    lost = shard_paths(read_info(res["cache"]))[1]
    with h5py.File(lost, "r") as f:
        lost_rows = int(f.attrs["rows"])
    lost.unlink()
    with pytest.raises(CacheError, match="missing"):
        FeatureCache(res["cache"])
    redo = result_of(torchrun(tmp_path, data, tmp_path / "sharded", 30))
    assert redo["computed"] == lost_rows and redo["cache"] == res["cache"]
    assert_same_rows(one, redo["cache"], exact=False)


def test_a_short_run_without_n_says_files_and_counts_the_dangling_link_as_one_process_does(tmp_path):
    """torchrun -n 0 said 'only 12 good images of the 14 asked for (2 skipped)' where one process says 'of the 15
    files (3 skipped)': nothing was asked for, and the dangling link was neither counted nor kept as skipped."""
    data = make_image_folder(tmp_path / "data", per_class=6)
    for i in range(2):
        (data / "red" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    (data / "blue" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    one = single(data, tmp_path / "single", 0)
    ran = torchrun(tmp_path, data, tmp_path / "sharded", 0)
    assert result_of(ran)["skipped"] == 3
    assert "only 12 good images of the 15 files (3 skipped)" in ran.stderr and "asked for" not in ran.stderr
    assert_same_rows(one, result_of(ran)["cache"], exact=False)  # the same rows, skipped ones included
