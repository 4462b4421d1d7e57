"""The train and finetune stages: whole models trained on images, end to end.

``train`` freezes the backbone and trains the new head on decoded images (so, unlike a feature
cache, random augmentation is possible). ``finetune`` then unfreezes all or the last K blocks of
the backbone and trains at a low learning rate, the backbone's lower still, optionally after a
few head-only epochs, starting from a fit-head or train checkpoint. Both use the same seeded,
stratified sample (``--n``) and train/val split as extract and fit-head.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ..cache.feature_cache import CacheBusy, CacheError, FeatureCache
from ..config import FinetuneConfig, TrainConfig, option_text
from ..data.folders import canonical_name, class_index, list_image_folder, near_miss_text, stratified_order
from ..data.image_reader import ImageListDataset, collate_items, file_digest, item_loader, iter_items, quiet_hangups
from ..devices import resolve_device, resolve_precision, resolve_workers
from ..errors import DiskFull, PipelineError, UsageError
from ..extraction.inference import Inference
from ..files import Terminated, check_output, signals_deferred
from ..heads.epoch_loop import (
    per_class_accuracy,
    run_epochs,
    split_indices,
    train_one_epoch,
    validate_training,
)
from ..heads.trust import fit_trust
from ..progress import progress
from ..runs.run_folders import drop_staged, finish_run, is_staged, publish_run_dir, staged_run_dir
from . import trained_on
from .trained_on import refitted
from .predict import ImageOutputs, iter_log_proba
from .resume import (
    TrainingInterrupted,
    TrainingTerminated,
    clear_leftovers,
    init_head_gone,
    items_digest,
    read_resume,
    restore,
    resume_fields,
    run_record,
    training_into,
)
from .whole_models import (
    ALL,
    WithExtras,
    build_model,
    checkpoint_reads,
    count_params,
    model_from_checkpoint,
    parse_unfreeze,
    read_checkpoint,
    save_model,
    split_extras,
)

log = logging.getLogger(__name__)


def validate(cfg: TrainConfig) -> None:
    validate_training(cfg, data=((cfg.data, "--data"),))
    if cfg.resume:  # the run goes on writing there (model.pt, curves.png): never among the photos it reads
        check_output(cfg.resume, data=((cfg.data, "--data"),), what="--resume", folder=True)
        init_head_gone(cfg)
    if isinstance(cfg, FinetuneConfig):
        if not 0 <= cfg.head_epochs <= cfg.epochs:
            raise UsageError(f"{option_text('head_epochs')} must be between 0 and {option_text('epochs')} "
                             f"({cfg.epochs}), "
                             f"got {cfg.head_epochs}")


# -- data --------------------------------------------------------------------------------------
def train_transform(transform, augment: bool):
    """The weights' preprocessing, or with --augment: a random resized crop and flip, then its normalisation."""
    if not augment:
        return transform

    return T.Compose([
        T.RandomResizedCrop(transform.crop_size[0], interpolation=transform.interpolation,
                            antialias=transform.antialias),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(transform.mean, transform.std),
    ])


def _loader(root, items, transform, cfg: TrainConfig, shuffle: bool):
    """A persistent loader of Items: Batches of ``cfg.batch_size`` (train, shuffled) or chunks in order (val)."""

    workers = resolve_workers(cfg.workers)
    dataset = ImageListDataset(root, items, transform)
    if not shuffle:
        return item_loader(dataset, workers, persistent=True)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                      collate_fn=collate_items, persistent_workers=workers > 0, worker_init_fn=quiet_hangups,
                      generator=torch.Generator().manual_seed(cfg.seed))


def sample_split(labels: np.ndarray, n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Listing indices of the train and val images: the first n of the stratified order, then the shared split.

    The sample keeps extract's order (the order of a cache's rows), so with the same --n and seed
    the validation images are those fit-head and compare-sklearn hold out (unless extract replaced
    unreadable files): fine-tuning from a fit-head checkpoint is validated on images its head never saw.
    """
    if n > len(labels):
        raise UsageError(f"{option_text('n', n)} is more than the {len(labels)} images in the data folder")
    chosen = stratified_order(labels, seed)[:n or len(labels)]
    train, val = split_indices(labels[chosen], val_fraction, seed)
    return chosen[train], chosen[val]


# -- loops -------------------------------------------------------------------------------------
def evaluate(model, val_loader, batch_size: int, skipped: ImageOutputs
             ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Accuracy, mean NLL, labels and predictions of the validation images (``predict.iter_log_proba``)."""
    logp, y = _outputs(model, val_loader, batch_size, skipped, "no validation image could be decoded")
    loss_sum = 0.0  # summed batch by batch (the loop's batches: batch_size good images each), as always
    for i in range(0, len(y), batch_size):
        loss_sum -= float(logp[i:i + batch_size][np.arange(len(y[i:i + batch_size])), y[i:i + batch_size]].sum())
    pred = logp.argmax(1)
    return float((pred == y).mean()), loss_sum / len(y), y, pred


