"""Class-activation maps (pipeline/heads/heatmaps.py) light the part of the input that decides the class:
crafted cached maps through every fit-head head kind, and generated photos through whole models."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache.feature_cache import CacheWriter
from pipeline.errors import UsageError
from pipeline.heads.fit_head import FitHeadConfig, fit_head
from pipeline.heads.heatmaps import check_spatial, grad_cam, head_maps, log_odds, normalised
from pipeline.models.whole_models import head_from_checkpoint, read_checkpoint

import tests.tiny  # noqa: F401  (registers the tiny backbones)

SHAPE = (9, 6, 6)  # C, H, W
CLASSES = ("a", "b", "c")


pytestmark = pytest.mark.usefixtures("one_thread")


def region_maps(n: int, seed: int = 0):
    """(maps, labels, corners): non-negative noise everywhere (as a ReLU backbone gives) and, in one 2 x 2 block
    at a random place per map, the evidence of its class (its three channels raised): only that block decides."""
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    x = np.abs(rng.normal(0, 1, (n, c, h, w))).astype(np.float32)
    y = np.arange(n) % len(CLASSES)
    corners = rng.integers(0, h - 1, (n, 2))
    for i, (r, s) in enumerate(corners):
        x[i, 3 * y[i]:3 * y[i] + 3, r:r + 2, s:s + 2] += 4.0
    return x, y.astype(np.int64), corners


def write_cache(path, x, y):
    attrs = {"fingerprint": "fp", "backbone": "tiny", "weights": "none", "mean": np.zeros(3), "std": np.ones(3),
             "transform": "Resize([36], bilinear, antialias=True) CenterCrop([32]) ToTensor() "
                          "Normalize(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])",
             "classes": '["a", "b", "c"]', "seed": 0, "n_requested": 0, "data_root": str(path.parent / "photos"),
             "data_fingerprint": "d", "dtype": "float32", "created": "2026-01-01T00:00:00+0000", "versions": "{}"}
    with CacheWriter(path, attrs) as w:
        w.append(x, y, [f"{CLASSES[k]}/{i}.jpg" for i, k in enumerate(y)], len(y))
        w.finish()
    return path


def lit_share(maps: np.ndarray, corners: np.ndarray) -> float:
    """The share of maps whose hottest cell lies in their deciding 2 x 2 block."""
    hits = 0
    for m, (r, s) in zip(maps, corners):
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        hits += r <= i < r + 2 and s <= j < s + 2
    return hits / len(maps)


@pytest.fixture(scope="module")
def region_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    x, y, _ = region_maps(90)
    return write_cache(root / "cache.h5", x, y), root


@pytest.mark.parametrize("kind,options", [
    ("auto", {}), ("linear", {"epochs": 30}), ("logreg", {}), ("kernel", {"kernel_components": 40}),
    ("svm", {}), ("logreg", {"features": "flat", "normalize": "rms"}), ("svm", {"features": "avgmax"}),
])
def test_every_head_kind_lights_the_region_that_decides_the_class(region_cache, kind, options):
    cache, root = region_cache
    fitted = fit_head(FitHeadConfig(cache=str(cache), head=kind, runs_dir=str(root / "runs" / kind),
                                    calibrate="none", unknown_rows=0, **options))
    ckpt = read_checkpoint(fitted.checkpoint)
    head = head_from_checkpoint(ckpt, ckpt["state_dict"], fitted.checkpoint).eval()
    x, y, corners = region_maps(30, seed=1)  # photos it never saw
    logp, maps = head_maps(head, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logp), head(torch.from_numpy(x)).double())  # the same pass
    assert (logp.argmax(1) == y).mean() >= 0.9
    assert lit_share(maps, corners) >= 0.9, kind


def test_cam_of_a_linear_head_on_the_average_is_its_weights_over_the_map():
    """Grad-CAM of a head linear on the average (no l2 step) is CAM: the class's weights dotted with each cell."""
    from pipeline.heads.probe_heads import ProbeHead

    torch.manual_seed(0)
    w, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    head = ProbeHead.from_linear(w, b, (4, 3, 3), view="avg")
    x = torch.rand(5, 4, 3, 3, dtype=torch.float64)
    logp, maps = grad_cam(head, x)
    cls = logp.argmax(1)
    sign = torch.where(cls == 1, 1.0, -1.0).double()  # binary: the log-odds is the logit difference
    cam = torch.einsum("bc,bchw->bhw", sign[:, None] * (w[1] - w[0])[None], x) / 9
    torch.testing.assert_close(maps, cam)


