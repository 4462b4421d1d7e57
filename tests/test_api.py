"""The public Python API (pipeline/api.py, re-exported by the package): caches, heads, models, figures,
no output unless asked; and the README's "From Python or Jupyter" example, run as shown."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline import progress
from pipeline.extraction.extract import ExtractResult
from tests.conftest import ROOT, make_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights")

TINY = dict(backbone="tiny", weights="none", workers=0)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A project folder of its own (features/ and runs/ land here) with an image folder ``data``."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data", per_class=12)
    return tmp_path


@pytest.fixture
def cache(work):
    return pipeline.extract_features("data", n=0, dtype="float32", **TINY)


@pytest.fixture
def head(cache):
    return pipeline.Head(head="linear", epochs=3, val_fraction=0.25).fit(cache)


# -- the package ---------------------------------------------------------------------------------
def test_import_pipeline_stays_light_and_documents_the_api():
    code = ("import sys, pipeline; h = pipeline.Head; c = pipeline.Cache; import pydoc; "
            "text = pydoc.render_doc(pipeline, renderer=pydoc.plaintext); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'torchvision', 'h5py') if m in sys.modules)); "
            "print('extract_features' in text, 'Head(**params)' in text)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True True"]


def test_the_api_hides_no_stage_module():
    """Public names never shadow a submodule: `import pipeline.extraction.extract as m` stays the extract stage."""
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    assert not modules & set(pipeline.__all__)
    assert set(pipeline.__all__) <= set(dir(pipeline))
    for name in pipeline.__all__:
        assert getattr(pipeline, name).__doc__, name  # what help() shows
    import pipeline.extraction.extract as stage

    assert stage.ExtractConfig and pipeline.extract_features is pipeline.api.extract_features
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pipeline.nothing  # noqa: B018


# -- caches --------------------------------------------------------------------------------------
def test_extract_features_returns_a_cache_and_prints_nothing(work, capfd):
    cache = pipeline.extract_features(work / "data", n=0, dtype="float32", **TINY)
    assert capfd.readouterr() == ("", "")
    assert isinstance(cache, pipeline.Cache) and cache.path.parent == Path("features")
    assert len(cache) == 24 and cache.classes == ["blue", "red"] and cache.feature_shape == (8, 8, 8)
    assert cache.labels.tolist().count(0) == 12 and len(cache.paths) == 24
    assert cache.paths[0].startswith(("blue/", "red/")) and cache.data_root == (work / "data").resolve()
    assert cache.features.shape == (24, 8, 8, 8) and cache.features[:2].shape == (2, 8, 8, 8)  # an h5py view
    rows = cache.read_features([5, 1, 5])
    assert rows.dtype == np.float32 and np.array_equal(rows[0], rows[2])
    np.testing.assert_array_equal(rows[1], cache.features[1])
    assert cache.provenance.backbone == "tiny" and cache.provenance.classes == ("blue", "red")
    assert cache.summary()["rows"] == 24 and isinstance(cache.result, ExtractResult) and cache.result.hit is False
    assert "24 rows" in repr(cache) and os.fspath(cache) == str(cache.path)
    again = pipeline.extract_features("data", n=0, dtype="float32", **TINY)
    assert again.path == cache.path and again.result.hit is True
    assert [c.path for c in pipeline.list_caches()] == [cache.path]
    cache.close()


def test_verbose_shows_progress_and_restores_the_setting(work, capfd, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # stderr is not a terminal here: progress lines
    pipeline.extract_features("data", n=8, verbose=True, batch_size=4, **TINY)
    assert "extract: 8/8 (100%)" in capfd.readouterr().err
    assert progress.is_quiet() is False
    progress.set_quiet(True)
    try:
        with pytest.raises(ValueError):
            pipeline.extract_features("data", n=-1, verbose=True, **TINY)
        assert progress.is_quiet() is True  # restored, also after an error
    finally:
        progress.set_quiet(False)


def test_unknown_options_name_themselves_and_the_allowed_ones(work):
    with pytest.raises(ValueError, match=r"extract_features: unknown option bakbone; allowed: .*backbone"):
        pipeline.extract_features("data", bakbone="tiny")
    allowed = "cache_dir, head, features, normalize, epochs"
    with pytest.raises(ValueError, match=rf"Head: unknown options epoch, rate; allowed: {allowed}"):
        pipeline.Head(epoch=3, rate=1)
    with pytest.raises(ValueError, match="compare_sklearn: unknown option c;"):
        pipeline.compare_sklearn("x.h5", c=2)
    with pytest.raises(ValueError, match="preview: unknown option per_clas;"):
        pipeline.preview("data", per_clas=2)


@pytest.mark.parametrize("call, what", [
    (lambda: pipeline.export_model(None, "m.onnx"), "export_model: model"),  # a Head fitted on arrays: checkpoint_ None
    (lambda: pipeline.export_model("head.pt", None), "export_model: output"),
    (lambda: pipeline.serve_app(3), "serve_app: model"),
    (lambda: pipeline.predict_files("head.pt", None), "predict_files: paths"),
    (lambda: pipeline.predict_files("head.pt", ["a.jpg", 7]), "predict_files: paths"),
    (lambda: pipeline.extract_features(None, 10), "extract_features: data"),
    (lambda: pipeline.evaluate_model("head.pt", data=1.5), "evaluate_model: data"),
    (lambda: pipeline.exported_metadata(None), "exported_metadata: path"),
    (lambda: pipeline.Model.load(None), "Model.load: path"),
    (lambda: pipeline.Head.load(None), "Head.load: path"),
    (lambda: pipeline.Cache(None), "Cache: path"),
])
def test_a_path_of_another_type_is_refused_naming_the_call_and_its_parameter(call, what):
    """os.fspath's 'expected str, bytes or os.PathLike object, not NoneType' named no parameter of the call."""
    with pytest.raises(pipeline.UsageError, match=rf"^{what} must be a path \(a str or pathlib.Path\), got "):
        call()


