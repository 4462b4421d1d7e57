"""Using models: classify image files and folders with a saved checkpoint; the ImageNet sanity check.

Predictions stream: folders are listed, images decoded by background workers, classified in
batches, and each row (written at once with --output FILE as CSV) comes out in input order.
A file that cannot be decoded gets a row with its error instead of a class. Ctrl-C keeps the rows
computed so far: the output file is completed with them (``Interrupted``). Booleans are ``true`` /
``false`` in every format (JSON's words: CSV and the table write them so too).
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import ImagenetCheckConfig, PredictConfig, check_config, check_options
from ..data.folders import NOT_UTF8, ImageLoadError, is_image_name, walk
from ..data.image_reader import Batch, ImageListDataset, load_transformed, read_items
from ..devices import resolve_device
from ..errors import UsageError
from ..extraction import backbones as bb
from ..extraction.inference import run_batches
from ..files import (
    SafeCsvWriter,
    Terminated,
    atomic_write,
    check_output,
    is_utf8,
    numbered_name,
    one_line,
    shown,
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

COLUMNS = ("path", "class", "probability", "unknown", "ood_score", "error")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during predict, once the rows computed until then are kept (and written, with --output):
    ``result`` is predict's result for them."""

    def __init__(self, result: dict):
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
    """Image files named directly, and the image files under named folders (sorted, recursive)."""
    if not paths:
        raise UsageError("no image or folder given to predict")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, filenames in walk(p):
                files += [str(Path(dirpath) / f) for f in filenames if is_image_name(f)]
        elif p.is_file():
            files.append(str(p))
        else:
            raise UsageError(f"{str(p)!r} {'is neither a file nor a folder' if p.exists() else 'does not exist'}")
    if not files:
        raise UsageError(f"no image files in {', '.join(map(str, paths))}")
    bad = [f for f in files if not is_utf8(f)]
    if bad:
        raise UsageError(f"{shown(bad[0])!r}: {NOT_UTF8}" + (f" ({len(bad) - 1} more such names)" if bad[1:] else ""))
    return files


def iter_log_proba(model, transform, files: list[str], batch_size: int, workers: int) -> Iterator[tuple]:
    """(item, its log-probabilities, or None when the file is unreadable: ``item.error`` says why) per
    file, in order; ``model`` an ``inference.Inference``, ``transform`` the model's preprocessing."""

    items = read_items(ImageListDataset(Path(""), [(f, -1) for f in files], transform), workers, model.device,
                       chunk=batch_size)
    for batch, logp in run_batches(model, items, batch_size):
        k = 0
        for item in batch.items:
            if item.ok:
                yield item, logp[k]
                k += 1
            else:
                yield item, None


def prediction_rows(lm, batch: Batch, outputs, top: int = 0) -> list[dict]:
    """The rows of one batch, in order: {path, class, probability, unknown, ood_score, error}; ``outputs``:
    the network's (``whole_models.network``: log-probabilities, then the unknown score when the head has
    one) for the batch's good items (None when it has none). ``class`` is the best class even when the
    photo looks like none of them (``unknown``: its ``ood_score`` is above the threshold); both are None
    for a model without an unknown score.

    The one place a row is made: predict and the prediction service (``serving.service``) both call it,
    so a file gives the same row from either. ``top`` > 0 adds ``top``: the ``top`` most probable
    classes as [{class, probability}] (the service's page draws them as bars).
    """
    classes, rows, k = lm.classes, [], 0
    threshold = lm.model.head.threshold_used
    for item in batch.items:
        if not item.ok:
            rows.append({"path": item.path, "class": None, "probability": None, "unknown": None, "ood_score": None,
                         "error": item.error})
            continue
        logp, ood = split_extras(outputs[k], len(classes))
        k += 1
        best = int(logp.argmax())
        row = {"path": item.path, "class": classes[best], "probability": float(np.exp(logp[best])),
               "unknown": None if ood is None else bool(ood > threshold),
               "ood_score": None if ood is None else round(float(ood), 6), "error": None}
        if top > 0:
            order = np.argsort(-logp, kind="stable")[:top]
            row["top"] = [{"class": classes[int(i)], "probability": float(np.exp(logp[i]))} for i in order]
        rows.append(row)
    return rows


def iter_predictions(lm, model, files: list[str], batch_size: int, workers: int,
                     explain: Optional[Path] = None) -> Iterator[dict]:
    """One row per file, in order (``prediction_rows``); ``model`` is ``network(lm, ...)``, with ``maps``
    when ``explain`` names the folder that gets each photo's heatmap overlay (its row's ``heatmap``)."""

    items = read_items(ImageListDataset(Path(""), [(f, -1) for f in files], lm.transform), workers, model.device,
                       chunk=batch_size)
    grid = map_grid(lm) if explain else None
    for batch, outputs in run_batches(model, items, batch_size):
        maps = None
        if grid and outputs is not None:
            outputs, maps = split_maps(outputs, grid)
        rows = prediction_rows(lm, batch, outputs)
        if grid:
            write_overlays(lm, batch, rows, maps, explain)
        yield from rows


