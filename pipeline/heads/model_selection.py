"""Settings of a head (kind, view, normalisation, C, gamma ...), fitted one at a time or chosen by cross-validation."""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from threadpoolctl import threadpool_limits

from ..progress import progress, quiet
from .calibration import PRIOR_ROWS, fit_stack_weights, fit_temperature, log_softmax, nll, with_temperature
from .feature_views import (
    VIEWS,
    Normalizer,
    allowed_views,
    apply_view,
    check_norm,
    check_view,
)
from .linear_trainer import LinearTraining, train_linear
from .probe_heads import couple_pairs, from_kernel, from_logreg, from_stack, from_svm, pair_columns
from .sklearn_fits import (
    GRAM_ROWS,
    fit_kernel,
    fit_logreg,
    fit_svm,
    kernel_features,
    logreg_path,
    nystroem_map,
    resolve_gamma,
    svm_gram,
)

log = logging.getLogger(__name__)

HEAD_KINDS = ("logreg", "kernel", "svm", "stack", "torch")
CONFIG_KIND = "probe-head"
CONFIG_VERSION = 1
LOG_FLOOR = 1e-15  # probabilities are clipped here for log-loss (as sklearn.metrics.log_loss)

#: The default head's search (fit-head --head auto): the two plain recipes that a default head must not lose
#: to, the exact RBF SVM (one-vs-rest, gamma 'scale' as SVC's) and logistic regression, each with C by CV
#: accuracy, then stacked (``stack_setting``: their out-of-fold log-probabilities weighted, ``stack_weights``)
#: and refitted on every row. Measured on paired splits of the proxies (docs/heads.md).
AUTO_GRID = (
    {"head": ["svm"], "C": [0.1, 1.0, 10.0, 100.0, 1000.0], "gamma": ["scale"], "scheme": ["ovr", "ovo"]},
    {"head": ["logreg"], "C": [0.1, 1.0, 10.0, 100.0, 1000.0]},
)
#: The default stack's weights minimise its out-of-fold NLL, but from SVM_FLOOR_ROWS rows a class (of the rows
#: cross-validated) its SVMs keep at least SVM_SHARE_FLOOR of the vote (``stack_weights``; docs/heads.md).
SVM_FLOOR_ROWS = 30
SVM_SHARE_FLOOR = 0.7
#: Most classes for which a one-vs-one SVM is tried: its K(K-1)/2 pairs are rows of the head's Linear layer over
#: the support rows (K=50: 1,225 pairs, about 30 MB in float32 at 6,000 support rows; K=200 would be 0.5 GB).
MAX_PAIR_CLASSES = 50
#: Below this many rows a class (of the rows cross-validated) the one-vs-one pairs' scale pays the temperature's
#: prior (``fit_pair_scale``): on 5 photos a class every out-of-fold pair is often right, the NLL falls for ever
#: as the scale grows, and it ran to its bound (100): the stack then said 1.0 for nearly every photo, a wrong one
#: too. 10 photos a class through fit-head's validation split leave 9: from there on the scale is the NLL's
#: alone, as before (docs/heads.md, "Few photos, all right").
PAIR_PRIOR_BELOW_ROWS = 9
#: The previous default's search (an RBF kernel head, C and gamma by CV): audit's out-of-fold refits still use it.
KERNEL_GRID = {"head": ["kernel"], "C": [1.0, 10.0, 100.0, 1000.0], "gamma": ["0.25*scale", "0.5*scale", "scale"]}
#: --tune's wider search: every head kind and both pooled views (those the cache has), the default's included.
TUNE_GRIDS = (
    {"head": ["svm"], "view": ["avg", "avgmax"], "normalize": ["l2"], "C": [0.1, 1.0, 10.0, 100.0, 1000.0],
     "gamma": ["0.5*scale", "scale", "2*scale"], "scheme": ["ovr", "ovo"]},
    {"head": ["kernel"], "view": ["avg", "avgmax"], "normalize": ["l2"], "C": [1.0, 10.0, 100.0, 1000.0],
     "gamma": ["0.5*scale", "scale"]},
    {"head": ["logreg"], "view": ["avg", "avgmax"], "normalize": ["l2"], "C": [0.1, 1.0, 10.0, 100.0, 1000.0]},
    {"head": ["torch"], "view": ["avg"], "normalize": ["l2"], "weight_decay": [1e-4, 1e-3]},
)