@pytest.mark.parametrize("call, what", [
    (lambda: pipeline.extract_features("data", calib_data="", **TINY), "extract_features: calib_data"),
    (lambda: pipeline.extract_features("data", shard_dir="", **TINY), "extract_features: shard_dir"),
    (lambda: pipeline.extract_features("data", cache_dir="", **TINY), "extract_features: cache_dir"),
    (lambda: pipeline.extract_features("", **TINY), "extract_features: data"),
    (lambda: pipeline.Head(runs_dir="").fit(None), "Head: runs_dir"),
    (lambda: pipeline.Head(test_data="").fit(None), "Head: test_data"),
    (lambda: pipeline.Head.load(""), "Head.load: path"),
])
def test_an_empty_name_for_a_folder_or_file_is_refused_naming_the_keyword(work, call, what):
    """As the CLI refuses --calib-data '': calib_data='' calibrated on data, shard_dir='' put the shards beside
    the cache, runs_dir='' wrote the run into the working folder, test_data='' tested on nothing, and
    extract_features('') took the working folder for the photos ('class folder 'features' holds no images')."""
    with pytest.raises(pipeline.UsageError, match=rf"^{what} '' is an empty name; give a "):
        call()
    assert not (work / "features").exists() and not (work / "runs").exists()


def test_a_flag_given_as_a_string_is_refused_not_taken_as_true(work):
    """'no' is true to Python: check_image_folder(quarantine='no') moved the broken files it was to leave."""
    (work / "data" / "red" / "broken.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="check_image_folder: quarantine must be True or False, got 'no'"):
        pipeline.check_image_folder("data", quarantine="no", workers=1)
    with pytest.raises(ValueError, match="extract_features: flip must be True or False, got 'False'"):
        pipeline.extract_features("data", flip="False", **TINY)
    assert (work / "data" / "red" / "broken.jpg").exists() and not (work / "data.quarantine").exists()
    assert pipeline.check_image_folder("data", quarantine=np.bool_(False), workers=1).quarantine is None


@pytest.mark.parametrize("call, said", [
    (lambda: pipeline.serve_app("head.pt", host=3), "serve_app: host must be a str, got 3"),
    (lambda: pipeline.serve_model("head.pt", host=("127.0.0.1",)), "serve_model: host must be a str, got"),
    (lambda: pipeline.predict_files("head.pt", "a.jpg", weights=3), "predict_files: weights must be a str, got 3"),
    (lambda: pipeline.predict_files("head.pt", "a.jpg", output=7), "predict_files: output must be a str, got 7"),
])
def test_a_text_option_of_another_type_is_refused_naming_it(call, said):
    """serve_app(host=3) served without its Host check (3 is no loopback name), serve_model(host=...) ended in
    getaddrinfo's TypeError, weights=3 and output=7 in TypeErrors deep inside, after the model had loaded."""
    with pytest.raises(pipeline.UsageError, match=f"^{re.escape(said)}"):
        call()


def test_gamma_is_a_number_or_its_text_from_python(cache):
    """gamma is 'a number, scale or G*scale': Head(gamma=0.5) was refused ('gamma must be a str, got 0.5') once
    text options from Python were checked for their type."""
    X, y = cache.read_features(), np.asarray(cache.classes)[cache.labels]
    as_number = pipeline.Head(head="svm", gamma=0.5, val_fraction=0.25).fit(X, y)
    as_text = pipeline.Head(head="svm", gamma="0.5", val_fraction=0.25).fit(X, y)
    np.testing.assert_allclose(as_number.predict_proba(X), as_text.predict_proba(X), atol=1e-6)
    with pytest.raises(pipeline.UsageError, match="gamma must be a positive number"):
        pipeline.Head(head="svm", gamma=-1.0).fit(X, y)


@pytest.mark.parametrize("call, said", [
    (lambda: pipeline.serve_app("head.pt", host=None), "serve_app: host must be a str, got None; leave it out for "
                                                       "its default '127.0.0.1'"),
    (lambda: pipeline.extract_features("data", weights=None), "extract_features: weights must be a str, got None"),
])
def test_a_text_option_with_a_default_given_as_none_is_refused_naming_the_default(call, said):
    """host=None ended in an AttributeError; weights=None too (random weights, as torchvision reads it, or the
    default ones?)."""
    with pytest.raises(pipeline.UsageError, match=f"^{re.escape(said)}"):
        call()


def test_options_follow_the_config_dataclasses(monkeypatch):
    """A field added to a stage's config is an option of the API at once (other work adds fields)."""
    import dataclasses

    from pipeline.heads import fit_head as head_stage
    Extended = dataclasses.make_dataclass("Extended", [("view", str, "map")], bases=(head_stage.FitHeadConfig,))
    monkeypatch.setattr(pipeline.api, "FitHeadConfig", Extended)
    h = pipeline.Head(view="pooled")
    assert h.view == "pooled" and h.get_params()["view"] == "pooled" and h.get_params()["epochs"] == 100


# -- heads ---------------------------------------------------------------------------------------
def test_head_is_a_scikit_learn_style_estimator(cache, capfd):
    h = pipeline.Head(epochs=3, val_fraction=0.25, recipe="seed")
    assert h.epochs == 3 and h.lr == 0.03 and h.get_params()["runs_dir"] == "runs"
    assert repr(h) == "Head(epochs=3, recipe='seed', val_fraction=0.25)"  # parameters in get_params' order
    assert not hasattr(h, "classes_")
    with pytest.raises(pipeline.NotFittedError, match="not fitted"):
        h.predict(["x.jpg"])
    assert h.set_params(lr=0.02) is h and h.lr == 0.02
    assert h.fit(cache) is h
    assert capfd.readouterr() == ("", "")  # no epoch lines, no bars
    assert h.classes_ == ["blue", "red"] and len(h.history_) == 10 and h.history_[0]["epoch"] == 1  # the recipe's 10
    assert h.metrics_["val_acc"] == 1.0 and h.metrics_["val_rows"] == 6
    assert h.checkpoint_.name == "head.pt" and h.checkpoint_.is_file() and Path(h.run_dir_) == h.checkpoint_.parent
    assert h.feature_shape_ == (8, 8, 8) and h.n_features_in_ == 512 and h.cache_ == os.path.abspath(cache.path)
    assert "fitted" in repr(h)
    h.fit(cache, verbose=True)
    assert "Epoch 3, Train acc=" in capfd.readouterr().err


def test_head_predicts_paths_folders_pil_images_and_features(head, work):
    blue, red = work / "data" / "blue" / "blue.0.jpg", work / "data" / "red" / "red.0.jpg"
    assert head.predict([blue, str(red)]).tolist() == ["blue", "red"]
    proba = head.predict_proba([red, blue])
    assert proba.shape == (2, 2) and np.allclose(proba.sum(1), 1) and proba[0, 1] > 0.5 > proba[1, 1]
    assert head.predict(str(blue)).tolist() == ["blue"]  # one path
    folder = head.predict(work / "data" / "red")  # a folder: its images, sorted
    assert folder.tolist() == ["red"] * 12
    with Image.open(red) as im:
        mixed = head.predict([im.convert("RGBA"), blue])  # PIL images (any mode) and paths, in order
    assert mixed.tolist() == ["red", "blue"]
    np.testing.assert_allclose(head.predict_proba(Image.open(red)), head.predict_proba(red), atol=1e-5)
    on_cache = head.predict_proba(pipeline.Cache(head.cache_))  # cached features through the head alone
    cache = pipeline.Cache(head.cache_)
    np.testing.assert_allclose(on_cache, head.predict_proba(cache.read_features()), atol=1e-6)
    assert (on_cache.argmax(1) == cache.labels).all()
    # a bare 42 said "'int' object is not iterable", a photo's bytes "cannot predict a int" (its first byte)
    for bad, name in (([42], "int"), (42, "int"), (None, "NoneType"), (blue.read_bytes(), "bytes")):
        with pytest.raises(TypeError, match=f"cannot predict a {name}: pass image paths"):
            head.predict(bad)
    (work / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        head.predict([blue, work / "broken.jpg"])


def test_image_methods_check_their_keywords_as_the_cli_does(head, work):
    """batch_size=0 ran as 32 and unknown='yes' counted as True: each keyword is checked by its option's rule,
    in the method's terms, before any photo is read."""
    blue = work / "data" / "blue" / "blue.0.jpg"
    with pytest.raises(ValueError, match="predict_proba: batch_size must be positive, got 0"):
        head.predict_proba(blue, batch_size=0)
    with pytest.raises(ValueError, match="predict: workers must be"):
        head.predict(blue, workers=-5)
    with pytest.raises(ValueError, match="unknown_score: unknown precision 'fp64'; allowed: auto, fp32"):
        head.unknown_score(blue, precision="fp64")
    with pytest.raises(ValueError, match=r"explain: unknown device 'gpu'; allowed: auto, cpu, cuda \(or cuda:N\)"):
        head.explain(blue, device="gpu")
    with pytest.raises(ValueError, match="predict: unknown must be True or False, got 'yes'"):
        head.predict(blue, unknown="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        head.predict(blue, unknown=True, batchsize=4)  # was ignored where unknown=True
    assert head.predict(blue, unknown=np.bool_(False), batch_size=1).tolist() == ["blue"]


def test_device_and_precision_errors_name_the_callers_keywords(head, work, monkeypatch):
    """head.predict(photo, precision='fp16') on a machine without CUDA said '--device auto found none here ... use
    --precision bf16 or fp32', and device='cuda' 'use --device cpu': the command line's options, which a Python
    caller never wrote. The API's callers read their keywords; the CLI's messages are as before (test_devices)."""
    import torch

    from pipeline.errors import DeviceMissing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blue = work / "data" / "blue" / "blue.0.jpg"
    with pytest.raises(DeviceMissing) as e:
        head.predict(blue, precision="fp16")
    assert str(e.value) == ("precision 'fp16' needs a CUDA device, and device='auto' found none here (it resolved to "
                            "the CPU); on the CPU use precision='bf16' or 'fp32'")
    with pytest.raises(ValueError, match=r"precision 'fp16' needs a CUDA device, not device='cpu'; on the CPU"):
        head.predict(blue, precision="fp16", device="cpu")
    with pytest.raises(DeviceMissing, match=r"CUDA is not available here; use device='cpu'$"):
        head.predict(blue, device="cuda")
    with pytest.raises(DeviceMissing, match=r"CUDA is not available here; use device='cpu'$"):
        pipeline.Head(device="cuda").fit(head.cache_)


def test_head_scores_a_cache_or_a_folder(head, work, make_cache):
    assert head.score(head.cache_) == head.metrics_["val_acc"] == 1.0  # its own cache: the validation split
    assert head.score(pipeline.Cache(head.cache_), split="all") == 1.0
    with pytest.raises(ValueError, match="Head.score: unknown split 'vall'; allowed: auto, val, all"):
        head.score(head.cache_, split="vall")  # not a silent 'auto'
    other = make_image_folder(work / "other", per_class=5, seed=3)
    other_cache = pipeline.extract_features(other, n=0, dtype="float32", **TINY)
    r = pipeline.evaluate_model(head, cache=other_cache, split="all")
    assert head.score(other_cache) == r.accuracy  # another cache: every row
    assert head.score(other, workers=0) == pytest.approx(r.accuracy)  # images through the backbone
    files = sorted((other / "red").glob("*.jpg"))[:3]
    assert head.score(files, ["red"] * 3) == 1.0 and head.score(files, [1, 1, 0]) == pytest.approx(2 / 3)


def test_scores_warnings_name_the_split_keyword(cache, caplog):
    """Head.score and evaluate_model warned 'use --split all on a held-out cache' (and '(fit-head --refit)')."""
    h = pipeline.Head().fit(cache)  # the default head: refitted on every row, its validation rows included
    with caplog.at_level("WARNING", logger="pipeline"):
        h.score(cache)
        pipeline.evaluate_model(h, cache=cache, split="all", figures=False)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "(refit=True)" in said and "Use split='all' on a held-out cache" in said, said
    assert "split='all' scores its training rows too" in said and "--split" not in said and "--refit" not in said


def test_save_and_load_round_trip_the_cli_checkpoint(head, work):
    import torch

    saved = head.save(work / "keep" / "cats.pt")
    a, b = torch.load(saved, weights_only=True), torch.load(head.checkpoint_, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    loaded = pipeline.Head.load(saved)
    assert loaded.classes_ == head.classes_ and loaded.epochs == 3 and loaded.val_fraction == 0.25
    images = sorted((work / "data").rglob("*.jpg"))[:4]
    np.testing.assert_allclose(loaded.predict_proba(images), head.predict_proba(images), atol=1e-6)
    assert pipeline.Head.load(head.checkpoint_).history_ == head.history_  # history.json beside it
    with pytest.raises(ValueError, match="is a folder"):
        head.save(work)
    before = {p: p.read_bytes() for p in (Path(head.cache_), images[0])}
    for target, why in ((head.cache_, "is one of the inputs .the model's cache"), (images[0], "inside the data folder"),
                        (work / "data" / "red" / "h.pt", "inside the data folder")):
        with pytest.raises(ValueError, match=why):
            head.save(target)  # its cache and photos are what it reads
    assert {p: p.read_bytes() for p in before} == before and not (work / "data" / "red" / "h.pt").exists()


def test_save_replaces_an_earlier_checkpoint_but_no_file_of_the_users(head, cache, work):
    """head.save(path) replaced whatever was at path (a README, a photo outside the data, a cache of another folder,
    a link to one); each is now refused naming it, nothing changed. A checkpoint there (an earlier save, a head.pt)
    is replaced as before."""
    notes, photo, link = work / "notes.md", work / "cat.jpg", work / "link.pt"
    notes.write_text("# notes\n")
    Image.new("RGB", (8, 8)).save(photo)
    link.symlink_to(notes)
    before = {p: p.read_bytes() for p in (notes, photo)}
    for target, that in ((notes, ""), (photo, ""), (link, r" \(a link to a file\)")):
        with pytest.raises(ValueError, match=rf"save's path '.*{target.name}' exists and is not a checkpoint of this "
                                             rf"tool{that}: it would be replaced; move it away, or name another path"):
            head.save(target)
    assert {p: p.read_bytes() for p in before} == before and link.is_symlink()
    (work / "h.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="exists and is not a checkpoint"):
        head.save(work / "h.pt")
    for bad, said in ((None, r"save: path must be a path \(a str or pathlib.Path\), got None"),
                      ("", "save: path '' is an empty name; give a file")):
        with pytest.raises(ValueError, match=f"^{said}$"):
            head.save(bad)
    other = pipeline.Head(head="linear", epochs=1).fit(cache)
    saved = other.save(work / "kept.pt")
    assert head.save(saved) == saved and pipeline.Head.load(saved).epochs == 3  # an earlier checkpoint: replaced


# -- rows, reports, figures ----------------------------------------------------------------------
def test_compare_sklearn_returns_rows(cache):
    rows = pipeline.compare_sklearn(cache, head=pipeline.Head(head="linear", epochs=2), val_fraction=0.25, C=0.5)
    assert isinstance(rows, list) and [r["model"].split()[0] for r in rows] == [
        "auto", "linear", "logreg", "kernel", "sklearn", "sklearn", "sklearn"]
    assert rows[1]["model"].startswith("linear Linear+LogSoftmax (avg, l2") and "C=0.5" in rows[4]["model"]
    assert rows.result.split["val_rows"] == rows[0]["val_rows"] == 6
    assert "<table>" in rows._repr_html_() and "sklearn LogisticRegression" in rows._repr_html_()


def test_compare_sklearns_bad_values_name_its_keywords(cache, work):
    """compare_sklearn(cache, lr=-1) or head={'lr': -1} said '--lr must be in (0, 10], got -1' (the stage's check,
    in the command line's words), and too few photos for the default head '--val-fraction's share'."""
    for options in ({"lr": -1}, {"head": {"lr": -1}}, {"head": pipeline.Head(lr=-1)}):
        with pytest.raises(ValueError, match=r"^compare_sklearn: lr must be in \(0, 10\], got -1$"):
            pipeline.compare_sklearn(cache, **options)
    with pytest.raises(ValueError, match=r"^compare_sklearn: val_fraction must be in \(0, 1\), got 2"):
        pipeline.compare_sklearn(cache, val_fraction=2)
    few = pipeline.extract_features(make_image_folder(work / "few", per_class=3), n=0, **TINY)
    with pytest.raises(ValueError, match=r"\(training rows: val_fraction's share is held out\); add photos"):
        pipeline.compare_sklearn(few)


def test_evaluate_model_gives_metrics_and_figures(head):
    from matplotlib.figure import Figure

    r = pipeline.evaluate_model(head)  # the cache it was fitted on, validation rows
    assert r.rows == 6 and r.accuracy == 1.0 and Path(r.confusion_png).is_file()
    assert isinstance(r.figures["confusion"], Figure) and isinstance(r.figures["gallery"], Figure)
    assert r.figures["confusion"]._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pipeline.evaluate_model(head, figures=False).figures == {}


def test_pictures_are_figures_that_show_inline_and_can_be_saved(head, work):
    import matplotlib

    fig = pipeline.preview("data", per_class=2, backbone="tiny", weights="none")
    assert isinstance(fig, matplotlib.figure.Figure) and fig.info.classes == ["blue", "red"]
    png = fig._repr_png_()  # what Jupyter displays
    assert png[:4] == b"\x89PNG" and Image.open(__import__("io").BytesIO(png)).size == (440, 540)
    fm = pipeline.feature_map(work / "data" / "red" / "red.1.jpg", backbone="tiny", weights="none", top_k=2,
                              output=work / "fm.png")
    assert fm.info.feature_shape == [8, 8, 8] and Image.open(work / "fm.png").size == (1500, 600)
    assert isinstance(fm.info, pipeline.api.FeatureMapResult) and fm.info.output == str(work / "fm.png")
    curves = head.plot_curves()
    assert len(curves.axes) == 2 and pipeline.plot_curves(head.history_).axes[0].get_title() == "accuracy"
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # not pyplot's: a notebook shows each once, nothing to close


# -- whole models and the rest -------------------------------------------------------------------
def test_train_finetune_and_model_load(work, head):
    fast = dict(workers=0, batch_size=8, print_every=0, precision="fp32")
    m = pipeline.train_model("data", backbone="tiny", weights="none", epochs=1, **fast)
    assert isinstance(m, pipeline.Model) and m.kind_ == "train" and m.classes_ == ["blue", "red"]
    assert len(m.history_) == 1 and m.checkpoint_.name == "model.pt"
    images = sorted((work / "data").rglob("*.jpg"))
    assert m.score("data", workers=0) == pytest.approx(m.score(images, [p.parent.name for p in images]))
    f = pipeline.finetune_model("data", init=head, epochs=1, unfreeze="1", **fast)
    assert f.kind_ == "finetune" and f.config_["init_head"] == os.path.abspath(head.checkpoint_)
    again = pipeline.Model.load(f.save(work / "ft.pt"))
    images = sorted((work / "data" / "red").glob("*.jpg"))[:2]
    np.testing.assert_allclose(again.predict_proba(images, precision="fp32"),
                               f.predict_proba(images, precision="fp32"), atol=1e-5)
    assert pipeline.Model.load(head.checkpoint_).predict(images).tolist() == ["red", "red"]  # a head on its backbone
    with pytest.raises(ValueError, match="is a finetune checkpoint.*Model.load"):
        pipeline.Head.load(f.checkpoint_)
    for run in (m.predict, m.explain):  # a Cache went to the image reader: '.h5 (0 x 0 pixels: an empty image)'
        with pytest.raises(ValueError, match=r"\.h5' is a feature cache: a whole model takes photos"):
            run(head.cache_)


def test_predict_files_check_runs_and_summary(work, head):
    (work / "data" / "blue" / "bad.jpg").write_bytes(b"")
    rows = pipeline.predict_files(head, work / "data" / "blue", workers=0)
    assert len(rows) == 13 and rows.result.errors == 1
    as_bytes = pipeline.predict_files(head, os.fsencode(work / "data" / "blue"), workers=0)  # was a list of numbers
    assert [r["class"] for r in as_bytes] == [r["class"] for r in rows]
    assert {r["class"] for r in rows if not r["error"]} == {"blue"}
    report = pipeline.check_image_folder("data", workers=1)
    assert report.files == 25 and report.errors == 1 and report.findings[0]["kind"] == "zero-byte"
    runs = pipeline.list_runs()
    assert [r["kind"] for r in runs] == ["fit-head"] and runs[0]["metrics"]["val_acc"] == 1.0
    assert pipeline.model_summary(backbone="tiny", classes=3).trainable_params == 512 * 3 + 3


# -- the README example --------------------------------------------------------------------------
def readme_example() -> str:
    """The first ```python block under the README's "From Python or Jupyter" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## From Python or Jupyter\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_short_and_uses_the_public_api():
    code = readme_example()
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 12 and lines[0] == "import pipeline"
    used = set(re.findall(r"pipeline\.(\w+)", code))
    assert used and used <= set(pipeline.__all__)
    assert ".fit(" in code and ".predict(" in code and "../shared/" in code


@pytest.mark.slow
@pytest.mark.xdist_group("readme")  # the notebook reuses the README example's cache
def test_the_readme_example_runs_as_shown(shared_available, scratch_project):
    """In a plain Python session from a project folder with ../shared beside it, as a reader would paste it
    (its features/ and runs/ land in that scratch folder, which the notebook test reuses)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=scratch_project, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("Cache(") and "800 rows, classes ['Cat', 'Dog'], features 512x7x7" in out[0]
    assert float(out[1]) >= 0.95
    assert out[2].startswith("['Cat' 'Dog']") and out[3] == "['Cat' 'Dog']"
    assert r.stderr.strip() == ""  # nothing printed but what the example prints


# -- scikit-learn's conventions --------------------------------------------------------------------
def test_head_clones_and_is_a_classifier():
    from sklearn.base import clone, is_classifier

    h = pipeline.Head(lr=0.1, verbose=True, head="logreg")
    c = clone(h)
    assert c is not h and c.get_params() == h.get_params() and c.verbose is True and c.lr == 0.1
    assert is_classifier(h)
    with pytest.raises(ValueError, match="Invalid parameter 'lrr'"):
        h.set_params(lrr=1)


def test_a_head_that_ran_a_timm_backbone_pickles_and_predicts_again(work):
    import pickle

    cache = pipeline.extract_features("data", n=0, backbone="test_efficientnet", weights="none", workers=0)
    h = pipeline.Head(head="logreg").fit(cache)
    photos = sorted(map(str, (work / "data" / "red").iterdir()))[:3]
    first = h.predict_proba(photos)  # loads the backbone: a class timm's trunk makes at load
    again = pickle.loads(pickle.dumps(h))  # was "Can't pickle local object 'timm_trunk_class.<locals>.TimmTrunk'"
    assert again.get_params() == h.get_params() and list(again.classes_) == list(h.classes_)
    assert np.allclose(again.predict_proba(photos), first, atol=1e-6)


def test_an_output_named_for_another_format_is_refused_in_the_callers_keywords(head, work):
    """export_model and predict_files said '--output ... --format is 'onnx': pass --format torchscript'."""
    with pytest.raises(pipeline.UsageError, match=r"^output 'm.pt' names a torchscript file but format is 'onnx': "
                                                  r"pass format='torchscript', or name the file m.onnx$"):
        pipeline.export_model(head, "m.pt")
    with pytest.raises(pipeline.UsageError, match=r"^output 'p.json' names a json file but format is 'csv': give "
                                                  r"format='json', or an output named .csv$"):
        pipeline.predict_files(head, "data", output="p.json", format="csv")
    assert not (work / "m.pt").exists() and not (work / "p.json").exists()


def test_a_default_head_says_why_it_has_no_curves(cache):
    """fit-head's default head fits by CV: plot_curves said its history.json was missing (it never had one),
    and pipeline.plot_curves(head) said only 'no epochs to plot'."""
    head = pipeline.Head(val_fraction=0.25).fit(cache)
    assert not (Path(head.checkpoint_).parent / "history.json").exists()
    for plot in (head.plot_curves, lambda: pipeline.plot_curves(head)):
        with pytest.raises(ValueError, match=r"only heads trained by epochs have them \(head='linear'"):
            plot()


def test_plot_curves_names_what_a_history_lacks():
    """A list of dicts that is not a history.json was a bare KeyError: 'epoch' from inside the plotting loop."""
    with pytest.raises(ValueError, match=r"plot_curves: \{'acc': 0.9\} is not an epoch .* lacks epoch, train_acc"):
        pipeline.plot_curves([{"acc": 0.9}])
    row = {"epoch": 1, "train_acc": 0.5, "val_acc": 0.6, "train_loss": 0.7, "val_loss": 0.6}
    assert len(pipeline.plot_curves([row]).axes) == 2


def test_head_fits_arrays_of_features_as_it_fits_a_cache(cache):
    """The same rows as arrays (labels as names) give the same head as the cache file."""
    from_cache = pipeline.Head(head="logreg", val_fraction=0.25, runs_dir=str(cache.path.parent / "runs")).fit(cache)
    X = cache.read_features()
    y = np.asarray(cache.classes)[cache.labels]
    from_arrays = pipeline.Head(head="logreg", val_fraction=0.25).fit(X, y)
    assert list(from_arrays.classes_) == ["blue", "red"] and from_arrays.n_features_in_ == X[0].size
    assert from_arrays.metrics_["val_acc"] == from_cache.metrics_["val_acc"]
    np.testing.assert_allclose(from_arrays.predict_proba(X), from_cache.predict_proba(X), atol=1e-6)
    assert (from_arrays.predict(X) == y).mean() == from_arrays.score(X, y) == 1.0
    with pytest.raises(ValueError, match="X has 3 features, but Head is expecting 512 features"):
        from_arrays.predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="fitted on arrays of features"):
        from_arrays.save("h.pt")
    # learned state is plain attributes, set in one go by fit or load, the same names either way
    learned = {k for k in vars(from_cache) if k.endswith("_") and not k.startswith("_")}
    assert learned == {k for k in vars(from_arrays) if k.endswith("_") and not k.startswith("_")}
    assert {"classes_", "history_", "metrics_", "checkpoint_", "temperature_"} <= learned
    assert not hasattr(pipeline.Head, "__getattr__")


def test_pil_images_in_memory_meet_the_rules_of_files(head):
    """An empty PIL image was a ZeroDivisionError, and a 30000 x 1 one was resized to billions of pixels for a
    real backbone: in memory as from a file, they are refused with the reason (the good ones still predict)."""
    good = Image.new("RGB", (40, 40), (40, 60, 200))
    assert head.predict_proba([good]).shape == (1, 2)
    for bad, reason in [(Image.new("RGB", (0, 0)), "0 x 0 pixels: an empty image"),
                        (Image.new("RGB", (30000, 1)), "more than 100 times longer than wide")]:
        with pytest.raises(pipeline.UsageError, match=rf"1 of 2 images could not be read: <image 1> \(.*{reason}"):
            head.predict_proba([good, bad])


def test_a_pil_image_whose_file_was_closed_is_refused_with_the_reason(head, work):
    """``with Image.open(p) as im:`` over before predicting: Pillow's bare AssertionError (an empty message) came
    out of the resize; a PIL image cut short raised OSError. Each is its image's reason, as a file's would be."""
    photo = min((work / "data").rglob("*.jpg"))
    with Image.open(photo) as closed:
        pass
    with pytest.raises(pipeline.UsageError, match=r"<image 0> \(its file was closed before its pixels were read"):
        head.predict([closed])
    cut = work / "cut.png"
    Image.new("RGB", (40, 40), (40, 60, 200)).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(pipeline.UsageError, match=r"<image 0> \(unreadable image: "):
        head.predict([Image.open(cut)])
    with Image.open(photo) as im:
        assert head.predict([im]).tolist() == head.predict(photo).tolist()  # inside the block: as the file


def test_score_takes_labels_of_the_classes_and_refuses_others(cache):
    """score(X, y) compares with y in fit's own label space (numeric classes are labels, never indices), and a
    label that is no class, an index out of range or a y of the wrong length is an error, never a silent miss."""
    X = cache.read_features()
    names = np.asarray(cache.classes)[cache.labels]
    numbered = pipeline.Head(head="logreg", unknown_rows=0).fit(X, np.where(names == "blue", 3, 7))
    assert numbered.score(X, np.where(names == "blue", 3, 7)) == 1.0  # was an IndexError: 3 read as an index
    named = pipeline.Head(head="logreg", unknown_rows=0).fit(X, names)
    assert named.score(X, cache.labels) == named.score(X, names) == 1.0  # indices still work for named classes
    for y, message in [(names[:1], "one label per image"), (np.full(len(X), -1), "class index -1"),
                       (np.full(len(X), "purple"), "'purple', which is not one of the classes"),
                       (names[:, None], "one label per image")]:
        with pytest.raises(pipeline.UsageError, match=message):
            named.score(X, y)


def test_a_cache_reads_its_rows_through_the_one_reader(cache):
    """Cache.labels/paths/read_features come from FeatureCache (read_rows: any order, negative rows)."""
    from pipeline.cache.feature_cache import FeatureCache

    with FeatureCache(cache.path) as fc:
        everything = fc.read_rows()
        assert (cache.labels == fc.labels).all() and cache.paths == fc.paths
    np.testing.assert_array_equal(cache.read_features([2, 0, -1]), everything[[2, 0, len(cache) - 1]])
    np.testing.assert_array_equal(cache.features[:2], everything[:2])
    with pytest.raises(IndexError, match="row indices must be in"):
        cache.read_features([len(cache)])
    cache.close()


def test_a_boolean_mask_reads_its_true_rows_and_a_fraction_is_refused(cache):
    """read_features(cache.labels == 0) read rows 0 and 1 (the mask as numbers), one per row, and 2.7 read row 2."""
    everything = cache.read_features()
    mask = cache.labels == 0
    np.testing.assert_array_equal(cache.read_features(mask), everything[mask])
    with pytest.raises(IndexError, match="one value per row"):
        cache.read_features(mask[:3])
    with pytest.raises(IndexError, match="whole numbers"):
        cache.read_features([2.7])
    assert cache.read_features([]).shape == (0, *everything.shape[1:])
    for rows in (slice(2, 7), slice(None, None, -3), slice(-2, None)):  # was an IndexError ('got object')
        np.testing.assert_array_equal(cache.read_features(rows), everything[rows])
    cache.close()


# scikit-learn's own estimator checks, on a fast head (logistic regression on standardised rows: the
# l2 default would map the checks' 2-d toy points onto a circle). Every check runs and passes but two
# that skip themselves here: the array-API check (SCIPY_ARRAY_API unset) and the pandas one (no pandas).
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_scikit_learn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(pipeline.Head(head="logreg", normalize="standardize", val_fraction=0.2), on_fail=None)
    failed = {r["check_name"]: str(r["exception"])[:300] for r in results if r["status"] == "failed"}
    assert failed == {}
    assert sum(r["status"] == "passed" for r in results) >= 50


def test_score_on_a_copy_of_the_training_photos_warns_as_evaluate_model_does(work, head, caplog):
    """Model.score / Head.score of a folder ('as evaluate_model(data=...)') read 1.0 on a copy of the photos the
    model was trained on, nothing said, where evaluate_model warns; now the same warning; on other photos, none."""
    import shutil

    m = pipeline.train_model("data", backbone="tiny", weights="none", epochs=1, workers=0, batch_size=8,
                             print_every=0, precision="fp32", val_fraction=0.25)
    shutil.copytree(work / "data", work / "copy")
    make_image_folder(work / "fresh", per_class=3, seed=11)
    for model, seen in ((m, 18), (head, head.metrics_["train_rows"])):
        for folder, said in (("copy", True), ("fresh", False)):
            caplog.clear()
            with caplog.at_level("WARNING", logger="pipeline"):
                model.score(folder, workers=0)
            assert (f"{seen} images of {folder} have the same content as images the head was fitted on"
                    in caplog.text) == said, (model, folder, caplog.text)


def test_save_through_a_link_to_an_earlier_checkpoint_replaces_its_file_and_keeps_the_link(head, cache, work):
    """head.save(link), the link leading to an earlier checkpoint (current.pt -> v1/head.pt), replaced the link by a
    regular file and left v1/head.pt stale. Now written through, as every output is: the file gets the new head."""
    (work / "v1").mkdir()
    earlier = pipeline.Head(head="linear", epochs=1).fit(cache).save(work / "v1" / "head.pt")
    link = work / "current.pt"
    link.symlink_to(earlier)
    assert head.save(link) == link
    assert link.is_symlink() and pipeline.Head.load(earlier).epochs == 3 and os.listdir(work / "v1") == ["head.pt"]
