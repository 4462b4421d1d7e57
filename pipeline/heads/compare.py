"""The compare-sklearn stage: every kind of head and plain scikit-learn recipes, side by side on one split:
the tutorial's flat StandardScaler + LogisticRegression, and the two plain recipes the default head is measured
against (``PLAIN_RECIPES``: an RBF SVC and logistic regression on average-pooled l2 rows, C by 5-fold CV)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ..cache.feature_cache import FeatureCache
from ..config import CompareConfig, check_config, option_text
from ..errors import UsageError
from ..progress import still_running
from ..runs.ledger import append_run
from .cache_views import CacheViews, Relabelled
from .epoch_loop import per_class_accuracy, split_indices
from .fit_head import FitHeadConfig, FitHeadResult, TooFewForFolds, fit_head, resolve_cache, with_recipe
from .feature_views import Normalizer
from .model_selection import log_loss

log = logging.getLogger(__name__)

#: The plain recipes a practitioner types, the bar the default head must not fall below (bench/head_table.py
#: scores every candidate against them): avg-pooled l2 rows, C by stratified 5-fold CV from the grid.
PLAIN_RECIPES = {
    "svc": ("SVC", (0.1, 1.0, 10.0, 100.0)),
    "logreg": ("LogisticRegression", (0.1, 1.0, 10.0, 100.0, 1000.0)),
}


def plain_recipe(kind: str, folds: int = 5) -> GridSearchCV:
    """PLAIN_RECIPES[kind], unfitted: SVC() as scikit-learn defines it (RBF, gamma 'scale'), or
    LogisticRegression with room to converge, C chosen by ``folds``-fold CV accuracy."""
    name, grid = PLAIN_RECIPES[kind]
    estimator = SVC() if name == "SVC" else LogisticRegression(max_iter=2000)
    return GridSearchCV(estimator, {"C": list(grid)}, cv=folds, n_jobs=1)


#: The flat baseline's training rows are held in memory as float32 (scikit-learn fits arrays; the scaler works
#: in place): past this many bytes it fits a stratified sample that fits, and says so. Without it 25,000
#: VGG-16 rows took 4.4 GB, and past 40,000 the view was refused with a ValueError.
FLAT_FIT_BYTES = 2e9


def load_rows(cache: FeatureCache, indices: np.ndarray, block_rows: int) -> np.ndarray:
    """Rows ``indices`` (sorted) as a float32 (len, C*H*W) array: the flat view, read as every head reads."""
    return CacheViews(cache, indices, block_rows)["flat"]


def stratified_sample(indices: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` of ``indices`` (sorted), each class in its share: the training part of ``split_indices``
    (the split every head uses), which keeps a row of each class of two or more."""
    if len(indices) <= size:
        return indices
    return indices[split_indices(labels, 1 - size / len(indices), seed)[0]]


