"""Fused features: one head on several caches of the same photos, and every command that runs it on photos."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipeline
from pipeline.cache.feature_cache import FeatureCache
from pipeline.cli import cli
from pipeline.errors import UsageError
from pipeline.heads.cache_views import CacheViews, evaluate_head
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.reports.present import fit_head_text
from pipeline.heads.fused_views import FusedRows, l2_rows
from pipeline.models.predict import PredictConfig, predict
from pipeline.models.whole_models import head_from_checkpoint, load_model, read_checkpoint
from tests.conftest import make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights")

CLASSES = ("blue", "green", "red")


@pytest.fixture
def photos(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=16, classes=CLASSES)


@pytest.fixture
def two_caches(photos, make_cache):
    """The same photos through two backbones with other preprocessing: tiny (32 px, 8 channels) and tiny_wide
    (24 px bicubic, 6 channels)."""
    return make_cache(photos).cache, make_cache(photos, backbone="tiny_wide").cache


def test_fused_rows_are_each_caches_view_l2_normalised_side_by_side_matched_by_content(two_caches):
    a, b = two_caches
    with FeatureCache(a) as ca, FeatureCache(b) as cb, FusedRows([a, b]) as fused:
        assert fused.feature_shape == (14, 1, 1) and fused.block_sizes == [8, 6] and fused.n == ca.n
        assert fused.classes == list(CLASSES) and (fused.labels == ca.labels).all()
        want_a = l2_rows(CacheViews(ca, np.arange(ca.n))["avg"])
        by_path = dict(zip(cb.paths, l2_rows(CacheViews(cb, np.arange(cb.n))["avg"])))
        want_b = np.stack([by_path[p] for p in ca.paths])  # the rows of b in a's order
        got = fused.features[:, :, 0, 0]
        assert np.allclose(got[:, :8], want_a) and np.allclose(got[:, 8:], want_b)
        assert np.allclose(np.linalg.norm(got[:, 8:], axis=1), 1, atol=1e-5)  # each block: unit length
        assert fused.attrs["backbone"] == "tiny+tiny_wide"


def test_a_fused_head_predicts_evaluates_exports_and_serves_every_backbone_on_the_photo(two_caches, tmp_path):
    a, b = two_caches
    test = make_image_folder(tmp_path / "test", per_class=4, classes=CLASSES, seed=5)
    r = fit_head(FitHeadConfig(cache=[a, b], test_data=str(test), runs_dir=str(tmp_path / "runs"), unknown_rows=40))
    assert r.caches == [a, b] and r.test["rows"] == 12 and r.val_acc == 1.0
    ckpt = read_checkpoint(r.checkpoint)  # one checkpoint: the head and each backbone's record
    assert ckpt["in_shape"] == [14, 1, 1] and ckpt["backbone"] == "tiny+tiny_wide"
    assert [p["backbone"] for p in ckpt["fused"]["parts"]] == ["tiny", "tiny_wide"]
    assert [p["block"] for p in ckpt["fused"]["parts"]] == [8, 6]
    assert ckpt["fused"]["parts"][1]["preprocessing"]["crop_size"] == 24

    # predict runs each backbone on its own preprocessing of the photo: the rows its test caches hold
    files = sorted(str(p) for p in test.rglob("*.jpg"))
    rows = predict(PredictConfig(paths=[str(test)], model=r.checkpoint, workers=0, precision="fp32")).rows
    head = head_from_checkpoint(ckpt, ckpt["state_dict"], r.checkpoint)
    with FusedRows(r.test["cache"].split(" + ")) as tc:
        _, _, logp = evaluate_head(head, tc, np.arange(tc.n), "cpu", 64)
        cached = {str(test / p): np.exp(lp) for p, lp in zip(tc.paths, logp)}
    by_file = {row["path"]: row for row in rows}
    for f in files:
        assert by_file[f]["class"] == CLASSES[int(cached[f].argmax())]
        assert by_file[f]["probability"] == pytest.approx(cached[f].max(), abs=2e-3)  # float16 cache rows
        assert by_file[f]["ood_score"] is not None

    # evaluate: on photos (every backbone), and on the caches it was fitted on (their val rows, fused as then)
    on_photos = pipeline.evaluate_model(r.checkpoint, data=test, runs_dir=tmp_path / "runs")
    assert on_photos.accuracy == pytest.approx(r.metrics["test_acc"]) and on_photos.rows == 12
    on_cache = pipeline.evaluate_model(r.checkpoint, runs_dir=tmp_path / "runs")
    assert on_cache.accuracy == pytest.approx(r.val_acc) and on_cache.rows == r.val_rows
    with pytest.raises(UsageError, match="fitted on 2 caches' fused features"):
        pipeline.evaluate_model(r.checkpoint, cache=a, runs_dir=tmp_path / "runs")

    # export: one ONNX file taking the stacked inputs, checked against predict's path
    out = pipeline.export_model(r.checkpoint, tmp_path / "fused.onnx", check_data=test)
    assert out.passed and out.max_abs_diff < 1e-4
    meta = json.loads((tmp_path / "fused.onnx.json").read_text())
    assert meta["input"]["shape"] == ["N", 6, 32, 32] and [p["crop_size"] for p in meta["preprocessing"]] == [32, 24]

    # serve: the service's rows are predict's
    from fastapi.testclient import TestClient

    upload = [("files", (f.rsplit("/", 1)[-1], open(f, "rb").read(), "image/jpeg")) for f in files[:3]]
    with TestClient(pipeline.serve_app(r.checkpoint, precision="fp32"), base_url="http://localhost") as client:
        got = client.post("/predict", files=upload).json()
    assert [g["class"] for g in got] == [by_file[f]["class"] for f in files[:3]]
    assert np.allclose([g["probability"] for g in got], [by_file[f]["probability"] for f in files[:3]], atol=1e-6)


def test_fit_head_takes_cache_twice_on_the_command_line_and_the_api_a_list(two_caches, tmp_path):
    a, b = two_caches
    out = CliRunner().invoke(cli, ["fit-head", "--cache", a, "--cache", b, "--head", "logreg", "--runs-dir",
                                   str(tmp_path / "runs"), "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["caches"] == [a, b] and read_checkpoint(result["checkpoint"])["in_shape"] == [14, 1, 1]
    head = pipeline.Head(head="logreg", runs_dir=tmp_path / "runs").fit([pipeline.Cache(a), b])
    assert head.backbone_ == "tiny+tiny_wide" and head.feature_shape_ == (14, 1, 1)
    assert list(head.predict(sorted(str(p) for p in (tmp_path / "data" / "red").glob("*.jpg"))[:2])) == ["red", "red"]


def test_caches_of_other_photos_or_classes_are_refused_in_one_line(photos, make_cache, tmp_path):
    a = make_cache(photos).cache
    fewer = make_cache(photos, backbone="tiny_wide", n=30, cache_dir=str(tmp_path / "fewer")).cache
    with pytest.raises(UsageError, match=r"do not hold the same photos: 18 of the first's 48 are not in the second "
                                         r"\(e\.g\. [^)]*\) \(a photo counts"):  # and not '0 of the second's 30 are'
        fit_head(FitHeadConfig(cache=[a, fewer], runs_dir=str(tmp_path / "runs")))
    with pytest.raises(UsageError, match=r"do not hold the same photos: 18 of the second's 48 are not in the first "
                                         r"\(e\.g\. [^)]*\) \(a photo counts"):
        fit_head(FitHeadConfig(cache=[fewer, a], runs_dir=str(tmp_path / "runs")))
    relabelled = tmp_path / "relabelled"
    shutil.copytree(photos, relabelled)
    (relabelled / "green" / "green.0.jpg").rename(relabelled / "red" / "green.0.jpg")  # the same photo, another class
    moved = make_cache(relabelled, backbone="tiny_wide", cache_dir=str(tmp_path / "moved")).cache
    # one photo each way: "1 of the first's 48 are not in the second" said it in the plural
    with pytest.raises(UsageError, match=r"1 of the first's 48 is not in the second \(e\.g\. .*\), 1 of the second's "
                                         "48 is not in the first "):
        fit_head(FitHeadConfig(cache=[a, moved], runs_dir=str(tmp_path / "runs")))
    other_classes = make_cache(make_image_folder(tmp_path / "two", per_class=16, classes=("blue", "red")),
                               backbone="tiny_wide", cache_dir=str(tmp_path / "two_f")).cache
    with pytest.raises(UsageError, match="have other classes"):
        fit_head(FitHeadConfig(cache=[a, other_classes], runs_dir=str(tmp_path / "runs")))
    with pytest.raises(UsageError, match="^cache names the cache .* twice: give each cache once$"):
        fit_head(FitHeadConfig(cache=[a, a], runs_dir=str(tmp_path / "runs")))
    with pytest.raises(UsageError, match="^test_cache names one cache; .* with test_data=DIR "):
        fit_head(FitHeadConfig(cache=[a, fewer], test_cache=a, runs_dir=str(tmp_path / "runs")))
    out = CliRunner().invoke(cli, ["fit-head", "--cache", a, "--cache", fewer, "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "do not hold the same photos" in out.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/head.pt"))  # nothing written


def test_one_row_without_a_digest_is_said_in_the_singular(two_caches, monkeypatch):
    """A cache with one row whose digest is unknown and whose photo is gone said "1 rows have ... their photos are
    gone ... they cannot be matched"."""
    from pipeline.heads.fused_views import match_rows

    a, b = two_caches
    monkeypatch.setattr(FeatureCache, "row_digests", lambda self, rows=None: [""] + ["d"] * (self.n - 1))
    with FeatureCache(a) as first, FeatureCache(b) as second:
        with pytest.raises(UsageError, match=r": 1 row has no content digest and its photo is gone \(e\.g\. .*\), so "
                                             "it cannot be matched to another cache's; extract it again$"):
            match_rows(first, second)


