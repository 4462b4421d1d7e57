"""Using models: classify image files and folders with a saved checkpoint; the ImageNet sanity check.

Predictions stream: folders are listed, images decoded by background workers, classified in
batches, and each row (written at once with --output FILE as CSV) comes out in input order.
A file that cannot be decoded gets a row with its error instead of a class. Ctrl-C keeps the rows
computed so far: the output file is completed with them (``Interrupted``). Booleans are ``true`` /
``false`` in every format (JSON's words: CSV and the table write them so too).
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..config import ImagenetCheckConfig, PredictConfig, check_config, check_options, option_text, option_value
from ..data.folders import FRAMES, NOT_UTF8, ImageLoadError, is_image_name, load_rgb, walk
from ..data.image_reader import (
    Batch,
    ImageListDataset,
    Item,
    first_frame_note,
    first_frames_line,
    load_transformed,
    read_items,
)
from ..data.moves import rename_to_free
from ..devices import resolve_device
from ..errors import UsageError
from ..extraction import backbones as bb
from ..extraction.inference import run_batches
from ..files import (
    SafeCsvWriter,
    Terminated,
    atomic_write,
    check_output,
    folder_held,
    folder_of_a_file,
    is_utf8,
    json_text,
    numbered_name,
    one_line,
    quoted,
    unwinding_on_signals,
    writing,
)
from ..heads.heatmaps import overlay
from ..progress import is_quiet, progress
from .whole_models import (
    checkpoint_reads,
    map_grid,
    model_from_checkpoint,
    network,
    read_checkpoint,
    split_extras,
    split_maps,
)

log = logging.getLogger(__name__)

COLUMNS = ("path", "class", "probability", "unknown", "ood_score", "error", "note")


@dataclass(frozen=True)
class PredictResult:
    """predict's answer: one row per file (class, probability, unknown, ood_score, or its error) and counts."""

    model: str
    kind: str
    classes: list
    files: int  # the files found (on Ctrl-C more than the rows computed)
    images: int  # the rows computed
    errors: int  # rows of files that could not be read (their error instead of a class)
    unknown: int  # rows the unknown score flags
    output: Optional[str]  # the file the rows went to (--output); None: they are for stdout
    explain: Optional[str]  # the folder of the heatmaps (--explain), else None
    seconds: float
    img_per_s: float
    rows: list


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during predict, once the rows computed until then are kept (and written, with --output):
    ``result`` is predict's result (a PredictResult) for them."""

    def __init__(self, result: PredictResult):
        super().__init__()
        self.result = result