def write_overlays(lm, batch: Batch, rows: list[dict], maps, folder: Path) -> None:
    """Each good photo's heatmap over it as ``folder/NNNNN-name.png`` (its number in the input order), the
    file's name in its row's ``heatmap`` (None for an unreadable photo)."""
    good = iter(zip(batch.good, maps if maps is not None else []))
    for item, row in zip(batch.items, rows):
        row["heatmap"] = None
        if item.ok:
            g, cam = next(good)
            path = folder / numbered_name(g.position, g.path, ".png")
            atomic_write(path, lambda tmp: overlay(lm.transform, g.image, cam).save(tmp, format="PNG"))
            row["heatmap"] = str(path)


def row_columns(explained: bool) -> tuple:
    """The CSV columns: predict's, and ``heatmap`` (the overlay's file) with --explain."""
    return COLUMNS + ("heatmap",) if explained else COLUMNS


def format_rows(rows: list[dict], fmt: str) -> str:
    columns = row_columns(bool(rows) and "heatmap" in rows[0])
    if fmt == "json":
        return json.dumps(rows, indent=2)
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


def predict(cfg: PredictConfig) -> dict:
    """Classify cfg.paths with cfg.model; the rows are returned, or streamed to cfg.output."""

    check_config(cfg)
    files = list_inputs(cfg.paths)
    ckpt = read_checkpoint(cfg.model)
    reads, folders = checkpoint_reads(ckpt, cfg.model, cfg.weights)
    if cfg.output:
        check_output(cfg.output, [*files, *reads], data=[*cfg.paths, *folders])
    explain = None
    if cfg.explain:  # a folder of new PNGs: never among the photos (they would be classified next time)
        explain = check_output(cfg.explain, [*files, *reads, (cfg.output, "--output")], data=[*cfg.paths, *folders],
                               what="--explain", folder=True)
    lm = model_from_checkpoint(ckpt, cfg.model, cfg.weights)
    model = network(lm, cfg.device, cfg.precision, maps=bool(explain))
    if explain:
        with writing(explain):
            explain.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    columns = row_columns(bool(explain))
    predictions = progress(iter_predictions(lm, model, files, cfg.batch_size, cfg.workers, explain),
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
    result = {"model": cfg.model, "kind": lm.kind, "classes": lm.classes, "files": len(files),
              "images": len(rows), "errors": errors, "unknown": sum(bool(r["unknown"]) for r in rows),
              "output": cfg.output, "explain": str(explain) if explain else None,
              "seconds": seconds, "img_per_s": len(rows) / seconds if seconds > 0 else 0.0,
              "rows": rows}
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
def imagenet_check(image: str, backbone: str = ImagenetCheckConfig.backbone,
                   weights: str = ImagenetCheckConfig.weights, top: int = ImagenetCheckConfig.top,
                   device: str = ImagenetCheckConfig.device) -> dict:
    """Top-k ImageNet classes of one image from the full pretrained model (classifier included)."""

    check_options(ImagenetCheckConfig, {"top": top}, python=False)
    loaded = bb.load_backbone(backbone, weights)
    if loaded.covers != "all":
        what = "are random (--weights none)" if loaded.covers == "none" else "cover only the features"
        raise UsageError(f"weights {loaded.weights_id} {what} of {backbone}, not its ImageNet classifier; "
                         "imagenet-check needs the full pretrained model, e.g. --weights DEFAULT")
    categories = bb.imagenet_categories(loaded)  # a local full-model file: its library's ImageNet class names
    try:
        x = load_transformed(image, loaded.transform).unsqueeze(0)
    except ImageLoadError as e:
        raise UsageError(f"{image}: {e.reason}") from None
    dev = resolve_device(device)
    with torch.inference_mode():
        prob = torch.softmax(loaded.model.to(dev)(x.to(dev)).float(), 1)[0].cpu()
    if len(categories) != len(prob):
        raise UsageError(f"{backbone}'s classifier has {len(prob)} outputs but {len(categories)} class names are "
                         "known; imagenet-check needs an ImageNet-1k classifier")
    values, indices = prob.topk(min(top, len(prob)))
    return {"image": image, "backbone": backbone, "weights": loaded.weights_id,
            "top": [{"rank": r + 1, "class": categories[i], "index": int(i), "probability": float(p)}
                    for r, (p, i) in enumerate(zip(values.tolist(), indices.tolist()))]}
