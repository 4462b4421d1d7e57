"""The fit-head stage: a Linear + LogSoftmax classifier trained from a feature cache in seconds.

The head reads a *view* of the cached C x H x W maps, chosen at fit time and never stored again
(``flat``: the tutorial's 25,088-vector; ``avg``/``max``: global pooling; ``avgmax``: both),
normalised (``l2``, ``rms``, ``standardize`` or ``none``), and fitted one of several ways, all saved
as the same ``probe_heads.ProbeHead`` (view -> normalisation -> [RBF map] -> Linear -> LogSoftmax,
tensors only): ``auto`` (the default) stacks an exact RBF SVM (one-vs-rest, gamma 'scale'),
SVC's own one-vs-one pairs (up to ``model_selection.MAX_PAIR_CLASSES`` = 50 classes) and logistic
regression, the C of each chosen by cross-validation, weighted by the NLL of their out-of-fold
log-probabilities (``model_selection.stack_setting``); ``svm``, the RBF SVM alone; ``linear`` with
Adam, weight decay and early stopping on the validation loss (the best epoch's weights restored);
``logreg``, scikit-learn's LogisticRegression converted to the Linear layer; ``kernel``, an RBF
Nystroem map in front of it, with the C and gamma given.
``--tune`` searches every kind and view by cross-validation. ``--test-data`` scores photos the head
never saw, extracted with the training cache's exact backbone, weights and preprocessing.

Features stream from HDF5 in contiguous blocks (shuffled block order, shuffled rows within a
block), so the linear head's memory stays bounded for caches larger than RAM.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..cache.feature_cache import FeatureCache, newest_cache, read_int8_observers, source_changes
from ..cache.provenance import ROW_FEATURES, Provenance
from ..config import FitHeadConfig, Placeholder, option_named, option_text, option_value
from ..data.folders import POOL, TEST, class_index
from ..devices import resolve_device
from ..errors import UsageError
from ..files import check_output, one_line
from ..progress import is_quiet, still_running
from ..runs.run_folders import drop_staged, finish_run, publish_run_dir, staged_run_dir
from .cache_views import CacheRows, CacheViews, Relabelled, cache_classes_to_model, head_scores
from .calibration import before_after
from .checkpoints import HEAD_KIND, write_checkpoint
from .epoch_loop import per_class_accuracy, split_indices, validate_training
from .feature_views import check_view
from .fused_views import FusedRows, fused_paths, single_cache
from .linear_trainer import LinearTraining, train_linear
from .model_selection import (
    AUTO_GRID,
    TUNE_GRIDS,
    CVOptions,
    clearly_better,
    expand_grid,
    fit_setting,
    format_table,
    out_of_fold_log_proba,
    setting_key,
    stacked_row,
    tune,
)
from .probe_heads import ProbeHead
from .sklearn_fits import parse_gamma
from .trust import fit_trust

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitHeadResult:
    """fit-head's answer: the head's scores, how it was fitted, and where its files went."""

    cache: str  # the cache fitted on (one of several fused, or the one that won alone)
    run_dir: str
    checkpoint: str
    curves: Optional[str]  # None for a head without epochs (no curves to draw)
    head: str  # the fitted head described in one line
    train_rows: int
    val_rows: int
    metrics: dict  # val/train/test/CV scores and the temperature: what the ledger and the checkpoint record
    per_class_val_acc: dict
    best_epoch: Optional[int]
    trust: dict  # the temperature and the unknown threshold, and the rows each was fitted on
    fit_seconds: float
    history: list  # one dict per epoch (empty for a head fitted in one go)
    tuning: Optional[dict]  # the CV search (--tune, or the default head's), None without one
    test: Optional[dict]  # the scores on --test-data / --test-cache, None without them
    fit_info: dict
    source_changed: Optional[str]  # how the photos changed since the cache was made (None: they did not)
    default_cache: Optional[dict]  # the newest cache taken when none was named, else None
    caches: list = field(default_factory=list)  # the caches fused into one head's rows (empty for one cache)

    @property
    def val_acc(self) -> float:
        return self.metrics["val_acc"]

    @property
    def val_loss(self) -> float:
        return self.metrics["val_loss"]

    def to_dict(self) -> dict:
        """The answer as --json prints it: the trust's and the metrics' keys at the top level too."""
        d = asdict(self)
        head = {k: d.pop(k) for k in ("cache", "caches", "run_dir", "checkpoint", "curves", "head", "train_rows",
                                      "val_rows")}
        metrics = d.pop("metrics")
        if not head["caches"]:
            del head["caches"]
        return {**head, **d["trust"], **metrics, **d}


def with_recipe(cfg: FitHeadConfig) -> FitHeadConfig:
    """``--recipe seed``: the tutorial's head exactly (flat 25,088-vector scaled by 1/RMS, Adam 0.01, 10 epochs)."""
    if cfg.recipe == "seed":
        return replace(cfg, head="linear", features="flat", normalize="rms", epochs=10, patience=0, lr=0.01,
                       weight_decay=0.0, tune=False)
    return cfg


def validate(cfg: FitHeadConfig) -> None:
    validate_training(cfg, data=((cfg.test_data, "--test-data"),))
    try:
        parse_gamma(cfg.gamma)  # checked as given, before any work (and whichever head uses it)
    except ValueError as e:
        raise UsageError(option_named(f"--{e}")) from None  # '--gamma must be ...', 'gamma must be ...' from Python
    if cfg.test_data and cfg.test_cache:
        raise UsageError(f"pass {option_text('test_data')} or {option_text('test_cache')}, not both")
    _check_head_choice(cfg)
    if fused_paths(cfg.cache) and cfg.test_cache:
        raise UsageError(f"{option_text('test_cache')} names one cache; test a head on several caches' fused "
                         f"features with {option_text('test_data', Placeholder('DIR'))} (each backbone extracts it)")


def _check_head_choice(cfg: FitHeadConfig) -> None:
    """--head with --tune or --recipe seed, which choose the head themselves: it was dropped without a word
    (`--tune --head svm` fitted whatever the search chose; `--recipe seed --head logreg` a linear head)."""
    if cfg.recipe == "seed" and (cfg.tune or cfg.head not in ("auto", "linear")):
        given = _tune_text() if cfg.tune else option_text("head", cfg.head)
        raise UsageError(f"{option_text('recipe', 'seed')} is the tutorial's linear head on flat rows; drop {given}, "
                         f"or {option_text('recipe')}")
    if cfg.tune and cfg.head != "auto":
        raise UsageError(f"{_tune_text()} chooses the head kind (svm, kernel, logreg or linear) by CV itself; drop "
                         f"{option_text('head', cfg.head)}, or {_tune_text()} to fit that head")


