"""scikit-learn fits on view rows: multinomial logistic regression, and an RBF kernel map in front of it.

The kernel map is Nystroem's: on every training row it is the exact kernel machine; on a sample of
landmark rows, an approximation for training sets too large for an n x n kernel.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression

log = logging.getLogger(__name__)

# -- scikit-learn fits ---------------------------------------------------------------------------
def fit_logreg(X: np.ndarray, y: np.ndarray, C: float = 1.0, seed: int = 0, max_iter: int = 1000):
    """A multinomial (lbfgs) LogisticRegression on view rows; L2 penalty 1/C. Deterministic for a seed."""

    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        log.info("LogisticRegression(C=%g) stopped at max_iter=%d before converging", C, max_iter)
    return clf


def logreg_path(X: np.ndarray, y: np.ndarray, Cs, seed: int = 0, max_iter: int = 1000):
    """(C, fitted LogisticRegression) for each C in ascending order, each fit warm-started from the last:
    cross-validating a grid of C costs little more than its largest fit. The classifier is reused:
    use each one before taking the next."""
    clf = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)
    for C in sorted(Cs):
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        clf.set_params(C=C)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        yield C, clf


def resolve_gamma(gamma, X: np.ndarray) -> float:
    """An RBF gamma: a number as is, 'scale' = 1 / (d * var(X)) (scikit-learn's SVC rule), 'g*scale' = g times that.

    For l2-normalised rows 'scale' is about 1 (squared distances lie in [0, 4]).
    """
    if isinstance(gamma, str):
        g, _, rest = gamma.partition("*") if "*" in gamma else ("1", "*", gamma)
        if rest.strip() != "scale":
            raise ValueError(f"gamma must be a number, 'scale' or 'G*scale', got {gamma!r}")
        var = float(np.var(X, dtype=np.float64))
        return float(g) / (X.shape[1] * var) if var > 0 else float(g)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return float(gamma)


def kernel_features(nystroem, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``nystroem.transform(X)`` in float64, chunk by chunk (bounded temporary memory)."""
    out = np.empty((len(X), nystroem.normalization_.shape[0]), np.float64)
    for i in range(0, len(X), chunk):
        out[i:i + chunk] = nystroem.transform(np.asarray(X[i:i + chunk], np.float64))
    return out


def fit_kernel(X: np.ndarray, y: np.ndarray, gamma="scale", n_components: int = 1000, C: float = 1.0,
               seed: int = 0, max_iter: int = 1000):
    """(Nystroem, LogisticRegression): an RBF kernel approximation on ``n_components`` seeded landmark rows.

    Landmarks are drawn with ``seed``; the map and the fit run in float64 (a kernel matrix is
    badly conditioned, and float32 noise through K^{-1/2} would cost the torch copy its 1e-5 match).
    """

    ny = nystroem_map(X, gamma, n_components, seed)
    return ny, fit_logreg(kernel_features(ny, X), y, C, seed, max_iter)


def nystroem_map(X: np.ndarray, gamma="scale", n_components: int = 2000, seed: int = 0) -> Nystroem:
    """An RBF Nystroem map on ``n_components`` seeded landmark rows of X: every row (the exact kernel) when
    X has no more rows than that."""
    m = min(int(n_components), len(X))
    if m < 1:
        raise ValueError(f"n_components must be positive, got {n_components}")
    g = resolve_gamma(gamma, X)
    pick = np.sort(np.random.default_rng(seed).choice(len(X), m, replace=False))
    return Nystroem(kernel="rbf", gamma=g, n_components=m, random_state=seed).fit(np.asarray(X[pick], np.float64))