#: Per-kind defaults filled into a setting that leaves them out.
SETTING_DEFAULTS = {
    "logreg": {"view": "avg", "normalize": "l2", "C": 100.0},
    "kernel": {"view": "avg", "normalize": "l2", "C": 100.0, "gamma": "scale", "n_components": 1000},
    "svm": {"view": "avg", "normalize": "l2", "C": 10.0, "gamma": "scale", "scheme": "ovr", "pair_scale": 1.0},
    # an SVM's scores and a logistic regression's logits, weighted (``stack_setting``)
    "stack": {"view": "avg", "normalize": "l2", "C": 10.0, "gamma": "scale", "scheme": "ovr", "C_logreg": 100.0,
              "weights": (1.0, 1.0), "pair_scale": 1.0, "C_pairs": 0.0},  # C_pairs > 0: a one-vs-one SVM too
    "torch": {"view": "flat", "normalize": "l2", "lr": 1e-2, "weight_decay": 1e-4, "max_epochs": 100,
              "patience": 5, "batch_size": 32},
}
_SETTING_KEYS = {k: tuple(v) for k, v in SETTING_DEFAULTS.items()}


def clearly_better(challenger: dict, default: dict, folds: int) -> bool:
    """Both the CV log-loss lower and the CV accuracy higher, each by more than the standard error of the
    difference of two means over ``folds`` folds (``tune`` rows)."""

    def noise(metric: str) -> float:
        return math.hypot(challenger[f"{metric}_std"], default[f"{metric}_std"]) / math.sqrt(folds)

    return (challenger["log_loss_mean"] + noise("log_loss") < default["log_loss_mean"]
            and challenger["acc_mean"] - noise("acc") > default["acc_mean"])


def stack_weights(logps: list, y: np.ndarray) -> list[float]:
    """The stack's weights (each member's temperature and share in one; the SVMs first, logistic regression last)
    from the members' out-of-fold log-probabilities: those that minimise the NLL of their sum
    (``fit_stack_weights``), but once the rows hold ``SVM_FLOOR_ROWS`` a class, the SVMs keep at least
    ``SVM_SHARE_FLOOR`` of the vote (shares counted with each member at its own temperature).

    The NLL rewards calibration as much as ranking, and logistic regression is the better calibrated member nearly
    everywhere: its weight grows where the SVM ranks the photos better (scenes: the SVMs' share 0-0.43, 0.9 points
    behind the SVM alone on Lite0). With few rows a class (11 photos a dog breed) the SVM is the weaker
    member and the NLL weights are right to leave it; with more, it is never far behind in accuracy, so the
    floor costs nothing where the weights favour the SVM already and recovers what they lose where they do not
    (paired splits of six proxies, docs/heads.md)."""
    y = np.asarray(y)
    weights = np.asarray(fit_stack_weights(logps, y))
    if len(y) < SVM_FLOOR_ROWS * len(np.unique(y)):
        return weights.tolist()
    temps = np.array([fit_temperature(lp, y) for lp in logps])
    shares = weights * temps
    total = shares.sum()
    svm = shares[:-1].sum() / total if total > 0 else 1.0
    if svm >= SVM_SHARE_FLOOR:
        return weights.tolist()
    svm_shares = shares[:-1] / shares[:-1].sum() if svm > 0 else np.full(len(logps) - 1, 1.0 / (len(logps) - 1))
    shares = np.r_[SVM_SHARE_FLOOR * svm_shares, 1.0 - SVM_SHARE_FLOOR] * total
    return (shares / temps).tolist()


