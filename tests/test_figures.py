"""Every picture is a PNG of the expected pixel size with something drawn in it, made headless."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import cli
from pipeline.runs import figures as plots
from tests.conftest import ROOT, SHARED_CATSDOGS, SHARED_WEIGHTS, make_image_folder


def assert_picture(path, size):
    """A PNG of ``size`` (width, height) pixels that is not one flat colour."""
    im = Image.open(path)
    assert im.format == "PNG"
    assert im.size == size
    assert np.asarray(im.convert("L"), np.float32).std() > 8


def run(*args):
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_preview_grid(tmp_path, image_folder):
    out = tmp_path / "p.png"
    result = run("preview", "--data", image_folder, "--backbone", "tiny", "--weights", "none", "--per-class", 3,
                 "--output", out, "--json")
    info = json.loads(result.stdout)
    assert info["classes"] == ["blue", "red"] and len(info["images"]) == 6
    assert_picture(out, (660, 540))  # 2 rows x 3 cells of 2.2 x 2.5 in (+ 0.4 in title) at 100 dpi
    pixels = np.asarray(Image.open(out).convert("RGB"), np.float32)
    top, bottom = pixels[60:280].reshape(-1, 3), pixels[320:520].reshape(-1, 3)
    assert top[:, 2].mean() > top[:, 0].mean() + 20  # the blue row is blue, the red row red:
    assert bottom[:, 0].mean() > bottom[:, 2].mean() + 20  # one row per class, in class order


def test_preview_gives_each_class_its_own_row_however_few_its_images(tmp_path):
    """A class with fewer images than --per-class used to let the next class wrap into its row."""
    data = make_image_folder(tmp_path / "data", per_class=2, classes=("blue", "green", "red"))
    for c in ("blue", "red"):
        (data / c / f"{c}.1.jpg").unlink()
    out = tmp_path / "p.png"
    run("preview", "--data", data, "--backbone", "tiny", "--weights", "none", "--per-class", 2, "--output", out)
    assert_picture(out, (440, 790))  # 3 rows (blue, green, red) x 2 cells, not 2 rows of 2 mixing the classes


def test_preview_of_a_folder_of_many_classes_draws_a_seeded_choice_of_them(tmp_path):
    """1000 classes made a figure of 1000 rows: minutes of drawing, then too tall to save."""
    MAX_PREVIEW_CLASSES = 50  # pipeline.reports.pictures.MAX_PREVIEW_CLASSES
    data = tmp_path / "data"
    for i in range(MAX_PREVIEW_CLASSES + 10):
        (data / f"c{i:03d}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (4 * i, 90, 200)).save(data / f"c{i:03d}" / "a.png")
    out = tmp_path / "p.png"
    result = run("preview", "--data", data, "--backbone", "tiny", "--weights", "none", "--per-class", 1,
                 "--output", out, "--json")
    info = json.loads(result.stdout)
    assert len(info["images"]) == MAX_PREVIEW_CLASSES and len(info["classes"]) == MAX_PREVIEW_CLASSES + 10
    assert f"has {MAX_PREVIEW_CLASSES + 10} classes; the preview shows {MAX_PREVIEW_CLASSES}" in result.stderr
    assert Image.open(out).size == (440, 250 * MAX_PREVIEW_CLASSES + 40)


def test_preview_of_a_folder_of_broken_files_is_refused_not_drawn_empty(tmp_path):
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        (data / c / "x.jpg").write_bytes(b"not an image")
    error = _usage_error("preview", "--data", data, "--backbone", "tiny", "--weights", "none",
                         "--output", tmp_path / "p.png")
    assert f"no image in {data} could be decoded (2 tried)" in error and not (tmp_path / "p.png").exists()


def test_feature_map(tmp_path, image_folder):
    out = tmp_path / "fm.png"
    result = run("feature-map", image_folder / "red" / "red.0.jpg", "--backbone", "tiny", "--weights", "none",
                 "--top-k", 4, "--output", out, "--json")
    info = json.loads(result.stdout)
    assert info["feature_shape"] == [8, 8, 8] and len(info["top_channels"]) == 4
    assert_picture(out, (1500, 600))


def test_feature_map_titles_never_overlap_at_the_most_channels():
    """--top-k 32 used to squeeze 16 overlays a row into the fixed-size figure: their titles ran into each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmap = np.random.default_rng(0).random((64, 7, 7)).astype(np.float32) * 100
    fig = plots.feature_map_figure(np.zeros((224, 224, 3)), fmap, top_k=32)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title().startswith("#")]
    assert len(boxes) == 32
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_fit_head_writes_curves(tmp_path, tiny_cache):
    result = run("fit-head", "--cache", tiny_cache, "--head", "linear", "--epochs", 3, "--runs-dir", tmp_path / "runs",
                 "--json")
    curves = Path(json.loads(result.stdout)["curves"])
    assert curves == Path(json.loads(result.stdout)["checkpoint"]).with_name("curves.png")
    assert_picture(curves, (1000, 400))


