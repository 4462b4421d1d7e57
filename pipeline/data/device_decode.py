"""JPEG decoding on the compute device (nvJPEG on CUDA), for when CPU decoding is the bottleneck.

The decoding workers only read bytes and check headers (``folders.jpeg_bytes``); chunks of JPEGs are
decoded together by ``torchvision.io.decode_jpeg`` on the device and preprocessed there by the
weights' own transform, which works on tensors. A file the device cannot decode, and every
non-JPEG, goes through PIL as usual, so what counts as a bad file does not change.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Iterator

from torchvision.io import ImageReadMode, decode_jpeg

from .folders import ImageLoadError
from .image_reader import Item, load_transformed


def is_raw(item: Item) -> bool:
    """Reader items carry raw JPEG bytes as a 1-D uint8 tensor, decoded images as 3-D float tensors."""
    return item.image is not None and item.image.ndim == 1


def decode_on_device(items: Iterable[Item], transform, device, root: Path, chunk: int = 32) -> Iterator[Item]:
    """Pass reader items through in order, replacing raw JPEG bytes by preprocessed tensors on ``device``."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) == chunk:
            yield from _decode_chunk(buf, transform, device, root)
            buf = []
    yield from _decode_chunk(buf, transform, device, root)


def _decode_one(data, device):
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _decode_chunk(buf: list, transform, device, root: Path) -> Iterator[Item]:

    raw = [i for i, item in enumerate(buf) if is_raw(item)]
    images: dict = {}
    if raw:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 flags its image decoders as deprecated
            try:  # one call for the whole chunk is what makes nvJPEG fast
                decoded = decode_jpeg([buf[i].image for i in raw], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # some file is corrupt: find which, one by one
                decoded = [_decode_one(buf[i].image, device) for i in raw]
        images = dict(zip(raw, decoded))
    for i, item in enumerate(buf):
        if i not in images:
            yield item
            continue
        if images[i] is not None:
            yield item._replace(image=transform(images[i]))
            continue
        try:  # the device refused it: PIL decides, as the workers decode without device decoding
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield item._replace(image=load_transformed(root / item.path, transform))
        except ImageLoadError as e:
            yield item._replace(image=None, error=e.reason)
