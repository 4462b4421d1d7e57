"""Extract one range of candidate images into one cache file: reader -> model -> writer, resumable.

``extract_range`` is the whole single-process extraction (every candidate) and each torchrun
shard (candidate positions [first, stop)). ``existing_cache`` decides whether a file on disk is
this request's (a hit, or a run to resume) before anything runs.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..cache.feature_cache import CacheBusy, CacheError, CacheInfo, CacheWriter, now_iso, read_info, read_int8_observers
from ..cache.freshness import set_aside_copies
from ..cache.provenance import Provenance, versions
from ..config import flag_text, option_text
from ..cache.row_donors import find_donors
from ..data.folders import ImageFolderListing, stratified_order
from ..data.image_reader import DECODE_VERSION, ImageListDataset, batches, first_frames_line, read_items
from ..data.moves import rename_to_free
from ..errors import PipelineError, UsageError
from ..files import Terminated, one_line, writing
from . import backbones as bb

log = logging.getLogger(__name__)


class ExtractionTerminated(Terminated):
    """SIGTERM or SIGHUP (``files.unwinding_on_signals``) while extracting into ``cache``: its ``rows`` committed
    rows stay there for the run that resumes it, which the CLI's one line names."""

    def __init__(self, code: int, cache: Path, rows: int):
        super().__init__(code)
        self.cache, self.rows = cache, rows


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C while extracting into ``cache``: its ``rows`` committed rows stay there, as on SIGTERM
    (``ExtractionTerminated``); the CLI's one line names them and the command that resumes."""

    def __init__(self, cache: Path, rows: int):
        # the message is what a notebook shows of it: what is kept and how to go on
        super().__init__(f"{rows} rows kept in {cache}; the same extract resumes from them")
        self.cache, self.rows = cache, rows


def timed(iterable, clock: dict, key: str):
    """``iterable``, adding the time spent waiting for each element to ``clock[key]``."""
    it = iter(iterable)
    while True:
        started = time.perf_counter()
        try:
            element = next(it)
        except StopIteration:
            return
        finally:
            clock[key] += time.perf_counter() - started
        yield element


def rates(model, seconds: float, computed: int) -> dict:
    """{img_per_s: the rate after the one-offs (calibration, then compiling: the first compiled call and its
    batch), which a longer run tends to, what bench/bench_extract.py reports, so a user's run and the bench
    agree; wall_img_per_s: one-off compiling included} of ``computed`` images in ``seconds``."""
    first = model.compiled.first_images if model.compile_seconds else 0
    steady_seconds = seconds - model.compile_seconds
    wall = computed / seconds if seconds > 0 else 0.0
    return {"img_per_s": (computed - first) / steady_seconds if computed > first and steady_seconds > 0 else wall,
            "wall_img_per_s": wall}


def hit_summary(info: CacheInfo, started: float) -> dict:
    """What extract returns for a cache that is already complete."""
    return {"cache": str(info.path), "hit": True, "rows": info.rows,
            "skipped": int(info.attrs.get("skipped_rows", 0)), "feature_shape": list(info.feature_shape),
            "classes": info.classes, "precision": info.attrs.get("precision"),
            "flip": bool(info.attrs.get("flip", False)), "seconds": time.time() - started}


def refuse_changed(listing: ImageFolderListing, batch) -> None:
    """PipelineError when a file of ``batch`` is gone or rewritten since the folder was listed, before the batch
    is written: the cache's name says the folder as listed, so a file moved or edited during the run (an
    ``audit --apply`` beside it) is neither a row nor a skip of it. The rows before stay committed and the
    cache incomplete: the same command resumes once the folder is as listed again (``audit --undo``), and a
    folder left changed is another request (another cache)."""
    changed = listing.changed(item.path for item in batch.items)
    if changed:
        raise PipelineError(f"the data folder {listing.root} changed during extraction: {len(changed)} "
                            f"file{'s' * (len(changed) > 1)} gone or rewritten since it was listed (e.g. "
                            f"{', '.join(changed[:3])}); the cache stays incomplete and nothing of theirs is "
                            "recorded. Run the same command again once nothing else is changing the folder (an "
                            "audit --apply running?)")


