"""Likely wrong labels: out-of-fold probabilities from k refits of the default head, ranked by confident learning.

Every training row gets the probabilities of a head that never saw it (stratified k-fold; each fold
refits the head on the other folds' rows: seconds on cached features, where a network would need k
trainings). cleanlab's ``find_label_issues`` (confident learning, Northcutt et al. 2021) then flags
the rows whose given class the out-of-fold probabilities contradict, ranked by self-confidence (the
out-of-fold probability of the given class, lowest first); the suggested class is the most probable one.

The head is fit-head's default kind: an RBF kernel head on average-pooled, l2-normalised rows
(Nystroem landmarks, then logistic regression), its C and gamma chosen by the same cross-validation
fit-head runs, on at most ``cv_rows`` rows. At large N the refits use ``LARGE_N_LANDMARKS`` landmarks
(measured: bench/audit_scale.py) so that 5 refits of 25,000 rows stay within two minutes on 2 cores.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from ..heads.feature_views import Normalizer
from ..heads.model_selection import KERNEL_GRID, CVOptions, class_proba, complete_setting, setting_key, tune
from ..heads.sklearn_fits import fit_logreg, kernel_features, nystroem_map
from ..progress import progress

log = logging.getLogger(__name__)

#: Rows from which the refits use fewer landmarks, and how many (bench/audit_scale.py, 25,000 rows on a busy
#: 2-core machine: the label issues took 176 s with 2,000 landmarks, 41-44 s with 1,000).
LARGE_N = 5000
LARGE_N_LANDMARKS = 1000


def choose_setting(avg: np.ndarray, y: np.ndarray, feature_shape, folds: int, seed: int, landmarks: int,
                   cv_rows: int) -> dict:
    """A kernel head's C and gamma (KERNEL_GRID by k-fold CV on at most ``cv_rows`` rows)."""
    idx = np.arange(len(y))
    if len(idx) > cv_rows:
        from ..heads.epoch_loop import split_indices

        idx = np.sort(split_indices(y, 1 - cv_rows / len(y), seed)[0])
    grid = {**KERNEL_GRID, "view": ["avg"], "normalize": ["l2"], "n_components": [landmarks]}
    try:
        # its own progress: about a minute at 25,000 rows on a busy 2-core machine, audit's first minute was silent
        cv = CVOptions(folds=folds, seed=seed, threads=1, progress=f"audit: C and gamma by CV on {len(idx)} rows")
        result = tune({"avg": avg[idx]}, y[idx], grid, cv, in_shape=feature_shape)
    except ValueError as e:  # a class too small for the folds in the sample: fit-head's kernel defaults
        log.info("audit: C and gamma not searched (%s); using C=100, gamma=scale", e)
        return complete_setting({"head": "kernel", "view": "avg", "normalize": "l2", "C": 100.0, "gamma": "scale",
                                 "n_components": landmarks})
    return result["best"]["setting"]


def fold_splits(y: np.ndarray, folds: int, seed: int, copies: Optional[list] = None) -> list:
    """Stratified folds, each byte copy (``copies``: each row's sha256, '' unknown) moved into its first copy's
    fold, so that no copy is predicted by its twin's label: a photo saved twice in a wrong class confirmed its own
    wrong label, and its correctly labelled original was flagged as wrong. Every other row keeps its fold, so one
    copy does not reshuffle the whole list. Where holding copies together would leave a class out of a fold's
    training rows (a class of copies of one photo), the copies stay apart, as before."""
    fold = np.empty(len(y), np.int64)
    for k, (_, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
        fold[held] = k
    together, first = fold.copy(), {}
    for i, digest in enumerate(copies or ()):
        if digest:
            together[i] = together[first.setdefault(digest, i)]
    if all(len(np.unique(y[together != k])) == len(np.unique(y)) for k in range(folds)):
        fold = together
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(folds) if (fold == k).any()]