def resolve_cache(cache: Optional[str], cache_dir: str) -> tuple[Path, Optional[dict]]:
    """The cache to use, and (when none was named) a description of the one picked by default.

    The default, the newest complete cache in ``cache_dir``, is announced on stderr: a run that
    silently trained on another extraction than the user thought is worse than a longer log.
    """
    if cache:
        return Path(cache), None
    info = newest_cache(cache_dir)
    chosen = {k: info.summary()[k] for k in ("path", "rows", "backbone", "created")}
    log.info("using the newest cache %s (%d rows, %s, created %s); %s picks another",
             chosen["path"], chosen["rows"], chosen["backbone"], chosen["created"], option_text("cache"))
    return info.path, chosen


def check_labelled(cache, path, needs: str = "a head") -> None:
    """A head (an audit) needs two classes: a pool's cache (suggest's unlabelled photos) is refused naming what
    it is, before a solver fails inside on its one class."""
    if len(cache.classes) < 2:
        what = "the unlabelled photos of a pool (suggest's)" if cache.attrs.get("purpose") == POOL else "one class"
        raise UsageError(f"cache {path} holds {what}: {needs} needs a labelled cache of at least two classes")
    counts = np.bincount(np.asarray(cache.labels, np.int64), minlength=len(cache.classes))
    empty = [c for c, k in zip(cache.classes, counts) if k == 0]
    if empty:  # a --n sample that drew none of a small class's photos: it failed inside ('the smallest class has 3')
        n = int(cache.attrs.get("n_requested", 0) or 0)
        them = "its" if len(empty) == 1 else "their"
        skipped = cache.skipped() if hasattr(cache, "skipped") else []
        unreadable = [(p, why) for p, why in skipped if p.split("/", 1)[0] in empty]
        why = (f"{them} photos were skipped as unreadable (e.g. {one_line(unreadable[0][0])}: "
               f"{one_line(unreadable[0][1])}): fix or remove them and extract again" if unreadable else
               f"extract's sample of {option_text('n', n)} drew none of {them} photos: take a larger "
               f"{option_text('n')} ({option_text('n', 0)}: every photo)" if n else
               f"every one of {them} photos was skipped as unreadable: fix or remove them and extract again")
        raise UsageError(f"cache {path} has no row of class{'es' if len(empty) > 1 else ''} "
                         f"{', '.join(map(repr, empty))}: {needs} cannot learn {'it' if len(empty) == 1 else 'them'}; "
                         f"{why}")


def scores(head, cache: FeatureCache, indices: np.ndarray, device, block_rows: int) -> dict:
    """acc, loss and per-class accuracy of ``head`` on some rows of ``cache``; with an unknown score, the share
    of them it keeps as known (``known_kept``: on test photos, the direct check of ``--known-share``)."""
    logp, ood = head_scores(head, cache, indices, device, block_rows)
    y = cache.labels[np.sort(indices)]
    out = {"acc": float((logp.argmax(1) == y).mean()), "loss": float(-logp[np.arange(len(y)), y].mean()),
           "rows": int(len(indices)), "per_class": per_class_accuracy(y, logp.argmax(1), cache.classes),
           "logp": logp, "labels": y}
    if ood is not None:
        out["known_kept"] = float((ood <= float(head.unknown_threshold)).mean())
    return out


# -- the three ways to fit ------------------------------------------------------------------------
def _fit_linear(cfg: FitHeadConfig, cache: FeatureCache, train_idx, val_idx, device):
    """Adam on the Linear layer of a ProbeHead, one line per epoch, early stopping on the val loss.

    Pooled views are small and read once (25,000 rows of avg are 50 MB); the flat view streams."""
    if cfg.features == "flat":
        train, val = CacheRows(cache, train_idx, cfg.block_rows), CacheRows(cache, val_idx, cfg.block_rows)
    else:
        views = [CacheViews(cache, idx, cfg.block_rows) for idx in (train_idx, val_idx)]
        train, val = ((v[cfg.features], v.labels) for v in views)
    return train_linear(train, val, n_classes=len(cache.classes), in_shape=cache.feature_shape, view=cfg.features,
                        normalize=cfg.normalize, training=LinearTraining(
                            lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs, patience=cfg.patience,
                            batch_size=cfg.batch_size, dropout=cfg.dropout, seed=cfg.seed), device=device)


def _setting(cfg: FitHeadConfig) -> dict:
    """fit-head's options as a ``model_selection`` setting (logreg / kernel / svm)."""
    s = {"head": cfg.head, "view": cfg.features, "normalize": cfg.normalize, "C": cfg.C}
    if cfg.head in ("kernel", "svm"):
        s.update(gamma=_gamma(cfg.gamma))
    if cfg.head == "kernel":
        s.update(n_components=cfg.kernel_components)
    return s