def existing_cache(path: Path, key: str) -> Optional[CacheInfo]:
    """The cache at ``path`` when it belongs to this request (complete, or to resume), else None.

    A file that is damaged, foreign or of another fingerprint is moved aside (never deleted) and
    extraction starts again; a file another process holds is an error (CacheBusy).
    """
    if not path.exists():
        return None
    try:
        info = read_info(path)
        if info.attrs["fingerprint"] != key:
            raise CacheError("fingerprint differs")
        return info
    except CacheBusy:
        raise
    except CacheError as e:
        stamp = f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        names = (path.with_name(stamp if i == 1 else f"{stamp}-{i}") for i in itertools.count(1))
        try:  # each name taken in one step: a file set aside there meanwhile (twice in a second) is never replaced
            aside = rename_to_free(path, names)
        except FileNotFoundError:  # another extraction of it set it aside while this one read it
            return None
        log.warning("cache %s could not be resumed (%s); moved it to %s and starting again", path, e, aside)
        return None


#: --compile auto compiles a bf16/fp32 CPU run from this many images on. Measured on a 2-core CPU:
#: compiling VGG-16 costs ~30 s cold and saves ~8 % per image in bf16, so it pays from ~4,500 images.
COMPILE_MIN_IMAGES = 5000
#: ... and a network with depthwise convolutions from this many: EfficientNet-Lite0 in bf16 ran 1.39x faster
#: compiled (30.4 vs 21.9 img/s steady, 1,000 catsdogs photos, docs/performance.md) after a ~48 s compile, which
#: that saving repays after ~3,700 images (Inductor fuses the depthwise convolutions PyTorch runs slowly eager).
COMPILE_MIN_IMAGES_DEPTHWISE = 4000


def should_compile(choice: str, precision: str, device, images: int, depthwise: bool = False) -> bool:
    """--compile: on, off, or auto = int8 (compiled it runs about twice as fast as eager: Inductor fuses the
    quantise/dequantise steps) or a CPU run long enough to pay back the compile time."""
    if choice != "auto":
        return choice == "on"
    return precision == "int8" or (device.type == "cpu" and
                                   images >= (COMPILE_MIN_IMAGES_DEPTHWISE if depthwise else COMPILE_MIN_IMAGES))


def feature_model(cfg, backbone, listing: ImageFolderListing, device, precision: str, compile: bool = False,
                  resumed: Optional[CacheInfo] = None):
    """The backbone's feature part as extract runs it: (Inference, int8 calibration record or None, int8
    calibrated observers or None: stored in the cache so that predict runs this very network).

    int8 reuses a calibration made before instead of calibrating again: the resumed cache's, else the one
    the project's one-offs folder holds for this calibration, backbone, weights and preprocessing
    (``oneoffs``); a new calibration is kept there. The record says ``reused`` where it was (and
    ``reuse_seconds``, what rebuilding took): ``one_offs`` takes them out before the record is stored."""
    from .inference import Inference
    from .oneoffs import oneoffs_dir

    net, calibration, folder = backbone.features, None, oneoffs_dir(cfg.cache_dir)
    if precision == "int8":
        started = time.time()
        net, calibration = int8_feature_network(cfg, backbone, listing, folder, resumed,
                                                lower=not (compile and not cfg.flip))
        if "reused" in calibration:  # what reusing it cost (rebuilding the network from its observers)
            calibration["reuse_seconds"] = round(time.time() - started, 2)
    observers = getattr(net, "observers", None)
    if cfg.flip:
        from .inference import MirrorMean

        log.info("flip: each map is the mean of the photo's and its mirror image's (%s), twice the compute",
                 flag_text("flip"))
        net = MirrorMean(net)
    return (Inference(net, device, precision, cfg.pool, cfg.dtype, compile=compile, compile_batch=cfg.batch_size,
                      cache_folder=folder),
            calibration, observers)