def test_confusion_and_gallery(tmp_path):
    cm = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 3]])
    assert_picture(plots.save(plots.confusion_matrix_figure(cm, ["a", "b", "c"]), tmp_path / "cm.png"), (500, 400))
    rng = np.random.default_rng(0)
    items = [{"image": Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),
              "path": f"some/long/folder/name/img{i}.jpg", "true": "a", "pred": "b", "prob": 0.9} for i in range(5)]
    items[2]["image"] = None  # an image that can no longer be read still gets its cell
    assert_picture(plots.save(plots.gallery_figure(items, cols=4), tmp_path / "g.png"), (1120, 680))  # 2 rows x 4 cells
    assert_picture(plots.save(plots.gallery_figure([]), tmp_path / "none.png"), (560, 150))


def test_denormalise_undoes_caffe_style_normalisation():
    from torchvision.transforms._presets import ImageClassification

    mean, std = [0.485, 0.458, 0.408], [1 / 255] * 3  # the shared VGG-16 weights' sidecar
    t = ImageClassification(crop_size=8, resize_size=8, mean=mean, std=std)
    x = t(Image.new("RGB", (8, 8), (200, 30, 90)))
    assert x.abs().max() > 50  # normalised values are in pixel units
    np.testing.assert_allclose(plots.denormalise(x.numpy(), mean, std)[0, 0] * 255, [200, 30, 90], atol=1)