def _gamma(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # 'scale' or 'G*scale', checked by sklearn_fits.resolve_gamma


def _fit_sklearn(cfg: FitHeadConfig, cache: FeatureCache, train_idx, setting: Optional[dict] = None):
    """logreg or kernel (or --tune's winner) fitted by scikit-learn on the training rows, as a ProbeHead."""

    rows = CacheViews(cache, train_idx, cfg.block_rows)
    try:
        with still_running(f"fitting the head on {len(train_idx)} rows"):
            return fit_setting(rows, rows.labels, setting or _setting(cfg), n_classes=len(cache.classes),
                               seed=cfg.seed)
    except ValueError as e:  # a bad gamma, a class missing from the training rows
        raise UsageError(str(e)) from None


def _auto_grid(cfg: FitHeadConfig) -> tuple:
    """The default head's search (AUTO_GRID) on the view and normalisation asked for."""
    return tuple({**g, "view": [cfg.features], "normalize": [cfg.normalize],
                  **({"n_components": [cfg.kernel_components]} if g["head"] == ["kernel"] else {})} for g in AUTO_GRID)


def _cv(cfg: FitHeadConfig, folds: int, progress: str = "") -> CVOptions:
    """fit-head's cross-validation: by accuracy, seeded by --seed, on one thread (many small fits); ``progress``
    names its progress bar (none by default)."""
    return CVOptions(folds=folds, seed=cfg.seed, score="accuracy", threads=1, progress=progress)


def _search_grid(cfg: FitHeadConfig):
    """What to cross-validate: --tune's wide grids, or the default head's."""
    if cfg.tune:
        return tuple({**g, "n_components": [cfg.kernel_components]} if g["head"] == ["kernel"] else g
                     for g in TUNE_GRIDS)
    return _auto_grid(cfg)


def _cv_rows(cfg: FitHeadConfig, labels: np.ndarray, train_idx: np.ndarray, folds: Optional[int] = None) -> np.ndarray:
    """The training rows cross-validation runs on: all of them, or a seeded stratified sample of
    ``kernel_components`` rows when there are more (the choice of C and gamma is stable by then, and a
    search over 25,000 rows would take minutes); the winner is fitted on every training row. A class the
    sample leaves with fewer rows than the folds: refused naming --kernel-components, or, with ``folds`` given
    (rows in memory: suggest, whose folds fit its smallest class already), kept whole."""
    if len(train_idx) <= cfg.kernel_components:
        return train_idx
    keep = train_idx[split_indices(labels[train_idx], 1 - cfg.kernel_components / len(train_idx), cfg.seed)[0]]
    n = int(labels.max()) + 1
    sampled, whole = (np.bincount(labels[rows], minlength=n) for rows in (keep, train_idx))
    if folds is not None:
        return np.union1d(keep, train_idx[(sampled < folds)[labels[train_idx]]])
    if sampled.min() < cfg.folds <= whole[sampled.argmin()]:  # the sample, not the folder, is too small
        raise UsageError(f"{option_text('kernel_components', cfg.kernel_components)}: the cross-validation sample "
                         f"of that many training rows holds {sampled.min()} of a class; {cfg.folds}-fold CV needs "
                         f"{cfg.folds} of each (raise {option_text('kernel_components')}, or lower "
                         f"{option_text('folds')})")
    return keep


def _default_unless_beaten(cfg: FitHeadConfig, shape, result: dict) -> dict:
    """The default head's choice among ``result``'s rows (a ``tune`` over --tune's grids), unless the wide
    search's best beats it clearly (``clearly_better``). A wide grid always holds some setting that wins by
    noise on a few hundred rows (measured: avgmax won 5-fold CV on cats-vs-dogs and lost 1 point on its test
    photos; logistic regression on avgmax won the log-loss on caltech20 by 0.04, tied its accuracy and scored
    one test photo fewer), so a challenger must win on both counts."""
    default = _default_row(cfg, shape, result)
    best = result["best"]
    return best if default is None or clearly_better(best, default, result["folds"]) else default


def _default_row(cfg: FitHeadConfig, shape, result: dict) -> Optional[dict]:
    """The default head's own choice from the rows of a ``tune`` table that are its settings (None: some are
    missing): the best one-vs-rest SVM, the best one-vs-one SVM (several classes: with two they are the same
    SVM) and the best logistic regression (CV accuracy, then log-loss; logistic regression: then the smallest C),
    stacked.

    Logistic regression's logits grow with C wherever the rows are (nearly) separable, so among its Cs of the same
    CV accuracy the lower log-loss is the larger scale, not the better ranking: with a few photos a class (every
    out-of-fold row right) it chose C=1000, and a wrong test photo got 0.96-0.99 on the wrong class. Of those as
    accurate, the most regularised (docs/heads.md, "Few photos, all right"). The SVMs keep the log-loss: their
    margins stop growing once C passes the hard margin (the same model from there on), and the smallest C of
    their ties changed more of head_table's splits for no clear gain."""
    default_keys = {setting_key(s) for s in expand_grid(_auto_grid(cfg), shape)}
    rows = [r for r in result["table"] if r["key"] in default_keys]
    several = int(np.max(result["labels"])) > 1

    def best(kind, scheme=None):
        return min((r for r in rows if r["setting"]["head"] == kind and scheme in (None, r["setting"].get("scheme"))),
                   key=lambda r: (-r["acc_mean"], r["setting"]["C"] if kind == "logreg" else r["log_loss_mean"]),
                   default=None)

    svm, logreg, pairs = best("svm", "ovr"), best("logreg"), best("svm", "ovo") if several else None
    if svm is None or logreg is None:
        return None
    return stacked_row(svm, logreg, result, pairs)


def _nested(cfg: FitHeadConfig, rows, grid, n_classes: int) -> dict:
    """--tune's choice made again inside each of ``cfg.folds`` outer folds and scored on the outer fold's rows,
    beside the default head's own choice made the same way: {"tune": row, "default": row} (acc and calibrated
    log-loss, mean and std over the outer folds). Choosing among many settings by the same folds that score
    them flatters the winner; only rows no choice saw say whether the wider search is worth it."""
    from sklearn.model_selection import StratifiedKFold

    from .calibration import with_temperature
    from .model_selection import LOG_FLOOR

    shape = rows.feature_shape
    views = sorted({s["view"] for s in expand_grid(grid, shape)})
    y = rows.labels
    out = {"tune": {"acc": [], "ll": []}, "default": {"acc": [], "ll": []}}
    outer = StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed + 1)
    for k, (tr, te) in enumerate(outer.split(np.zeros(len(y)), y), 1):
        part = {v: rows[v][tr] for v in views}
        inner = tune(part, y[tr], grid, _cv(cfg, cfg.folds, f"--tune nested CV, outer fold {k}/{cfg.folds}"),
                     in_shape=shape)
        choices = {"tune": _default_unless_beaten(cfg, shape, inner), "default": _default_row(cfg, shape, inner)}
        for name, row in choices.items():
            head, _ = fit_setting(part, y[tr], row["setting"], in_shape=shape, n_classes=n_classes, seed=cfg.seed)
            logp = with_temperature(head.log_proba_of_rows(rows[row["setting"]["view"]][te]), row["temperature"])
            out[name]["acc"].append(float((logp.argmax(1) == y[te]).mean()))
            p_true = np.clip(np.exp(logp[np.arange(len(te)), y[te]]), LOG_FLOOR, 1)
            out[name]["ll"].append(float(-np.log(p_true).mean()))
    return {name: {"acc_mean": float(np.mean(r["acc"])), "acc_std": float(np.std(r["acc"])),
                   "log_loss_mean": float(np.mean(r["ll"])), "log_loss_std": float(np.std(r["ll"]))}
            for name, r in out.items()}


