"""The reader: large JPEGs decoded at a reduced DCT scale, everything else as before; decoding in turns with a CPU
network."""
import re

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms._presets import ImageClassification

import pipeline.data.folders
from pipeline.data.folders import decode_image, load_rgb
from pipeline.data.image_reader import ImageListDataset, draft_short_side, load_transformed
from pipeline.models.train import train_transform

# resize 32 / crop 28: the pipeline lets a JPEG decode reduced to a short side >= 2 x 32 = 64
T = ImageClassification(crop_size=28, resize_size=32)


def photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth structure (gradients, blobs) plus fine texture: a JPEG that is not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 200, 128 + 80 * np.sin(x / w * 6) * np.cos(y / h * 5)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(w, h)
        base += ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None] * rng.uniform(-80, 80, 3)
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def big_jpeg(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(photo_like(390, 260)).save(p, quality=90)
    return p


def test_draft_short_side_only_for_an_antialiased_short_side_resize():
    assert draft_short_side(T) == 64
    assert draft_short_side(ImageClassification(crop_size=28, resize_size=32, antialias=False)) is None
    assert draft_short_side(train_transform(T, augment=True)) is None  # crops before resizing: full size
    assert draft_short_side(train_transform(T, augment=False)) == 64
    assert draft_short_side(lambda im: im) is None


def test_a_large_jpeg_decodes_reduced_keeping_the_resize_size(big_jpeg):
    assert load_rgb(big_jpeg).size == (390, 260)
    assert load_rgb(big_jpeg, 32).size == (49, 33)  # 1/8 (ceil): short side 33 >= 32
    assert load_rgb(big_jpeg, 64).size == (98, 65)  # 1/4: 1/8 would give 33 < 64
    assert load_rgb(big_jpeg, 100).size == (195, 130)  # 1/2
    assert load_rgb(big_jpeg, 131).size == (390, 260)  # < 2 x 131: full size
    im, rgb = decode_image(big_jpeg, 32)
    assert im.format == "JPEG" and rgb.mode == "RGB" and rgb.size == (49, 33)


def test_small_jpegs_pngs_and_other_modes_are_not_drafted(tmp_path, monkeypatch):
    calls = []
    real = pipeline.data.folders.jpeg_draft
    monkeypatch.setattr(pipeline.data.folders, "jpeg_draft", lambda im, m: calls.append(real(im, m)) or calls[-1])
    Image.fromarray(photo_like(90, 60)).save(tmp_path / "small.jpg", quality=90)
    Image.fromarray(photo_like(390, 260)).save(tmp_path / "big.png")
    Image.fromarray(photo_like(390, 260)).convert("L").save(tmp_path / "gray.jpg", quality=90)
    assert load_rgb(tmp_path / "small.jpg", 32).size == (90, 60)  # 60 < 2 x 32
    assert load_rgb(tmp_path / "big.png", 32).size == (390, 260)  # not a JPEG
    assert calls == [1, 1]
    gray = load_rgb(tmp_path / "gray.jpg", 32)  # a grayscale JPEG reduces too, and still comes out RGB
    assert gray.mode == "RGB" and gray.size == (49, 33) and calls[-1] == 8


def levels(x, y):
    """|x - y| of two transformed tensors in 8-bit levels."""
    return (x - y).abs().numpy() * 255 * np.array(T.std, dtype=np.float32)[:, None, None]


def test_the_drafted_tensor_stays_close_to_the_full_decode(big_jpeg):
    full = T(load_rgb(big_jpeg))
    drafted = load_transformed(big_jpeg, T)
    assert load_rgb(big_jpeg, draft_short_side(T)).size == (98, 65)  # 1/4: short side 65 >= 2 x 32
    assert drafted.shape == full.shape == (3, 28, 28)
    d = levels(drafted, full)
    assert d.mean() < 2.0 and d.max() < 24  # measured: mean 0.9, max 11 levels
    # One scale more (1/8, short side 33 for a resize to 32, what a margin of 1 would pick) leaves the
    # resize nothing to filter: measured mean 4.8, max 52 levels. The bounds above must catch that.
    coarse = levels(T(load_rgb(big_jpeg, 32)), full)
    assert load_rgb(big_jpeg, 32).size == (49, 33) and coarse.mean() > 2.0 and coarse.max() > 24


def test_the_dataset_drafts_with_its_transform(big_jpeg, monkeypatch):
    seen = []
    real = pipeline.data.folders.jpeg_draft
    monkeypatch.setattr(pipeline.data.folders, "jpeg_draft", lambda im, m: seen.append(m) or real(im, m))
    items = [(big_jpeg.name, 0)]
    item = ImageListDataset(big_jpeg.parent, items, T)[0]
    assert item.ok and seen == [64]
    assert np.array_equal(item.image.numpy(), load_transformed(big_jpeg, T).numpy())
    ImageListDataset(big_jpeg.parent, items, train_transform(T, augment=True))[0]
    assert seen == [64, 64, None]  # the dataset, load_transformed, then augmentation: full size


def test_in_turns_gives_what_worker_processes_give_and_decodes_only_when_asked(tmp_path, monkeypatch):
    import torch

    from pipeline.data.image_reader import CpuReader, read_items

    for i in range(7):
        Image.fromarray(photo_like(50, 40, seed=i)).save(tmp_path / f"{i}.jpg", quality=90)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    items = [(f"{i}.jpg", i % 2) for i in range(3)] + [("bad.jpg", 0)] + [(f"{i}.jpg", 1) for i in range(3, 7)]
    ds = ImageListDataset(tmp_path, items, T, digests=True)
    want = list(read_items(ds, 1))  # one background process
    got = list(read_items(ds, -1, torch.device("cpu"), chunk=3))  # a CPU network: threads, in turns
    assert [(g.position, g.path, g.label, g.error, g.digest) for g in got] == \
           [(w.position, w.path, w.label, w.error, w.digest) for w in want]
    assert got[3].error and all(np.array_equal(g.image.numpy(), w.image.numpy()) for g, w in zip(got, want) if g.ok)

    decoded = []
    real = ImageListDataset.__getitem__
    monkeypatch.setattr(ImageListDataset, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    turns = CpuReader(ds, 2, 3, mode="turns")
    assert decoded == []  # nothing before the first item is asked for
    next(turns)
    assert sorted(decoded) == [0, 1, 2]  # one chunk, while the network waits; not the whole folder
    next(turns), next(turns)
    assert sorted(decoded) == [0, 1, 2]
    next(turns)
    assert sorted(decoded) == [0, 1, 2, 3, 4, 5]


def test_sixteen_bit_gray_converts_in_integer_blocks_without_a_float64_copy():
    """A 16-bit image became float64 (8 bytes a pixel) and more float64 copies: 3.1 GB for a 9400 x 9400 PNG.
    Now small int64 blocks of rows: numpy's peak stays near the 1-byte output, and the pixels are the old
    formula's, round(v / 65535 * 255), for every 16-bit value."""
    import tracemalloc

    from pipeline.data.portable import ROWS_PER_BLOCK, to_rgb

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    want = (np.clip(values.astype(np.float64), 0, 65535) / 65535 * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(values)))[..., 0], want)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (2000, 1500), dtype=np.uint16))
    assert big.mode == "I;16"
    tracemalloc.start()
    try:
        rgb = to_rgb(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.size == (1500, 2000)
    # the uint8 output (3 MB) and one block of int64 rows (256 x 1500 x 8 x ~3 temporaries); float64 was 24 MB a copy
    assert peak < 2000 * 1500 + 4 * ROWS_PER_BLOCK * 1500 * 8, peak


def test_the_cpu_reader_decodes_beside_the_network_when_that_is_faster(tmp_path, monkeypatch):
    """'auto' tries both after the first batch and keeps the faster: here decoding is slow and the 'network'
    (the consumer) sleeps, leaving the cores idle, so beside wins; the items are the same in any mode. With
    decoding a negligible share of a batch it stays in turns without trying."""
    import time

    from pipeline.data import image_reader
    from pipeline.data.image_reader import CpuReader

    for i in range(4):
        Image.fromarray(photo_like(50, 40, seed=i)).save(tmp_path / f"{i}.jpg", quality=90)
    ds = ImageListDataset(tmp_path, [(f"{i % 4}.jpg", 0) for i in range(20)], T)
    real = ImageListDataset.__getitem__
    monkeypatch.setattr(ImageListDataset, "__getitem__", lambda self, i: (time.sleep(0.02), real(self, i))[1])

    def consume(reader, network_seconds):
        out = []
        for k, item in enumerate(reader):
            out.append(item)
            if k % 2 == 1:
                time.sleep(network_seconds)  # the network's turn, after each chunk of two
        return out

    auto = CpuReader(ds, 1, 2)
    got = consume(auto, 0.05)
    assert auto.mode == "beside" and auto.choice.startswith("decoding beside")
    want = list(CpuReader(ds, 1, 2, mode="turns"))
    assert [(g.position, g.path) for g in got] == [(w.position, w.path) for w in want]
    assert all(np.array_equal(g.image.numpy(), w.image.numpy()) for g, w in zip(got, want))
    monkeypatch.setattr(ImageListDataset, "__getitem__", real)
    # decoding two small photos takes a few ms, but handing them to the pool and back took over 5 % of the half
    # second on a loaded machine (then 'auto' never settled in 3 chunks): the share is raised for this test
    monkeypatch.setattr(image_reader, "PROBE_FROM_SHARE", 0.3)
    quick = CpuReader(ImageListDataset(tmp_path, [(f"{i % 4}.jpg", 0) for i in range(6)], T), 1, 2)
    consume(quick, 0.5)  # decoding two small photos: well under 30 % of half a second
    assert quick.mode == "turns" and not quick.cycles["beside"]
    assert re.fullmatch(r"decoding in turns: it took (\d+ %|under 1 %) of a batch", quick.choice), quick.choice


# -- EXIF orientation and float gray: every path decodes the photo a viewer shows --------------------------------
#: How a photo is stored so that EXIF Orientation k (2-8) turns it back upright: the inverse of each transpose.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def save_turned(upright: Image.Image, path, k: int, exif: bytes | None = None) -> None:
    """``upright`` stored as a camera held sideways stores it, with EXIF Orientation ``k`` (or ``exif`` as given)."""
    if exif is None:
        tags = Image.Exif()
        tags[0x0112] = k
        exif = tags.tobytes()
    upright.transpose(STORED_AS[k]).save(path, exif=exif)


def asymmetric(w: int = 9, h: int = 6) -> Image.Image:
    """No flip or rotation of it equals it (random pixels, not square)."""
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("k", range(2, 9))
def test_a_photo_stored_with_an_orientation_tag_decodes_upright(tmp_path, k):
    """Every orientation 2-8 (lossless PNG: equal pixels): before, the pixels as stored, sideways or mirrored."""
    up = asymmetric()
    save_turned(up, tmp_path / "p.png", k)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), np.asarray(up))
    stored, rgb = decode_image(tmp_path / "p.png")
    assert stored.size == up.transpose(STORED_AS[k]).size and rgb.size == up.size  # check-images' mode: as stored