def test_one_cache_given_twice_is_named_once_with_the_option_that_repeated_it(two_caches, tmp_path, monkeypatch):
    """'the same cache is named twice in X, X' named the cache twice and no option; now --cache, the cache once,
    and the other spelling when it was one."""
    a, b = two_caches
    monkeypatch.chdir(tmp_path)
    relative = str(Path(a).relative_to(tmp_path))
    out = CliRunner().invoke(cli, ["fit-head", "--cache", a, "--cache", b, "--cache", relative,
                                   "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert out.output == f"Error: --cache names the cache {a} twice (the second time as {relative}): give each " \
        "cache once\n"
    with pytest.raises(UsageError, match=f"^the cache {a} is named twice among the caches to fuse$"):
        FusedRows([a, b, relative])


def test_a_fused_head_loads_each_backbones_recorded_weights_and_refuses_finetuning(two_caches, tmp_path):
    a, b = two_caches
    r = fit_head(FitHeadConfig(cache=[a, b], head="logreg", runs_dir=str(tmp_path / "runs")))
    lm = load_model(r.checkpoint)
    assert lm.transform.input_shape == (6, 32, 32) and [p["crop_size"] for p in lm.info["preprocessing"]] == [32, 24]
    with pytest.raises(UsageError, match="weights='none' must be one of their weights files"):
        load_model(r.checkpoint, weights="none")
    with pytest.raises(UsageError, match="fine-tuning starts from a head on one backbone's"):
        load_model(r.checkpoint, trainable=True)
    ckpt = torch.load(r.checkpoint, weights_only=True)
    ckpt["fused"]["parts"] = ckpt["fused"]["parts"][:1]  # a damaged record: one line, not a traceback
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="field 'fused' must be a fused-features record"):
        load_model(tmp_path / "bad.pt")


def test_a_fused_head_whose_weights_folder_moved_runs_with_weights_naming_one_file_of_it(photos, make_cache, tmp_path):
    """Each backbone's weights file recorded in a fused head has moved (the project copied elsewhere): --weights
    names one file of the new folder (matched by sha256), the other is found beside it; before, --weights was
    refused for a fused head while the error said to pass it, so the head could not run at all."""
    from pipeline.extraction import backbones as bb

    folder = tmp_path / "w"
    folder.mkdir()
    for name in ("tiny", "tiny_wide"):
        torch.save(bb.load_backbone(name, "none").model.state_dict(), folder / f"{name}.pt")
    a = make_cache(photos, weights=str(folder / "tiny.pt")).cache
    b = make_cache(photos, backbone="tiny_wide", weights=str(folder / "tiny_wide.pt")).cache
    r = fit_head(FitHeadConfig(cache=[a, b], head="logreg", runs_dir=str(tmp_path / "runs")))
    want = load_model(r.checkpoint).model.head.state_dict()
    shutil.move(folder, tmp_path / "moved")
    with pytest.raises(pipeline.PipelineError, match="tiny.pt .*not found.*in one folder and pass weights naming"):
        load_model(r.checkpoint)
    lm = load_model(r.checkpoint, weights=str(tmp_path / "moved" / "tiny_wide.pt"))
    assert [p["weights_path"] for p in lm.info["fused"]] == [str((tmp_path / "moved" / n).resolve())
                                                             for n in ("tiny.pt", "tiny_wide.pt")]
    assert all(torch.equal(v, want[k]) for k, v in lm.model.head.state_dict().items())
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 for k, v in torch.load(tmp_path / "moved" / "tiny.pt").items()}, other)
    with pytest.raises(UsageError, match="is none of the files .* was fitted with"):
        load_model(r.checkpoint, weights=str(other))
    out = CliRunner().invoke(cli, ["predict", "--model", r.checkpoint, "--weights",
                                   str(tmp_path / "moved" / "tiny.pt"), str(photos / "red")])
    assert out.exit_code == 0, out.output
    assert out.output.count("red") >= 16