def _outputs(model, loader, batch_size: int, skipped: ImageOutputs, none_read: str = "no image could be decoded"):
    """(the network's output rows, labels) of a loader's images; unreadable files go to ``skipped``'s record."""
    skipped.clear()
    return skipped.collect(iter_log_proba(model, iter_items(loader), batch_size)).arrays(none_read)


def trust_of(cfg: TrainConfig, model, device, precision, listing, train_idx, val_loader, transform,
             skipped: ImageOutputs) -> dict:
    """``heads.trust.fit_trust`` on images: the temperature from the validation images, the unknown score
    from the pooled features of a seeded sample of ``unknown_rows`` training images (one more pass over
    them) against the validation images'; set on ``model.head``."""
    n_classes = len(listing.classes)
    extras = Inference(WithExtras(model, "pooled"), device, precision, freeze=False)
    out, y = _outputs(extras, val_loader, cfg.batch_size, skipped)
    logp, val_pooled = split_extras(out, n_classes)

    def train_pooled(keep):
        loader = _loader(listing.root, [(listing.files[i].path, listing.files[i].label) for i in keep], transform,
                         cfg, shuffle=False)
        return split_extras(_outputs(extras, loader, cfg.batch_size, skipped)[0], n_classes)[1]

    return fit_trust(cfg, model.head, (logp, y, "val"), train_idx, train_pooled, lambda: val_pooled)


def _to_stderr(bar):
    """The bar's ``write`` aimed at stderr: tqdm's goes to stdout, where --json output must stay alone."""

    return lambda line: bar.write(line, file=sys.stderr)


def _minibatches(loader, device, skipped: ImageOutputs, bar, per_class: np.ndarray):
    """(images, labels) on ``device`` from a loader of Batches; unreadable files skipped and logged; the labels
    decoded counted into ``per_class`` (on the host, before they move: no device sync a step)."""

    for batch in loader:
        for item in batch.items:
            if not item.ok:
                skipped.add(item, None)
            elif item.frames > 1:  # an animated GIF, a multi-page TIFF: said once a run (``validate``)
                skipped.frames[item.path] = item.frames
        bar.update(len(batch.items))
        if batch.good:
            labels = batch.labels()
            per_class += np.bincount(labels.numpy(), minlength=len(per_class))
            yield batch.images().to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def unlearnt_classes(per_class, classes: list, listing, train_idx, skipped: ImageOutputs, n: int,
                     val_idx=(), val_fraction: float = 0.0) -> None:
    """Refuse (exit 2) a run in which a class has no training image to learn from: none in the training split
    (a small --n, or a class's one photo put in validation; ``per_class`` None: checked before any work), or every
    one there unreadable (``per_class``: the images an epoch decoded, by class). The model would still have its
    output, and report a val acc, of a class it never saw."""
    counts = np.bincount(listing.labels[train_idx], minlength=len(classes)) if per_class is None else per_class
    for c in np.flatnonzero(counts == 0):
        mine = [listing.files[i].path for i in train_idx if listing.files[i].label == c]
        held = sum(1 for i in val_idx if listing.files[i].label == c)
        if not mine and held:  # its one photo (of the sample) in validation: --n 0 'take a larger --n' said nothing
            of_n, larger = (f" of {option_text('n', n)}", f" (or take a larger {option_text('n')})") if n else ("", "")
            raise UsageError(f"class {classes[c]!r} has no photo among the {len(train_idx)} training images: its "
                             f"{held} photo{'' if held == 1 else 's'}{of_n} went to validation "
                             f"({option_text('val_fraction', val_fraction)}); a class needs at least 2 photos, one for "
                             f"each: add photos{larger}")
        if not mine:
            raise UsageError(f"class {classes[c]!r} has no photo among the {len(train_idx)} training images of "
                             f"{option_text('n', n)}: the model could not learn it; take a larger {option_text('n')}")
        raise UsageError(f"class {classes[c]!r} has no training image to learn from: all {len(mine)} of its "
                         f"training photos are unreadable (e.g. {mine[0]}: {skipped.bad.get(mine[0])}); fix or "
                         "remove its folder")