def cell(value):
    """A value as CSV and the table write it: a boolean as JSON does (true / false: one rule for every
    format), None as an empty cell, anything else as it is."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return "" if value is None else value


def csv_row(row: dict) -> dict:
    return {k: cell(v) for k, v in row.items()}


def list_inputs(paths) -> list[str]:
    """Image files named directly, and the image files under named folders (sorted, recursive). A folder that
    cannot be read, or one reached twice through links, is said in a line of its own: its photos have no rows."""
    if not paths:
        raise UsageError("no image or folder given to predict")
    if "" in map(os.fspath, paths):  # Path('') is '.': predict "$PHOTOS", PHOTOS unset, classified the working folder
        raise UsageError("'' is an empty name: give an image file or a folder ('.' for the working folder)")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            left_out: list = []
            for dirpath, filenames in walk(p, left_out):
                files += [str(Path(dirpath) / f) for f in filenames if is_image_name(f)]
            for where, why in left_out:
                log.warning("%s: %s", one_line(str(p.parent / where)), one_line(why))
        elif p.is_file() or p.is_symlink():  # a dangling or looping link (photos/*.jpg): its row says so, as in a
            files.append(str(_not_a_cache(p)))  # folder; it was 'does not exist', the whole run refused
        elif p.exists():  # a named pipe, a device: its row says what it is, as in a folder (never opened); it was
            files.append(str(p))  # 'is neither a file nor a folder', the whole run refused
        else:
            raise UsageError(f"{str(p)!r} does not exist")
    if not files:
        raise UsageError(f"no image files in {', '.join(map(str, paths))}")
    bad = [f for f in files if not is_utf8(f)]
    if bad:
        raise UsageError(f"{quoted(bad[0])}: {NOT_UTF8}" + (f" ({len(bad) - 1} more such names)" if bad[1:] else ""))
    return files


def _not_a_cache(path: Path) -> Path:
    """The file named to predict, unless it is an HDF5 file (a feature cache): Pillow's HDF5 stub knows those,
    so it became a row '0 x 0 pixels: an empty image' instead of saying what scores a cache."""
    import h5py

    try:
        hdf5 = h5py.is_hdf5(path)
    except OSError:  # unreadable: its row says why
        return path
    if hdf5:
        raise UsageError(f"{quoted(str(path))} is a feature cache, not a photo: predict classifies photos; a head "
                         f"scores a cache with evaluate --model HEAD --cache {quoted(str(path))}, or in Python "
                         "pipeline.Head.load(HEAD).score(cache)")
    return path


def read_images(pairs, transform, model, batch_size: int, workers: int, root=Path("")) -> Iterator[Item]:
    """The Items of (path, label) ``pairs`` (relative to ``root``) decoded with ``transform`` for ``model``
    (an ``inference.Inference``), read as ``image_reader.read_items`` reads for a network on its device."""
    return read_items(ImageListDataset(Path(root), list(pairs), transform), workers, model.device, chunk=batch_size)


def iter_log_proba(model, items: Iterable[Item], batch_size: int) -> Iterator[tuple]:
    """The one loop from images to a network's outputs (log-probabilities, and the extra columns of a
    ``whole_models.WithExtras`` network): (item, its output row, or None when the file is unreadable:
    ``item.error`` says why) per item, in order, batched by ``inference.run_batches``. predict, evaluate
    --data, train's validation, export's parity check and the API all read images through it."""
    for batch, out in run_batches(model, items, batch_size):
        k = 0
        for item in batch.items:
            if item.ok:
                yield item, out[k]
                k += 1
            else:
                yield item, None


class ImageOutputs:
    """The good/bad bookkeeping of the loop: the output rows, labels and paths of the good items in order,
    and each unreadable file once, with why (logged when it is first met, unless ``warn`` is False).
    One instance may collect several passes (train's epochs): a file is reported once."""

    def __init__(self, warn: bool = True):
        self.warn, self.bad = warn, {}
        self.frames: dict = {}  # path -> frames of the good files read from their first frame alone (a GIF's)
        self.clear()

    def clear(self) -> None:
        """Forget the good items (the bad ones stay known, so a file is reported once)."""
        self.rows, self.labels, self.paths = [], [], []

    def add(self, item: Item, out) -> None:
        if out is None:
            if item.path not in self.bad and self.warn:
                log.warning("skipping %s: %s", item.path, item.error)
            self.bad.setdefault(item.path, item.error)
        else:
            self.rows.append(out)
            self.labels.append(item.label)
            self.paths.append(item.path)
            if item.frames > 1:
                self.frames[item.path] = item.frames

    def warn_first_frames(self) -> None:
        """The one warning for the files read from their first frame alone (``image_reader.first_frames_line``)."""
        if self.frames:
            log.warning("%s", first_frames_line(list(self.frames.items())))

    def collect(self, stream) -> "ImageOutputs":
        """Add every (item, output) of ``stream`` (``iter_log_proba``'s); returns self."""
        for item, out in stream:
            self.add(item, out)
        return self

    def arrays(self, none_read: str) -> tuple[np.ndarray, np.ndarray]:
        """(the output rows stacked, the labels); ``none_read``: the UsageError when no image was read."""
        if not self.rows:
            raise UsageError(none_read)
        return np.stack(self.rows), np.array(self.labels, np.int64)


def outputs_of_inputs(lm, model, inputs, batch_size: int, workers=None) -> np.ndarray:
    """``model``'s output rows (float64), in order, for ``inputs``: an image path, a folder (its images, sorted,
    recursively: the order predict lists), a PIL image, or a list of these (the API's ``X``). An unreadable
    file is a UsageError naming it. ``workers`` None: decoded in this process for fewer than 64 files."""
    from PIL import Image

    from ..data.folders import ImageLoadError, check_size, frame_count, to_rgb
    from ..data.portable import decode_failure, orientation, upright

    def pil_item(i: int, im) -> Item:
        """A PIL image given in memory, under the rules a file's header meets (empty, too many pixels, too thin),
        turned upright by its EXIF Orientation as a file is (``Image.open`` of a phone photo keeps the tag;
        ``ImageOps.exif_transpose`` drops it, so an image already turned is not turned twice)."""
        try:
            check_size(im.size)
            read_pixels(im)
            image = lm.transform(upright(to_rgb(im), orientation(im)))
            # an opened animated GIF or multi-page TIFF at its first frame: said as a file's is (counted once the
            # pixels are taken: counting seeks through its frames, then back to the first)
            frames = frame_count(im) if im.tell() == 0 else 1
            return Item(i, image, -1, f"<image {i}>", frames=frames)
        except ImageLoadError as e:
            return Item(i, None, -1, f"<image {i}>", e.reason)

    def read_pixels(im) -> None:
        """Pillow reads an opened image's pixels when first used: ImageLoadError when it cannot, as for a file."""
        try:
            im.load()
        except AssertionError:  # Pillow's bare assert: the file closed first (``with Image.open(p) as im`` over)
            raise ImageLoadError("its file was closed before its pixels were read: pass the path, or call im.load() "
                                 "inside Image.open's with block", "unreadable") from None
        except (OSError, ValueError) as e:  # cut short or damaged, as a file's row would say
            raise ImageLoadError(decode_failure(e), "unreadable") from None

    if isinstance(inputs, (str, bytes, os.PathLike, Image.Image)) or not hasattr(inputs, "__iter__"):
        inputs = [inputs]  # one photo; anything else (5, None, bytes) is refused below by name, not "not iterable"
    inputs = list(inputs)
    if not inputs:
        raise UsageError("nothing to predict: X is empty")
    files, images, order = [], [], []
    for x in inputs:
        if isinstance(x, Image.Image):
            order.append(("image", len(images)))
            images.append(x)
        elif isinstance(x, (str, os.PathLike)):
            found = list_inputs([os.fspath(x)])  # a folder: its images, sorted, recursively
            order += [("file", len(files) + i) for i in range(len(found))]
            files += found
        else:
            raise TypeError(f"cannot predict a {type(x).__name__}: pass image paths, folders or PIL images"
                            + (" (an array of cached features only to a Head)" if isinstance(x, np.ndarray) else "")
                            + (" (a photo's bytes: Image.open(io.BytesIO(data)))" if isinstance(x, bytes) else ""))
    got = {"file": ImageOutputs(warn=False), "image": ImageOutputs(warn=False)}
    if files:
        workers = (0 if len(files) < 64 else -1) if workers is None else workers
        items = read_images([(f, -1) for f in files], lm.transform, model, batch_size, workers)
        got["file"].collect(progress(iter_log_proba(model, items, batch_size), total=len(files), unit="img",
                                     desc="predict"))
        _refuse_unread(got["file"], len(files))
    got["image"].collect(iter_log_proba(model, (pil_item(i, im) for i, im in enumerate(images)), batch_size))
    _refuse_unread(got["image"], len(images))
    got["file"].frames.update(got["image"].frames)  # one warning for the files and the images given in memory
    got["file"].warn_first_frames()
    return np.stack([got[kind].rows[j] for kind, j in order]).astype(np.float64)


def _refuse_unread(got: "ImageOutputs", n: int) -> None:
    """The API predicts every input or none: a UsageError naming the first few that could not be read."""
    if got.bad:
        bad = [f"{p} ({why})" for p, why in got.bad.items()]
        raise UsageError(f"{len(bad)} of {n} images could not be read: {'; '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}")


def prediction_rows(lm, batch: Batch, outputs, top: int = 0) -> list[dict]:
    """The rows of one batch, in order (``prediction_row`` of each item); ``outputs``: the network's for the
    batch's good items (None when it has none)."""
    good = iter(outputs if outputs is not None else ())
    return [prediction_row(lm, item, next(good) if item.ok else None, top) for item in batch.items]


def prediction_row(lm, item: Item, output, top: int = 0) -> dict:
    """{path, class, probability, unknown, ood_score, error, note} of one item; ``output``: the network's
    (``whole_models.network``: log-probabilities, then the unknown score when the head has one), None for an
    unreadable file. ``class`` is the best class even when the photo looks like none of them (``unknown``: its
    ``ood_score`` is above the threshold); both are None for a model without an unknown score. ``note``: None, or
    that the photo was read from the first of its frames (an animated GIF, a multi-page TIFF: ``first_frame_note``).

    The one place a row is made: predict and the prediction service (``serving.service``) both call it,
    so a file gives the same row from either. ``top`` > 0 adds ``top``: the ``top`` most probable
    classes as [{class, probability}] (the service's page draws them as bars).
    """
    if output is None:
        return {"path": item.path, "class": None, "probability": None, "unknown": None, "ood_score": None,
                "error": item.error, "note": None}
    classes = lm.classes
    logp, ood = split_extras(output, len(classes))
    best = int(logp.argmax())
    row = {"path": item.path, "class": classes[best], "probability": float(np.exp(logp[best])),
           "unknown": None if ood is None else bool(ood > lm.model.head.threshold_used),
           "ood_score": None if ood is None else round(float(ood), 6), "error": None,
           "note": first_frame_note(item.frames)}
    if top > 0:
        order = np.argsort(-logp, kind="stable")[:top]
        row["top"] = [{"class": classes[int(i)], "probability": float(np.exp(logp[i]))} for i in order]
    return row


def iter_predictions(lm, model, files: list[str], batch_size: int, workers: int,
                     explain: Optional[Path] = None, first_frames: Optional[list] = None) -> Iterator[dict]:
    """One row per file, in order (``prediction_row``); ``model`` is ``network(lm, ...)``, with ``maps``
    when ``explain`` names the folder that gets each photo's heatmap overlay (its row's ``heatmap``).
    ``first_frames``: a list that gets (path, frames) of each file read from its first frame alone (a GIF's)."""
    items = read_images([(f, -1) for f in files], lm.transform, model, batch_size, workers)
    grid = map_grid(lm) if explain else None
    for item, out in iter_log_proba(model, items, batch_size):
        if first_frames is not None and out is not None and item.frames > 1:
            first_frames.append((item.path, item.frames))
        if not grid:
            yield prediction_row(lm, item, out)
            continue
        out, cam = split_maps(out, grid) if out is not None else (None, None)
        row = prediction_row(lm, item, out)
        row["heatmap"] = write_overlay(lm, item, cam, explain) if out is not None else None
        yield row


def write_overlay(lm, item: Item, cam, folder: Path) -> str:
    """A good photo's heatmap over it as ``folder/NNNNN-name.png`` (its number in the input order), never over a
    file: where an earlier run into the folder left that name (the same photos again), ``NNNNN-name-2.png``, then
    ``-3``... (that run's file was replaced). The file's name (its row's ``heatmap``)."""
    name = numbered_name(item.position, item.path, ".png")
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    with unwinding_on_signals():
        try:
            with writing(folder / name):
                overlay(lm.transform, item.image, cam).save(tmp, format="PNG")
                names = (folder / (name if i == 1 else f"{name[:-len('.png')]}-{i}.png") for i in itertools.count(1))
                return str(rename_to_free(tmp, names))  # a file made meanwhile is kept too
        finally:
            if tmp.exists():
                tmp.unlink()


def row_columns(explained: bool) -> tuple:
    """The CSV columns: predict's, and ``heatmap`` (the overlay's file) with --explain."""
    return COLUMNS + ("heatmap",) if explained else COLUMNS


def format_rows(rows: list[dict], fmt: str) -> str:
    columns = row_columns(bool(rows) and "heatmap" in rows[0])
    if fmt == "json":
        return json_text(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = SafeCsvWriter(buf, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(map(csv_row, rows))
        return buf.getvalue().rstrip("\n")
    # one row a line whatever the names hold: cells escaped as files.one_line (csv and json quote their own)
    cells = [{k: one_line(str(r[k])) if r[k] is not None else "" for k in ("path", "class", "error")} for r in rows]
    width = max([len("path")] + [len(c["path"]) for c in cells])
    lines = [f"{'path':<{width}}  {'class':<16} {'probability':>11}  {'unknown':<7}  {'ood_score':>9}  error"]
    for r, c in zip(rows, cells):
        prob = "" if r["probability"] is None else f"{r['probability']:.4f}"
        unknown = cell(r.get("unknown"))
        ood = "" if r.get("ood_score") is None else f"{r['ood_score']:.4f}"
        lines.append(f"{c['path']:<{width}}  {c['class']:<16} {prob:>11}  {unknown:<7}  {ood:>9}  {c['error']}")
    return "\n".join(lines)


def output_format(cfg: PredictConfig) -> str:
    """--format, except that the default table into an --output named .csv or .json is that format: ``predict DIR
    --output pred.json`` wrote a table into pred.json (no JSON reader takes it), and pred.csv was a table too. The
    other format asked for into such a file is refused: --format csv --output pred.json wrote CSV into pred.json."""
    named = {".csv": "csv", ".json": "json"}.get(Path(cfg.output).suffix.lower()) if cfg.output else None
    if named and cfg.format not in ("table", named):
        raise UsageError(f"{option_text('output')} {cfg.output!r} names a {named} file but {option_text('format')} is "
                         f"{cfg.format!r}: give {option_text('format', named)}, or an {option_text('output')} named "
                         f".{cfg.format}")
    return named if named and cfg.format == "table" else cfg.format


def predict(cfg: PredictConfig) -> PredictResult:
    """Classify cfg.paths with cfg.model; the rows are returned, or streamed to cfg.output."""

    check_config(cfg)
    for name, value, what in (("output", cfg.output, "file"), ("explain", cfg.explain, "folder")):
        if value == "":  # else no file and exit 0: explain=os.environ.get("MAPS", "") wrote no heatmap
            raise UsageError(f"{option_text(name)} '' is an empty name; give a {what}, or leave {option_text(name)} "
                             "out")
    cfg = replace(cfg, format=output_format(cfg))
    files = list_inputs(cfg.paths)
    ckpt = read_checkpoint(cfg.model)
    reads, folders = checkpoint_reads(ckpt, cfg.model, cfg.weights)
    if cfg.output:
        check_output(cfg.output, [*files, *reads], data=[*cfg.paths, *folders])
        if is_image_name(os.path.basename(cfg.output)):  # predict a.jpg --output b.jpg replaced the photo b.jpg
            raise UsageError(f"{option_value('output', cfg.output)} is named as an image: the rows would replace a "
                             "photo, or be read as one by a predict of its folder; name it .csv, .json or .txt")
    explain = None
    if cfg.explain:  # a folder of new PNGs: never among the photos (they would be classified next time)
        explain = check_output(cfg.explain, [*files, *reads, (cfg.output, "--output")], data=[*cfg.paths, *folders],
                               what="--explain", folder=True)
        photo = folder_of_a_file(explain, cfg.paths)
        if photo:
            raise UsageError(f"{option_value('explain', cfg.explain)} is the folder of {photo!r}: its heatmaps "
                             "would join that "
                             "photo's neighbours; write them elsewhere")
        held = folder_held(explain, cfg.paths)
        if held:  # predict DIR/in --explain DIR: a later predict DIR would classify the heatmaps as photos
            raise UsageError(f"{option_value('explain', cfg.explain)} holds {held!r}, a folder predicted: its heatmaps "
                             f"would be read as photos by a predict of {cfg.explain!r}; write them elsewhere")
    lm = model_from_checkpoint(ckpt, cfg.model, cfg.weights)
    model = network(lm, cfg.device, cfg.precision, maps=bool(explain))
    if explain:
        with writing(explain):
            explain.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    columns = row_columns(bool(explain))
    first_frames: list = []
    predictions = progress(iter_predictions(lm, model, files, cfg.batch_size, cfg.workers, explain, first_frames),
                           total=len(files), unit="img", desc="predict")

    stopped = []  # the Ctrl-C (or SIGTERM) that ended the rows early

    def write_rows(out) -> None:
        """Every row, streamed (csv: a row as soon as it is known), into ``out`` or just into ``rows``; on
        Ctrl-C the rows so far, as a complete file of their own."""
        writer = SafeCsvWriter(out, columns) if out and cfg.format == "csv" else None
        if writer:
            writer.writeheader()
        try:
            for row in predictions:
                if row["error"] and not is_quiet():  # quiet: one line with the count, at the end
                    log.warning("%s: %s", row["path"], row["error"])
                rows.append(row)
                if writer:
                    writer.writerow(csv_row(row))
        except (KeyboardInterrupt, Terminated) as e:
            stopped.append(e)
        if out and not writer:
            out.write(format_rows(rows, cfg.format) + "\n")

    if cfg.output:  # written under a temporary name and renamed when complete: never a half file
        atomic_write(cfg.output, lambda tmp: _with_open(tmp, write_rows))
    else:
        write_rows(None)
    seconds = time.time() - t0
    errors = sum(r["error"] is not None for r in rows)
    if errors and is_quiet():
        log.warning("%d of %d files could not be read (their rows say why)", errors, len(rows))
    if first_frames:
        log.warning("%s", first_frames_line(first_frames))
    result = PredictResult(model=cfg.model, kind=lm.kind, classes=lm.classes, files=len(files), images=len(rows),
                           errors=errors, unknown=sum(bool(r["unknown"]) for r in rows), output=cfg.output,
                           explain=str(explain) if explain else None, seconds=seconds,
                           img_per_s=len(rows) / seconds if seconds > 0 else 0.0, rows=rows)
    if stopped:
        log.warning("interrupted: %d of %d rows%s", len(rows), len(files),
                    f" written to {cfg.output}" if cfg.output else "")
        if isinstance(stopped[0], Terminated):
            raise stopped[0]
        raise Interrupted(result)
    return result


def _with_open(path: Path, write) -> None:
    with open(path, "w", newline="") as f:
        write(f)


# -- the ImageNet sanity check ------------------------------------------------------------------
@dataclass(frozen=True)
class ImagenetCheckResult:
    """imagenet-check's answer: the top ImageNet classes of one image."""

    image: str
    backbone: str
    weights: str  # the weights as the cache and checkpoints name them (a torchvision name, file:NAME, ...)
    top: list  # {rank, class, index, probability} each, most probable first


def imagenet_check(image: str, backbone: str = ImagenetCheckConfig.backbone,
                   weights: str = ImagenetCheckConfig.weights, top: int = ImagenetCheckConfig.top,
                   device: str = ImagenetCheckConfig.device) -> ImagenetCheckResult:
    """Top-k ImageNet classes of one image from the full pretrained model (classifier included)."""

    check_options(ImagenetCheckConfig, {"top": top}, python=False)
    try:
        rgb = load_rgb(image)  # a typo or a broken photo is told before the weights load (VGG-16's: 528 MB to download)
    except ImageLoadError as e:
        raise UsageError(f"{image}: {e.reason}") from None
    frames = rgb.info.get(FRAMES, 1)
    dev = resolve_device(device)  # '--device tpu' is told before the weights load too
    loaded = bb.load_backbone(backbone, weights)
    if loaded.covers != "all":
        random = f"are random ({option_text('weights', 'none')})"
        what = random if loaded.covers == "none" else "cover only the features"
        raise UsageError(f"weights {loaded.weights_id} {what} of {backbone}, not its ImageNet classifier; "
                         f"imagenet-check needs the full pretrained model, e.g. {option_text('weights', 'DEFAULT')}")
    categories = bb.imagenet_categories(loaded)  # a local full-model file: its library's ImageNet class names
    try:
        x = load_transformed(image, loaded.transform).unsqueeze(0)
    except ImageLoadError as e:
        raise UsageError(f"{image}: {e.reason}") from None
    with torch.inference_mode():
        prob = torch.softmax(loaded.model.to(dev)(x.to(dev)).float(), 1)[0].cpu()
    if len(categories) != len(prob):
        raise UsageError(f"{backbone}'s classifier has {len(prob)} outputs but {len(categories)} class names are "
                         "known; imagenet-check needs an ImageNet-1k classifier")
    values, indices = prob.topk(min(top, len(prob)))
    if frames > 1:  # an animated GIF, a multi-page TIFF: said as predict and extract say it
        log.warning("%s", first_frames_line([(image, frames)]))
    return ImagenetCheckResult(image=image, backbone=backbone, weights=loaded.weights_id,
                               top=[{"rank": r + 1, "class": categories[i], "index": int(i), "probability": float(p)}
                                    for r, (p, i) in enumerate(zip(values.tolist(), indices.tolist()))])