def _rows_written(cache, signal: float, seed: int) -> None:
    """Replace a cache's features by seeded noise, plus ``signal`` on the channel of each row's class: rows that
    say as much about the classes as one asks, whatever the tiny backbones made of the photos."""
    import h5py

    with h5py.File(cache, "r+") as f:
        shape, labels = f["features"].shape, f["labels"][:]
        rng = np.random.default_rng(seed)
        rows = rng.normal(size=shape[:2])
        rows[np.arange(len(labels)), labels] += signal
        f["features"][...] = np.broadcast_to(rows[:, :, None, None], shape).astype(f["features"].dtype)


def test_the_default_head_keeps_one_cache_alone_where_it_beats_the_fused_rows_by_cv(two_caches, tmp_path):
    """A backbone whose rows say nothing must not dilute one that separates the classes: the default head
    cross-validates the fused rows and each cache alone and keeps a alone (an ordinary one-backbone
    checkpoint); an explicit head still fits the fused rows."""
    a, b = two_caches
    _rows_written(a, 2.0, 0)
    _rows_written(b, 0.0, 1)
    r = fit_head(FitHeadConfig(cache=[a, b], runs_dir=str(tmp_path / "runs")))
    tried = {t["rows"]: t for t in r.tuning["fusion"]}
    assert list(tried) == ["fused", "tiny", "tiny_wide"] and [t["chosen"] for t in tried.values()] == [0, 1, 0]
    assert tried["tiny"]["cv_acc"] > tried["fused"]["cv_acc"] > tried["tiny_wide"]["cv_acc"]
    assert r.caches == [a, b] and r.cache == a and r.metrics["cv_acc"] == tried["tiny"]["cv_acc"]
    assert "fused features or one cache alone" in fit_head_text(r) and "; kept tiny\n" in fit_head_text(r)
    ckpt = read_checkpoint(r.checkpoint)
    assert "fused" not in ckpt and ckpt["backbone"] == "tiny" and ckpt["cache"] == a
    on_cache = pipeline.evaluate_model(r.checkpoint, runs_dir=tmp_path / "runs")  # a's own validation rows
    assert on_cache.rows == r.val_rows

    explicit = fit_head(FitHeadConfig(cache=[a, b], head="logreg", runs_dir=str(tmp_path / "runs")))
    assert read_checkpoint(explicit.checkpoint)["in_shape"] == [14, 1, 1] and explicit.tuning is None