def tune_verdict(top: dict, default: Optional[dict], chosen: dict, nested: Optional[dict]) -> str:
    """--tune's decision in one line: the table showed the search's best by CV (not the default's stack, which is
    no row of it) and the head kept, with nothing saying which one fit-head fitted, or why."""
    def scores(row: dict) -> str:
        return f"{row['key']} (CV acc {row['acc_mean']:.3f}, log-loss {row['log_loss_mean']:.4f})"

    if default is None:
        return f"--tune chose {scores(chosen)}: the default head's settings are not all in the search"
    if chosen["key"] != default["key"]:
        return f"--tune chose {scores(chosen)} over the default head {scores(default)}: better in nested CV too"
    why = ("is not better on both by more than the standard error of the difference" if nested is None else
           "is, but not in nested CV (the search made again inside each outer fold)")
    return f"--tune keeps the default head {scores(default)}: the search's best, {scores(top)}, {why}"


class TooFewForFolds(UsageError):
    """The CV's refusal of too small a class for the folds; ``reason`` is the CV's own words, without the remedy
    fit-head adds (compare-sklearn, which has no --head, adds its own)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _tune_text() -> str:
    """--tune, as its caller writes it (Head(tune=True) from Python: config.option_text)."""
    return "--tune" if option_text("tune") == "--tune" else "tune=True"


def _cv_remedy(tune: bool) -> str:
    """What a refusal of too small a class for the folds adds: where the rows went and the options that fit, in
    the caller's terms (a Head in cross_val_score was told '--head', '--folds')."""
    other = f"another {option_text('head')} (linear, logreg, kernel, svm)" + (f" without {_tune_text()}" * tune)
    return (f" (training rows: {option_text('val_fraction')}'s share is held out); give fewer {option_text('folds')} "
            f"(at least 2), {other} or more photos of the smallest class")


def _tune(cfg: FitHeadConfig, cache, train_idx):
    """Stratified k-fold CV on the training rows (over --tune's grids, or the default head's search);
    the winner refitted on all of them. Returns (head, info, tuning, (the winner's out-of-fold
    log-probabilities, their labels))."""
    cv_idx = _cv_rows(cfg, cache.labels, train_idx)
    rows = CacheViews(cache, cv_idx, cfg.block_rows)
    try:
        result = tune(rows, rows.labels, _search_grid(cfg),
                      _cv(cfg, cfg.folds, "--tune cross-validation" if cfg.tune else "cross-validation"))
    except UsageError:  # a refusal of its own (non-finite cache rows): no folds would help
        raise
    except ValueError as e:  # too few rows of a class for the folds
        what = _tune_text() if cfg.tune else option_text("head", "auto")
        raise TooFewForFolds(f"{what}: {e}{_cv_remedy(cfg.tune)}", str(e)) from None
    best, nested, verdict = _default_row(cfg, rows.feature_shape, result), None, None
    if cfg.tune:
        default, top = best, result["best"]
        best = _default_unless_beaten(cfg, rows.feature_shape, result)
        if default is not None and best["key"] != default["key"]:
            nested = _nested(cfg, rows, _search_grid(cfg), len(cache.classes))
            if not clearly_better(nested["tune"], nested["default"], cfg.folds):
                best = default
        verdict = tune_verdict(top, default, best, nested)
    result = {**result, "best": best}  # the table marks the choice
    if cfg.tune and not is_quiet():
        print(format_table(result) + "\n(--tune keeps the default head's best setting unless another beats both its "
              "CV log-loss and its CV accuracy by more than the standard error of the difference, and the wider "
              "search, made again inside each outer fold, beats the default's own search on the outer folds' rows "
              "the same way)" + (f"\nnested CV: --tune {nested['tune']['acc_mean']:.3f} / "
                                 f"{nested['tune']['log_loss_mean']:.4f}, "
                                 f"defaults {nested['default']['acc_mean']:.3f} / "
                                 f"{nested['default']['log_loss_mean']:.4f} (acc / log-loss)" if nested else "")
              + f"\n{verdict}", file=sys.stderr)
    else:
        log.info("head: %s, chosen by %d-fold CV over %d rows (acc %.3f, log-loss %.4f; %d settings)",
                 best["key"], cfg.folds, len(cv_idx), best["acc_mean"], best["log_loss_mean"], len(result["table"]))
    head, info = _fit_sklearn(cfg, cache, train_idx, best["setting"])
    tuning = {"choice": best["key"], "setting": best["setting"], "cv_acc": best["acc_mean"],
              "cv_acc_std": best["acc_std"], "cv_log_loss": best["log_loss_mean"], "folds": cfg.folds,
              "cv_rows": int(len(cv_idx)), "nested": nested, **({"verdict": verdict} if verdict else {}),
              "table": [{k: r[k] for k in ("key", "acc_mean", "acc_std", "log_loss_mean", "log_loss_std")}
                        for r in result["table"]]}
    return head, info, tuning, (result["oof"][best["key"]], rows.labels)


def default_head_on_rows(rows, labels: np.ndarray, n_classes: int, in_shape, cfg: FitHeadConfig) -> tuple:
    """(fit-head's default head, its setting's name) on rows in memory (``rows``: {view: (N, d) rows}): --head
    auto's search by CV (on ``_cv_rows``' rows), then the choice fitted on all of them, for stages that fit a head
    without a run of its own (suggest). With fewer than 2 rows of some class no CV can choose: the
    logistic regression's defaults."""
    labels = np.asarray(labels, np.int64)
    folds = min(cfg.folds, int(np.bincount(labels, minlength=n_classes).min()))
    setting, temperature = {"head": "logreg", "view": cfg.features, "normalize": cfg.normalize}, 1.0
    if folds >= 2:
        some = _cv_rows(cfg, labels, np.arange(len(labels)), folds)
        result = tune({cfg.features: np.asarray(rows[cfg.features])[some]}, labels[some], _auto_grid(cfg),
                      _cv(cfg, folds, "cross-validation"), in_shape=in_shape)
        row = _default_row(cfg, in_shape, result)
        setting, temperature = row["setting"], row["temperature"]
    with still_running(f"fitting the head on {len(labels)} rows"):
        head, info = fit_setting(rows, labels, setting, in_shape=in_shape, n_classes=n_classes, seed=cfg.seed)
    head.set_temperature(temperature)
    return head.eval(), info["key"]


