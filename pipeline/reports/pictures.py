"""The picture stages: a preview grid of a data folder, and one image's feature map.

Both show images as the backbone sees them: after the weights' own resize and crop, with the
normalisation undone (so a wrong mean/std shows up as wrong colours). Each returns the matplotlib
Figure and what it shows; the caller saves it to ``info["output"]`` (``cfg.output``, checked before
any work; the default name gets a number rather than replace an earlier run's picture).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import FeatureMapConfig, PreviewConfig, check_config, option_text, option_value
from ..data.folders import FRAMES, ImageLoadError, list_image_folder, load_rgb
from ..data.image_reader import first_frames_line
from ..errors import UsageError
from ..extraction.backbones import load_backbone, load_preprocessing, weights_inputs
from ..extraction.inference import Inference
from ..files import check_output, folder_of_a_file, free_default
from ..runs.figures import denormalise, top_channels
from ..runs.figures import preview_figure as draw

log = logging.getLogger(__name__)

#: Class rows a preview draws at most: a row is 250 pixels, and a folder of 1000 classes made a figure of 1000
#: rows that ran for minutes and could not be saved (matplotlib draws at most 2^16 pixels a side)
MAX_PREVIEW_CLASSES = 50


def as_seen(transform, image) -> tuple:
    """(normalised CxHxW tensor, HxWx3 de-normalised array in [0, 1]) of a PIL image."""

    x = transform(image)
    return x, denormalise(x.numpy(), [float(m) for m in transform.mean], [float(s) for s in transform.std])


def sample_per_class(listing, per_class: int, seed: int) -> list[tuple[int, object, str]]:
    """Up to ``per_class`` decodable images of each class, seeded: (label, PIL image, path); of at most
    ``MAX_PREVIEW_CLASSES`` classes, a seeded choice (said on stderr) when the folder has more."""
    rng = np.random.default_rng(seed)
    labels = listing.labels
    chosen = []
    shown = range(len(listing.classes))
    if len(shown) > MAX_PREVIEW_CLASSES:
        shown = sorted(rng.choice(len(shown), MAX_PREVIEW_CLASSES, replace=False).tolist())
        log.warning("%s has %d classes; the preview shows %d of them, a row each (%s chooses which)",
                    listing.root, len(listing.classes), MAX_PREVIEW_CLASSES, option_text("seed"))
    for label in shown:
        got = 0
        for i in rng.permutation(np.flatnonzero(labels == label)):
            if got == per_class:
                break
            path = listing.files[i].path
            try:
                chosen.append((label, load_rgb(listing.root / path), path))
                got += 1
            except ImageLoadError as e:
                log.warning("skipping %s: %s", path, e.reason)
    said_first_frames([(path, image.info.get(FRAMES, 1)) for _, image, path in chosen])
    return chosen


def said_first_frames(shown: list) -> None:
    """The one warning of predict and extract for the pictures drawn from their first frame alone: ``shown`` is
    (path, frames) of each (an animated GIF, a multi-page TIFF: preview and feature-map drew it without a word)."""
    found = [(p, n) for p, n in shown if n > 1]
    if found:
        log.warning("%s", first_frames_line(found))


def class_rows(chosen, classes, transform) -> tuple[list, list, int]:
    """(images as seen, titles, columns) of ``sample_per_class``'s choice: one row per class with images, ended by
    blank cells (title None) where a class has fewer than the others, so no class wraps into the next row."""
    by_class: dict = {}
    for label, image, _ in chosen:
        by_class.setdefault(label, []).append(as_seen(transform, image)[1])
    cols = max(map(len, by_class.values()), default=1)
    images, titles = [], []
    for label, seen in sorted(by_class.items()):
        images += seen + [None] * (cols - len(seen))
        titles += [classes[label]] * len(seen) + [None] * (cols - len(seen))
    return images, titles, cols


@dataclass(frozen=True)
class PreviewResult:
    """preview's answer (the Figure's ``info``): what the grid shows and where it went."""

    output: str  # the PNG written ('' when none was asked for: the API's figure only)
    classes: list
    images: list  # the photos shown, class by class
    backbone: str
    weights: str  # the weights whose preprocessing was used, as caches name them


@dataclass(frozen=True)
class FeatureMapResult:
    """feature-map's answer (the Figure's ``info``): the map's shape, its most active channels, where it went."""

    output: str  # the PNG written ('' when none was asked for: the API's figure only)
    feature_shape: list  # channels x H x W of the backbone's map for the image
    top_channels: list  # the most active channels, most active first
    backbone: str
    weights: str


def preview(cfg: PreviewConfig) -> tuple:
    """(Figure, PreviewResult): a grid of sample images per class, preprocessed as for extraction (``cfg.output``
    checked)."""

    check_config(cfg)
    output = cfg.output and str(check_output(free_default(cfg.output, PreviewConfig.output),
                                             weights_inputs(cfg.weights), data=[cfg.data], suffixes=(".png",)))
    listing = list_image_folder(cfg.data)
    t, weights_id = load_preprocessing(cfg.backbone, cfg.weights)  # the preprocessing only: no weights loaded
    chosen = sample_per_class(listing, cfg.per_class, cfg.seed)
    if not chosen:  # every file skipped: no picture of nothing (it used to be an empty PNG and exit 0)
        raise UsageError(f"no image in {cfg.data} could be decoded ({len(listing.files)} tried); "
                         "run check-images on it")
    images, titles, cols = class_rows(chosen, listing.classes, t)
    fig = draw(images, titles, cols=cols,
               suptitle=f"{Path(cfg.data).name}: resize {t.resize_size[0]}, crop {t.crop_size[0]} "
                        f"({cfg.backbone}, {weights_id})")
    return fig, PreviewResult(output=output, classes=list(listing.classes), images=[p for _, _, p in chosen],
                              backbone=cfg.backbone, weights=weights_id)


def feature_map(cfg: FeatureMapConfig) -> tuple:
    """(Figure, FeatureMapResult): the input image beside its feature map and top channels (``cfg.output`` checked)."""

    from ..runs.figures import feature_map_figure as draw

    check_config(cfg)
    output = cfg.output and str(check_output(free_default(cfg.output, FeatureMapConfig.output),
                                             [(cfg.image, "IMAGE"), *weights_inputs(cfg.weights)], suffixes=(".png",)))
    if output and folder_of_a_file(Path(output).parent, [cfg.image]):  # (that folder exists: nothing was made)
        raise UsageError(f"{option_value('output', output)} is in the folder of IMAGE {cfg.image!r}: a picture "
                         "there would "
                         "join its photos; write it elsewhere")
    try:
        image = load_rgb(cfg.image)
    except ImageLoadError as e:
        raise UsageError(f"image {cfg.image!r}: {e.reason}") from None
    said_first_frames([(cfg.image, image.info.get(FRAMES, 1))])
    backbone = load_backbone(cfg.backbone, cfg.weights)
    x, seen = as_seen(backbone.transform, image)
    model = Inference(backbone.features, torch.device("cpu"), "fp32")
    fmap = model(x[None])[0]
    top = top_channels(fmap, cfg.top_k)
    fig = draw(seen, fmap, top_k=cfg.top_k,
               title=f"{Path(cfg.image).name} through {cfg.backbone} ({backbone.weights_id})")
    return fig, FeatureMapResult(output=output, feature_shape=list(fmap.shape), top_channels=[int(c) for c in top],
                                 backbone=cfg.backbone, weights=backbone.weights_id)


