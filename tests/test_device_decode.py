"""--decode device: JPEGs decoded by torchvision on the compute device (here the CPU), same rows as PIL."""
import os

import numpy as np
import pytest

from pipeline.cache.feature_cache import FeatureCache
from pipeline.data.folders import ImageLoadError, jpeg_bytes
from pipeline.extraction.extract import ExtractConfig, extract
from tests.badfiles import make_bad_corpus, skipped_by_extract
from tests.conftest import make_image_folder
from tests.fsfaults import no_hang


def _extract(data, tmp_path, decode, workers=0):
    return extract(ExtractConfig(data=str(data), n=0, backbone="tiny", weights="none", workers=workers, batch_size=4,
                                 dtype="float32", precision="fp32", decode=decode, cache_dir=str(tmp_path / "f")))


def test_device_decoding_keeps_the_rows_and_the_skips_of_pil(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=6)
    corpus = make_bad_corpus(data)
    pil = _extract(data, tmp_path, "pil")
    dev = _extract(data, tmp_path, "device", workers=1)
    assert dev.cache != pil.cache  # another decoder, another cache
    with FeatureCache(pil.cache) as a, FeatureCache(dev.cache) as b:
        assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
        assert {p for p, _ in b.skipped()} == skipped_by_extract(corpus) == {p for p, _ in a.skipped()}
        x, y = a.features[:].reshape(a.n, -1), b.features[:].reshape(b.n, -1)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.98  # libjpeg + tensor resize vs PIL resize: nearly the same pixels


def test_jpeg_bytes_sends_only_plain_jpegs_to_the_device(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=1)
    make_bad_corpus(data)
    assert jpeg_bytes(data / "blue" / "blue.0.jpg")[:3] == b"\xff\xd8\xff"
    for name in ("note.png-named.jpg", "note.cmyk.jpg"):  # not a JPEG / a JPEG in a mode decode_jpeg may not take
        hits = list(data.rglob(name))
        assert hits and jpeg_bytes(hits[0]) is None
    with pytest.raises(ImageLoadError, match="zero-byte"):
        jpeg_bytes(next(data.rglob("bad.zero.jpg")))


def test_a_named_pipe_never_hangs_device_decoding(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=3)
    os.mkfifo(data / "red" / "f.jpg")  # reading it would block until someone writes: forever
    with no_hang(60):
        with pytest.raises(ImageLoadError, match="named pipe"):
            jpeg_bytes(data / "red" / "f.jpg")
        r = _extract(data, tmp_path, "device")
    with FeatureCache(r.cache) as c:
        assert c.n == 6 and "red/f.jpg" not in c.paths


def test_a_sideways_jpeg_goes_through_pil_and_reaches_the_network_upright(tmp_path):
    """nvJPEG (decode_jpeg) ignores EXIF: a JPEG with Orientation 2-8 is left to PIL, which turns it, so both
    decoders give the photo upright; an upright JPEG still goes to the device."""
    import torch
    from PIL import Image
    from torchvision.transforms._presets import ImageClassification

    from pipeline.data.device_decode import decode_on_device
    from pipeline.data.image_reader import ImageListDataset
    from tests.test_image_reader import photo_like, save_turned

    up = Image.fromarray(photo_like(90, 60))
    up.save(tmp_path / "up.jpg", quality=95)
    save_turned(up, tmp_path / "turned.jpg", 6)
    assert jpeg_bytes(tmp_path / "up.jpg") is not None and jpeg_bytes(tmp_path / "turned.jpg") is None
    t = ImageClassification(crop_size=28, resize_size=32)
    ds = ImageListDataset(tmp_path, [("up.jpg", 0), ("turned.jpg", 0)], t, raw_jpeg=True)
    a, b = (i.image for i in decode_on_device([ds[0], ds[1]], t, torch.device("cpu"), tmp_path))
    assert a.shape == b.shape == (3, 28, 28) and (a - b).abs().mean() < 0.1  # JPEG loss, resizers; sideways: 1.07