def stack_setting(svm_row: dict, logreg_row: dict, oof: Mapping, y: np.ndarray,
                  pairs_row: Optional[dict] = None) -> tuple[dict, np.ndarray]:
    """The stack of ``tune`` rows (an SVM's, a logistic regression's and optionally a one-vs-one SVM's, on the
    same view and normalisation) with its weights (``stack_weights``: each one's temperature and share, from
    their out-of-fold log-probabilities), and the stack's out-of-fold log-probabilities. Measured over paired
    splits of six proxies (docs/heads.md): each of the three is the more accurate recipe somewhere (logistic
    regression on 20 dog breeds from 11 photos each, one-vs-rest on noisy dishes, SVC's own pairs on hand
    signs); the stack is at least level with the better plain recipe, and choosing one of them by CV loses a
    point on one kind of set or another."""
    rows = [svm_row, *([pairs_row] if pairs_row else []), logreg_row]
    weights = stack_weights([oof[r["key"]] for r in rows], y)
    svm, lr = svm_row["setting"], logreg_row["setting"]
    pairs = pairs_row["setting"] if pairs_row else None
    scaled = pairs or svm
    setting = complete_setting({"head": "stack", "view": svm["view"], "normalize": svm["normalize"], "C": svm["C"],
                                "gamma": svm["gamma"], "scheme": svm["scheme"], "C_logreg": lr["C"],
                                "weights": tuple(weights), "pair_scale": scaled.get("pair_scale", 1.0),
                                "C_pairs": pairs["C"] if pairs else 0.0})
    combined = log_softmax(sum(w * oof[r["key"]] for w, r in zip(weights, rows)))
    return setting, combined


def stacked_row(svm_row: dict, logreg_row: dict, result: dict, pairs_row: Optional[dict] = None) -> dict:
    """A ``tune`` table row for the stack of ``result``'s rows (``stack_setting``): its out-of-fold accuracy and
    log-loss per fold of the same folds; its out-of-fold log-probabilities go into result["oof"]."""
    setting, oof = stack_setting(svm_row, logreg_row, result["oof"], result["labels"], pairs_row)
    y, key = result["labels"], setting_key(setting)
    result["oof"][key] = oof
    acc = [float((oof[te].argmax(1) == y[te]).mean()) for _, te in result["splits"]]
    ll = [log_loss(y[te], np.exp(oof[te])) for _, te in result["splits"]]
    return {"key": key, "setting": setting, "acc_mean": float(np.mean(acc)), "acc_std": float(np.std(acc)),
            "log_loss_mean": float(np.mean(ll)), "log_loss_std": float(np.std(ll)), "temperature": 1.0,
            "seconds": sum(r["seconds"] for r in (svm_row, logreg_row, pairs_row) if r)}