# -- testing on photos the head never saw -----------------------------------------------------------
def check_test_classes(test_data: Optional[str], classes) -> None:
    """A ``--test-data`` folder with a class folder the head does not know, refused before anything is fitted or
    extracted, naming it (it was refused after both, as a cache 'made differently' with the advice to extract it
    with the training cache's network). A folder of some of the head's classes is scored (``relabelled_test``), as
    evaluate scores one: a small test set often lacks a class."""
    if not test_data:
        return
    from ..data.folders import list_image_folder, near_miss_text, unknown_classes

    theirs, ours = list_image_folder(test_data, min_classes=1).classes, list(classes)
    unknown = unknown_classes(theirs, ours)
    if unknown:
        hint = near_miss_text(unknown, ours, whose="the head's")
        raise UsageError(f"{option_value('test_data', test_data)} has the classes {', '.join(theirs)}, the head's are "
                         f"{', '.join(ours)} (unknown: {', '.join(unknown)}): a test folder holds some or all of "
                         f"the head's class folders{hint}")


def check_test_decoding(test_data: Optional[str], cache, path) -> None:
    """A training cache made by an older decoding rule than ``--test-data`` would be extracted with (decode_version,
    e.g. before photos were turned upright by their EXIF orientation), refused before anything is fitted or
    extracted, saying what to do (it was refused after both, as a test cache 'made differently')."""
    from ..cache.provenance import decode_difference, older_decoding
    from ..data.image_reader import DECODE_VERSION

    fused = isinstance(cache, FusedRows)  # its record joins its caches' ('3+3')
    older = older_decoding(cache.provenance.decode_version if fused else cache.attrs.get("decode_version", ""),
                           DECODE_VERSION)
    if test_data and older:
        raise UsageError(f"the training cache {path} and {option_value('test_data', test_data)} would differ in "
                         f"{decode_difference(older, str(DECODE_VERSION))}")


def check_test_data(test_data: Optional[str], cache, path) -> None:
    """--test-data checked against the training cache before any fit or extraction (fit-head, audit): its class
    folders and the decoding rule its photos would be extracted with."""
    check_test_classes(test_data, cache.classes)
    check_test_decoding(test_data, cache, path)
    check_test_cache_folder(test_data, cache)
    check_test_weights(test_data, cache)
    check_test_calibration(test_data, cache)


def check_test_weights(test_data: Optional[str], cache) -> None:
    """The weights file each cache fitted on was made with, which --test-data extracts the test folder with: one
    moved or deleted since was said after the fit as "weights file '...' does not exist", with nothing to do about
    it (fit-head takes no --weights); refused before, saying whose file it is."""
    parts = getattr(cache, "parts", None)  # a fusion's caches take --test-data only
    for part in parts or [cache]:
        weights = part.attrs.get("weights_path", "")
        if test_data and weights and not os.path.isfile(weights):
            raise UsageError(f"{option_text('test_data')} is extracted with the weights the cache {part.path} was "
                             "made with, "
                             f"{weights!r}, which no longer exists; put that file back" + ("" if parts else
                             " (or extract the test folder yourself with the same options and pass "
                             f"{option_text('test_cache')})"))


def check_test_calibration(test_data: Optional[str], cache) -> None:
    """The photos an int8 cache made before caches stored their observers was calibrated on (its 'calibration'
    record's calib_root), which --test-data's extraction calibrates the same network on again (``test_cache_for``;
    a cache that stores them lends them, and needs none of its photos: ``keeps_network``). A folder moved or deleted
    since was said after the fit as "calibration folder '...' does not exist", naming nothing fit-head takes; one
    whose photos changed, after the fit and the test folder's whole extraction, as two fingerprints that differ.
    Both refused before, saying whose folder it is and what to do. Moved, its photos keep their names, sizes and
    times, so extract --calib-data at the new place makes the same network; changed, no network can be the same,
    and the way out names --calib-data: a plain extract of the training folder lends itself this very cache's
    network (``quantize.own_lender``), so it would be this cache again, refused again."""
    if not test_data:
        return
    parts = getattr(cache, "parts", None)  # a fusion's caches take --test-data only
    for part in parts or [cache]:
        record = json.loads(part.attrs.get("calibration") or "{}")
        if keeps_network(part):  # its network is rebuilt from its observers (test_cache_for): no photo needed
            continue
        root = record.get("calib_root", "")
        whose = (f"{option_text('test_data')} is extracted with the int8 network of the cache {part.path}, "
                 "calibrated on the photos "
                 f"in {root!r}")
        if root and not os.path.isdir(root):
            raise UsageError(f"{whose}, which no longer exists; put that folder back" + ("" if parts else
                             " (or extract the test folder yourself with that cache's options and "
                             f"{option_text('calib_data')} where those photos are now, and pass "
                             f"{option_text('test_cache')})"))
        if root and _listing_fingerprint(root) != record.get("calib_data"):
            raise UsageError(f"{whose}, which have changed since (photos added, removed or edited), so that network "
                             "cannot be made again; put them back as they were, or extract the training photos again "
                             f"with {option_value('calib_data', root)} (a new cache, calibrated on the photos as "
                             "they are now) and "
                             "fit on it")


def keeps_network(cache) -> bool:
    """Whether an int8 cache (an open FeatureCache) stores its calibrated observers, from which its network is
    rebuilt bitwise (``quantize.lent_calibration``): --test-data was calibrated again on the training cache's
    calibration photos, and refused once they had moved or changed, though the network needed none of them."""
    from ..cache.feature_cache import OBSERVERS

    return "calibration" in cache.attrs and OBSERVERS in cache.f


def _listing_fingerprint(root: str) -> str:
    """The fingerprint extract records of an int8 cache's calibration folder ('' for one that holds no photos)."""
    from ..extraction.quantize import calibration_listing

    try:
        return calibration_listing(root, None).fingerprint()
    except UsageError:
        return ""


def check_test_cache_folder(test_data: Optional[str], cache) -> None:
    """--test-data's cache goes beside the cache fitted on (each cache of a fusion): where that folder is inside the
    test folder, extract refused it after the fit, naming '--cache-dir' and '--data', options fit-head does not
    take; refused before, naming the cache to move."""
    for part in getattr(cache, "parts", None) or [cache]:
        where = Path(os.path.realpath(Path(part.path).parent))
        if test_data and where.is_relative_to(os.path.realpath(test_data)):
            raise UsageError(f"{option_value('test_data', test_data)} holds the cache fitted on ({part.path}), and "
                             "its own cache "
                             "would go beside it, among the test photos; move that cache out of the test folder")


