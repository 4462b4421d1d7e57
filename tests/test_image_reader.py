"""The reader: large JPEGs decoded at a reduced DCT scale, everything else as before; decoding in turns with a CPU
network."""
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
    quick = CpuReader(ImageListDataset(tmp_path, [(f"{i % 4}.jpg", 0) for i in range(6)], T), 1, 2)
    consume(quick, 0.5)  # decoding two small photos: well under 5 % of half a second
    assert quick.mode == "turns" and "in turns" in quick.choice and not quick.cycles["beside"]