def test_headless_backend_is_forced(tmp_path):
    env = {**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": ""}
    code = "import pipeline.runs.figures, matplotlib; print(matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "agg"


@pytest.mark.slow
def test_real_feature_map_is_512_by_49(tmp_path, shared_available):
    out = tmp_path / "fm.png"
    result = run("feature-map", SHARED_CATSDOGS / "Dog" / "dog.1.jpg", "--weights", SHARED_WEIGHTS,
                 "--output", out, "--json")
    assert json.loads(result.stdout)["feature_shape"] == [512, 7, 7]
    assert_picture(out, (1500, 600))


def test_preview_needs_the_preprocessing_only_never_the_weights(tmp_path, image_folder, monkeypatch):
    """VGG-16's DEFAULT weights (528 MB) are neither downloaded nor loaded: their enum has the transforms."""
    from pipeline.extraction import backbones as bb
    def refuse(*a, **k):
        raise AssertionError("preview loaded weights")

    monkeypatch.setattr(bb, "_download_state_dict", refuse)
    monkeypatch.setattr(bb, "_load_local", refuse)
    out = tmp_path / "p.png"
    info = json.loads(run("preview", "--data", image_folder, "--per-class", 2, "--output", out, "--json").stdout)
    assert info["weights"] == "VGG16_Weights.IMAGENET1K_V1" and out.is_file()


def _usage_error(*args):
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return result.output


def test_pictures_never_write_over_an_input_or_inside_the_data_folder(tmp_path, image_folder):
    photo = image_folder / "red" / "red.0.jpg"
    before = photo.read_bytes()
    tiny = ("--backbone", "tiny", "--weights", "none")
    assert "one of the inputs" in _usage_error("feature-map", photo, *tiny, "--output", photo)
    # a new name inside the data folder is refused too: it would join the training set
    assert "inside the data folder" in _usage_error("preview", "--data", image_folder, *tiny,
                                                    "--output", image_folder / "red" / "x.png")
    assert photo.read_bytes() == before and not (image_folder / "red" / "x.png").exists()


def test_feature_map_never_writes_beside_its_image(tmp_path, image_folder):
    """The image's folder is a photo folder: the picture used to land among its photos (and join a class)."""
    photo = image_folder / "red" / "red.0.jpg"
    before = sorted((image_folder / "red").iterdir())
    error = _usage_error("feature-map", photo, "--backbone", "tiny", "--weights", "none",
                         "--output", image_folder / "red" / "fm.png")
    assert "--output" in error and "the folder of IMAGE" in error
    assert sorted((image_folder / "red").iterdir()) == before


def test_picture_options_out_of_range_are_usage_errors(tmp_path, image_folder):
    tiny = ("--backbone", "tiny", "--weights", "none")
    assert "--seed" in _usage_error("preview", "--data", image_folder, *tiny, "--seed", -1,
                                    "--output", tmp_path / "p.png")
    assert ".png" in _usage_error("preview", "--data", image_folder, *tiny, "--output", tmp_path / "x.txt")
    assert "--per-class must be between 1 and 32, got 300" in _usage_error(
        "preview", "--data", image_folder, *tiny, "--per-class", 300, "--output", tmp_path / "p.png")
    assert ".png" in _usage_error("feature-map", image_folder / "red" / "red.0.jpg", *tiny,
                                  "--output", tmp_path / "head.pt")


def test_figures_are_saved_through_a_temporary_name(tmp_path):
    fig = plots.curves_figure([{"epoch": 1, "train_acc": .5, "val_acc": .5, "train_loss": 1, "val_loss": 1}])
    out = tmp_path / "c.png"
    out.write_bytes(b"old")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    fig.savefig = fail
    with pytest.raises(Exception, match="no space left"):
        plots.save(fig, out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]


def test_default_picture_never_replaces_an_earlier_one(tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        run("preview", "--data", image_folder, "--backbone", "tiny", "--weights", "none", "--per-class", 1)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["preview-2.png", "preview.png"]


def test_top_k_is_capped_and_the_cap_is_in_the_help(tmp_path, image_folder):
    assert "1 to 32" in run("feature-map", "--help").stdout
    assert "between 1 and 32" in _usage_error("feature-map", image_folder / "red" / "red.0.jpg", "--backbone", "tiny",
                                              "--weights", "none", "--top-k", 512, "--output", tmp_path / "f.png")


def test_reliability_figure_draws_both_curves_and_the_rows_per_bin():
    import numpy as np

    from pipeline.heads.calibration import reliability_bins, with_temperature
    from pipeline.runs.figures import reliability_figure

    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet([0.3, 0.3, 0.3], 200))
    y = rng.integers(0, 3, 200)
    fig = reliability_figure(reliability_bins(logp, y), reliability_bins(with_temperature(logp, 2.0), y), 0.3, 0.1,
                             2.0)
    top, bars = fig.axes
    assert len(top.collections) == 2 and "T = 2.00 (ECE 0.100)" in [t.get_text() for t in top.get_legend().texts]
    assert sum(p.get_height() for p in bars.patches) == 400  # both histograms, every row once


def test_preview_and_feature_map_say_an_animated_picture_was_drawn_from_its_first_frame(tmp_path):
    """preview's grid and feature-map drew an animated GIF (or a multi-page TIFF) from its first frame without a
    word; now the one warning extract and predict give names it."""
    from tests.test_image_reader import several_frames

    data = make_image_folder(tmp_path / "data", per_class=1)
    several_frames(data / "red" / "anim.gif", "GIF", 4)
    (data / "red" / "red.0.jpg").unlink()  # the grid's one red picture is the GIF
    tiny = ["--backbone", "tiny", "--weights", "none"]
    shown = run("preview", "--data", data, *tiny, "--per-class", 1, "--output", tmp_path / "p.png")
    drawn = run("feature-map", data / "red" / "anim.gif", *tiny, "--top-k", 2, "--output", tmp_path / "m.png")
    for result in (shown, drawn):
        assert "1 file holds more than one frame" in result.stderr and ": 4 frames)" in result.stderr, result.stderr
