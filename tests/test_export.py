"""export: every head kind and a whole model as ONNX / TorchScript, the metadata, the parity check, its failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import pipeline
from pipeline import cli
from pipeline.models.predict import PredictConfig, predict
from pipeline.models.whole_models import build_model, save_model
from pipeline.serving import export as export_mod
from tests.conftest import ROOT, make_image_folder
from tests.live_server import make_tiny_head

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar", "ignore:`torch.jit")
onnx_ok = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("heads")
    return {kind: make_tiny_head(root / kind, head=kind) for kind in ("linear", "kernel", "svm", "auto")}


def example_rows(model: Path, photos) -> list[dict]:
    """examples/predict_onnx.py's rows: another program, with only the file, its metadata, onnxruntime and Pillow."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_onnx.py"), str(model), *map(str, photos)],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_the_onnx_example_answers_help_and_a_missing_photo_without_onnxruntime_tracebacks():
    """examples/predict_onnx.py --help was taken for the model's path: an onnxruntime traceback."""
    script = str(ROOT / "examples" / "predict_onnx.py")
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "onnxruntime, numpy and Pillow only" in helped.stdout
    bare = subprocess.run([sys.executable, script, "model.onnx"], capture_output=True, text=True)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: ") and "Traceback" not in bare.stderr
    for model in ("missing.onnx", script):  # no file; a file that is no ONNX (a .pt or .json passed by mistake)
        got = subprocess.run([sys.executable, script, model, "photo.jpg"], capture_output=True, text=True)
        assert got.returncode == 1 and got.stderr.startswith(f"{model}: not an ONNX file onnxruntime can load: ")
        assert "Traceback" not in got.stderr and len(got.stderr.splitlines()) == 1, got.stderr


@pytest.mark.parametrize("kind", ["linear", "kernel", "svm", "auto"])  # auto: the stack, with coupled pairs
def test_an_onnx_export_predicts_as_predict_does(heads, kind, tmp_path):
    head = heads[kind]
    if kind == "auto":  # the default head on three classes: SVC's own pairs coupled in the exported graph
        assert torch.load(head, weights_only=True)["head"]["pairs"]
    out = tmp_path / f"{kind}.onnx"
    result = pipeline.export_model(head, out)
    assert isinstance(result, export_mod.ExportResult) and result.passed and result.max_abs_diff < 1e-4
    assert result.parity["same_class"] == 16 + len(export_mod.ODD_MODES)  # the odd modes made from a photo
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["backbone"] == "tiny"
    assert meta["preprocessing"]["crop_size"] == 32 and meta["input"]["shape"] == ["N", 3, 32, 32]
    loaded = pipeline.Head.load(head)
    assert len(meta["cache_fingerprint"]) == 64 and meta["unknown_threshold"] == loaded.unknown_threshold_
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "unknown_score"]
    assert meta["temperature"] == loaded.temperature_ and result.parity["max_abs_diff_unknown"] < 1e-4
    assert meta["parity"]["max_abs_diff"] == result.max_abs_diff
    # another program with only the file and its metadata: the same classes and probabilities as predict
    photos = sorted((head.parents[2] / "data").rglob("*.jpg"))[::2]
    want = predict(PredictConfig(paths=[str(p) for p in photos], model=str(head), workers=0, precision="fp32"))
    got = example_rows(out, photos)
    assert [r["class"] for r in got] == [r["class"] for r in want.rows]
    assert np.abs(np.subtract([r["probability"] for r in got], [r["probability"] for r in want.rows])).max() < 1e-4
    assert [r["unknown"] for r in got] == [r["unknown"] for r in want.rows]  # the unknown score travels too
    assert np.abs(np.subtract([r["ood_score"] for r in got], [r["ood_score"] for r in want.rows])).max() < 1e-4
    import onnx

    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == meta["classes"]
    opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]  # which runtimes can run it
    assert opset == [meta["opset"]] == [json.loads(props["opset"])] and meta["opset"] >= 17
    assert json.loads(props["preprocessing"]) == meta["preprocessing"]


def odd_photos(folder: Path, photo: Path) -> list[Path]:
    """A photo as every mode where a decoder can differ from predict's, and a large JPEG with detail."""
    from tests.test_image_reader import photo_like

    folder.mkdir()
    files = [Path(f) for f in export_mod.odd_mode_files(str(photo), folder, None)]  # None: a 1024 x 768 JPEG
    Image.fromarray(photo_like(1200, 900)).save(folder / "detailed.jpg", quality=90)  # decoded reduced by predict
    Image.fromarray(photo_like(300, 200)).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.gif")
    return files + [folder / "detailed.jpg", folder / "palette.gif"]