def test_a_large_sideways_jpeg_is_drafted_then_turned_and_reaches_the_network_upright(tmp_path):
    """Orientation 6 on a JPEG decoded reduced: the reduced photo is turned (the short side is the same either
    way), and the tensor the dataset gives is the upright photo's."""
    up = Image.fromarray(photo_like(390, 260))
    up.save(tmp_path / "up.jpg", quality=95)
    save_turned(up, tmp_path / "turned.jpg", 6)
    assert load_rgb(tmp_path / "turned.jpg", 64).size == (98, 65) == load_rgb(tmp_path / "up.jpg", 64).size
    ds = ImageListDataset(tmp_path, [("up.jpg", 0), ("turned.jpg", 0)], T)
    a, b = ds[0].image, ds[1].image
    assert (a - b).abs().mean() < 0.05  # JPEG's loss on the two storings; sideways differed by ~1
    assert (a - ds[1].image.flip(-1)).abs().mean() > 0.2  # the photo is not symmetric: a wrong turn shows


def test_a_damaged_exif_block_still_decodes_and_turns_when_its_tag_reads(tmp_path):
    """A block Pillow's ``exif_transpose`` raises on (Pillow 13: struct.error rewriting tag 0x0116 stored as text)
    but whose Orientation reads: the rule reads only the tag, so the photo still decodes, upright."""
    damaged = (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x04\x01\x16\x00\x02\x00\x00\x00\x04cam\x00\x01\x12\x00"
               b"\x03\x00\x00\x00\x01\x00\x06\x00\x00\x01\x1a\x00\x05\x00\x00\x00\x01\x00\x00\x00>\x87i\x00\x04"
               b"\x00\x00\x00\x01\x00\x00\x00F\x00\x00\x00\x00\x00\x00\x00H\x00\x00\x00\x01\x00\x01\x90\x03\x00"
               b"\x02\x00\x00\x00\x14\x00\x00\x00X\x00\x00\x00\x002024:01:01 00:00:\x870\x00")
    up = asymmetric()
    save_turned(up, tmp_path / "p.png", 6, exif=damaged)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), np.asarray(up))


