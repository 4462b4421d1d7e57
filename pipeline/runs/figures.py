"""Pictures: training curves, confusion matrix, misclassified gallery, preview grid, feature maps.

Pure drawing from numpy arrays and PIL images. Each picture has a ``*_figure`` function that returns
a matplotlib ``Figure`` (what the Python API hands out: Jupyter shows it inline) and a ``*_png``
one that draws the same figure and saves it (what the CLI writes). The figures are made without
pyplot, so nothing is kept open and no display is needed; outside a Jupyter kernel the Agg backend
is forced anyway (headless), inside one the notebook's own backend is left alone. Every figure has
a fixed size in inches at ``DPI`` and a constrained layout, so a PNG's pixel size follows from its
grid alone and no label is cut off.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

from ..files import atomic_write, writing
from ..progress import in_notebook  # noqa: E402

if not in_notebook():  # a notebook keeps its inline backend for its own plots
    matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure as _MplFigure  # noqa: E402
from matplotlib.gridspec import GridSpec
from PIL import Image

DPI = 100
CURVES_SIZE = (10.0, 4.0)  # inches: two panels side by side
FEATURE_MAP_SIZE = (15.0, 6.0)
OVERLAY_CELL = (2.0, 2.4)  # inches of one more channel overlay's column or row
PREVIEW_CELL = (2.2, 2.5)  # inches per image, title included
GALLERY_CELL = (2.8, 3.2)


class Figure(_MplFigure):
    """A matplotlib Figure made without pyplot that shows itself as a PNG in Jupyter (``_repr_png_``).

    Not registered with pyplot: nothing to close, never shown twice, garbage-collected like any
    object. ``fig.savefig(path)`` saves it as usual.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=DPI)
        return buf.getvalue()