def test_a_linear_heads_map_takes_one_pass_of_the_head(monkeypatch):
    """The head used to run twice per map (once for the rows, once more for the gradient's direction)."""
    from pipeline.heads.probe_heads import ProbeHead

    torch.manual_seed(1)
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    head = ProbeHead.from_linear(w, b, (4, 2, 2), view="avg")
    x = torch.rand(2, 4, 2, 2, dtype=torch.float64)
    calls = []
    classify = head.classify
    monkeypatch.setattr(head, "classify", lambda h: calls.append(1) or classify(h))
    logp, maps = grad_cam(head, x)
    assert len(calls) == 1
    logits = x.mean((2, 3)) @ w.T + b  # the log-odds' gradient: w_t minus the other classes' softmax-weighted w
    t = logits.argmax(1)
    others = torch.softmax(logits.scatter(1, t[:, None], float("-inf")), 1)
    direction = w[t] - others @ w
    torch.testing.assert_close(logp, torch.log_softmax(logits, 1))
    torch.testing.assert_close(maps, torch.einsum("bc,bchw->bhw", direction, x) / 4)


def test_log_odds_stays_finite_and_exact_at_certainty():
    logp = torch.log_softmax(torch.tensor([[0.0, 60.0, -5.0]], dtype=torch.float32), 1)
    odds = log_odds(logp, torch.tensor([1]))
    assert torch.isfinite(odds).all() and abs(float(odds) - (60 - np.logaddexp(0, -5))) < 1e-3


def test_grad_cam_works_under_inference_mode():
    from pipeline.heads.probe_heads import ProbeHead

    head = ProbeHead.from_linear(torch.randn(3, 4), torch.zeros(3), (4, 2, 2), view="avg")
    with torch.inference_mode():
        logp, maps = grad_cam(head, torch.rand(2, 4, 2, 2))
    assert maps.shape == (2, 2, 2) and logp.shape == (2, 3)


def test_a_pooled_cache_has_no_map_to_explain():
    with pytest.raises(UsageError, match=r"pooled features \(512, 1, 1\).*without pool='avg'"):
        check_spatial((512, 1, 1))
    check_spatial((512, 7, 7))


def test_normalised_maps_peak_at_one_and_drop_counter_evidence():
    m = normalised(np.array([[[-2.0, 1.0], [0.5, 2.0]], [[-1.0, -3.0], [-0.5, -2.0]]]))
    assert m[0].max() == 1 and m[0, 0, 0] == 0 and m[0, 1, 0] == 0.25 and not m[1].any()


# -- whole models, from photos ------------------------------------------------------------------
PATCH = 12  # pixels of the coloured square that decides a photo's class (in the 32 x 32 crop: 3 x 3 cells of 4)
PATCH_COLOURS = {"blue": (40, 60, 220), "red": (220, 40, 40)}