def fit_sklearn(cfg: CompareConfig, cache: FeatureCache, test_cache: Optional[str] = None) -> dict:
    """The plain scikit-learn baseline: StandardScaler + LogisticRegression on the flat C*H*W rows."""

    train_idx, val_idx = split_indices(cache.labels, cfg.val_fraction, cfg.seed)
    row_bytes = int(np.prod(cache.feature_shape)) * 4
    fit_idx = stratified_sample(train_idx, cache.labels[train_idx], int(FLAT_FIT_BYTES // row_bytes), cfg.seed)
    sampled = f"a stratified sample of {len(fit_idx)} of {len(train_idx)} training rows" if len(fit_idx) < len(
        train_idx) else ""
    if sampled:
        log.warning("the flat LogisticRegression fits %s: all of them would hold %.1f GB as float32", sampled,
                    len(train_idx) * row_bytes / 1e9)
    log.info("loading %d training rows (%.2f GB as float32) for scikit-learn", len(fit_idx),
             len(fit_idx) * row_bytes / 1e9)
    x_train = load_rows(cache, fit_idx, cfg.block_rows)
    y_train = cache.labels[fit_idx]
    steps = [StandardScaler(copy=False)] if cfg.scale else []  # in place: the rows are this fit's own copy
    model = make_pipeline(*steps, LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
    t0 = time.time()
    with still_running(f"fitting scikit-learn's LogisticRegression on {len(fit_idx)} flat rows"):
        model.fit(x_train, y_train)
    seconds = time.time() - t0
    del x_train

    def score(c: FeatureCache, idx) -> tuple[float, float, np.ndarray, np.ndarray]:
        y = c.labels[idx]
        proba = np.zeros((len(y), len(c.classes)))
        for at in range(0, len(idx), cfg.block_rows):  # in blocks: a test folder may be as large as any
            part = idx[at:at + cfg.block_rows]
            proba[at:at + len(part), model.classes_] = model.predict_proba(load_rows(c, part, cfg.block_rows))
        return float((proba.argmax(1) == y).mean()), log_loss(y, proba), y, proba.argmax(1)

    val_acc, val_loss, y_val, pred = score(cache, val_idx)
    out = {"model": f"sklearn LogisticRegression (flat{', standardized' if cfg.scale else ''}, C={cfg.C:g}"
                    f"{', ' + sampled if sampled else ''})",
           "per_class_val_acc": per_class_accuracy(y_val, pred, cache.classes), "val_acc": val_acc,
           "val_loss": val_loss, "fit_seconds": seconds, "train_rows": int(len(train_idx)),
           "fit_rows": int(len(fit_idx)), "val_rows": int(len(val_idx)), "iterations": int(np.max(model[-1].n_iter_))}
    if test_cache:
        with FeatureCache(test_cache) as tc:  # of some of the classes, perhaps: its labels as the training cache's
            out["test_acc"], out["test_loss"] = score(Relabelled(tc, cache.classes), np.arange(tc.n))[:2]
    return out


def fit_plain(cfg: CompareConfig, cache: FeatureCache, kind: str, test_cache: Optional[str] = None) -> dict:
    """One plain recipe (``PLAIN_RECIPES[kind]``) on the same training rows, scored on the same validation
    (and test) rows as the heads: what a practitioner would type, beside them."""
    name, grid = PLAIN_RECIPES[kind]
    train_idx, val_idx = split_indices(cache.labels, cfg.val_fraction, cfg.seed)

    def rows(c: FeatureCache, idx):
        v = CacheViews(c, idx, cfg.block_rows)
        return Normalizer("l2").transform(v["avg"]), v.labels

    x, y = rows(cache, train_idx)
    t0 = time.time()
    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        raise UsageError(f"the plain {name} needs at least 2 training rows of every class")
    with still_running(f"fitting scikit-learn's {name}, C by {folds}-fold GridSearchCV, on {len(y)} rows"):
        search = plain_recipe(kind, folds).fit(x, y)
    seconds = time.time() - t0

    def score(c: FeatureCache, idx) -> tuple:
        xs, ys = rows(c, idx)
        pred = search.predict(xs)
        if kind == "svc":  # SVC() gives no probabilities: no log-loss
            return float((pred == ys).mean()), None, ys, pred
        proba = np.zeros((len(ys), len(c.classes)))
        proba[:, search.classes_] = search.predict_proba(xs)
        return float((pred == ys).mean()), log_loss(ys, proba), ys, pred

    val_acc, val_loss, y_val, pred = score(cache, val_idx)
    how = "RBF gamma=scale, " if kind == "svc" else ""
    out = {"model": f"sklearn {name} (avg, l2, {how}C={search.best_params_['C']:g} by {folds}-fold CV)",
           "per_class_val_acc": per_class_accuracy(y_val, pred, cache.classes), "val_acc": val_acc,
           "val_loss": val_loss, "fit_seconds": seconds, "train_rows": int(len(train_idx)),
           "val_rows": int(len(val_idx))}
    if test_cache:
        with FeatureCache(test_cache) as tc:  # of some of the classes, perhaps: its labels as the training cache's
            out["test_acc"], out["test_loss"] = score(Relabelled(tc, cache.classes), np.arange(tc.n))[:2]
    return out


#: the head kinds compared (the default's SVM is in its stack; ``--head svm`` alone is not a row)
COMPARED = ("auto", "linear", "logreg", "kernel")


def _stack_parts(s: dict) -> str:
    """The default head's stack, each part with its weight: the weights are (one-vs-rest SVM, [one-vs-one SVM,]
    logreg), so with SVC's own pairs in (several classes) the logreg's is the third, not the second."""
    pairs = f" + one-vs-one SVM C={s['C_pairs']:g} x {s['weights'][1]:.2g}" if s.get("C_pairs") else ""
    return (f"RBF SVM C={s['C']:g} x {s['weights'][0]:.2g}{pairs} + logreg C={s['C_logreg']:g} "
            f"x {s['weights'][-1]:.2g}")


def _describe(r: FitHeadResult, c: dict) -> str:
    """A table name for one fit-head result (``c``: its effective config): kind and the settings that matter."""
    if c["head"] == "auto":
        s = r.tuning["setting"]
        cv = f"by {c['folds']}-fold CV"
        how = f"{_stack_parts(s)}, {cv}" if s["head"] == "stack" else f"{r.tuning['choice']} {cv}"
    elif c["head"] == "linear":
        how = f"Adam lr={c['lr']:g}, wd={c['weight_decay']:g}, best epoch {r.best_epoch} of {len(r.history)}"
    elif c["head"] == "logreg":
        how = f"C={c['C']:g}"
    else:
        how = f"C={c['C']:g}, RBF gamma={c['gamma']}, {min(c['kernel_components'], r.train_rows)} landmarks"
    recipe = "seed recipe: " if c["recipe"] == "seed" else ""
    return f"{c['head']} Linear+LogSoftmax ({recipe}{c['features']}, {c['normalize']}, {how})"


@dataclass(frozen=True)
class CompareResult:
    """compare-sklearn's answer: one row per model, fitted on one split of one cache."""

    cache: str
    split: dict  # val_fraction, seed, train_rows, val_rows: the one split every model was fitted on
    models: list  # one row dict per model: the heads' kinds, then the scikit-learn recipes
    head_run_dir: str  # the first head's run folder (demo's next steps point at its head.pt)
    test_cache: Optional[str]  # the cache of --test-data / --test-cache every model was scored on, else None
    source_changed: Optional[str]  # how the photos changed since the cache was made (None: they did not)
    default_cache: Optional[dict]  # the newest cache taken when none was named, else None
    curves: Optional[str] = None  # the first head with epochs' training curves (demo's next steps show them)


def _fit_kind(base: FitHeadConfig, kind: str, said: set) -> FitHeadResult:
    """fit-head's head of one kind; the default head's refusal of too small a class said '--head auto', an
    option compare-sklearn does not have (it fits every kind): said as compare-sklearn's. ``said``: the test set's
    warnings said by an earlier kind, said once."""
    try:
        return fit_head(replace(base, head=kind), said, part_of="compare-sklearn")
    except TooFewForFolds as e:  # fit-head's remedies name options compare-sklearn lacks
        if kind != "auto":
            raise
        raise UsageError(f"compare-sklearn's first row, fit-head's default head: {e.reason} (training "
                         f"rows: {option_text('val_fraction')}'s share is held out); add photos to the smallest "
                         "class") from None


def compare_sklearn(cfg: CompareConfig) -> CompareResult:
    """Fit every head kind (auto, linear, logreg, kernel), the flat scikit-learn baseline and the plain recipes
    on the same split."""

    check_config(cfg)
    path, default_cache = resolve_cache(cfg.cache, cfg.cache_dir)
    base = replace(cfg.head or FitHeadConfig(), cache=str(path), val_fraction=cfg.val_fraction, seed=cfg.seed,
                   tune=False)
    kinds = ("linear",) if base.recipe == "seed" else COMPARED
    models, runs, test_cache, said = [], [], None, set()
    for kind in kinds:
        r = _fit_kind(base, kind, said)
        test_cache = (r.test or {}).get("cache")
        models.append({"model": _describe(r, asdict(with_recipe(replace(base, head=kind)))), "val_acc": r.val_acc,
                       "val_loss": r.val_loss, "fit_seconds": r.fit_seconds, "train_rows": r.train_rows,
                       "val_rows": r.val_rows, "per_class_val_acc": r.per_class_val_acc,
                       **({"test_acc": r.metrics["test_acc"], "test_loss": r.metrics["test_loss"]} if r.test else {}),
                       "checkpoint": r.checkpoint})
        runs.append(r)
    with FeatureCache(path) as cache:
        sk = fit_sklearn(cfg, cache, test_cache)
        plain = {k: fit_plain(cfg, cache, k, test_cache) for k in PLAIN_RECIPES} if base.recipe != "seed" else {}
    models += [sk, *plain.values()]
    append_run(base.runs_dir, "compare-sklearn", cache=str(path), params=asdict(cfg),
               metrics={"val_acc": models[0]["val_acc"], "val_loss": models[0]["val_loss"],
                        **{f"{m}_val_acc": r.val_acc for m, r in zip(kinds[1:], runs[1:])},
                        "sklearn_val_acc": sk["val_acc"], "sklearn_val_loss": sk["val_loss"],
                        **{f"plain_{k}_val_acc": m["val_acc"] for k, m in plain.items()}},
               outputs=[r.run_dir for r in runs])
    return CompareResult(cache=str(path), split={"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                                                 "train_rows": sk["train_rows"], "val_rows": sk["val_rows"]},
                         models=models, head_run_dir=runs[0].run_dir, test_cache=test_cache,
                         source_changed=runs[0].source_changed, default_cache=default_cache,
                         curves=next((r.curves for r in runs if r.curves), None))