def test_float_and_sixteen_bit_gray_are_never_black(tmp_path):
    """A float TIFF (mode F) in [0, 1] went through convert('RGB'), which clips to 0-255: all black or 1. Now a
    [0, 1] picture keeps its brightness (v x 255), one in other units is fitted by its own range, NaN is lo.
    16-bit gray (I;16) by its type's range, as since decode_version 2."""
    ramp = np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 0.2, "F").save(tmp_path / "dark.tif")
    Image.fromarray(ramp * 1000 - 250, "F").save(tmp_path / "wide.tif")
    nan = ramp.copy()
    nan[0, 0], nan[0, 1] = np.nan, np.inf
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    gray = {name: np.asarray(load_rgb(tmp_path / f"{name}.tif"))[..., 0].astype(int)
            for name in ("unit", "dark", "wide", "nan")}
    assert np.array_equal(gray["unit"], np.floor(ramp.astype(np.float64) * 255 + 0.5))
    assert gray["dark"].max() == 51  # 0.2 x 255: a dark picture stays dark, as 16-bit gray does
    assert gray["wide"].min() == 0 and gray["wide"].max() == 255  # [-250, 750]: its own range
    assert gray["nan"][0, 0] == 0 and gray["nan"][0, 1] == 255 and np.array_equal(gray["nan"][1:], gray["unit"][1:])
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.abs(np.asarray(load_rgb(tmp_path / "g16.png"))[..., 0].astype(int) - gray["unit"]).max() <= 1