def patch_photo(path, colour: str, corner, rng):
    """A 36 x 36 grey-noise photo (the tiny backbones' crop is its middle 32 x 32) with one coloured square at
    ``corner`` (row, column in the crop): the only place that tells the class."""
    arr = np.clip(rng.normal(128, 25, (36, 36, 3)), 0, 255)
    r, s = corner[0] + 2, corner[1] + 2
    arr[r:r + PATCH, s:s + PATCH] = np.clip(rng.normal(PATCH_COLOURS[colour], 15, (PATCH, PATCH, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def patch_folder(root, per_class: int, seed: int):
    """An ImageFolder of patch photos, and each photo's square (corner) by path."""
    rng = np.random.default_rng(seed)
    corners = {}
    for c in PATCH_COLOURS:
        for i in range(per_class):
            corner = tuple(int(v) for v in rng.integers(0, 32 - PATCH + 1, 2))
            corners[str(patch_photo(root / c / f"{c}.{i}.png", c, corner, rng))] = corner
    return root, corners


def patch_share(maps: np.ndarray, corners) -> float:
    """The share of maps whose hottest cell (4 x 4 pixels of the crop) overlaps its photo's square."""
    hits = 0
    for m, (r, s) in zip(maps, corners):
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        cell = 32 // m.shape[0]
        hits += r - cell < i * cell < r + PATCH and s - cell < j * cell < s + PATCH
    return hits / len(maps)


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    data, _ = patch_folder(root / "data", 16, seed=0)
    test, corners = patch_folder(root / "test", 6, seed=1)
    return root, data, sorted(corners), [corners[p] for p in sorted(corners)]


def patch_cache(root, data, backbone: str) -> str:
    from pipeline.extraction.extract import ExtractConfig, extract

    return extract(ExtractConfig(data=str(data), n=0, backbone=backbone, weights="none", workers=0,
                                 cache_dir=str(root / "features"), dtype="float32", precision="fp32")).cache


pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


@pytest.mark.parametrize("kind", ["auto", "logreg", "svm", "kernel", "linear"])
def test_a_heads_map_of_a_photo_lights_the_square_that_decides_it(patch_data, kind):
    import pipeline

    root, data, photos, corners = patch_data
    head = pipeline.Head(head=kind, epochs=40, calibrate="none", unknown_rows=0, runs_dir=str(root / "runs"))
    head.fit(patch_cache(root, data, "tiny"))
    maps = head.explain(photos)
    assert maps.shape == (len(photos), 8, 8) and maps.min() >= 0 and np.allclose(maps.max((1, 2)), 1)
    assert (head.predict(photos) == [p.split("/")[-2] for p in photos]).mean() >= 0.9
    assert patch_share(maps, corners) >= 0.9, kind


def test_a_trained_whole_model_lights_the_square_through_its_pooled_head(patch_data):
    """tiny_bn: BatchNorm, a head on the average-pooled map; the map is the one before the pool."""
    import pipeline

    root, data, photos, corners = patch_data
    model = pipeline.train_model(data, backbone="tiny_bn", weights="none", epochs=30, lr=0.05, workers=0,
                                 batch_size=8, precision="fp32", unknown_rows=0, runs_dir=str(root / "runs"))
    maps = model.explain(photos, precision="fp32")
    assert maps.shape == (len(photos), 8, 8)
    assert (model.predict(photos, precision="fp32") == [p.split("/")[-2] for p in photos]).mean() >= 0.9
    assert patch_share(maps, corners) >= 0.9


def test_a_head_explains_its_cache_with_no_backbone_and_as_its_photos(patch_data):
    """From the cache the head alone runs; the maps are those of the same photos through the backbone."""
    import pipeline

    root, data, _, _ = patch_data
    cache = pipeline.Cache(patch_cache(root, data, "tiny"))
    head = pipeline.Head(head="logreg", calibrate="none", unknown_rows=0, runs_dir=str(root / "runs")).fit(cache)
    from_cache = head.explain(cache)
    from_photos = head.explain([str(cache.data_root / p) for p in cache.paths], precision="fp32")
    np.testing.assert_allclose(from_cache, from_photos, atol=1e-4)
    np.testing.assert_allclose(head.explain(cache.read_features([3, 5])), from_cache[[3, 5]], atol=1e-6)


def test_a_pooled_cache_is_refused_with_the_reason(patch_data):
    import pipeline

    root, data, _, _ = patch_data
    from pipeline.extraction.extract import ExtractConfig, extract

    pooled = extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none", workers=0, pool="avg",
                                   cache_dir=str(root / "pooled"), dtype="float32")).cache
    head = pipeline.Head(head="logreg", calibrate="none", unknown_rows=0, runs_dir=str(root / "runs")).fit(pooled)
    with pytest.raises(UsageError, match=r"pooled features \(8, 1, 1\).*without pool='avg'"):
        head.explain(pooled)
    assert head.explain([str(next((data / "red").iterdir()))]).shape == (1, 8, 8)  # from photos: the map is there


def test_predict_explain_writes_one_overlay_per_photo_beside_its_rows(patch_data, tmp_path):
    from click.testing import CliRunner

    from pipeline import cli

    root, data, photos, _ = patch_data
    head = pipeline_head(root, data)
    odd = tmp_path / "in" / "a\nb photo.png"  # a name that must not reach the file system as it is
    odd.parent.mkdir()
    odd.write_bytes(open(photos[0], "rb").read())
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "maps"
    r = CliRunner().invoke(cli.cli, ["predict", str(tmp_path / "in"), photos[1], "--model", head, "--workers", "0",
                                     "--format", "csv", "--explain", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000-a_b_photo.png", "00002-blue.1.png"]  # numbered in input order; the broken one: none
    assert [row["heatmap"] for row in rows] == [str(out / written[0]), "", str(out / written[1])]
    assert rows[0]["path"].endswith("a\nb photo.png") and rows[1]["error"] and not rows[0]["error"]
    assert Image.open(out / written[0]).size == (32, 32)


def test_predict_explain_into_the_same_folder_again_writes_over_nothing(patch_data, tmp_path):
    """predict --explain DIR twice over the same photos replaced the first run's heatmaps (the same numbers and
    names); the second run's now take free names (NNNNN-name-2.png), named in its rows."""
    from click.testing import CliRunner

    from pipeline import cli

    root, data, photos, _ = patch_data
    head, out = pipeline_head(root, data), tmp_path / "maps"
    args = ["predict", *photos[:2], "--model", head, "--workers", "0", "--format", "csv", "--explain", str(out)]
    assert CliRunner().invoke(cli.cli, args).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "00001-blue.1.png").write_bytes(b"the user's own")  # a file not predict's: kept too
    r = CliRunner().invoke(cli.cli, args)
    assert r.exit_code == 0, r.output
    assert sorted(first) == ["00000-blue.0.png", "00001-blue.1.png"] and sorted(p.name for p in out.iterdir()) == [
        "00000-blue.0-2.png", "00000-blue.0.png", "00001-blue.1-2.png", "00001-blue.1.png"]
    assert (out / "00000-blue.0.png").read_bytes() == first["00000-blue.0.png"]
    assert (out / "00001-blue.1.png").read_bytes() == b"the user's own"
    assert (out / "00000-blue.0-2.png").read_bytes() == first["00000-blue.0.png"]  # the same photo's map again
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["heatmap"] for row in rows] == [str(out / "00000-blue.0-2.png"), str(out / "00001-blue.1-2.png")]


def test_predict_explain_is_refused_among_the_photos(patch_data):
    from click.testing import CliRunner

    from pipeline import cli

    root, data, photos, _ = patch_data
    r = CliRunner().invoke(cli.cli, ["predict", str(data), "--model", pipeline_head(root, data), "--workers", "0",
                                     "--explain", str(data / "red" / "maps")])
    assert r.exit_code == 2 and "--explain" in r.stderr and "data folder" in r.stderr
    assert not (data / "red" / "maps").exists()


def test_predict_explain_is_refused_in_the_folder_of_a_photo_named_alone(patch_data, tmp_path):
    """A photo named alone: its folder is a photo folder too (the heatmap used to land beside the photo)."""
    from click.testing import CliRunner

    from pipeline import cli

    root, data, photos, _ = patch_data
    photo = tmp_path / "in" / "new photo.png"
    photo.parent.mkdir()
    photo.write_bytes(open(photos[0], "rb").read())
    r = CliRunner().invoke(cli.cli, ["predict", str(photo), "--model", pipeline_head(root, data), "--workers", "0",
                                     "--explain", str(tmp_path / "in" / "." / "")])
    assert r.exit_code == 2 and "--explain" in r.stderr and f"the folder of '{photo}'" in r.stderr, r.output
    assert sorted(photo.parent.iterdir()) == [photo]


def test_predict_explain_is_refused_in_a_folder_holding_a_folder_predicted(patch_data, tmp_path):
    """predict DIR/in --explain DIR wrote the heatmaps one level above the photos: a later predict DIR classified
    them as photos. Refused now (exit 2), through a link too; a folder beside the photos is still fine."""
    from click.testing import CliRunner

    from pipeline import cli

    root, data, photos, _ = patch_data
    head = pipeline_head(root, data)
    (tmp_path / "top" / "in").mkdir(parents=True)
    for p in photos[:2]:
        (tmp_path / "top" / "in" / Path(p).name).write_bytes(Path(p).read_bytes())
    (tmp_path / "link").symlink_to(tmp_path / "top")
    args = ["predict", str(tmp_path / "top" / "in"), "--model", head, "--workers", "0", "--explain"]
    for maps in (tmp_path / "top", tmp_path, tmp_path / "link"):
        r = CliRunner().invoke(cli.cli, [*args, str(maps)])
        assert r.exit_code == 2 and f"--explain '{maps}' holds '{tmp_path / 'top' / 'in'}', a folder predicted" in \
            r.stderr and len(r.stderr.splitlines()) == 1, r.output
    assert sorted(p.name for p in (tmp_path / "top").iterdir()) == ["in"]
    r = CliRunner().invoke(cli.cli, [*args, str(tmp_path / "top" / "maps")])
    assert r.exit_code == 0 and len(list((tmp_path / "top" / "maps").iterdir())) == 2, r.output


def pipeline_head(root, data) -> str:
    from pipeline.heads.fit_head import fit_head

    return fit_head(FitHeadConfig(cache=patch_cache(root, data, "tiny"), head="logreg", calibrate="none",
                                  unknown_rows=0, runs_dir=str(root / "runs"))).checkpoint


# -- evaluate's gallery of confident errors ------------------------------------------------------
@pytest.fixture(scope="module")
def swapped(patch_data):
    """The test photos filed under the other colour: every one a confident error, its square still the cause."""
    import shutil

    root, _, photos, corners = patch_data
    out = root / "swapped"
    for p, other in (("red", "blue"), ("blue", "red")):
        (out / other).mkdir(parents=True)
        for f in sorted((root / "test" / p).iterdir()):
            shutil.copy(f, out / other / f.name)
    by_name = {f"{'blue' if p.split('/')[-2] == 'red' else 'red'}/{p.split('/')[-1]}": c
               for p, c in zip(photos, corners)}
    return out, by_name


@pytest.mark.parametrize("source", ["cache", "data"])
def test_evaluate_gallery_shows_each_errors_heatmap(patch_data, swapped, source, tmp_path):
    from pipeline.config import EvaluateConfig
    from pipeline.reports.evaluate import _gallery_image, evaluate

    root, data, _, _ = patch_data
    folder, corners = swapped
    head = pipeline_head(root, data)
    where = ({"cache": patch_cache(root, folder, "tiny"), "split": "all"} if source == "cache"
             else {"data": str(folder), "workers": 0, "precision": "fp32"})
    result = evaluate(EvaluateConfig(model=head, runs_dir=str(tmp_path / "runs"), top_k=8, **where))
    wrong = result.wrong
    assert len(wrong) == 8 and result.errors >= 11
    maps = np.array([w["heatmap"] for w in wrong])
    assert maps.shape == (8, 8, 8) and patch_share(maps, [corners[w["path"]] for w in wrong]) >= 0.85
    from pipeline.cache.provenance import Preprocessing

    transform = Preprocessing.from_dict(result.preprocessing).to_transform()
    assert _gallery_image(folder, wrong[0], transform).size == (32, 32)  # the crop the model saw, under its map
    assert (tmp_path / "runs").exists() and result.gallery_png.endswith("gallery.png")


# -- the service ---------------------------------------------------------------------------------
def test_the_service_answers_predicts_overlay_when_asked(patch_data, tmp_path):
    """?explain=true: each good row's heatmap as a data: JPEG, the overlay predict --explain writes (one rule)."""
    import base64

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    import pipeline
    from pipeline.models.predict import PredictConfig, predict

    root, data, photos, _ = patch_data
    head = pipeline_head(root, data)
    written = predict(PredictConfig(paths=[photos[0]], model=head, workers=0, precision="fp32",
                                    explain=str(tmp_path / "maps"))).rows[0]
    files = [("files", ("a.png", open(photos[0], "rb").read(), "image/png")),
             ("files", ("b.png", b"junk", "image/png"))]
    with TestClient(pipeline.serve_app(head, precision="fp32"), base_url="http://localhost") as client:
        rows = client.post("/predict?explain=true", files=files).json()
        plain = client.post("/predict", files=files[:1]).json()
    assert rows[0]["heatmap"].startswith("data:image/jpeg;base64,") and rows[1]["heatmap"] is None
    assert "heatmap" not in plain[0] and plain[0]["probability"] == rows[0]["probability"]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(rows[0]["heatmap"].split(",", 1)[1]))), np.float32)
    png = np.asarray(Image.open(written["heatmap"]), np.float32)

    def cells(a):  # 4 x 4-pixel means: JPEG smooths a noisy 32 x 32 photo's pixels, not its cells' colours
        return a.reshape(8, 4, 8, 4, 3).mean((1, 3))

    assert np.abs(cells(served) - cells(png)).mean() < 4