# -- one setting, fitted ------------------------------------------------------------------------
def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): ``fraction`` of the rows held out, stratified, at least one row a class on each side
    where the rows allow (a --tune fold of 9 rows of 3 classes held out 2 and failed in scikit-learn's words)."""
    idx, classes = np.arange(len(y)), len(np.unique(y))
    held = min(max(math.ceil(fraction * len(y)), classes), len(y) - classes)
    a, b = train_test_split(idx, test_size=held, stratify=y, random_state=seed)
    return np.sort(a), np.sort(b)


def complete_setting(setting: dict) -> dict:
    """A setting with its kind's defaults filled in and unknown keys refused."""
    kind = setting.get("head", "logreg")
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; allowed: {', '.join(HEAD_KINDS)}")
    extra = set(setting) - {"head"} - set(_SETTING_KEYS[kind])
    if extra:
        raise ValueError(f"a {kind!r} head takes {', '.join(_SETTING_KEYS[kind])}; not {', '.join(sorted(extra))}")
    out = {"head": kind, **SETTING_DEFAULTS[kind], **setting}
    if out["view"] not in VIEWS:
        raise ValueError(f"unknown view {out['view']!r}; allowed views: {', '.join(VIEWS)}")
    check_norm(out["normalize"])
    return out


def setting_key(setting: dict) -> str:
    """A short stable name: 'logreg|avg|l2|C=100', 'kernel|avg|l2|C=10|gamma=scale|m=1000',
    'torch|flat|l2|lr=0.01|wd=0.0001'."""
    s = complete_setting(setting)
    base = f"{s['head']}|{s['view']}|{s['normalize']}"
    if s["head"] == "torch":
        return f"{base}|lr={s['lr']:g}|wd={s['weight_decay']:g}"
    base += f"|C={s['C']:g}"
    if s["head"] in ("kernel", "svm", "stack"):
        base += f"|gamma={s['gamma'] if isinstance(s['gamma'], str) else format(s['gamma'], 'g')}"
    if s["head"] == "kernel":
        base += f"|m={s['n_components']}"
    if s["head"] in ("svm", "stack"):
        base += f"|{s['scheme']}"
    if s["head"] == "stack":
        base += f"|C_logreg={s['C_logreg']:g}|w={','.join(format(w, '.3g') for w in s['weights'])}"
        base += f"|ovo C={s['C_pairs']:g}" if s["C_pairs"] else ""
        base += f"|s={s['pair_scale']:.3g}" if s["scheme"] == "ovo" or s["C_pairs"] else ""
    return base


def _training(s: dict, seed: int) -> LinearTraining:
    """A torch setting's training options (dropout none: the settings have none)."""
    return LinearTraining(lr=s["lr"], weight_decay=s["weight_decay"], epochs=s["max_epochs"], patience=s["patience"],
                          batch_size=s["batch_size"], seed=seed)


def fit_setting(X, y: np.ndarray, setting: dict, in_shape=None, n_classes: Optional[int] = None, seed: int = 0,
                max_iter: int = 1000):
    """Fit one setting (e.g. ``tune``'s winner) on all of ``X`` and return (ProbeHead, info).

    ``X``: raw (N, C, H, W) maps, or a mapping {view: rows} such as ``CacheViews`` (then ``in_shape``
    comes from its ``feature_shape`` or must be given). A torch head holds out a stratified 1/8 of
    the rows for early stopping; an SVM fits on a seeded stratified sample of ``GRAM_ROWS`` rows when
    there are more (its time grows with the square of the rows; a stack's logistic regression sees all).
    The head is float64 for scikit-learn kinds, float32 for torch.
    """
    s = complete_setting(setting)
    rows, in_shape = _rows_for(X, in_shape)
    check_view(s["view"], in_shape)
    x = rows(s["view"])
    y = np.asarray(y, np.int64)
    n_classes = n_classes or int(y.max()) + 1
    t0 = time.time()
    if s["head"] == "torch":
        a, b = _stratified_holdout(y, 0.125, seed)
        with quiet():
            head, history = train_linear((x[a], y[a]), (x[b], y[b]), n_classes=n_classes, in_shape=in_shape,
                                         view=s["view"], normalize=s["normalize"], training=_training(s, seed))
        best = min(history, key=lambda h: h["val_loss"])
        info = {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "epochs_run": len(history)}
    else:
        nm = Normalizer(s["normalize"]).fit(x)
        xn = nm.transform(x)
        if s["head"] in ("svm", "stack"):
            some = _stratified_holdout(y, 1 - GRAM_ROWS / len(y), seed)[0] if len(y) > GRAM_ROWS else slice(None)
            svm = fit_svm(xn[some], y[some], s["C"], s["gamma"], s["scheme"], n_classes)
            if s["head"] == "svm":
                head = from_svm(svm, in_shape, s["view"], nm, pair_scale=s["pair_scale"])
            else:
                clf = fit_logreg(xn, y, s["C_logreg"], seed, max_iter)
                pairs = fit_svm(xn[some], y[some], s["C_pairs"], s["gamma"], "ovo", n_classes) if s["C_pairs"] else None
                head = from_stack(svm, s["weights"][0], clf, s["weights"][-1], in_shape, s["view"], nm,
                                  pair_scale=s["pair_scale"], pairs=pairs, pairs_weight=s["weights"][1])
            info = {"gamma": svm.gamma, "support_rows": int(len(svm.rows)), "setting": s}
            info.update(key=setting_key(s), fit_seconds=time.time() - t0, rows=len(y))
            return head, info
        if s["head"] == "logreg":
            clf = fit_logreg(xn, y, s["C"], seed, max_iter)
            head, info = from_logreg(clf, in_shape, s["view"], nm), {}
        else:
            ny, clf = fit_kernel(xn, y, s["gamma"], s["n_components"], s["C"], seed, max_iter)
            head, info = from_kernel(ny, clf, in_shape, s["view"], nm), {"gamma": float(ny.gamma)}
        info["iterations"] = int(np.max(clf.n_iter_))
        if head.n_classes != n_classes:
            raise ValueError(f"the training rows hold {head.n_classes} of the {n_classes} classes")
    info.update(setting=s, key=setting_key(s), fit_seconds=time.time() - t0, rows=len(y))
    return head, info


def out_of_fold_log_proba(rows: Mapping, labels: np.ndarray, setting: dict, n_classes: int, in_shape,
                          folds: int = 5, seed: int = 0) -> np.ndarray:
    """Log-probabilities of every row from a head of ``setting`` fitted without it (k-fold): held-out
    predictions of the training rows, to fit the temperature on many more rows than the validation split.
    ``rows``: {view: (N, d) rows}, as ``CacheViews``; ``in_shape``: the cached maps' shape. Empty when a
    class has fewer than 2 rows."""
    labels = np.asarray(labels, np.int64)
    folds = min(folds, int(np.bincount(labels, minlength=n_classes).min()))
    view = setting["view"]
    x = rows[view]
    out = np.zeros((len(labels), n_classes))
    if folds < 2:
        return out[:0]
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        head, _ = fit_setting({view: x[tr]}, labels[tr], setting, in_shape=tuple(in_shape),
                              n_classes=n_classes, seed=seed)
        out[te] = head.log_proba_of_rows(x[te])
    return out


# -- cross-validated choice ------------------------------------------------------------------------
def _rows_for(X, in_shape):
    """(view -> rows function, feature shape) for raw maps or a {view: rows} mapping."""
    if isinstance(X, np.ndarray) and X.ndim == 4:
        cache: dict = {}

        def rows(v):
            if v not in cache:
                cache[v] = apply_view(X, v)
            return cache[v]
        return rows, tuple(X.shape[1:])
    if isinstance(X, Mapping):
        shape = tuple(in_shape or getattr(X, "feature_shape", None) or ())
        if not shape:
            raise ValueError("pass in_shape with a {view: rows} mapping (the cached (C, H, W) feature shape)")

        def rows(v):
            try:
                return np.asarray(X[v])
            except KeyError:
                raise ValueError(f"no rows for view {v!r} in the mapping (has {', '.join(X)})") from None
        return rows, shape
    raise TypeError("X must be raw (N, C, H, W) maps or a {view: rows} mapping such as CacheViews")


def expand_grid(grid, feature_shape=None) -> list[dict]:
    """Complete settings from a grid: a dict of lists (product per head kind, each kind taking only its
    own keys), a tuple of such dicts (their union), or a list of setting dicts. With ``feature_shape``,
    views it lacks are dropped from a dict grid (so a grid works on pooled caches) and refused in a list."""
    if isinstance(grid, tuple):
        parts = []
        for g in grid:
            try:
                parts += expand_grid(g, feature_shape)
            except ValueError:  # every view of this part is one the cache lacks
                continue
        return expand_grid(parts, feature_shape)
    if isinstance(grid, Mapping):
        g = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
        unknown = set(g) - {"head"} - set().union(*map(set, _SETTING_KEYS.values()))
        if unknown:
            raise ValueError(f"unknown grid keys: {', '.join(sorted(unknown))}")
        if feature_shape is not None and "view" in g:
            ok = allowed_views(feature_shape)
            g["view"] = [v for v in g["view"] if v in ok]
            if not g["view"]:
                raise ValueError(f"none of the grid's views is allowed for features {tuple(feature_shape)}; "
                                 f"allowed views: {', '.join(ok)}")
        out = []
        for kind in g.get("head", ["logreg"]):
            keys = [k for k in _SETTING_KEYS.get(kind, ()) if k in g]
            for combo in itertools.product(*(g[k] for k in keys)):
                out.append(complete_setting({"head": kind, **dict(zip(keys, combo))}))
    else:
        out = [complete_setting(dict(s)) for s in grid]
    if feature_shape is not None:
        for s in out:
            check_view(s["view"], feature_shape)
    seen, unique = set(), []
    for s in out:
        k = setting_key(s)
        if k not in seen:
            seen.add(k)
            unique.append(s)
    if not unique:
        raise ValueError("the grid holds no settings")
    return unique


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-probability of the true class, clipped at 1e-15."""
    p = np.clip(proba[np.arange(len(y)), y], LOG_FLOOR, 1.0)
    return float(-np.log(p).mean())


def class_proba(clf, z: np.ndarray, n_classes: int) -> np.ndarray:
    """``clf.predict_proba`` over all ``n_classes`` (0 for a class its training rows lacked)."""
    p = np.zeros((len(z), n_classes))
    p[:, np.asarray(clf.classes_)] = clf.predict_proba(z)
    return p


@dataclass(frozen=True)
class CVOptions:
    """How ``tune`` cross-validates: ``folds`` stratified folds shuffled by ``seed`` (which also seeds landmarks
    and torch heads), the winner by ``score`` ('log_loss' or 'accuracy'), ``max_iter`` of each logistic
    regression, ``threads``, the BLAS and torch threads meanwhile (None: as they are), and ``progress``, the
    name of a progress bar over the fits (folds x settings; '' for none: a caller that shows its own)."""

    folds: int = 5
    seed: int = 0
    score: str = "log_loss"
    max_iter: int = 1000
    threads: Optional[int] = None
    progress: str = ""


@contextlib.contextmanager
def limited_threads(threads: Optional[int]):
    """BLAS and torch capped at ``threads`` inside the block (None: left as they are)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(before)


def tune(X, y: np.ndarray, grid, cv: CVOptions = CVOptions(), *, in_shape=None,
         on_setting: Optional[Callable[[dict], None]] = None) -> dict:
    """Stratified k-fold cross-validation of every setting in ``grid`` (``cv``: folds, seed, score, threads).

    ``X``: raw (N, C, H, W) maps or a {view: rows} mapping (``CacheViews``); ``y``: labels 0..K-1.
    Normalisation statistics, kernel landmarks and early-stopping splits are fitted inside each
    fold's training part only. Deterministic for a seed (the folds, landmarks and torch heads are
    seeded; lbfgs and libsvm are deterministic); only the 'seconds' column varies. The log-loss is
    that of each setting's out-of-fold log-probabilities at the one temperature fitted on them (what
    the head gives once calibrated; an SVM's margins are no probabilities before it). The winner has the
    lowest mean log-loss (``cv.score='accuracy'``: highest mean accuracy), ties going to the other measure
    and then to the earlier setting. ``cv.threads`` caps BLAS and torch threads meanwhile: many small fits
    on a busy machine run up to 10x faster on one thread than fighting over several.
    Returns {"table": [per setting: key, setting, acc_mean, acc_std, log_loss_mean, log_loss_std,
    temperature, seconds (mean fit time per fold)], "best": the winning row, "folds", "seed", "score",
    "rows", "oof": {key: (rows, classes) out-of-fold log-probabilities before the temperature}, "labels",
    "splits": the folds' (train, test) indices}.
    """
    with limited_threads(cv.threads):
        return _tune(X, y, grid, cv, in_shape, on_setting)


def _tune(X, y, grid, cv: CVOptions, in_shape, on_setting) -> dict:
    folds, seed, score, max_iter = cv.folds, cv.seed, cv.score, cv.max_iter
    if score not in ("log_loss", "accuracy"):
        raise ValueError(f"score must be 'log_loss' or 'accuracy', got {score!r}")
    rows, shape = _rows_for(X, in_shape)
    settings = expand_grid(grid, shape)
    y = np.asarray(y, np.int64)
    n_classes = int(y.max()) + 1
    if n_classes > MAX_PAIR_CLASSES:  # the pairs' head would grow with the square of the classes
        settings = [s for s in settings if s.get("scheme") != "ovo"]
    smallest = int(np.bincount(y, minlength=n_classes).min())
    if folds < 2 or smallest < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {max(folds, 2)} rows of every class; "
                         f"the smallest class has {smallest}")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    results = {setting_key(s): {"oof": np.zeros((len(y), n_classes)), "sec": []} for s in settings}
    # every setting once per fold: a search of minutes (--tune) says how far it is
    bar = progress(total=folds * len(settings), desc=cv.progress, unit="fit") if cv.progress else None

    def fitted(r, sec):  # one setting fitted on one fold
        r["sec"].append(sec)
        if bar is not None:
            bar.update(1)

    def record(s, proba, te, sec, logp=None):
        r = results[setting_key(s)]
        r["oof"][te] = np.log(np.clip(proba, LOG_FLOOR, 1.0)) if logp is None else logp
        fitted(r, sec)

    def record_svm(s, svm, xte, te, sec):
        """An SVM's held-out class scores; a one-vs-one SVM's pairs' margins, coupled once every fold has them."""
        if not svm.pairs:
            return record(s, None, te, sec, log_softmax(svm.scores(xte)))
        r = results[setting_key(s)]
        r.setdefault("margins", np.zeros((len(y), len(svm.bias))))[te] = svm.scores(xte)
        fitted(r, sec)

    def record_path(group, ztr, zte, ytr, yte, t_before):
        """The settings of one group (one view and map) differ only in C: one warm-started path."""
        by_c = {s["C"]: s for s in group}
        t0 = time.time()
        for c, clf in logreg_path(ztr, ytr, list(by_c), seed, max_iter):
            record(by_c[c], class_proba(clf, zte, n_classes), te, t_before + (time.time() - t0) / len(by_c))

    groups: dict = {}
    for s in settings:
        groups.setdefault((s["view"], s["normalize"]), []).append(s)
    for (view, norm), group in groups.items():
        x = rows(view)
        for tr, te in splits:
            t0 = time.time()
            nm = Normalizer(norm).fit(x[tr])
            xtr, xte = nm.transform(x[tr]), nm.transform(x[te])
            t_norm = time.time() - t0
            record_path([s for s in group if s["head"] == "logreg"], xtr, xte, y[tr], te, t_norm)
            grams: dict = {}
            svms: dict = {}  # two classes: one-vs-one is one-vs-rest, fitted once
            for s in (s for s in group if s["head"] == "svm"):
                t0 = time.time()
                gamma = resolve_gamma(s["gamma"], xtr)
                if gamma not in grams and len(xtr) <= GRAM_ROWS:  # one kernel matrix for every C and scheme
                    grams[gamma] = svm_gram(xtr, gamma)
                fit = (gamma, s["C"], s["scheme"] if n_classes > 2 else "ovr")
                if fit not in svms:
                    svms[fit] = fit_svm(xtr, y[tr], s["C"], gamma, s["scheme"], n_classes, grams.get(gamma))
                record_svm(s, svms[fit], xte, te, t_norm + time.time() - t0)
            kernels: dict = {}
            for s in (s for s in group if s["head"] == "kernel"):
                kernels.setdefault((s["gamma"], s["n_components"]), []).append(s)
            for (gamma, m), ks in kernels.items():
                t0 = time.time()
                ny = nystroem_map(xtr, gamma, m, seed)
                ztr, zte = kernel_features(ny, xtr), kernel_features(ny, xte)
                record_path(ks, ztr, zte, y[tr], te, t_norm + time.time() - t0)
            for s in (s for s in group if s["head"] == "stack"):
                t0 = time.time()
                head, _ = fit_setting({view: x[tr]}, y[tr], s, in_shape=shape, n_classes=n_classes, seed=seed)
                record(s, None, te, time.time() - t0, head.log_proba_of_rows(x[te]))
            for s in (s for s in group if s["head"] == "torch"):
                t0 = time.time()
                a, b = _stratified_holdout(y[tr], 0.125, seed)
                with quiet():
                    head, _ = train_linear((x[tr][a], y[tr][a]), (x[tr][b], y[tr][b]), n_classes=n_classes,
                                           in_shape=shape, view=view, normalize=norm, training=_training(s, seed))

                with torch.no_grad():
                    zt = head.norm(torch.from_numpy(np.ascontiguousarray(x[te], np.float32)))
                    proba = head.classify(zt).double().exp().numpy()
                record(s, proba, te, time.time() - t0)
        for s in group:
            r = results[setting_key(s)]
            if "margins" in r:  # the pairs' scale fitted on the out-of-fold margins, then coupled
                few = len(y) < PAIR_PRIOR_BELOW_ROWS * n_classes
                r["pair_scale"] = fit_pair_scale(r["margins"], y, n_classes, prior_rows=PRIOR_ROWS if few else 0.0)
                r["oof"] = coupled_log_proba(r.pop("margins"), r["pair_scale"], n_classes)
            _calibrated(r, y, splits)
            if on_setting:
                on_setting(_row(s, results[setting_key(s)]))
    if bar is not None:
        bar.close()
    table = [_row(s, results[setting_key(s)]) for s in settings]
    if score == "log_loss":
        order = sorted(range(len(table)), key=lambda i: (table[i]["log_loss_mean"], -table[i]["acc_mean"], i))
    else:
        order = sorted(range(len(table)), key=lambda i: (-table[i]["acc_mean"], table[i]["log_loss_mean"], i))
    return {"table": table, "best": table[order[0]], "ranking": [table[i]["key"] for i in order],
            "folds": folds, "seed": seed, "score": score, "rows": int(len(y)),
            "oof": {k: r["oof"] for k, r in results.items()}, "labels": y, "splits": splits}