def test_the_example_follows_the_decoding_rule_on_odd_modes(heads, tmp_path):
    """16-bit gray, gray + alpha, RGBA, a palette with transparency, CMYK, large JPEGs: the example's probabilities
    are predict's (it once composited alpha over black, clipped 16-bit gray and decoded large JPEGs in full)."""
    head = heads["linear"]
    out = tmp_path / "odd.onnx"
    assert pipeline.export_model(head, out).passed
    photos = odd_photos(tmp_path / "odd", min((head.parents[2] / "data").rglob("*.jpg")))
    assert {Image.open(p).mode for p in photos} >= {"I;16", "LA", "RGBA", "P", "CMYK", "F"}
    assert any(Image.open(p).getexif().get(0x0112) == 6 for p in photos)  # a photo stored sideways
    want = predict(PredictConfig(paths=[str(p) for p in photos], model=str(head), workers=0, precision="fp32")).rows
    got = example_rows(out, photos)
    assert [r["class"] for r in got] == [r["class"] for r in want]
    assert np.abs(np.subtract([r["probability"] for r in got], [r["probability"] for r in want])).max() < 1e-4
    assert np.abs(np.subtract([r["ood_score"] for r in got], [r["ood_score"] for r in want])).max() < 1e-4


def test_the_example_gives_an_unreadable_file_its_reason_and_classifies_the_rest(heads, tmp_path):
    """A zero-byte photo and a text file among good photos: before, the example died with a traceback on the
    first of them and printed nothing of their batch; now their rows say why, the others are predict's. The text
    file's reason is predict's words (it was Pillow's 'UnidentifiedImageError: cannot identify image file'), and
    the empty one's too (it was 'not an image' where predict said 'zero-byte file')."""
    head = heads["linear"]
    out = tmp_path / "m.onnx"
    assert pipeline.export_model(head, out).passed
    good = sorted((head.parents[2] / "data").rglob("*.jpg"))[:2]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a photo")
    photos = [good[0], tmp_path / "empty.jpg", tmp_path / "notes.jpg", good[1]]
    got = example_rows(out, photos)
    want = predict(PredictConfig(paths=[str(p) for p in good], model=str(head), workers=0, precision="fp32")).rows
    assert [r["path"] for r in got] == list(map(str, photos))
    assert [r["class"] for r in got] == [want[0]["class"], None, None, want[1]["class"]]
    said = predict(PredictConfig(paths=[str(tmp_path / n) for n in ("empty.jpg", "notes.jpg")], model=str(head),
                                 workers=0)).rows
    assert got[2]["error"] == said[1]["error"] == "not an image (unidentified format)"
    assert got[1]["error"] == said[0]["error"] == "zero-byte file"  # the example said 'not an image'
    assert abs(got[3]["probability"] - want[1]["probability"]) < 1e-4


def damaged(kind: str) -> bytes:
    """A file Pillow raises on with other than OSError/ValueError: a DDS header with no pixel format
    (NotImplementedError), a SPIDER image of no stack (AttributeError, while opening), an AVIF without its
    primary item (RuntimeError)."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("F" if kind == "SPIDER" else "RGB", (16, 16)).save(buf, kind)
    data = bytearray(buf.getvalue())
    if kind == "DDS":
        data[80:84] = bytes(4)  # the pixel format's flags: none
    elif kind == "SPIDER":
        data[104:108] = struct.pack("<f", 1.0)  # the header's image number: 1, in no stack
    else:
        at = data.find(b"pitm") + 8
        data[at:at + 2] = b"\x00\x63"  # the primary item: one the file does not hold
    return bytes(data)


@pytest.mark.parametrize("kind, error", [("DDS", "unreadable image: Unknown pixel format"),
                                         ("SPIDER", "unreadable image: "), ("AVIF", "unreadable image: ")])
def test_the_example_gives_a_damaged_file_its_reason_and_classifies_the_rest(tmp_path, kind, error):
    """The example died on each with a traceback, printing no row of its batch."""
    from PIL import features

    from tests.live_server import make_tiny_head

    if kind == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow decodes no AVIF")
    head = make_tiny_head(tmp_path / "made")
    out = tmp_path / "m.onnx"
    assert pipeline.export_model(head, out).passed
    (tmp_path / "damaged.jpg").write_bytes(damaged(kind))
    good = sorted((head.parents[2] / "data").rglob("*.jpg"))[0]
    got = example_rows(out, [tmp_path / "damaged.jpg", good])
    assert got[0]["class"] is None and got[0]["error"].startswith(error)
    assert got[1]["class"] and "error" not in got[1]
    said = predict(PredictConfig(paths=[str(tmp_path / "damaged.jpg")], model=str(head), workers=0)).rows[0]["error"]
    assert got[0]["error"] == said  # predict's words


def test_a_tiff_pillow_fails_on_with_a_type_error_gets_the_same_reason_in_predict_and_the_example(heads, tmp_path):
    """Strip offsets stored as fractions: Pillow's TypeError ended predict's whole run ('unexpected TypeError ... a
    bug?') and the example's with a traceback; now it is the file's row, in the same words."""
    from tests.badfiles import fraction_strips_tiff

    out = tmp_path / "m.onnx"
    assert pipeline.export_model(heads["linear"], out).passed
    (tmp_path / "bad.tif").write_bytes(fraction_strips_tiff())
    good = min((heads["linear"].parents[2] / "data").rglob("*.jpg"))
    want = predict(PredictConfig(paths=[str(tmp_path / "bad.tif"), str(good)], model=str(heads["linear"]),
                                 workers=0, precision="fp32")).rows
    got = example_rows(out, [tmp_path / "bad.tif", good])
    assert want[0]["error"].startswith("unreadable image: ") and got[0]["error"] == want[0]["error"]
    assert got[1]["class"] == want[1]["class"]


def test_the_example_never_runs_ghostscript_on_a_photo(tmp_path):
    """An EPS file (PostScript: a program, which may never end) named .jpg: Pillow decodes it by running
    Ghostscript, which the example did when one was installed; now its row says it is not decoded."""
    from tests.live_server import make_tiny_head

    head = make_tiny_head(tmp_path / "made")
    out = tmp_path / "m.onnx"
    assert pipeline.export_model(head, out).passed
    ran = tmp_path / "gs-ran"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gs").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (tmp_path / "bin" / "gs").chmod(0o755)
    (tmp_path / "photo.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    got = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_onnx.py"), str(out),
                          str(tmp_path / "photo.jpg")], capture_output=True, text=True, check=True, env=env)
    row = json.loads(got.stdout.splitlines()[0])
    assert row["class"] is None and "EPS is not decoded" in row["error"] and not ran.exists()