def test_a_head_fitted_on_arrays_of_maps_explains_arrays():
    import pipeline

    x, y, _ = region_maps(90)
    head = pipeline.Head(head="logreg", calibrate="none", unknown_rows=0).fit(x, np.array(CLASSES)[y])
    xt, _, corners = region_maps(30, seed=1)
    maps = head.explain(xt)
    assert maps.shape == (30, 6, 6) and lit_share(maps, corners) >= 0.9
    with pytest.raises(UsageError, match="no spatial map"):
        pipeline.Head(head="logreg", calibrate="none", unknown_rows=0).fit(x.mean((2, 3)), y).explain(x.mean((2, 3)))


def test_explain_checks_its_keywords_for_a_cache_and_an_array_too(patch_data):
    """batch_size=-3 gave a 32-row cache no map at all ((0, 8, 8)), 0 'range() arg 3 must not be zero'; as
    predict_proba, explain checks its keywords whatever it is given."""
    import pipeline

    root, data, _, _ = patch_data
    cache = pipeline.Cache(patch_cache(root, data, "tiny"))
    head = pipeline.Head(head="logreg", calibrate="none", unknown_rows=0, runs_dir=str(root / "runs")).fit(cache)
    for X in (cache, cache.read_features([0, 1])):
        for bad, message in ((dict(batch_size=-3), "batch_size must be positive, got -3"),
                             (dict(batch_size=0), "batch_size must be positive, got 0"),
                             (dict(precision="int4"), "unknown precision .int4.")):
            with pytest.raises(UsageError, match=f"^explain: {message}"):
                head.explain(X, **bad)
    assert head.explain(cache, batch_size=5).shape == (len(cache), 8, 8)