def save(fig: _MplFigure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``DPI`` to ``path`` (its folder created) through a temporary name, so
    a failure never leaves half a picture or destroys the old one; returns the path."""
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _figure(size) -> Figure:
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def shorten(text: str, width: int) -> str:
    """Keep the end of a long path (the file name), which says the most."""
    return text if len(text) <= width else "\u2026" + text[-(width - 1):]


def curves_figure(history: Sequence[dict], title: str = "") -> Figure:
    """Accuracy and loss per epoch, train vs validation, in two panels (``history``: one dict per epoch
    with epoch, train_acc, val_acc, train_loss, val_loss)."""
    fig = _figure(CURVES_SIZE)
    axes = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for ax, what in zip(axes, ("acc", "loss")):
        ax.plot(epochs, [h[f"train_{what}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{what}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss (NLL)")
        ax.set_title("accuracy" if what == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    return fig


def curves(history: Sequence[dict], path: str | os.PathLike) -> Path:
    """``curves_figure`` saved as a PNG."""
    return save(curves_figure(history), path)


def confusion_size(n_classes: int) -> tuple[float, float]:
    side = max(4.0, 1.5 + 0.5 * n_classes)
    return side + 1.0, side


def confusion_matrix_figure(cm: np.ndarray, classes: Sequence[str], title: str = "confusion matrix") -> Figure:
    """Rows are true classes, columns predicted ones; every cell shows its count."""
    cm = np.asarray(cm)
    n = len(classes)
    fig = _figure(confusion_size(n))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), [shorten(c, 14) for c in classes], rotation=45 if n > 4 else 0,
                  ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), [shorten(c, 14) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=10 if n <= 10 else 6,
                        color="white" if cm[i, j] > threshold else "black")
    return fig


def grid_shape(count: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, count))
    return max(1, math.ceil(count / cols)), cols


def grid_size(rows: int, cols: int, cell) -> tuple[float, float]:
    """Inches of an image grid: at least two cells wide, so that the title fits."""
    return cell[0] * max(cols, 2), cell[1] * rows + 0.4


def _image_grid(images: Sequence, titles: Sequence[str], cell, cols: int, suptitle: str, fontsize: float):
    rows, cols = grid_shape(len(images), cols)
    fig = _figure(grid_size(rows, cols, cell))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, title in zip(axes, images, titles):
        if title is None:  # a blank cell (the end of a short row)
            continue
        if image is None:
            ax.imshow(np.full((8, 8, 3), 0.8))
            ax.text(4, 4, "unreadable", ha="center", va="center")
        else:
            ax.imshow(image)
        ax.set_title(title, fontsize=fontsize)
    fig.suptitle(suptitle)
    return fig


def preview_figure(images: Sequence, titles: Sequence[str], cols: int = 4, suptitle: str = "") -> Figure:
    """A grid of images (HxWx3 arrays in [0, 1] or PIL images), each titled (its class); a cell titled None
    is left blank (a class with fewer images than ``cols`` still ends its row)."""
    return _image_grid(images, titles, PREVIEW_CELL, cols, suptitle, 11)


def _thumbnails_figure(items: Sequence[dict], titles: Sequence[str], cols: int, suptitle: str, empty: str) -> Figure:
    """Titled thumbnails of ``items`` ({image (PIL or None), ...} each), or one line saying there are none."""
    if not items:
        fig = _figure((GALLERY_CELL[0] * 2, 1.5))
        fig.text(0.5, 0.5, empty, ha="center", va="center", fontsize=14)
        return fig
    return _image_grid([it["image"] for it in items], titles, GALLERY_CELL, cols, suptitle, 9)


def gallery_figure(items: Sequence[dict], cols: int = 4, suptitle: str = "most confidently wrong") -> Figure:
    """Thumbnails of misclassified images: {image (PIL or None), path, true, pred, prob} each."""
    titles = [f"{shorten(it['path'], 30)}\ntrue {it['true']} \u2192 pred {it['pred']}\np = {it['prob']:.3f}"
              for it in items]
    return _thumbnails_figure(items, titles, cols, suptitle, "no misclassified images")


def label_issues_figure(items: Sequence[dict], cols: int = 4, suptitle: str = "likely wrong labels") -> Figure:
    """Thumbnails of an audit's label issues: {image (PIL or None), path, given, suggested, score} each."""
    titles = [f"{shorten(it['path'], 30)}\ngiven {it['given']} \u2192 {it['suggested']}?\nscore {it['score']:.3f}"
              for it in items]
    return _thumbnails_figure(items, titles, cols, suptitle, "no label issues found")


def upsample(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one HxW map to ``size`` (width, height)."""

    return np.asarray(Image.fromarray(channel.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def heatmap_overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """A photo (H x W x 3 in [0, 1], as the backbone saw it) with a heatmap (h x w in [0, 1]) upsampled over it in
    'jet' colours: red where the class was decided, the photo faintly blue-tinted where the map is cold."""
    h, w = image.shape[:2]
    heat = np.clip(upsample(np.asarray(heat, np.float32), (w, h)), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    a = (0.15 + 0.45 * heat)[..., None]
    return Image.fromarray(np.round(255 * ((1 - a) * image + a * colours)).astype(np.uint8))


def top_channels(fmap: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` channels of a C x H x W map with the highest mean activation, highest first."""
    return np.argsort(-fmap.reshape(len(fmap), -1).mean(1), kind="stable")[:k]


def overlay_grid(k: int) -> tuple[int, int]:
    """(rows, columns) of feature_map_figure's ``k`` channel overlays: 2 rows up to 8, then 4."""
    rows = 2 if k <= 8 else 4
    return rows, max(1, math.ceil(k / rows))


def feature_map_size(rows: int, cols: int) -> tuple[float, float]:
    """Inches of the feature-map figure: FEATURE_MAP_SIZE up to 2 x 3 overlays, an overlay's cell more for each
    column or row past those (at a fixed size, 32 overlays squeezed 16 titles into a row, one over the other)."""
    return (FEATURE_MAP_SIZE[0] + OVERLAY_CELL[0] * max(0, cols - 3),
            FEATURE_MAP_SIZE[1] + OVERLAY_CELL[1] * max(0, rows - 2))


def feature_map_figure(image: np.ndarray, fmap: np.ndarray, top_k: int = 6, title: str = "") -> Figure:
    """The input (HxWx3 in [0, 1]) beside its C x H' x W' feature map, laid out as channels x positions,
    and the ``top_k`` channels with the highest mean activation upsampled over the input."""

    c, h, w = fmap.shape
    flat = fmap.reshape(c, h * w)
    top = top_channels(fmap, top_k)
    over_rows, over_cols = overlay_grid(len(top))
    fig = _figure(feature_map_size(over_rows, over_cols))
    gs = GridSpec(over_rows, 2 + over_cols, figure=fig, width_ratios=[2.2, 1.6] + [1.0] * over_cols)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(image)
    ax.set_title(f"input ({image.shape[1]}x{image.shape[0]}, as the backbone sees it)", fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(gs[:, 1])
    vmax = float(np.percentile(flat, 99.5)) or float(flat.max()) or 1.0
    im = ax.imshow(flat, aspect="auto", cmap="viridis", vmin=min(0.0, float(flat.min())), vmax=vmax,
                   interpolation="nearest")
    ax.set_xlabel(f"position ({h}x{w} = {h * w})")
    ax.set_ylabel(f"channel ({c})")
    ax.set_title(f"feature map {c} x {h * w}", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.6, label="activation (clipped at 99.5th pct)")
    size = (image.shape[1], image.shape[0])
    for i, ch in enumerate(top):
        ax = fig.add_subplot(gs[i // over_cols, 2 + i % over_cols])
        ax.imshow(image)
        ax.imshow(upsample(fmap[ch], size), cmap="jet", alpha=0.5,
                  vmin=0.0, vmax=float(fmap[ch].max()) or 1.0)
        ax.set_title(f"#{i + 1}: channel {ch}\nmean {flat[ch].mean():.3g}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


def denormalise(tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised CxHxW tensor back to an HxWx3 image in [0, 1] (x * std + mean)."""
    x = np.asarray(tensor, dtype=np.float32)
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.clip(x.transpose(1, 2, 0), 0.0, 1.0)



RELIABILITY_SIZE = (5.0, 6.0)


def reliability_figure(before: dict, after: dict, ece_before: float, ece_after: float, temperature: float,
                       title: str = "reliability") -> Figure:
    """Accuracy against confidence per bin of the top probability, without and with the temperature
    (``before``/``after``: ``calibration.reliability_bins``), over the rows per bin; on the diagonal,
    "0.9" comes true 9 times in 10. Marker areas follow the bins' rows."""
    fig = _figure(RELIABILITY_SIZE)
    ax, bars = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], "--", color="0.6", label="perfectly calibrated")
    total = max(1, sum(after["count"]))
    edges = np.asarray(after["edges"])
    width = edges[1] - edges[0]
    for k, (bins, marker, label) in enumerate(((before, "o", f"T = 1 (ECE {ece_before:.3f})"),
                                               (after, "s", f"T = {temperature:.2f} (ECE {ece_after:.3f})"))):
        keep = [i for i, c in enumerate(bins["count"]) if c]
        ax.scatter([bins["confidence"][i] for i in keep], [bins["accuracy"][i] for i in keep], marker=marker,
                   s=[15 + 300 * bins["count"][i] / total for i in keep], alpha=0.6, label=label)
        bars.bar(edges[:-1] + width * (0.25 + 0.5 * k), bins["count"], width=width / 2, alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    bars.set_yscale("log")
    bars.set_ylabel("photos")
    bars.set_xlabel("confidence (top probability; bins of 1/15)")
    bars.grid(alpha=0.3)
    return fig