def test_cache_for(cfg: FitHeadConfig, cache: FeatureCache) -> Path:
    """The cache of ``--test-data`` (extracted like ``cache``, reused next time, checked) or ``--test-cache``.
    Callers check the folder (``check_test_data``) or the given cache (``check_test_cache``) first, before any fit.
    A --test-cache was checked again here, after the fit, to the same answer: nothing in the command writes it."""

    if cfg.test_data:
        from ..extraction.extract import ExtractConfig, extract

        made = json.loads(cache.attrs["config"])
        keep = {k: made[k] for k in ("backbone", "weights", "dtype", "precision", "pool", "decode", "seed", "calib_n",
                                     "compile", "flip") if k in made}
        if cache.attrs.get("weights_path"):  # the file, absolute: the command line's path may be relative to
            keep["weights"] = cache.attrs["weights_path"]  # a folder fit-head is not run from
        if keep.get("precision") == "auto":  # what it meant for the training photos: auto decides from the number
            keep["precision"] = cache.attrs["precision"]  # of photos (int8 from 1,000 on some CPUs), not the test's
        if "calibration" in cache.attrs:  # int8: the very network of the training cache
            if keeps_network(cache):  # rebuilt from its observers, whatever became of its calibration photos
                keep["calib_cache"] = str(cache.path)
            else:  # a cache made before they were stored: calibrated again on the same photos
                keep["calib_data"] = json.loads(cache.attrs["calibration"])["calib_root"]
        from ..runs.ledger import current_command

        path = Path(extract(ExtractConfig(data=cfg.test_data, n=0, cache_dir=str(Path(cache.path).parent),
                                          command=current_command(), purpose=TEST, **keep)).cache)
        check_test_cache(path, cache)  # extract's answer: the same options once made another network (precision auto)
        return path
    return Path(cfg.test_cache)


def check_test_cache(path, cache: FeatureCache) -> None:
    """A test cache made like ``cache`` (the same network, preprocessing, decoding...) of some or all of its
    classes, or a one-line refusal; fit-head checks --test-cache with it before the fit, not after minutes of it.
    Only the classes may differ, as a subset: its rows are scored against the head's classes (``relabelled_test``)."""
    with FeatureCache(path) as test:
        differ = Provenance.from_cache_attrs(cache.attrs).differences(Provenance.from_cache_attrs(test.attrs),
                                                                      ROW_FEATURES)
        if differ:
            raise UsageError(f"test cache {path} was made differently from the training cache (training vs test): "
                             f"{'; '.join(differ)} ({option_text('test_data', Placeholder('DIR'))} extracts the test "
                             "folder with the training cache's network)")
        cache_classes_to_model(cache.classes, test)  # a class the head does not know: refused, naming it


def relabelled_test(test, classes, said: Optional[set] = None):
    """The test rows (``test``: an open test cache, or fused test caches) with their labels as the head's
    ``classes``' indices, matched by name (``Relabelled``); the head's classes it has no photos of are said in one
    line: the test figures leave them out (their per-class accuracy is None), as evaluate's do. ``said``: as
    ``warn_once``'s."""
    missing = [c for i, c in enumerate(classes) if i not in {class_index(classes, t) for t in test.classes}]
    if missing:
        warn_once(said, f"the test set {test.path} has no photos of {', '.join(missing)}: those classes are not scored")
    return Relabelled(test, classes)


def warn_once(said: Optional[set], line: str, key: Optional[str] = None) -> None:
    """``line`` as a warning, unless ``said`` holds it (or its ``key``): the lines a command fitting several heads
    on one cache and test set said already (compare-sklearn said each once per head kind, four times); it is added
    there. ``key``: what makes two lines the same warning where their numbers differ by head kind."""
    key = key or line
    if said is None or key not in said:
        log.warning("%s", line)
    if said is not None:
        said.add(key)


def warn_same_folder(test_data: Optional[str], test_cache: Optional[str], root: str, test_root: str, what: str,
                     said: Optional[set] = None) -> None:
    """One line where the test photos are the training photos (the same folder, by any name, or one inside the
    other), saying what that does to the result (``what``): fit-head and compare-sklearn said only that the test
    photos are copies of training photos; audit, fit-head and compare-sklearn say it alike, and go on."""
    train, test = Path(root).resolve(), Path(test_root).resolve()
    how = ("is" if train == test else "is inside" if test.is_relative_to(train) else
           "holds" if train.is_relative_to(test) else "")
    if how:
        given = (f"--test-data {test_data!r}" if test_data else
                 f"--test-cache {test_cache!r} was made from {test}, which")
        warn_once(said, f"{given} {how} the training folder {train}: {what}; pass a test folder apart from it")


def overlap(train: FeatureCache, train_idx, test: FeatureCache, test_idx=None) -> list[str]:
    """Test images (of ``test_idx``, all by default) whose file content equals a training image's (sha256), reported,
    never silently scored."""

    seen = {h for h in train.row_digests(train_idx) if h}
    rows = range(test.n) if test_idx is None else test_idx
    paths = test.paths
    return sorted(paths[i] for i, h in zip(rows, test.row_digests(test_idx)) if h in seen)


# -- the stage ------------------------------------------------------------------------------------
@dataclass
class FittedHead:
    """A head fitted on some rows, with what its fit says about it."""

    head: ProbeHead  # on ``device``, in eval mode
    history: list  # one dict per epoch (linear heads; [] otherwise)
    info: dict  # what the fit reports (iterations, gamma, landmarks, ...)
    tuning: Optional[dict]  # the cross-validated choice, when one was made
    val: dict  # acc, loss, rows and per-class accuracy on the validation rows
    best_epoch: Optional[int]  # linear heads: the epoch whose weights were kept
    fit_seconds: float
    trust: dict = None  # the temperature and the unknown score's threshold, with what they were fitted on
    fitted_idx: Optional[np.ndarray] = None  # the rows the saved head was fitted on (the val rows too once refitted)


def _checked_view(cfg: FitHeadConfig, rows) -> None:
    if not cfg.tune:
        try:
            check_view(cfg.features, rows.feature_shape)
        except ValueError as e:
            raise UsageError(f"{option_text('features')}: {e}") from None