def test_the_example_refuses_a_photo_too_thin_to_resize_as_predict_does(heads, tmp_path):
    """A 1 x 20000 PNG (161 bytes): predict refuses it from its header, the example resized it (at a resize size
    of 256, a 256 x 5,120,000 image: 5.2 GB and 14 s) and gave it a class."""
    out = tmp_path / "m.onnx"
    assert pipeline.export_model(heads["linear"], out).passed
    Image.new("RGB", (1, 20000), (0, 0, 255)).save(tmp_path / "thin.png")
    got = example_rows(out, [tmp_path / "thin.png"])[0]
    said = predict(PredictConfig(paths=[str(tmp_path / "thin.png")], model=str(heads["linear"]), workers=0)).rows[0]
    assert got["class"] is None and got["error"] == said["error"] == (
        "1 x 20000 pixels: more than 100 times longer than wide, its resize would build a huge image")


def test_the_example_refuses_a_photo_past_pillows_pixel_limit_as_predict_does(heads, tmp_path):
    """Between Pillow's limit and twice it, Pillow only warns: the example decoded a 10000 x 10000 PNG of 120 KB
    (0.55 GB) and gave it a class, where predict says it is a decompression bomb."""
    from tests.badfiles import bomb_png

    out = tmp_path / "m.onnx"
    assert pipeline.export_model(heads["linear"], out).passed
    (tmp_path / "bomb.png").write_bytes(bomb_png(10000, 10000))  # 1e8 pixels: past the limit, under twice it
    got = example_rows(out, [tmp_path / "bomb.png"])[0]
    said = predict(PredictConfig(paths=[str(tmp_path / "bomb.png")], model=str(heads["linear"]), workers=0)).rows[0]
    assert got["class"] is None and got["error"] == said["error"] and said["error"].startswith("decompression bomb")


def test_the_example_holds_the_decoding_rule_verbatim():
    """One rule: the example's decoding is data/portable.py's text below its marker, character for character."""
    from pipeline.data import portable

    source = Path(portable.__file__).read_text()
    marker = next(line for line in source.splitlines(keepends=True) if line.startswith("# ---- the decoding rule:"))
    assert source.split(marker)[1] in (ROOT / "examples" / "predict_onnx.py").read_text().split(marker)[1]