def test_damaged_rows_are_refused_as_scoring_refuses_them_not_explained_as_nan(tmp_path):
    """A cache row or an array row holding NaN or inf: predict_proba refused it in one line, explain gave NaN maps
    (not the promised [0, 1]) without a word; explain now refuses it the same way."""
    import pipeline

    x, y, _ = region_maps(60)
    cache = write_cache(tmp_path / "cache.h5", x, y)
    head = pipeline.Head(head="logreg", calibrate="none", unknown_rows=0, runs_dir=str(tmp_path / "runs")).fit(cache)
    damaged = x.copy()
    damaged[3, 0, 0, 0], damaged[9, 1, 2, 2] = np.nan, np.inf
    (tmp_path / "bad").mkdir()
    bad_cache = write_cache(tmp_path / "bad" / "cache.h5", damaged, y)
    for ask in (head.predict_proba, head.explain):
        with pytest.raises(UsageError, match=r"2 cache rows hold non-finite features \(NaN or inf\), e.g. rows \[3, 9"):
            ask(str(bad_cache))
        with pytest.raises(ValueError, match="Input contains (NaN|infinity)"):
            ask(damaged[:10])
    assert np.isfinite(head.explain(x[:10])).all() and np.isfinite(head.explain(str(cache))).all()


def test_predict_explain_on_a_backbone_with_a_one_by_one_map_is_refused_before_any_photo(tmp_path):
    """A backbone whose map is C x 1 x 1 (timm's PiT gives its class token): predict --explain said "the feature
    map holds pooled features ...; extract again without --pool avg ..., or explain photos (predict --explain)",
    which the user had done with no --pool avg; now one line naming the backbone, before any row."""
    from click.testing import CliRunner
    from torch import nn
    from torchvision.transforms._presets import ImageClassification

    from pipeline import cli
    from pipeline.extraction.backbones import BACKBONES, BackboneSpec, register_backbone
    from tests.conftest import make_image_folder

    class Token(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))

    register_backbone(BackboneSpec(name="tiny_token", build=Token, features=lambda m: m.features,
                                   feature_prefixes=("features.",), pool="avg",
                                   transform=lambda: ImageClassification(crop_size=32, resize_size=36)))
    try:
        data = make_image_folder(tmp_path / "data", per_class=6)
        cache = patch_cache(tmp_path, data, "tiny_token")
        head = fit_head(FitHeadConfig(cache=cache, head="logreg", runs_dir=str(tmp_path / "runs"))).checkpoint
        r = CliRunner().invoke(cli.cli, ["predict", str(data / "red"), "--model", head, "--workers", "0",
                                         "--explain", str(tmp_path / "maps")])
        assert r.exit_code == 2 and "tiny_token's is 4 x 1 x 1" in r.stderr and "--pool avg" not in r.stderr
        assert not r.stdout and not (tmp_path / "maps").exists()
        # evaluate --data on photos it gets wrong (each colour filed under the other): its gallery of errors ended
        # the run in the same refusal; now the gallery has no maps, as for a head on fused features
        (data / "red").rename(data / "swap")
        (data / "blue").rename(data / "red")
        (data / "swap").rename(data / "blue")
        from pipeline.config import EvaluateConfig
        from pipeline.reports.evaluate import evaluate

        result = evaluate(EvaluateConfig(model=head, data=str(data), workers=0, precision="fp32", top_k=4,
                                         runs_dir=str(tmp_path / "runs")))
        assert result.errors >= 6 and result.wrong and all(w.get("heatmap") is None for w in result.wrong)
        # serve: ?explain=true answered every photo with an error; now its rows, with no heatmap
        pytest.importorskip("fastapi", reason="the serve extra is not installed")
        from fastapi.testclient import TestClient

        import pipeline

        photo = next((data / "red").iterdir())
        with TestClient(pipeline.serve_app(head, precision="fp32"), base_url="http://localhost") as client:
            rows = client.post("/predict?explain=true", files=[("files", ("a.jpg", photo.read_bytes()))]).json()
        assert rows[0]["class"] in ("blue", "red") and rows[0]["heatmap"] is None
    finally:
        del BACKBONES["tiny_token"]