def int8_feature_network(cfg, backbone, listing: ImageFolderListing, folder: Path, resumed: Optional[CacheInfo],
                         lower: bool):
    """(the int8 network, its calibration record with ``reused`` saying from where, when it was)."""
    from .oneoffs import calibration_key, request_key, store_calibration, stored_calibration
    from .quantize import calibrated_int8, calibration_identity, calibration_listing, int8_network, lent_calibration

    crop = backbone.transform.crop_size[0]
    stored = read_int8_observers(resumed.path) if resumed is not None else None
    if stored is not None:
        calibration = {**json.loads(resumed.attrs["calibration"]), "reused": "the cache being resumed"}
        return int8_network(backbone.features, stored, (3, crop, crop), lower), calibration
    lent, why = lent_calibration(cfg)
    if lent is not None:  # the earlier cache's very network: its rows are reused by content
        log.info("int8 network rebuilt from the calibration of %s (its %d photos), whose rows are reused",
                 cfg.calib_cache, len(lent.get("images", [])))
        return (int8_network(backbone.features, read_int8_observers(cfg.calib_cache), (3, crop, crop), lower),
                {**lent, "observers_from": str(Path(cfg.calib_cache).resolve()),
                 "reused": f"the cache {cfg.calib_cache}"})
    if why:
        log.warning("the int8 calibration of %s cannot be reused (%s): calibrating on %s, so every row is computed",
                    cfg.calib_cache, why, cfg.calib_data or cfg.data)
    calib_listing = calibration_listing(cfg.calib_data, listing)
    identity = calibration_identity(calib_listing, cfg.seed, cfg.calib_n)
    key = calibration_key(identity, backbone.spec.name, backbone.features,
                          Provenance.of_backbone(backbone, ()).preprocessing.to_dict())
    found = stored_calibration(folder, key, calib_listing.root)
    if found is not None:
        observers, calibration = found
        log.info("int8 calibration reused (%s: %d photos, %.0f s when made)", folder / "int8" / f"{key}.json",
                 len(calibration.get("images", [])), calibration.get("seconds", 0))
        return (int8_network(backbone.features, observers, (3, crop, crop), lower),
                {**calibration, "reused": str(folder / "int8" / f"{key}.json")})
    net, calibration = calibrated_int8(backbone.features, calib_listing, cfg.seed, cfg.calib_n, backbone.transform,
                                       lower=lower)
    store_calibration(folder, key, net.observers, calibration, calib_listing.root,
                      request_key(identity, cfg.backbone, bb.weights_identity(cfg.weights)))
    return net, calibration


def one_offs(calibration: Optional[dict]) -> dict:
    """What this run paid once, for its summary: the int8 calibration's seconds (or what reusing one took, and
    from where: taken out of ``calibration``, which the cache keeps as it was made)."""
    if not calibration:
        return {}
    reused = calibration.pop("reused", "")
    seconds = calibration.pop("reuse_seconds", 0.0) if reused else calibration["seconds"]
    return {"calibration_seconds": seconds, **({"calibration_reused": reused} if reused else {})}


def batches_reusing(model, items, batch_size: int, limit: int, donors, reuse: dict, classes=()):
    """(batch, features of its good items) as ``inference.run_batches``, except that items the reader
    marked ``reused`` get their rows from ``donors`` instead of the model (counted in ``reuse``: rows
    copied, and how many of them now carry another class than in the cache they came from)."""
    for batch in batches(items, batch_size, limit):
        good = batch.good
        fresh = [g for g in good if not g.reused]
        computed = model([g.image for g in fresh]) if fresh else None
        old = [g for g in good if g.reused]
        if not old:
            yield batch, computed
            continue
        copied = donors.rows([g.digest for g in old])
        sample = computed if computed is not None else copied
        feats = np.empty((len(good), *sample.shape[1:]), sample.dtype)
        is_old = np.array([g.reused for g in good])
        feats[is_old] = copied
        if computed is not None:
            feats[~is_old] = computed
        reuse["reused"] += len(old)
        reuse["label_changes"] += sum(donors.class_changed(g.digest, classes[g.label]) for g in old)
        yield batch, feats


def warn_short(rows: int, n: int, listing, skipped: int) -> None:
    """The line of an extraction that found fewer good images than it wanted: of the ``n`` asked for, or (--n 0)
    of the folder's files, the listing's left-out entries (dangling links, pipes) among them, each one of the
    ``skipped``. One wording for one process and torchrun's (which said 'asked for' with no --n given)."""
    wanted, what = (n, "asked for") if n else (len(listing.files) + len(listing.bad), "files")
    log.warning("only %d good images of the %d %s (%d skipped)", rows, wanted, what, skipped)