def fit_on_rows(cfg: FitHeadConfig, rows, train_idx: np.ndarray, val_idx: np.ndarray, device,
                tuned: Optional[tuple] = None) -> FittedHead:
    """Fit the head ``cfg`` asks for on ``train_idx`` of ``rows`` (a ``FeatureCache`` or a ``FeatureArray``)
    and score it on ``val_idx``: the same code whether the rows come from a cache file or from arrays.
    ``tuned``: ``_tune``'s result on these rows when the caller already cross-validated them."""
    _checked_view(cfg, rows)
    t0 = time.time()
    tuning, history, info, oof = None, [], {}, None
    if tuned is not None:
        head, info, tuning, oof = tuned
    elif cfg.tune or cfg.head == "auto":
        head, info, tuning, oof = _tune(cfg, rows, train_idx)
    elif cfg.head == "linear":
        head, history = _fit_linear(cfg, rows, train_idx, val_idx, device)
    else:
        head, info = _fit_sklearn(cfg, rows, train_idx)
    head = head.to(device).eval()
    best_epoch = min(history, key=lambda h: h["val_loss"])["epoch"] if history and cfg.patience else (
        history[-1]["epoch"] if history else None)
    val = scores(head, rows, val_idx, device, cfg.block_rows)  # before calibration: what the fit itself gives
    calibration = calibration_rows(cfg, rows, val, train_idx, tuning, oof)
    known_idx, held_out = train_idx, val_idx
    if tuning and cfg.refit:  # validated: now the same setting on every row, the validation rows included
        known_idx, held_out = np.union1d(train_idx, val_idx), val_idx[:0]
        head, info = _fit_sklearn(cfg, rows, known_idx, tuning["setting"])
        head = head.to(device).eval()
        info["refit_rows"] = int(len(known_idx))
    fit_seconds = time.time() - t0
    trust = fit_trust(cfg, head, calibration, known_idx, lambda idx: CacheViews(rows, idx, cfg.block_rows)["avg"],
                      lambda: CacheViews(rows, held_out, cfg.block_rows)["avg"])
    return FittedHead(head, history, info, tuning, val, best_epoch, fit_seconds, trust, known_idx)


def fit_fused_or_alone(cfg: FitHeadConfig, fused, parts: list, device, fused_cfg: FitHeadConfig) -> tuple:
    """fit-head's default head on several caches' fused rows (``fused``, fitted with ``fused_cfg``) and on each
    cache alone (``parts``: the caches, or their rows as arrays), keeping the one with the best CV accuracy
    (then CV log-loss; the fused rows on a tie): (its fit, its rows, train_idx, val_idx). Equal-weight blocks
    let a much weaker backbone in (fused VGG-16 + Lite0 on 20 dog breeds, where Lite0 alone is 4.8 points
    ahead); choosing by the criterion choose-backbone names its best with follows the dominant backbone there
    and keeps the fusion where the two disagree (measured on paired splits of four proxies,
    docs/backbones.md). Another head (--head, --tune) is fitted on the fused rows as asked."""
    train_idx, val_idx = split_indices(fused.labels, cfg.val_fraction, cfg.seed)
    if cfg.tune or cfg.head != "auto":
        return fit_on_rows(fused_cfg, fused, train_idx, val_idx, device), fused, train_idx, val_idx
    t0 = time.time()
    tried = []  # (the cross-validated choice, its config, rows, train_idx, val_idx): only the winner is refitted
    for part_cfg, rows in [(fused_cfg, fused), *((cfg, part) for part in parts)]:
        tr, va = (train_idx, val_idx) if rows is fused else split_indices(rows.labels, cfg.val_fraction, cfg.seed)
        _checked_view(part_cfg, rows)
        tried.append((_tune(part_cfg, rows, tr), part_cfg, rows, tr, va))
    best = max(tried, key=lambda t: (t[0][2]["cv_acc"], -t[0][2]["cv_log_loss"]))  # the first on a tie
    tuned, best_cfg, best_rows, tr, va = best
    fit = fit_on_rows(best_cfg, best_rows, tr, va, device, tuned=tuned)
    fit.fit_seconds = time.time() - t0
    fit.tuning["fusion"] = [{"rows": "fused" if k == 0 else getattr(rows, "attrs", {}).get("backbone", f"part {k}"),
                             "cache": str(getattr(rows, "path", "")), "cv_acc": t[2]["cv_acc"],
                             "cv_log_loss": t[2]["cv_log_loss"], "chosen": rows is best_rows}
                            for k, (t, _, rows, _, _) in enumerate(tried)]
    log.info("fused features or one cache alone, by %d-fold CV (acc / log-loss): %s; keeping %s", cfg.folds,
             ", ".join(f"{r['rows']} {r['cv_acc']:.3f} / {r['cv_log_loss']:.4f}" for r in fit.tuning["fusion"]),
             next(r["rows"] for r in fit.tuning["fusion"] if r["chosen"]))
    return fit, best_rows, tr, va


def _oof_setting(cfg: FitHeadConfig, tuning: Optional[dict]) -> Optional[dict]:
    """The scikit-learn setting whose out-of-fold predictions can calibrate the head (None: a torch head)."""
    setting = tuning["setting"] if tuning else (_setting(cfg) if cfg.head in ("logreg", "kernel", "svm") else None)
    return setting if setting and setting["head"] in ("logreg", "kernel", "svm") else None


def calibration_rows(cfg: FitHeadConfig, rows, val: dict, train_idx, tuning, oof=None) -> Optional[tuple]:
    """What ``--calibrate`` fits the temperature on: (log-probabilities, labels, 'val' or 'cv+val'), None for
    'none'. ``oof``: the chosen setting's out-of-fold (log-probabilities, labels) from its cross-validation,
    if made; 'cv' makes them for a scikit-learn head that was not cross-validated."""
    if cfg.calibrate == "none":
        return None
    logp, y = val["logp"], val["labels"]
    setting, source = _oof_setting(cfg, tuning), "val"
    if cfg.calibrate == "cv" and oof is not None and len(oof[1]):
        logp, y, source = np.concatenate([oof[0], logp]), np.concatenate([oof[1], y]), "cv+val"
    elif cfg.calibrate == "cv" and setting is not None:
        cv_idx = _cv_rows(cfg, rows.labels, train_idx)
        views = CacheViews(rows, cv_idx, cfg.block_rows)
        with still_running(f"calibration: {cfg.folds}-fold out-of-fold predictions of {len(cv_idx)} rows"):
            oof = out_of_fold_log_proba(views, views.labels, setting, len(rows.classes), rows.feature_shape,
                                        cfg.folds, cfg.seed)
        if len(oof):
            logp, y, source = np.concatenate([oof, logp]), np.concatenate([views.labels, y]), "cv+val"
    return logp, y, source