def coupled_log_proba(margins: np.ndarray, scale: float, n_classes: int) -> np.ndarray:
    """Class log-probabilities from one-vs-one margins (N, K(K-1)/2) times ``scale``, as the head computes them."""
    z = torch.from_numpy(np.asarray(margins, np.float64) * scale)
    return log_softmax(couple_pairs(z, pair_columns(n_classes)).numpy())


def fit_pair_scale(margins: np.ndarray, y: np.ndarray, n_classes: int, bounds=(0.01, 100.0),
                   prior_rows: float = 0.0) -> float:
    """The scale of one-vs-one margins whose coupled probabilities have the lowest NLL (held-out margins): as
    SVC's Platt scaling of each pair, in one number. The coupling is not linear in the scale, so unlike a
    temperature it changes which class wins near ties: fitted, not left at 1. ``prior_rows``: the weight, in rows
    of evidence, of the temperature's log-normal prior (``calibration.fit_temperature``) on the scale, centred
    on 1; where every held-out pair is right the NLL alone falls for ever and the scale runs to its bound."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y)
    f = lambda t: (nll(coupled_log_proba(margins, math.exp(t), n_classes), y)  # noqa: E731
                   + prior_rows * t * t / max(len(y), 1))
    res = minimize_scalar(f, bounds=tuple(math.log(b) for b in bounds), method="bounded")
    return float(math.exp(res.x))


def _calibrated(r: dict, y: np.ndarray, splits) -> None:
    """The temperature fitted on a setting's out-of-fold log-probabilities, and each fold's accuracy and
    log-loss at it: the log-loss of what the head gives once calibrated, so that settings whose raw scores are
    no probabilities (an SVM's margins) compare with the others fairly."""
    r["temperature"] = fit_temperature(r["oof"], y)
    calibrated = with_temperature(r["oof"], r["temperature"])
    r["acc"] = [float((calibrated[te].argmax(1) == y[te]).mean()) for _, te in splits]
    r["ll"] = [log_loss(y[te], np.exp(calibrated[te])) for _, te in splits]


def _row(s: dict, r: dict) -> dict:
    return {"key": setting_key(s), "setting": {**s, "pair_scale": r["pair_scale"]} if "pair_scale" in r else s,
            "acc_mean": float(np.mean(r["acc"])), "acc_std": float(np.std(r["acc"])),
            "log_loss_mean": float(np.mean(r["ll"])), "log_loss_std": float(np.std(r["ll"])),
            "temperature": r["temperature"], "seconds": float(np.mean(r["sec"]))}


def format_table(result: dict, top: Optional[int] = None) -> str:
    """``tune``'s table as text, best first (the winner marked with *)."""
    by_key = {r["key"]: r for r in result["table"]}
    keys = result["ranking"][:top] if top else result["ranking"]
    w = max(len("setting"), *(len(k) for k in keys))
    lines = [f"  {'setting':<{w}}  acc (mean±std)   log-loss (mean±std)  fit s/fold",
             f"  {'-' * w}  ---------------  -------------------  ----------"]
    for k in keys:
        r = by_key[k]
        mark = "*" if k == result["best"]["key"] else " "
        lines.append(f"{mark} {k:<{w}}  {r['acc_mean']:.3f} ± {r['acc_std']:.3f}    "
                     f"{r['log_loss_mean']:.4f} ± {r['log_loss_std']:.4f}     {r['seconds']:8.2f}")
    lines.append(f"({result['folds']}-fold stratified CV over {result['rows']} rows, seed {result['seed']}; "
                 f"chosen by {result['score'].replace('_', '-')})")
    return "\n".join(lines)