def extract_range(cfg, listing: ImageFolderListing, key: str, path: Path, resumed: Optional[CacheInfo] = None,
                  positions: Optional[tuple[int, int]] = None, extra_attrs: Optional[dict] = None) -> dict:
    """Extract into ``path``, continuing ``resumed`` (its validated progress) if given.

    ``cfg`` is a ``config.ExtractConfig``. Without ``positions``, the first ``cfg.n`` good images
    of the stratified order (all with n=0); with ``positions=(first, stop)``, every good image among
    those candidates (one torchrun shard, ``extra_attrs`` added to its file).
    """
    from ..devices import resolve_device, resolve_precision
    from ..progress import progress

    # int8 is a CPU path: --device auto means the CPU for it, even where CUDA is available
    device = resolve_device("cpu" if cfg.precision == "int8" and cfg.device == "auto" else cfg.device)
    precision = resolve_precision(cfg.precision, device, int8_ok=True, asked=cfg.device)
    if resumed is not None and resumed.attrs["precision"] != precision:
        raise UsageError(f"{path} was started in precision {resumed.attrs['precision']!r} and this run computes in "
                         f"{precision!r}; pass {option_text('precision', resumed.attrs['precision'])} to finish it")
    backbone = bb.load_backbone(cfg.backbone, cfg.weights)
    order = stratified_order(listing.labels, cfg.seed)
    items = [(listing.files[i].path, listing.files[i].label) for i in order]
    first, stop = positions or (0, len(items))
    target = stop - first if positions else (cfg.n or len(items))
    rows = start_rows = resumed.rows if resumed else 0
    # auto decides on the whole request, so a resumed run or a torchrun shard decides as the first run did
    model, calibration, observers = feature_model(cfg, backbone, listing, device, precision,
                                                  should_compile(cfg.compile, precision, device, cfg.n or len(items),
                                                                 bb.has_depthwise(backbone.features)),
                                                  resumed)
    backbone.model = None  # the classifier (about 500 MB for VGG-16) is not needed to extract
    paid = one_offs(calibration)
    provenance = Provenance.of_backbone(backbone, listing.classes, cfg.pool, cfg.weights,
                                        data_root=str(Path(cfg.data).resolve()),
                                        data_fingerprint=listing.fingerprint(), versions=versions())
    attrs = {
        "fingerprint": key, **provenance.cache_attrs(),
        "seed": cfg.seed, "n_requested": cfg.n, "sample": "seeded, stratified by class (proportional)",
        "n_source_files": len(items), "dtype": cfg.dtype, "precision": precision, "device": str(device),
        "batch_size": cfg.batch_size, "created": now_iso(), "command": cfg.command, "config": json.dumps(asdict(cfg)),
        "purpose": cfg.purpose, "decode_version": DECODE_VERSION, "flip": bool(cfg.flip),
        **({"calibration": json.dumps(calibration)} if calibration else {}),
        **(extra_attrs or {}),
    }
    start = max(int(resumed.attrs["next_candidate"]) if resumed else 0, first)
    # rows of other caches made the same way, by content: a photo already computed is not decoded again
    stale = set_aside_copies(path) if not positions else []  # this request's caches set aside as stale
    donors = (find_donors(path.parent, attrs, exclude=path, also=stale)
              if not positions and rows < target else None)
    if donors:
        log.debug("%d rows of earlier caches with the same features may be reused by content", len(donors))
    # the decoding workers fork before the cache file is opened, so they never hold it
    dataset = ImageListDataset(listing.root, items[:stop], backbone.transform, start=start,
                               raw_jpeg=cfg.decode == "device", digests=True,
                               known=donors.digests if donors else frozenset())
    candidates = read_items(dataset, cfg.workers, device, chunk=cfg.batch_size) if rows < target else iter(())
    reader = candidates  # a CPU network's reader says whether it decoded in turns with it or beside it
    if cfg.decode == "device":
        from ..data.device_decode import decode_on_device

        candidates = decode_on_device(candidates, backbone.transform, device, listing.root)
    t0, clock = time.time(), {"input": 0.0, "write": 0.0}
    reuse = {"reused": 0, "label_changes": 0}
    # a full disk: one line, resumable
    # the donors' files are open from find_donors on: closed however the run ends, early returns included
    with donors or contextlib.nullcontext(), writing(path), \
            CacheWriter(path, attrs, source=listing, int8_observers=observers) as writer:
        if writer.complete:  # another process finished this very cache while we waited for its lock
            return hit_summary(read_info(path), t0)
        if writer.rows != start_rows:
            raise CacheBusy(f"{path} changed while this extraction started; run it again")
        if resumed is None and not positions and listing.bad:  # links, pipes: skipped like undecodable files
            writer.append(None, [], [], start, list(listing.bad))
        # from the first batch on: a compile on its first call (tens of seconds, said by still_running) counted in
        # the rate said 1.0 img/s, eta 24,738 s for a 100 s run of 24,000 photos
        bar = None
        first_frames: list = []  # (path, frames) of the animated GIFs, multi-page TIFFs...: read from frame 1 alone
        try:
            for batch, feats in batches_reusing(model, timed(candidates, clock, "input"), cfg.batch_size,
                                                target - start_rows, donors, reuse, listing.classes):
                refuse_changed(listing, batch)
                for p, why in batch.bad:
                    log.warning("skipping %s: %s", one_line(p), one_line(why))  # a newline in a name: still one line
                good = batch.good
                first_frames += [(g.path, g.frames) for g in good if g.frames > 1]
                if feats is not None and not np.isfinite(feats).all():
                    finite = np.isfinite(feats).reshape(len(good), -1).all(1)
                    bad_rows = [g.path for g, ok in zip(good, finite) if not ok]
                    raise PipelineError(f"the backbone gave NaN or infinite features for {len(bad_rows)} images (e.g. "
                                        f"{', '.join(bad_rows[:3])}); nothing of this batch was written (check the "
                                        "weights and their sidecar's mean/std)")
                started = time.perf_counter()
                writer.append(feats, [g.label for g in good], [g.path for g in good], batch.next_position,
                              batch.bad, digests=[g.digest for g in good])
                clock["write"] += time.perf_counter() - started
                rows += len(good)
                if bar is None:
                    bar = progress(total=target, initial=rows - len(good), unit="img", desc="extract")
                bar.update(len(good))
                bar.set_postfix(skipped=writer.skipped_rows, refresh=False)
        except Terminated as e:  # what the file keeps is known here only
            raise ExtractionTerminated(e.code, path, writer.rows) from None
        except KeyboardInterrupt:  # Ctrl-C: the same count, for the same one line
            raise ExtractionInterrupted(path, writer.rows) from None
        finally:
            if bar is not None:
                bar.close()
        if first_frames:
            log.warning("%s", first_frames_line(first_frames))
        skipped = writer.skipped_rows
        if rows == 0 and not positions:
            raise UsageError(f"no image in {cfg.data} could be decoded ({skipped} tried); run check-images on it")
        if rows < target and not positions:
            warn_short(rows, cfg.n, listing, skipped)
        before = json.loads(writer.f.attrs.get("reuse", "{}") or "{}")
        total = {k: int(before.get(k, 0)) + reuse[k] for k in reuse}
        computed = rows - start_rows - reuse["reused"]
        speed = rates(model, time.time() - t0, computed)
        # how fast this machine made it (choose-backbone reads it back on a cache hit); every row copied: the
        # rate of the caches they came from
        if computed:
            rate = json.dumps({**speed, "images": computed, "device": str(device), "precision": precision,
                               "flip": bool(cfg.flip)})
        else:
            rate = donors.extract_rate if donors else None
        writer.finish(reuse=json.dumps({**total, "computed": rows - total["reused"],
                                        "from": sorted({*before.get("from", []), *(
                                            Path(p).name for p in (donors.used_sources if donors else []))})}),
                      **({"extract_rate": rate} if rate else {}))
        shape = list(writer.f["features"].shape[1:]) if "features" in writer.f else []
    for p in stale:  # superseded: every row of it that still holds is in the new cache
        p.unlink(missing_ok=True)
        log.info("removed %s (set aside as stale; its rows that still hold were reused)", p)
    seconds = time.time() - t0
    return {"cache": str(path), "hit": False, "rows": rows, "computed": computed, "resumed_from": start_rows,
            "reused": reuse["reused"], "label_changes": reuse["label_changes"],
            "skipped": skipped, "feature_shape": shape, "classes": list(listing.classes),
            "device": str(device), "precision": precision, "flip": bool(cfg.flip), "seconds": seconds,
            **rates(model, seconds, computed),
            # where the time went: waiting for decoded images, the model (compiling included), HDF5 writes
            "stage_seconds": {**clock, "model": model.busy_seconds}, "compile_seconds": model.compile_seconds,
            "compiled": bool(model.compiled and not model.compiled.failed), "compile_cache": model.compile_cache,
            "decoding": getattr(reader, "choice", "") or ("in background processes" if rows > start_rows else ""),
            **paid}