def head_training_images(init_head: str, listing, ckpt: Optional[dict] = None) -> set:
    """The images of ``listing`` a fit-head checkpoint was fitted on (``head_images``: its training split, and its
    validation rows too when it was refitted on every row), so finetune does not validate on them."""
    trained, refit = head_images(init_head, listing, ckpt)
    return trained | refit


def head_images(init_head: str, listing, ckpt: Optional[dict] = None) -> tuple[set, set]:
    """(the images of ``listing`` in a fit-head checkpoint's training split, those in its validation split that
    its refit on every row saw: fit-head's default, ``--refit``), so finetune never validates on them.

    Found by content (sha256, as fit-head's --test-data does), so a copy of the head's folder is caught
    too, with the digests the cache keeps; a row without one (an older cache, its file gone) by relative
    path and size. Empty for other checkpoints; when the head's cache is gone nobody can tell, and that
    is said.
    """
    ckpt = ckpt or read_checkpoint(init_head)  # ``ckpt``: the checkpoint when the caller has read it already
    if ckpt["kind"] != "fit-head":
        return set(), set()
    try:
        with FeatureCache(ckpt["cache"]) as cache:
            train_rows, val_rows = split_indices(cache.labels, ckpt["config"]["val_fraction"], ckpt["config"]["seed"])
            if not refitted(ckpt):
                val_rows = val_rows[:0]
            return tuple(_found(listing, cache, rows) for rows in (train_rows, val_rows))
    except (CacheBusy, CacheError, KeyError, OSError) as e:
        log.warning("cannot tell which images %s was trained on (%s): validation may include some of them",
                    init_head, e)
        return set(), set()


def _found(listing, cache, rows) -> set:
    """The images of ``listing`` that are ``rows`` of ``cache``: by path in the cache's own folder, else by content."""
    paths = cache.paths
    trained = [paths[i] for i in rows]
    if Path(cache.attrs["data_root"]) == Path(listing.root).resolve():
        return set(trained)
    digests = cache.row_digests(rows) if len(rows) else []  # kept in the cache: the head's folder may be gone
    sizes = dict(zip((p.decode() for p in cache.f["source/paths"][:]), cache.f["source/sizes"][:].tolist())
                 ) if "source" in cache.f else {}
    by_content, by_name = {}, set()  # by_content: file size (None: not recorded) -> digests
    for p, h in zip(trained, digests):
        if h:
            by_content.setdefault(sizes.get(p), set()).add(h)
        else:
            by_name.add((p, sizes.get(p)))
    any_size = by_content.get(None, set())

    def trained_on(f) -> bool:
        if (f.path, f.size) in by_name:
            return True
        if f.size not in by_content and not any_size:
            return False  # no trained file has this size: not hashed
        h = file_digest(listing.root / f.path)
        return h in by_content.get(f.size, ()) or h in any_size

    return {f.path for f in listing.files if trained_on(f)} if trained else set()


def _fit(cfg: TrainConfig, kind: str, lm, stages: list, listing, head_saw: tuple = (frozenset(), frozenset()),
         start_saw: Optional[dict] = None) -> TrainResult:
    """Train ``lm`` on ``listing`` epoch by epoch; ``stages[e]`` = (unfreeze value, stage name) for epoch e;
    ``head_saw``: ``head_images`` of the starting head; ``start_saw``: the photos the starting model was fitted
    on (``trained_on.of_checkpoint``), kept with this run's in its model.pt."""
    with contextlib.ExitStack() as held:  # the run folder's lock, from its first save (or the resume) to the end
        return _train_run(cfg, kind, lm, stages, listing, head_saw, held, start_saw)