def fit_head(cfg: FitHeadConfig, said: Optional[set] = None, part_of: Optional[str] = None) -> FitHeadResult:
    """Fit the head on the cache's train split; returns metrics (val, and test if asked) and where outputs went.
    ``said``: the warnings a command fitting several heads said already (``warn_once``); ``part_of``: that
    command's name, for the ledger line (``ledger.append_run``)."""

    validate(cfg)  # the options as given (--recipe among them), then the recipe's settings
    cfg = with_recipe(cfg)
    fused = named = fused_paths(cfg.cache)  # several caches: one head on their fused views (heads/fused_views.py)
    path, default_cache = (Path(fused[0]), None) if fused else resolve_cache(single_cache(cfg.cache), cfg.cache_dir)
    device = resolve_device(cfg.device)
    with (FusedRows(fused, cfg.features, cfg.block_rows) if fused else FeatureCache(path)) as cache:
        check_labelled(cache, path)
        check_output(cfg.runs_dir, data=[(cache.attrs["data_root"], f"the photos of the cache {path}")],
                     what="--runs-dir", folder=True)
        check_test_data(cfg.test_data, cache, path)  # before the fit, not after it
        if cfg.test_cache:  # (several caches take --test-data only)
            check_test_cache(cfg.test_cache, cache)
        changed = source_changes(cache.info)
        if changed:
            warn_once(said, f"{path}: {changed}")
        if fused:  # the fused rows, or one cache alone where it wins the default head's CV
            fit, cache, train_idx, val_idx = fit_fused_or_alone(cfg, cache, cache.parts, device, cache.head_config(cfg))
            fused, path = (fused, path) if isinstance(cache, FusedRows) else ([], Path(cache.path))
        else:
            train_idx, val_idx = split_indices(cache.labels, cfg.val_fraction, cfg.seed)
            fit = fit_on_rows(cfg, cache, train_idx, val_idx, device)
        head, history, info, tuning, val, best_epoch = (fit.head, fit.history, fit.info, fit.tuning, fit.val,
                                                         fit.best_epoch)
        fit_seconds = fit.fit_seconds
        test = None
        if cfg.test_data or cfg.test_cache:
            with (cache.like([test_cache_for(cfg, part) for part in cache.parts]) if fused
                  else FeatureCache(test_cache_for(cfg, cache))) as tc:
                warn_same_folder(cfg.test_data, cfg.test_cache, cache.attrs["data_root"],  # a copy's cache may
                                 cfg.test_data or tc.attrs["data_root"],  # be the original's, hit: its data_root
                                 "the test accuracy counts the photos the head was fitted on", said)
                tc = relabelled_test(tc, cache.classes, said)  # some of the head's classes: labels as the head's
                test = {**scores(head, tc, np.arange(tc.n), device, cfg.block_rows), "cache": str(tc.path),
                        "overlap": overlap(cache, fit.fitted_idx, tc)}  # a refitted head saw the val rows too
            test["calibration"] = before_after(test.pop("logp"), test.pop("labels"), fit.trust["temperature"])
            if test["overlap"]:
                k = len(test["overlap"])
                warn_once(said, ("1 test image has the same content as a training image" if k == 1 else
                                 f"{k} test images have the same content as training images")
                          + f" (e.g. {', '.join(test['overlap'][:3])}): the test accuracy counts "
                          + ("it" if k == 1 else "them"), key="overlap")  # the refitted default head's count first
        staged = staged_run_dir(cfg.runs_dir, "fit-head")
        head = head.cpu()
        metrics = {"val_acc": val["acc"], "val_loss": val["loss"],
                   **({"train_acc": history[best_epoch - 1]["train_acc"],
                       "train_loss": history[best_epoch - 1]["train_loss"]} if history else {}),
                   **({"test_acc": test["acc"], "test_loss": test["loss"]} if test else {}),
                   **({"cv_acc": tuning["cv_acc"], "cv_log_loss": tuning["cv_log_loss"]} if tuning else {}),
                   **({"test_ece": test["calibration"]["after"]["ece"],
                       "test_ece_uncalibrated": test["calibration"]["before"]["ece"]} if test else {}),
                   **({"test_known_kept": test["known_kept"]} if test and "known_kept" in test else {}),
                   **{k: fit.trust[k] for k in ("temperature", "unknown_threshold") if k in fit.trust}}
        ckpt = {
            **Provenance.from_cache_attrs(cache.attrs).checkpoint_fields(),
            "state_dict": head.checkpoint()["state_dict"], "head": head.config,
            "in_shape": list(cache.feature_shape), "dropout": cfg.dropout, "config": asdict(cfg),
            # absolute: evaluate, export and finetune --init-head find it from any folder, not only from where
            # fit-head ran (a relative --cache-dir recorded 'features/...', 'does not exist' elsewhere)
            "cache": os.path.abspath(path), "cache_fingerprint": cache.attrs["fingerprint"], "metrics": metrics,
            "best_epoch": best_epoch, "tuning": tuning, "trust": fit.trust,
            **(cache.checkpoint_fields() if fused else _int8_network(path)),
        }
        try:
            write_checkpoint(staged / "head.pt", HEAD_KIND, ckpt)
        except BaseException:  # a full disk, Ctrl-C: no run folder left behind (runs lists none of it)
            drop_staged(staged)
            raise
        out_dir = publish_run_dir(staged)  # the run folder appears with its head.pt (a kill -9 leaves no empty one)
    fused_fields = {"backbone": ckpt["backbone"], "cache_fingerprint": ckpt["cache_fingerprint"]} if fused else {}
    curves = finish_run(out_dir, cfg.runs_dir, "fit-head", history, [out_dir / "head.pt"], cache=str(path),
                        part_of=part_of, **fused_fields,
                        params={**asdict(cfg), **({"tuned": tuning["choice"]} if tuning else {})}, metrics=metrics)
    return FitHeadResult(cache=str(path), caches=list(named or []), run_dir=str(out_dir),
                         checkpoint=str(out_dir / "head.pt"), curves=str(curves) if curves else None,
                         head=head.describe(), train_rows=int(len(train_idx)), val_rows=int(len(val_idx)),
                         metrics=metrics, per_class_val_acc=val["per_class"], best_epoch=best_epoch, trust=fit.trust,
                         fit_seconds=fit_seconds, history=history, tuning=tuning, test=test, fit_info=_plain(info),
                         source_changed=changed, default_cache=default_cache)


def _int8_network(cache_path) -> dict:
    """An int8 cache's calibrated observers (a few KB of tensors), so that predict and evaluate run the
    quantised network the head's rows came from, not the float one."""
    observers = read_int8_observers(cache_path)
    return {"int8_observers": {k: torch.from_numpy(np.asarray(v)) for k, v in observers.items()}} if observers else {}


def _plain(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}