def test_the_rule_reads_an_open_file_as_pillow_does(tmp_path):
    """A BytesIO just written to (left at its end) and a stream that cannot seek (a pipe, a request's body) were
    refused by refuse_empty ('zero-byte file'; io.UnsupportedOperation) where Image.open reads both whole: each
    gives the path's tensor, and an empty stream is still a zero-byte file."""
    import io

    from pipeline.data import portable

    p = {"resize_size": 40, "crop_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    Image.new("RGB", (48, 40), (200, 30, 90)).save(tmp_path / "a.png")
    want = portable.preprocess(str(tmp_path / "a.png"), p, {})
    written = io.BytesIO()
    Image.open(tmp_path / "a.png").save(written, "PNG")  # left at its end, as after any save

    class NoSeek(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.data.readinto(b)

    stream = io.BufferedReader(NoSeek((tmp_path / "a.png").read_bytes()))
    for fp in (written, stream, str(tmp_path / "a.png").encode()):
        assert np.array_equal(portable.preprocess(fp, p, {}), want)
    with pytest.raises(portable.Refused, match="zero-byte file"):
        portable.preprocess(io.BufferedReader(NoSeek(b"")), p, {})


def test_the_rule_refuses_a_path_that_is_no_file_as_what_it_is(tmp_path):
    """A named pipe given to the rule (examples/predict_onnx.py photos/*, export's parity photos) was refused as a
    'zero-byte file' (its size is 0; a FIFO is no empty photo), a folder as Pillow's 'Is a directory': each is now
    'not a regular file (a named pipe)' as predict says, and the pipe is never opened (that would block forever)."""
    import os
    import signal

    from pipeline.data import portable

    p = {"resize_size": 40, "crop_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    os.mkfifo(tmp_path / "pipe.jpg")
    signal.alarm(20)  # an open of the pipe would block: fail instead of hanging
    try:
        for name, what in (("pipe.jpg", "a named pipe"), (".", "a folder")):
            with pytest.raises(portable.Refused) as e:
                portable.preprocess(str(tmp_path / name), p, {})
            assert str(e.value) == f"not a regular file ({what})"
            assert portable.decode_failure(e.value) == str(e.value)
    finally:
        signal.alarm(0)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(portable.Refused, match="^zero-byte file$"):
        portable.preprocess(tmp_path / "empty.jpg", p, {})



def test_the_rule_names_a_format_it_does_not_decode_in_predicts_words(tmp_path):
    """An iPhone's HEIC photo named .jpg was 'not an image (unidentified format)' in the example as in predict; both
    now name it, in the same words, from a path and from an open file."""
    import io

    from pipeline.data import portable
    from pipeline.data.folders import ImageLoadError, load_rgb
    from tests.badfiles import HEIC_HEAD, JXL_HEAD, gray16_alpha_tiff

    p = {"resize_size": 40, "crop_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    for data in (HEIC_HEAD, JXL_HEAD, gray16_alpha_tiff(), b"plain text, no image"):
        (tmp_path / "a.jpg").write_bytes(data)
        with pytest.raises(ImageLoadError) as said:
            load_rgb(tmp_path / "a.jpg")
        for fp in (str(tmp_path / "a.jpg"), io.BytesIO(data)):
            with pytest.raises(portable.Refused) as e:
                portable.preprocess(fp, p, {})
            assert portable.decode_failure(e.value) == said.value.reason
    assert said.value.reason == "not an image (unidentified format)"


def test_the_parity_check_decodes_each_photo_from_its_bytes_by_the_rule(heads, tmp_path, monkeypatch):
    """A decoder that drops alpha (as the example once did) fails the check: it no longer feeds both sides the
    same tensors; the metadata says the rule's parameters."""
    from pipeline.data import portable

    out = tmp_path / "rule.onnx"
    good = pipeline.export_model(heads["linear"], out)
    assert good.parity["odd_modes"] == list(export_mod.ODD_MODES)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["decoding"]["jpeg_draft_min_short_side"] == 2 * meta["preprocessing"]["resize_size"]
    assert "portable.py" in meta["decoding"]["rule"]
    monkeypatch.setattr(portable, "to_rgb", lambda im: im.convert("RGB"))
    bad = pipeline.export_model(heads["linear"], tmp_path / "drops_alpha.onnx")
    assert not bad.passed and bad.max_abs_diff > 1e-4 and not (tmp_path / "drops_alpha.onnx").exists()


def test_a_torchscript_export_of_a_whole_model(tmp_path, image_folder):
    torch.manual_seed(0)
    lm = build_model("tiny_bn", "none", ["blue", "red"])
    model = tmp_path / "model.pt"
    save_model(lm, model, "train", {"data": str(image_folder)}, {}, [])
    out = tmp_path / "model.ts"
    r = CliRunner().invoke(cli.cli, ["export", "--model", str(model), "--format", "torchscript",
                                     "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["passed"] and result["parity"]["images"] == 16  # spread over the training folder
    extra = {export_mod.TORCHSCRIPT_KEY: ""}
    net = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[export_mod.TORCHSCRIPT_KEY])["classes"] == ["blue", "red"]
    x = torch.randn(5, 3, 32, 32)  # another batch size than the one traced
    with torch.no_grad():
        assert torch.allclose(net(x), torch.exp(lm.model.eval()(x)), atol=1e-5)
    inside = image_folder / "blue" / "model.ts"  # the parity check's default photos are the model's own
    r = CliRunner().invoke(cli.cli, ["export", "--model", str(model), "--format", "torchscript",
                                     "--output", str(inside)])
    assert r.exit_code == 2 and "inside the data folder" in r.output and "the model's training photos" in r.output
    assert not inside.exists()


def test_a_flip_head_exports_with_its_mirror_mean(tmp_path, make_cache):
    data = make_image_folder(tmp_path / "data", per_class=6)
    cache = make_cache(data, dtype="float32", flip=True).cache
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    head = fit_head(FitHeadConfig(head="logreg", cache=cache, runs_dir=str(tmp_path / "runs"))).checkpoint
    result = pipeline.export_model(head, tmp_path / "flip.onnx", check_data=data)
    assert result.passed and json.loads((tmp_path / "flip.onnx.json").read_text())["flip"] is True


def test_a_failed_parity_check_writes_nothing_and_exits_1(heads, tmp_path, monkeypatch):
    real = export_mod.ExportedRunner.__call__

    def drifted(self, x):
        probabilities, unknown = real(self, x)
        return probabilities * 0.9, unknown

    monkeypatch.setattr(export_mod.ExportedRunner, "__call__", drifted)
    out = tmp_path / "drift.onnx"
    r = CliRunner().invoke(cli.cli, ["export", "--model", str(heads["linear"]), "--output", str(out), "--json"])
    assert r.exit_code == 1
    result = json.loads(r.stdout)
    assert not result["passed"] and result["max_abs_diff"] > 1e-2 and result["output"] is None and "bytes" not in result
    assert list(tmp_path.iterdir()) == []


def test_check_data_and_usage_errors(heads, tmp_path):
    head = heads["linear"]
    photos = make_image_folder(tmp_path / "other", per_class=3)
    r = pipeline.export_model(head, tmp_path / "a.onnx", check_data=photos, check_n=0)
    assert r.parity["images"] == 6
    runner = CliRunner()
    for args, message in [
        (["--output", str(tmp_path / "b.onnx"), "--tolerance", "0"], "--tolerance must be positive"),
        (["--output", str(head), "--format", "torchscript"], "is one of the inputs"),
        (["--output", str(photos / "blue" / "x.onnx"), "--check-data", str(photos)], "inside"),
        # it takes a file too: 'give a folder' said otherwise
        (["--output", str(tmp_path / "b.onnx"), "--check-data", ""], "'' is an empty name; give a file or folder"),
    ]:
        r = runner.invoke(cli.cli, ["export", "--model", str(head), *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    with pytest.raises(ValueError, match="check_data '' is an empty name; give a file or folder, or leave"):
        pipeline.export_model(head, tmp_path / "c.onnx", check_data="")


def files_below(root: Path) -> dict:
    """Every file below ``root`` -> its bytes: what a refused command must leave as it was."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_output_replaces_a_photo_the_cache_or_the_weights_sidecar_of_the_head(tmp_path):
    """Issue 31 row 1: a TorchScript export over a training photo, over the head's cache, or with its
    metadata over the weights' sidecar exited 0; each is now refused (exit 2) and nothing changes."""
    from pipeline.extraction import backbones as bb
    from pipeline.extraction.extract import ExtractConfig, extract
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    data = make_image_folder(tmp_path / "d", per_class=4, classes=("blue", "green", "red"))
    weights = tmp_path / "W" / "r18.pt"
    weights.parent.mkdir()
    torch.save(bb.load_backbone("tiny", "none").model.state_dict(), weights)
    weights.with_suffix(".json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    cache = extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights=str(weights), workers=0,
                                  cache_dir=str(tmp_path / "f"))).cache
    head = fit_head(FitHeadConfig(head="linear", cache=cache, epochs=1, runs_dir=str(tmp_path / "r"))).checkpoint
    before = files_below(tmp_path)
    for output, extra, why in [
        (data / "blue" / "blue.0.jpg", [], "is inside the data folder"),
        (data / "green" / "new.ts", [], "is inside the data folder"),
        (cache, [], "is one of the inputs (the model's cache"),
        (weights.with_suffix(""), [], "is one of the inputs (the sidecar of the weights"),  # its r18.json
        (weights.with_suffix(""), ["--weights", str(weights)], "is one of the inputs (the sidecar of the weights"),
        (weights, [], "is one of the inputs (the backbone weights"),
    ]:
        r = CliRunner().invoke(cli.cli, ["export", "--model", head, "--format", "torchscript", "--output",
                                         str(output), *extra])
        assert r.exit_code == 2 and why in r.output and str(output) in r.output, (output, r.output)
    assert files_below(tmp_path) == before


def test_no_reachable_photos_asks_for_check_data(heads, tmp_path):
    import shutil

    lonely = tmp_path / "head.pt"
    shutil.copy(heads["linear"], lonely)
    ckpt = torch.load(lonely, weights_only=True)
    ckpt["cache"] = str(tmp_path / "gone.h5")
    torch.save(ckpt, lonely)
    with pytest.raises(ValueError, match="pass check_data=DIR$"):
        pipeline.export_model(lonely, tmp_path / "x.onnx")


def test_a_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(pipeline.PipelineError, match=r"needs onnxruntime \(runs the parity check\): pip install"):
        export_mod.require("onnx")


@pytest.mark.slow
def test_a_real_vgg16_head_exports_with_parity(shared_available, make_cache, tmp_path):
    """The README's case on a small scale: VGG-16 features of catsdogs photos, the default head, parity on test
    photos."""
    from pipeline.heads.fit_head import FitHeadConfig, fit_head
    from tests.conftest import SHARED, SHARED_CATSDOGS, SHARED_WEIGHTS

    cache = make_cache(SHARED_CATSDOGS, n=40, backbone="vgg16", weights=str(SHARED_WEIGHTS), workers=2).cache
    head = fit_head(FitHeadConfig(cache=cache, runs_dir=str(tmp_path / "runs"))).checkpoint
    result = pipeline.export_model(head, tmp_path / "catsdogs.onnx", check_data=SHARED / "data" / "catsdogs_test",
                                   check_n=8)
    assert result.passed and result.parity["same_class"] == 8 + len(export_mod.ODD_MODES)
    assert result.max_abs_diff < 1e-4, result.parity


def test_an_output_named_for_the_other_format_is_refused(tmp_path, image_folder):
    lm = build_model("tiny_bn", "none", ["blue", "red"])
    model = tmp_path / "model.pt"
    save_model(lm, model, "train", {"data": str(image_folder)}, {}, [])
    for fmt, name, other in [("torchscript", "new/Model.ONNX", "an onnx"), ("onnx", "new/model.ts", "a torchscript")]:
        r = CliRunner().invoke(cli.cli, ["export", "--model", str(model), "--format", fmt,
                                         "--output", str(tmp_path / name)])
        assert r.exit_code == 2 and f"names {other} file but --format is {fmt!r}" in r.output, r.output
        assert not (tmp_path / "new").exists()  # not even its folder


@pytest.fixture(scope="module")
def two_exports(heads, tmp_path_factory) -> tuple:
    """Two ONNX exports (the linear head's, the svm head's) and a photo."""
    root = tmp_path_factory.mktemp("two")
    first, second = root / "a.onnx", root / "b.onnx"
    assert pipeline.export_model(heads["linear"], first).passed and pipeline.export_model(heads["svm"], second).passed
    return first, second, min((heads["linear"].parents[2] / "data").rglob("*.jpg"))


def swapped(first: Path, second: Path, folder: Path) -> Path:
    """A copy of ``first`` in ``folder`` with ``second``'s sidecar beside it: what two exports to one --output, or
    one stopped between the file and its .json, left."""
    import shutil

    model = Path(shutil.copy(first, folder / first.name))
    shutil.copy(f"{second}.json", f"{model}.json")
    return model


def test_the_example_refuses_a_sidecar_from_another_export(two_exports, tmp_path):
    """examples/predict_onnx.py read the .json beside the file and used another model's classes silently; it now
    reads the metadata inside the file and refuses, in one line, a sidecar whose export_id differs."""
    first, second, photo = two_exports
    before = example_rows(first, [photo])
    model = swapped(first, second, tmp_path)
    got = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_onnx.py"), str(model), str(photo)],
                         capture_output=True, text=True)
    assert got.returncode == 1 and got.stdout == "" and len(got.stderr.splitlines()) == 1, got
    assert f"{model}.json is not the metadata of {model}" in got.stderr and "export the model again" in got.stderr
    os.remove(f"{model}.json")  # no sidecar: the metadata inside the file is enough
    assert example_rows(model, [photo]) == before


def test_the_pipeline_refuses_a_sidecar_from_another_export(two_exports, tmp_path):
    """read_metadata: the metadata inside the file with the sidecar's parity check, never another export's."""
    first, second, _ = two_exports
    meta = pipeline.exported_metadata(first)  # the API's name for it
    assert meta["export_id"] == json.loads(Path(f"{first}.json").read_text())["export_id"]
    assert meta["classes"] == ["blue", "green", "red"] and meta["parity"]["passed"]
    assert meta["export_id"] != export_mod.read_metadata(second)["export_id"]
    model = swapped(first, second, tmp_path)
    with pytest.raises(pipeline.PipelineError, match=r"a\.onnx\.json' is not the metadata of .*a\.onnx'.*export "
                                                     r"the model again"):
        export_mod.read_metadata(model)
    os.remove(f"{model}.json")
    assert export_mod.read_metadata(model)["export_id"] == meta["export_id"]


def test_a_torchscript_sidecar_from_another_export_is_refused(heads, tmp_path):
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    for out in (first, second):
        assert pipeline.export_model(heads["linear"], out, format="torchscript").passed
    assert export_mod.read_metadata(first)["classes"] == ["blue", "green", "red"]
    Path(f"{first}.json").write_text(Path(f"{second}.json").read_text())
    with pytest.raises(pipeline.PipelineError, match="is not the metadata of"):
        export_mod.read_metadata(first)


def test_a_torchscript_files_metadata_is_read_without_loading_its_program(heads, tmp_path, monkeypatch):
    """exported_metadata ran torch.jit.load on the file, which deserializes the program (its __setstate__ methods
    run as it loads) and its weights: reading what a file of unknown origin says it is must not. A torch.save
    checkpoint (a zip too) is still no TorchScript file."""
    out = tmp_path / "m.ts"
    assert pipeline.export_model(heads["linear"], out, format="torchscript").passed
    os.remove(f"{out}.json")  # the metadata inside the file, alone

    def refused(*args, **kwargs):
        raise AssertionError("torch.jit.load ran")

    monkeypatch.setattr(torch.jit, "load", refused)
    assert pipeline.exported_metadata(out)["classes"] == ["blue", "green", "red"]
    with pytest.raises(pipeline.PipelineError, match="is no ONNX or TorchScript file: .*not TorchScript's"):
        pipeline.exported_metadata(heads["linear"])


def test_an_export_stopped_before_its_sidecar_leaves_no_old_sidecar_beside_it(heads, tmp_path, monkeypatch):
    """The old sidecar goes before the new file replaces the old one: a stop in between leaves the new file with
    the metadata inside it, never beside the old export's .json."""
    out = tmp_path / "m.onnx"
    assert pipeline.export_model(heads["linear"], out).passed

    def stopped(path, value, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "write_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(heads["svm"], out)
    assert not Path(f"{out}.json").exists() and not export_mod.lock_path(out).exists()
    assert export_mod.read_metadata(out)["model"] == str(heads["svm"])


def test_sigterm_during_the_parity_check_leaves_no_unchecked_file_beside_the_output(tmp_path):
    """Only Ctrl-C removed the file being checked: SIGTERM (a scheduler's stop, kill) left '.x.ts.PID.export' beside
    --output (17.8 MB for an EfficientNet-Lite0 head), one more for each stopped export."""
    head = make_tiny_head(tmp_path / "head")
    out = tmp_path / "out" / "x.ts"
    code = (f"import os, signal, time\n"
            f"import tests.tiny\n"
            f"from pipeline.serving import export as e\n"
            f"def stopped(*args, **kwargs):\n"
            f"    os.kill(os.getpid(), signal.SIGTERM)\n"
            f"    time.sleep(30)\n"
            f"e.parity = stopped\n"
            f"import pipeline\n"
            f"pipeline.export_model({str(head)!r}, {str(out)!r}, format='torchscript')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 143, done.stderr  # unwound, with the shell's code for SIGTERM (was killed: -15)
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_a_killed_exports_unchecked_file_is_removed_by_the_next_export(tmp_path):
    """kill -9 during the parity check (no handler runs) left '.x.ts.PID.export' beside --output for good, one more
    for each killed export (as large as the model: 530 MB for VGG-16). The next export to it removes them."""
    head = make_tiny_head(tmp_path / "head")
    out = tmp_path / "out" / "x.ts"
    code = (f"import os, signal\n"
            f"import tests.tiny\n"
            f"from pipeline.serving import export as e\n"
            f"def killed(*args, **kwargs):\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"e.parity = killed\n"
            f"import pipeline\n"
            f"pipeline.export_model({str(head)!r}, {str(out)!r}, format='torchscript')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -9 and [p.suffix for p in out.parent.iterdir()] == [".export"]
    assert pipeline.export_model(head, out, format="torchscript").passed
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.ts", "x.ts.json"]


def test_two_exports_put_their_pairs_in_place_one_after_the_other(tmp_path):
    """The file and its sidecar go in place under a lock beside them: a second export waits for the first."""
    import threading

    out, side = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    tmp = tmp_path / ".m.onnx.1.export"
    tmp.write_bytes(b"second")
    with export_mod.output_lock(out):
        waiter = threading.Thread(target=export_mod.put_in_place, args=(tmp, out, side, {"export_id": "2"}))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not out.exists()  # waiting for the lock
        out.write_bytes(b"first")
        side.write_text('{"export_id": "1"}')
    waiter.join(10)
    assert out.read_bytes() == b"second" and json.loads(side.read_text()) == {"export_id": "2"}
    assert not export_mod.lock_path(out).exists()


def test_reading_the_metadata_of_no_export_is_one_line(tmp_path):
    """A file that is neither ONNX nor TorchScript: one line naming it, not the protobuf or zip reader's trace."""
    import zipfile

    (tmp_path / "g.onnx").write_text("garbage")
    with zipfile.ZipFile(tmp_path / "z.ts", "w") as z:
        z.writestr("a", "b")
    (tmp_path / "m.onnx.json").write_text('{"metadata_version": 1}')  # a sidecar: onnx.load read it as JSON protobuf
    for name in ("g.onnx", "z.ts", "m.onnx.json"):
        with pytest.raises(pipeline.PipelineError, match=f"{name}' is no ONNX or TorchScript file: ") as e:
            export_mod.read_metadata(tmp_path / name)
        assert "\n" not in str(e.value)
    assert "pass the exported file 'm.onnx'" in str(e.value)


def test_an_output_on_a_file_system_without_locks_is_still_put_in_place(tmp_path, monkeypatch, caplog):
    """flock refused (some network mounts: EOPNOTSUPP) ended the export after its parity check had passed."""
    import errno

    class NoLocks:
        LOCK_EX = 2

        @staticmethod
        def flock(fd, op):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(export_mod, "fcntl", NoLocks)
    entered = []
    with export_mod.output_lock(tmp_path / "m.onnx"):
        entered.append(True)
    assert entered and "cannot lock" in caplog.text


def test_an_output_with_a_long_name_is_exported_or_refused_before_the_export(heads, tmp_path):
    """--output named with 240 characters (a name the file system takes) failed after the parity check as
    'unexpected OSError: File name too long (a bug?)': its temporary '.NAME.PID.export' (and lock '.NAME.lock')
    were longer than 255 bytes; they now take a digest's name. A name whose '.json' beside it cannot exist
    is refused before the export, in one line."""
    out = tmp_path / "out" / ("m" * 235 + ".onnx")
    r = CliRunner().invoke(cli.cli, ["export", "--model", str(heads["linear"]), "--output", str(out), "--check-n", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".json"]
    assert export_mod.read_metadata(out)["parity"]["passed"]
    too_long = tmp_path / "out2" / ("m" * 246 + ".onnx")
    r = CliRunner().invoke(cli.cli, ["export", "--model", str(heads["linear"]), "--output", str(too_long)])
    assert r.exit_code == 2 and "--output is named with 251 bytes" in r.stderr and "250 or fewer" in r.stderr, r.output
    assert not too_long.exists()


def test_an_output_that_is_no_earlier_export_is_refused_and_an_earlier_export_replaced(heads, tmp_path):
    """export --output over a file of the user's (a README, a photo named .onnx, a checkpoint, a cache, a link to
    one, a pipe) replaced it with the export; each is now refused in one line naming it (exit 2), nothing
    changed. An earlier export there (ONNX, TorchScript) is replaced as before; a foreign .json where the metadata
    goes is refused too."""
    head = heads["linear"]
    readme, photo, other = tmp_path / "README.md", tmp_path / "photo.onnx", tmp_path / "other.pt"
    readme.write_text("# my notes\n")
    Image.new("RGB", (8, 8)).save(photo, format="PNG")
    other.write_bytes(head.read_bytes())  # a checkpoint: a file torch reads, but no export
    (tmp_path / "cache.ts").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp_path / "link.onnx").symlink_to(readme)
    (tmp_path / "m.onnx.json").write_text('{"mine": 1}\n')
    before = files_below(tmp_path)
    runner = CliRunner()
    for name, fmt, why in [("README.md", "onnx", "exists and is not an earlier export"),
                           ("photo.onnx", "onnx", "exists and is not an earlier export"),
                           ("other.pt", "torchscript", "exists and is not an earlier export"),
                           ("cache.ts", "torchscript", "exists and is not an earlier export"),
                           ("link.onnx", "onnx", "exists and is not an earlier export (a link to a file)"),
                           ("m.onnx", "onnx", "m.onnx.json' exists and is not an earlier export's metadata")]:
        r = runner.invoke(cli.cli, ["export", "--model", str(head), "--format", fmt, "--output", str(tmp_path / name)])
        assert r.exit_code == 2 and why in r.output and "move it away, or name another --output" in r.output, \
            (name, r.output)
        assert len(r.output.strip().splitlines()) == 1
    os.mkfifo(tmp_path / "pipe.onnx")  # as /dev/null: a rename onto it would replace the device itself
    r = runner.invoke(cli.cli, ["export", "--model", str(head), "--output", str(tmp_path / "pipe.onnx")])
    assert r.exit_code == 2 and "(not a regular file)" in r.output and not (tmp_path / "pipe.onnx").is_file()
    assert files_below(tmp_path) == before
    with pytest.raises(ValueError, match="output '.*README.md' exists and is not an earlier export"):
        pipeline.export_model(head, readme)
    for name, fmt in (("again.onnx", "onnx"), ("again.ts", "torchscript")):
        out = tmp_path / name
        first = pipeline.export_model(head, out, format=fmt, check_n=2)
        ids = {pipeline.exported_metadata(out)["export_id"]}
        Path(f"{out}.json").unlink()  # a tool kept the file alone: its metadata inside still says it is ours
        second = pipeline.export_model(head, out, format=fmt, check_n=2)
        ids.add(pipeline.exported_metadata(out)["export_id"])
        assert first.passed and second.passed and len(ids) == 2


def test_an_export_through_a_link_to_an_earlier_export_replaces_its_file_and_keeps_the_link(heads, tmp_path):
    """export --output LINK, the link leading to an earlier export (current.onnx -> v1/model.onnx), replaced the link
    by a regular file, v1/model.onnx left as it was. Now the export is written through the link, as every output is
    (its file replaced, the link kept); the metadata goes beside the name given, as always."""
    (tmp_path / "v1").mkdir()
    earlier = tmp_path / "v1" / "model.onnx"
    pipeline.export_model(heads["linear"], earlier, check_n=2)
    link = tmp_path / "current.onnx"
    link.symlink_to(earlier)
    first = pipeline.exported_metadata(earlier)["export_id"]
    assert pipeline.export_model(heads["linear"], link, check_n=2).passed
    assert link.is_symlink() and pipeline.exported_metadata(link)["export_id"] != first
    assert json.loads(Path(f"{link}.json").read_text())["export_id"] == pipeline.exported_metadata(earlier)["export_id"]
    assert sorted(os.listdir(tmp_path / "v1")) == ["model.onnx", "model.onnx.json"]


def test_a_failed_copy_through_a_link_to_another_disk_leaves_the_old_export_with_its_sidecars(tmp_path, monkeypatch):
    """export --output LINK, its file on another disk that is full: the copy there failed, the old export stayed,
    but its sidecars (beside the link and beside its file) were removed before the copy: an export without its
    metadata. They are now removed only once the new file is whole, just before it takes the name."""
    import errno

    from pipeline.errors import DiskFull

    (tmp_path / "v1").mkdir()
    earlier, link = tmp_path / "v1" / "model.onnx", tmp_path / "current.onnx"
    earlier.write_bytes(b"old export")
    link.symlink_to(earlier)
    sides = [Path(f"{earlier}.json"), Path(f"{link}.json")]
    for s in sides:
        s.write_text('{"export_id": "1"}')
    tmp = tmp_path / ".current.onnx.1.export"
    tmp.write_bytes(b"new export")

    def full(src, dst):
        Path(dst).write_bytes(b"new")  # part of the copy to the other disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod.shutil, "move", full)
    with pytest.raises(DiskFull, match="no space left"):
        export_mod.put_in_place(tmp, link, Path(f"{link}.json"), {"export_id": "2"})
    assert earlier.read_bytes() == b"old export" and link.is_symlink()
    assert [json.loads(s.read_text()) for s in sides] == [{"export_id": "1"}] * 2  # were: both gone
    assert sorted(os.listdir(tmp_path / "v1")) == ["model.onnx", "model.onnx.json"]
    monkeypatch.undo()
    export_mod.put_in_place(tmp, link, Path(f"{link}.json"), {"export_id": "2"})
    assert earlier.read_bytes() == b"new export" and not tmp.exists()
    assert [json.loads(s.read_text()) for s in sides] == [{"export_id": "2"}] * 2