def unseen_validation(val_idx: np.ndarray, listing, head_saw: tuple) -> tuple[np.ndarray, list, int]:
    """(validation rows, those left out, how many kept that the starting head's refit saw). Validating on images
    the starting head was fitted on would flatter it (val acc 1.000): its training split is left out (none left:
    refused), and so are the validation rows its refit on every row saw, unless that leaves none (finetune on
    the head's own folder): those are kept, said to flatter, rather than refusing fit-head's default flow."""
    trained, refit = head_saw
    left_out = [i for i in val_idx if listing.files[i].path in trained]
    if left_out:
        val_idx = np.array([i for i in val_idx if listing.files[i].path not in trained], np.int64)
        if not len(val_idx):
            raise UsageError(f"every validation image was a training image of {option_text('init_head')}'s head; use "
                             f"another {option_text('seed')} or {option_text('n')}, or a head fitted on other images")
    refit_saw = [i for i in val_idx if listing.files[i].path in refit]
    if refit_saw and len(refit_saw) < len(val_idx):
        val_idx = np.array([i for i in val_idx if listing.files[i].path not in refit], np.int64)
        left_out, refit_saw = left_out + refit_saw, []
    if left_out:
        log.warning("%d of the %d validation images were training images of the starting head; they are left out "
                    "of validation", len(left_out), len(left_out) + len(val_idx))
    if refit_saw:
        unseen = "fit-head --no-refit" if option_text("refit") == "--refit" else "Head(refit=False)"
        log.warning("all %d validation images were fitted by the starting head (fit-head refitted it on every photo "
                    "of its cache, its validation ones too): val acc, loss and the temperature are flattered; "
                    "%s keeps its validation photos unseen", len(refit_saw), unseen)
    return val_idx, left_out, len(refit_saw)


def classes_differ(model: list, data: list, root: str) -> str:
    """Why a folder's classes are not the starting model's, in one line naming only the differences (it printed both
    lists whole: 37 breeds twice to find the one folder added), and the names that are one of the model's in another
    Unicode form or but for case or spaces said so."""
    lack, extra = [c for c in model if c not in data], [c for c in data if c not in model]
    parts = [f"it lacks {_some(lack)} of the model's" if lack else "",
             f"it has {_some(extra)}, which the model has not" if extra else "",
             "its classes are the model's in another order" if not (lack or extra) else ""]
    coded = "".join(f"; {ascii(e)} is the model's {ascii(c)} in another Unicode form (as a Mac writes it): rename "
                    "the folder" for e in extra for c in lack if canonical_name(e) == canonical_name(c))
    hint = coded + near_miss_text([e for e in extra if class_index(lack, e) < 0], lack, whose="the model's")
    hint = hint or "; rename or move its class folders to the model's classes"
    return (f"data folder {root!r} has other classes than the starting model's {len(model)}: "
            f"{'; '.join(p for p in parts if p)}{hint}")


def _some(names: list, shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(c) for c in names[:shown]) + more