def test_a_fused_head_refuses_every_explain_as_fused(two_caches, tmp_path):
    """head.explain of a fused head: one reason whatever it is given (one backbone's cache said 'does not fit
    the model ... photos decoded by the older rule 3+3', an array 'pooled features: extract without --pool avg')."""
    a, b = two_caches
    head = pipeline.Head(head="logreg", runs_dir=tmp_path / "runs").fit([a, b])
    photo = sorted(str(p) for p in (tmp_path / "data" / "red").glob("*.jpg"))[:1]
    for X in (photo, a, pipeline.Cache(b), np.zeros((2, 14, 1, 1), np.float32), [a, b]):
        with pytest.raises(UsageError, match=r"^heatmaps need one backbone's feature map; this head is on several "
                                             r"backbones' fused features"):
            head.explain(X)


def test_a_fused_head_given_caches_in_python_says_what_the_api_does(two_caches, tmp_path):
    """Head().fit([a, b]) then head.score([a, b]) said 'score(X) takes an image folder (class sub-folders), or
    images X with their labels y', head.score(a) 'score it on them (no --cache) or on photos (--data DIR)' (options
    of the command line), and head.predict([a, b]) pointed to Head.score(cache), refused in turn; each now says
    that the head runs on photos and which call scores it on the caches it was fitted on."""
    a, b = two_caches
    head = pipeline.Head(head="logreg", runs_dir=tmp_path / "runs").fit([a, b])
    for call, X in ((head.score, [a, b]), (head.score, a), (head.score, pipeline.Cache(b)), (head.predict, [a, b]),
                    (head.predict_proba, a)):
        with pytest.raises(UsageError, match=r"^Head\.(score|predict): this head is on the fused features of 2 "
                                             r"caches \(tiny\+tiny_wide\), so it runs on photos .*evaluate_model"):
            call(X)
    red = sorted(str(p) for p in (tmp_path / "data" / "red").glob("*.jpg"))
    assert head.score(red, ["red"] * len(red)) == 1.0  # photos still score
    assert pipeline.evaluate_model(head.checkpoint_, runs_dir=tmp_path / "runs").rows == head.result_.val_rows


def test_one_network_with_the_same_weights_twice_is_refused(photos, make_cache, tmp_path):
    """fit-head --cache vgg16-float16.h5 --cache vgg16-float32.h5 (one network, the same weights file, another
    dtype) fitted a head on two copies of the same features, and predict ran the network twice on every photo:
    refused in one line naming both caches; the same network with other weights still fuses."""
    from pipeline.extraction import backbones as bb

    torch.manual_seed(0)
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), tmp_path / "w1.pt")
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), tmp_path / "w2.pt")
    half = make_cache(photos, weights=str(tmp_path / "w1.pt")).cache
    full = make_cache(photos, weights=str(tmp_path / "w1.pt"), dtype="float32").cache
    other = make_cache(photos, weights=str(tmp_path / "w2.pt")).cache
    assert half != full
    out = CliRunner().invoke(cli, ["fit-head", "--cache", half, "--cache", full, "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 2 and out.output.count("\n") == 1, out.output
    assert f"{half} and {full} are both tiny with the same weights (file:w1.pt)" in out.output
    r = fit_head(FitHeadConfig(cache=[half, other], head="logreg", runs_dir=str(tmp_path / "runs")))
    assert read_checkpoint(r.checkpoint)["backbone"] == "tiny+tiny"