def out_of_fold(avg: np.ndarray, y: np.ndarray, n_classes: int, setting: dict, folds: int = 5, seed: int = 0,
                threads: int = 1, copies: Optional[list] = None) -> np.ndarray:
    """(N, K) probabilities, each row's from the head refitted on the other folds (``setting``: a kernel
    or logreg setting on the avg view; byte ``copies`` kept in one fold: ``fold_splits``). Normalisation,
    landmarks and the fit see the training folds only."""
    s = complete_setting(setting)
    proba = np.zeros((len(y), n_classes))
    splits = fold_splits(y, folds, seed, copies)
    bar = progress(total=folds, desc="audit: out-of-fold refits", unit="fold")
    try:
        with threadpool_limits(threads):
            for tr, te in splits:
                nm = Normalizer(s["normalize"]).fit(avg[tr])
                xtr, xte = nm.transform(avg[tr]), nm.transform(avg[te])
                if s["head"] == "kernel":
                    ny = nystroem_map(xtr, s["gamma"], s["n_components"], seed)
                    xtr, xte = kernel_features(ny, xtr), kernel_features(ny, xte)
                clf = fit_logreg(xtr, y[tr], s["C"], seed)
                proba[te] = class_proba(clf, xte, n_classes)
                bar.update(1)
    finally:
        bar.close()
    return proba


def reference_out_of_fold(avg: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0
                          ) -> np.ndarray:
    """The benchmark's reference: a plain scikit-learn logistic regression (standardised avg rows, C=1), same folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proba = np.zeros((len(y), n_classes))
    with threadpool_limits(1):
        for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(avg[tr], y[tr])
            p = np.zeros((len(te), n_classes))
            p[:, clf.classes_] = clf.predict_proba(avg[te])
            proba[te] = p
    return proba


def rank_label_issues(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flagged rows ranked most likely wrong first, every row ranked the same way, score per row).

    Flagged: cleanlab's ``find_label_issues`` (prune by noise rate: confident learning), together with
    the rows whose out-of-fold prediction is another class (cleanlab's 'predicted_neq_given'; confident
    learning's per-class thresholds flag nothing in small, confident sets), ranked by self-confidence. The full
    ranking puts the flagged rows first and the others after them, both by self-confidence (for recall
    at k beyond what was flagged). ``score`` = 1 - the out-of-fold probability of the given class.
    """
    from cleanlab.filter import find_label_issues

    quality = proba[np.arange(len(y)), y]
    flagged = np.flatnonzero(find_label_issues(y, proba, filter_by="prune_by_noise_rate", n_jobs=1)  # masks
                             | find_label_issues(y, proba, filter_by="predicted_neq_given", n_jobs=1))
    flagged = flagged[np.argsort(quality[flagged], kind="stable")]
    rest = np.setdiff1d(np.arange(len(y)), flagged)
    rest = rest[np.argsort(quality[rest], kind="stable")]
    return flagged, np.concatenate([flagged, rest]), 1.0 - quality


def label_issues(avg: np.ndarray, y: np.ndarray, classes, folds: int = 5, seed: int = 0, landmarks: int = 2000,
                 cv_rows: int = 2000, setting: Optional[dict] = None, copies: Optional[list] = None) -> dict:
    """Out-of-fold probabilities of the default head and cleanlab's ranking of likely label errors (``copies``:
    each row's sha256, byte copies held out together)."""
    t0 = time.time()
    shape = (avg.shape[1], 1, 1)
    if setting is None:
        m = landmarks if len(y) <= LARGE_N else min(landmarks, LARGE_N_LANDMARKS)
        setting = choose_setting(avg, y, shape, folds, seed, m, cv_rows)
    t_choose = time.time() - t0
    log.info("audit: out-of-fold probabilities from %d refits of %s", folds, setting_key(setting))
    proba = out_of_fold(avg, y, len(classes), setting, folds, seed, copies=copies)
    flagged, ranking, score = rank_label_issues(y, proba)
    return {"proba": proba, "flagged": flagged, "ranking": ranking, "score": score, "setting": setting_key(setting),
            "oof_acc": float((proba.argmax(1) == y).mean()), "seconds": time.time() - t0,
            "choose_seconds": t_choose}


def recall_at(ranking: np.ndarray, truth, k: int) -> float:
    """Share of the ``truth`` rows among the first ``k`` of ``ranking``."""
    truth = {int(t) for t in truth}
    return len(truth & set(ranking[:k].tolist())) / max(len(truth), 1)