def _train_run(cfg: TrainConfig, kind: str, lm, stages: list, listing, head_saw: tuple,
               held: contextlib.ExitStack, start_saw: Optional[dict] = None) -> TrainResult:
    """``_fit``'s run; ``held`` keeps the run folder's lock (``resume.training_into``) until it ends."""
    if list(listing.classes) != lm.classes:
        raise UsageError(classes_differ(lm.classes, list(listing.classes), str(listing.root)))
    train_idx, val_idx = sample_split(listing.labels, cfg.n, cfg.val_fraction, cfg.seed)
    val_idx, left_out, refit_saw = unseen_validation(val_idx, listing, head_saw)
    unlearnt_classes(None, lm.classes, listing, train_idx, None, cfg.n, val_idx, cfg.val_fraction)  # before work
    items = [(f.path, f.label) for f in listing.files]
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, asked=cfg.device)
    lm.model.head.reset_trust()  # a starting head's temperature and known rows describe other features
    model = lm.model.to(device, memory_format=torch.channels_last)
    train_loader = _loader(listing.root, [items[i] for i in train_idx], train_transform(lm.transform, cfg.augment),
                           cfg, shuffle=True)
    val_loader = _loader(listing.root, [items[i] for i in val_idx], lm.transform, cfg, shuffle=False)
    backbone_lr = getattr(cfg, "backbone_lr", None) or cfg.lr / 10
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": cfg.lr},
                            {"params": model.features.parameters(), "lr": backbone_lr}])
    digest = items_digest(listing.files, train_idx, val_idx)
    if cfg.resume:
        held.enter_context(training_into(cfg.resume))
        clear_leftovers(cfg.resume)
    sample = (listing, train_idx, val_idx)
    stopped = read_resume(cfg, kind, recorded_config(cfg), digest, sample) if cfg.resume else None
    kept = run_record(cfg, listing, train_idx, val_idx, stopped)  # the photos one by one: what a resume checks
    saw = trained_on.merged(trained_on.of_run(kept["photos"], len(train_idx)), start_saw)  # their sha256: evaluate's
    val_model = Inference(model, device, precision, freeze=False)  # the same inference path as evaluate/predict
    skipped, state = ImageOutputs(), {"stage": None}
    log.info("%s: %d train / %d val images of %s (unreadable ones skipped as they are read), device %s, "
             "precision %s", kind, len(train_idx), len(val_idx), cfg.data, device, precision)

    def one_epoch(epoch: int):
        unfreeze, name = stages[epoch - 1]
        if name != state["stage"]:
            model.set_trainable(unfreeze)  # frozen parameters get no gradient, so Adam leaves them alone
            total, trainable = count_params(model)
            log.info("epoch %d: %s stage, %s of %s parameters trainable", epoch, name, f"{trainable:,}",
                     f"{total:,}")
            state["stage"] = name
        bar = progress(total=len(train_idx), desc=f"epoch {epoch}", unit="img", leave=False)
        per_class = np.zeros(len(lm.classes), np.int64)  # training images decoded, by class
        acc, loss, state["seen"] = train_one_epoch(model, opt, _minibatches(train_loader, device, skipped, bar,
                                                                            per_class),
                                                   device, precision, cfg.print_every, _to_stderr(bar), epoch)
        bar.close()
        unlearnt_classes(per_class, lm.classes, listing, train_idx, skipped, cfg.n)
        return acc, loss, {"stage": name, "trainable_params": count_params(model)[1], "train_rows": state["seen"]}

    def validate():
        acc, loss, state["y_val"], state["pred"] = evaluate(val_model, val_loader, cfg.batch_size, skipped)
        if not state.get("frames_said"):  # every photo was decoded once by now: one warning a run, not an epoch
            skipped.warn_first_frames()
            state["frames_said"] = True
        return acc, loss

    run = {"dir": Path(cfg.resume) if cfg.resume else None, "done": 0}

    def save_epoch(history: list):  # the run so far, resumable: a Ctrl-C or a crash loses one epoch at most
        if run["dir"] is None:  # hidden until its first model.pt is written: a kill -9 leaves no empty run folder
            run["dir"] = staged_run_dir(cfg.runs_dir, kind)
            held.enter_context(training_into(run["dir"]))  # the lock goes with the folder when it is renamed
        run["saving"] = (len(history), file_identity(run["dir"] / "model.pt"))  # stopped_at: did it land?
        save_model(lm, run["dir"] / "model.pt", kind, recorded_config(cfg),
                   {**history[-1], "epochs_done": len(history), "epochs": cfg.epochs}, history,
                   resume=resume_fields(opt, train_loader.generator, digest, kept), trained_on=saw)
        published(run)
        run["done"] = len(history)

    done = restore(stopped, model, opt, train_loader.generator) if stopped else []
    if done:
        log.info("resuming %s after epoch %d of %d", cfg.resume, len(done), cfg.epochs)
    t0 = time.time()
    try:
        history = run_epochs(cfg.epochs, one_epoch, validate, done=done, on_epoch=save_epoch)
        seconds = time.time() - t0
        if len(history) == len(done):  # --epochs as many as were done: the stopped run finished as it is
            validate()
        trust = trust_of(cfg, model, device, precision, listing, train_idx, val_loader, lm.transform, skipped)
        y_val, seen = state["y_val"], history[-1]["train_rows"]
        per_class = per_class_accuracy(y_val, state["pred"], lm.classes)
        metrics = {**history[-1], "per_class_val_acc": per_class, "train_rows": int(seen),
                   "val_rows": int(len(y_val)), "skipped": len(skipped.bad), "val_left_out_seen_by_head": len(left_out),
                   "val_seen_by_head_refit": refit_saw, **trust}
        out_dir = run["dir"]  # every epoch saved there; a resumed run with no epoch left: the folder resumed
        lm.model.to("cpu")

        def commit():  # the finished model.pt replaces the resumable one: from here on the run is done
            save_model(lm, out_dir / "model.pt", kind, recorded_config(cfg), metrics, history, trained_on=saw)
            run["finished"] = True

        curves = finish_run(out_dir, cfg.runs_dir, kind, history, [out_dir / "model.pt"], commit=commit,
                            backbone=lm.info["backbone"], params=asdict(cfg),
                            metrics={k: metrics[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")})
    except (KeyboardInterrupt, Terminated, PipelineError) as e:  # Ctrl-C, SIGTERM, a full disk, a diverged loss
        if run.get("finished"):
            raise
        kept = stopped_at(run, len(done), cfg.epochs)
        if isinstance(e, Terminated):  # SIGTERM or SIGHUP (the CLI's): the process ends, saying what it keeps
            raise TrainingTerminated(e.code, kept) from None
        if isinstance(e, KeyboardInterrupt):
            raise kept from None
        if kept.run_dir is None:
            raise
        raise with_epochs_kept(e, kept) from None
    return TrainResult(run_dir=str(out_dir), checkpoint=str(out_dir / "model.pt"), curves=str(curves),
                       backbone=lm.info["backbone"], metrics=metrics,
                       skipped_files=[{"path": p, "why": w} for p, w in skipped.bad.items()],
                       device=str(device), precision=precision, fit_seconds=seconds,
                       img_per_s=(seen + len(y_val)) * (len(history) - len(done)) / seconds if seconds > 0 else 0.0,
                       history=history)


@dataclass(frozen=True)
class TrainResult:
    """train's and finetune's answer: the model's scores, where it was saved, and how the run went."""

    run_dir: str
    checkpoint: str
    curves: str
    backbone: str
    metrics: dict  # the last epoch's scores, per-class val acc, rows, the trust's temperature and threshold: model.pt's
    skipped_files: list  # {path, why} of each photo that could not be decoded
    device: str
    precision: str
    fit_seconds: float
    img_per_s: float
    history: list  # one dict per epoch (a resumed run's earlier epochs included)

    @property
    def val_acc(self) -> float:
        return self.metrics["val_acc"]

    @property
    def val_loss(self) -> float:
        return self.metrics["val_loss"]

    def to_dict(self) -> dict:
        """The answer as --json prints it: the metrics' keys at the top level."""
        d = asdict(self)
        head = {k: d.pop(k) for k in ("run_dir", "checkpoint", "curves", "backbone")}
        return {**head, **d.pop("metrics"), **d}


def file_identity(path: Path):
    """(inode, mtime, size) of a file, None where there is none: a save renames a new file onto it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def stopped_at(run: dict, resumed_from: int, epochs: int) -> TrainingInterrupted:
    """What a Ctrl-C leaves: the epochs whose model.pt was written (an epoch whose save was stopped after
    its rename, before the count was updated, is kept: model.pt holds it); a run folder made for a first
    epoch whose save was cut short holds nothing and is removed, so no folder claims epochs it lacks."""
    kept = run["done"] or resumed_from
    saving, before = run.get("saving", (0, None))
    if saving > kept and (now := file_identity(run["dir"] / "model.pt")) is not None and now != before:
        kept = saving
        published(run)  # the first model.pt landed in the hidden folder: the run folder gets its name
    if not kept and is_staged(run["dir"]):
        drop_staged(run["dir"])
    elif not kept and run["dir"] is not None:
        try:
            run["dir"].rmdir()
        except OSError:  # not empty after all: left as it is
            pass
    return TrainingInterrupted(run["dir"] if kept else None, kept, epochs)


def published(run: dict) -> None:
    """``run["dir"]``, while it is the hidden folder its first model.pt was written into, renamed to the run
    folder's name (``run_folders.publish_run_dir``); a signal waits until the new name is recorded."""
    if is_staged(run["dir"]):
        with signals_deferred():
            run["dir"] = publish_run_dir(run["dir"])


def with_epochs_kept(error: PipelineError, kept: TrainingInterrupted) -> PipelineError:
    """``error`` saying which epochs the run folder still holds (and, for a full disk, how to go on), in place
    of the epoch loop's 'nothing was saved'."""
    where = f"{kept.run_dir}/model.pt"
    if isinstance(error, DiskFull):
        return DiskFull(f"{error}; {kept.epochs_done} of {kept.epochs} epochs are kept in {where}: make room, then "
                        f"run the same command with --resume {shlex.quote(str(kept.run_dir))}")
    n, text = kept.epochs_done, str(error)
    note = f"{'epoch 1 is' if n == 1 else f'epochs 1-{n} are'} kept in {where}"
    return type(error)(text.replace("nothing was saved", note) if "nothing was saved" in text else f"{text}; {note}")


def recorded_config(cfg) -> dict:
    """The config a model.pt keeps, its folders and files absolute: export's parity check (the training
    photos) and every output guard find them from any folder, not only from where the run was started."""
    from ..extraction.backbones import is_weights_path

    config = asdict(cfg)
    for key in ("data", "init_head"):
        if config.get(key):
            config[key] = os.path.abspath(config[key])
    if config.get("weights") and is_weights_path(config["weights"]):  # a file (not a name such as DEFAULT)
        config["weights"] = os.path.abspath(config["weights"])
    return config


def train(cfg: TrainConfig) -> TrainResult:
    """Backbone frozen, a new head trained on the images; returns metrics and the checkpoint path."""

    validate(cfg)
    listing = list_image_folder(cfg.data)
    torch.manual_seed(cfg.seed)
    lm = build_model(cfg.backbone or "vgg16", cfg.weights or "DEFAULT", listing.classes, cfg.pool, cfg.dropout)
    return _fit(cfg, "train", lm, [(0, "head")] * cfg.epochs, listing)


def init_head_weights(cfg: FinetuneConfig, ckpt: dict) -> Optional[str]:
    """The --weights --init-head's backbone is loaded with: --weights, or a timm tag written in --backbone (``X.tag``
    is ``X --weights tag``). --backbone is resolved as extract resolves it for a cache's record (``timm:X``, ``X.tag``
    and ``X`` are one network), so only another network is refused here, before any load; other weights are refused
    where the head's record is compared with what they give."""
    from ..extraction import backbones as bb

    if not cfg.backbone or ckpt.get("fused"):  # a fused head is refused by the load, in its own words
        return cfg.weights
    name, weights = bb.canonical_request(cfg.backbone, cfg.weights or "DEFAULT")
    if name != bb.canonical_name(ckpt["backbone"]):
        raise UsageError(f"{option_text('backbone', cfg.backbone)} differs from {cfg.init_head}'s "
                         f"{ckpt['backbone']}")
    return weights if cfg.weights or bb.split_tag(cfg.backbone)[1] else None


def finetune(cfg: FinetuneConfig) -> TrainResult:
    """Backbone (or its last K blocks) unfrozen at a low learning rate, after optional head-only epochs."""

    validate(cfg)
    unfreeze = parse_unfreeze(cfg.unfreeze)
    if unfreeze == 0:
        raise UsageError(f"{option_text('unfreeze', cfg.unfreeze)} leaves nothing of the backbone to fine-tune; use "
                         "train, "
                         "'all' or K of at least 1")
    listing = list_image_folder(cfg.data)
    torch.manual_seed(cfg.seed)
    if cfg.init_head:
        ckpt = read_checkpoint(cfg.init_head)
        check_output(cfg.runs_dir, data=checkpoint_reads(ckpt, cfg.init_head, cfg.weights)[1], what="--runs-dir",
                     folder=True)
        lm = model_from_checkpoint(ckpt, cfg.init_head, init_head_weights(cfg, ckpt), trainable=True)
        if cfg.pool and cfg.pool != lm.info["pool"]:
            raise UsageError(f"{option_text('pool', cfg.pool)} differs from {cfg.init_head}'s {lm.info['pool']}")
    else:
        lm = build_model(cfg.backbone or "vgg16", cfg.weights or "DEFAULT", listing.classes, cfg.pool, cfg.dropout)
    blocks = len(lm.model.blocks()) if hasattr(lm.model, "blocks") else 0  # a fused head's model: none to count
    if blocks and unfreeze != ALL and unfreeze > blocks:  # before any work; 'none' is not finetune's to allow
        raise UsageError(f"cannot unfreeze the last {unfreeze} blocks: {lm.model.backbone} has {blocks} "
                         f"(allowed: all, or 1..{blocks})")
    lm.model.set_trainable(unfreeze)
    stages = [(0, "head") if e < cfg.head_epochs else (unfreeze, "finetune") for e in range(cfg.epochs)]
    head_saw = tuple(map(frozenset, head_images(cfg.init_head, listing, ckpt))) if cfg.init_head else (frozenset(),) * 2
    start_saw = trained_on.of_checkpoint(ckpt) if cfg.init_head else None
    return _fit(cfg, "finetune", lm, stages, listing, head_saw, start_saw)