def several_frames(path, fmt: str, n: int = 3, **options) -> list:
    """A file of ``n`` frames of flat colours (an animated GIF, APNG, WebP, a multi-page TIFF); the frames' RGB."""
    frames = [Image.new("RGB", (40, 32), c) for c in [(250, 20, 20), (20, 250, 20), (20, 20, 250), (9, 9, 9)][:n]]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **options)
    return frames


def test_a_file_of_several_frames_is_read_from_its_first_and_says_how_many(tmp_path):
    """An animated GIF, PNG or WebP and a multi-page TIFF decode to their first frame, as before; the RGB image now
    says how many frames the file holds (info['frames']). A multi-picture JPEG (MPO: a photo and its preview) and a
    file of one frame say nothing; an animated GIF cut short decodes as before, counted as one frame."""
    from pipeline.data.folders import FRAMES

    for name, fmt in (("a.gif", "GIF"), ("a.png", "PNG"), ("a.webp", "WEBP"), ("a.tif", "TIFF")):
        first = several_frames(tmp_path / name, fmt, **({"lossless": True} if fmt == "WEBP" else {}))[0]
        rgb = load_rgb(tmp_path / name)
        assert rgb.info.get(FRAMES) == 3, name
        assert np.abs(np.asarray(rgb, np.int16) - np.asarray(first, np.int16)).max() <= 4, name
    several_frames(tmp_path / "stereo.jpg", "MPO", 2)
    Image.new("RGB", (40, 32), (1, 2, 3)).save(tmp_path / "one.gif")
    for name in ("stereo.jpg", "one.gif"):
        assert FRAMES not in load_rgb(tmp_path / name).info, name
    data = (tmp_path / "a.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(data[:len(data) * 2 // 3])  # the first frame whole, the next cut short
    before = Image.open(tmp_path / "cut.gif").convert("RGB")
    rgb = load_rgb(tmp_path / "cut.gif")
    assert np.array_equal(np.asarray(rgb), np.asarray(before))


def test_extract_and_predict_say_which_files_were_read_from_their_first_frame(tmp_path, caplog, make_cache):
    """An animated GIF or a multi-page TIFF among the photos became one row of its first frame without a word. Now
    one warning (not one a file) names how many and an example; the rows are as before."""
    import logging

    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=4)
    several_frames(data / "red" / "anim.gif", "GIF", 4)
    several_frames(data / "blue" / "pages.tif", "TIFF", 2)
    with caplog.at_level(logging.WARNING):
        cache = make_cache(data)
    said = [r.getMessage() for r in caplog.records if "frame" in r.getMessage()]
    assert said == ["2 files hold more than one frame (an animated GIF, PNG or WebP, a multi-page TIFF) and were read "
                    "from the first frame alone (e.g. blue/pages.tif: 2 frames); save the frame you mean as its own "
                    "photo to use another"], said
    assert cache.rows == 10 and cache.skipped == 0
    from pipeline.heads.fit_head import FitHeadConfig, fit_head
    from pipeline.models.predict import PredictConfig, predict

    head = fit_head(FitHeadConfig(cache=cache.cache, runs_dir=str(tmp_path / "runs"), head="linear", epochs=2))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = predict(PredictConfig(paths=[str(data / "red")], model=head.checkpoint, workers=0)).rows
    said = [r.getMessage() for r in caplog.records if "frame" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 file holds more than one frame") and "anim.gif: 4 frames" in said[0]
    assert len(rows) == 5 and not any(r["error"] for r in rows)


def test_predicts_rows_and_the_api_say_which_photos_were_read_from_their_first_frame(tmp_path, caplog, make_cache):
    """predict's rows (--format json and csv, the API's predict_files) carry a ``note`` for a photo read from its
    first frame (serve's rows are the same rows); the API's predict on a file, and on an animated GIF opened with
    Image.open and given in memory (which said nothing), warns once as predict does."""
    import csv
    import json
    import logging

    from click.testing import CliRunner

    import pipeline
    from pipeline import cli
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=4)
    cache = make_cache(data)
    head = pipeline.Head(head="linear", epochs=2, runs_dir=str(tmp_path / "runs")).fit(cache.cache)
    several_frames(tmp_path / "anim.gif", "GIF", 4)
    photo = next((data / "red").iterdir())
    for x in ([str(tmp_path / "anim.gif"), str(photo)], [Image.open(tmp_path / "anim.gif"), str(photo)]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert len(head.predict(x)) == 2
        said = [r.getMessage() for r in caplog.records if "frame" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("1 file holds more than one frame") and ": 4 frames" in said[0]
    # the CLI last: its logging set-up (basicConfig(force=True)) takes caplog's handler away
    args = ["predict", str(tmp_path / "anim.gif"), str(photo), "--model", head.checkpoint_, "--workers", "0"]
    rows = json.loads(CliRunner().invoke(cli.cli, [*args, "--format", "json"]).stdout)
    assert rows[0]["note"].startswith("the first of its 4 frames was classified") and rows[1]["note"] is None
    out = CliRunner().invoke(cli.cli, [*args, "--output", str(tmp_path / "p.csv")])
    assert out.exit_code == 0, out.output
    table = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert table[0]["note"] == rows[0]["note"] and table[1]["note"] == ""


class _HangupDataset:
    """Each item reports, as multiprocessing's resource sharer does from its thread in a decoding worker, a
    connection the main process dropped (it was ending), then another error."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        import sys
        for error in (ConnectionResetError(104, "Connection reset by peer"), ValueError("a real error")):
            try:
                raise error
            except Exception:
                sys.excepthook(*sys.exc_info())
        return i


def test_decoding_workers_say_nothing_of_a_connection_the_ending_main_process_dropped(capfd, tmp_path):
    """SIGTERM to train while a worker handed it a batch: the one 'terminated; ...' line was followed by a
    worker's ConnectionResetError traceback. Every loader's workers now keep quiet about the dropped connection
    (and only about that)."""
    from pipeline.config import TrainConfig
    from pipeline.data import image_reader
    from pipeline.models.train import _loader

    assert [i for chunk in image_reader.item_loader(_HangupDataset(), workers=1) for i in chunk] == [0]
    err = capfd.readouterr().err
    assert "ValueError: a real error" in err and "ConnectionResetError" not in err
    quiet_hangups = image_reader.quiet_hangups
    cfg = TrainConfig(data=str(tmp_path), workers=1)
    for shuffle in (True, False):
        assert _loader(tmp_path, [("a.jpg", 0)], None, cfg, shuffle=shuffle).worker_init_fn is quiet_hangups
