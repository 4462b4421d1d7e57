"""scikit-learn fits on view rows: multinomial logistic regression, an RBF kernel map in front of it, and
the exact RBF support-vector machine.

The kernel map is Nystroem's: on every training row it is the exact kernel machine; on a sample of
landmark rows, an approximation for training sets too large for an n x n kernel. The SVM's decision
function is a kernel expansion over its support vectors (``KernelExpansion``): a Linear layer over the RBF
kernel of the stored support rows, which a ``ProbeHead`` holds as its landmarks.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.svm import SVC

log = logging.getLogger(__name__)

SVM_SCHEMES = ("ovr", "ovo")  # a class against the rest, or SVC's own pairs
GRAM_ROWS = 6000  # up to this many rows an SVM's kernel matrix is computed once (6,000: 288 MB of float64)

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
    factor, scaled = parse_gamma(gamma)
    if not scaled:
        return factor
    var = float(np.var(X, dtype=np.float64))
    return factor / (X.shape[1] * var) if var > 0 else factor


def parse_gamma(gamma) -> tuple[float, bool]:
    """(G, whether it multiplies 'scale') of a gamma as given: a number, 'scale' or 'G*scale'; ValueError
    unless G is a finite positive number (nan, 0 or -1 would make no RBF at all)."""
    text = str(gamma).strip()
    g, star, rest = text.partition("*")
    scaled = text == "scale" or (bool(star) and rest.strip() == "scale")
    try:
        factor = 1.0 if text == "scale" else float(g if scaled else text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"gamma must be a positive number, 'scale' or 'G*scale' with G positive, got {gamma!r}")
    return factor, scaled


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




def svm_gram(X: np.ndarray, gamma) -> np.ndarray:
    """The RBF kernel matrix of rows X (float64), what ``fit_svm`` reads: computed once for every C and class."""
    X = np.asarray(X, np.float64)
    return rbf_kernel(X, X, gamma=resolve_gamma(gamma, X))


@dataclass(frozen=True)
class KernelExpansion:
    """Class scores ``weight @ exp(-gamma ||x - rows||^2).T + bias`` (an SVM's decision functions)."""

    rows: np.ndarray  # (m, d) support rows
    weight: np.ndarray  # (K, m)
    bias: np.ndarray  # (K,)
    gamma: float
    pairs: bool = False  # rows of ``weight``: the class pairs' margins (one-vs-one), not the classes' scores

    def scores(self, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
        X = np.asarray(X, np.float64)
        return np.concatenate([rbf_kernel(X[i:i + chunk], self.rows, gamma=self.gamma) @ self.weight.T + self.bias
                               for i in range(0, len(X), chunk)]) if len(X) else np.zeros((0, len(self.bias)))


def fit_svm(X: np.ndarray, y: np.ndarray, C: float = 1.0, gamma="scale", scheme: str = "ovr",
            n_classes: int = 0, gram: Optional[np.ndarray] = None) -> KernelExpansion:
    """The exact RBF support-vector machine (scikit-learn's SVC, libsvm) on view rows, as the kernel
    expansion of its class scores; ``gamma`` as ``resolve_gamma`` reads it ('scale' is SVC's own default).

    Binary: scores [0, f(x)], f SVC's decision function (> 0: class 1), so the argmax is SVC's prediction.
    Several classes, ``scheme`` 'ovr': one binary SVM a class against the rest, its f_k the class's score;
    'ovo' (SVC's own): the K(K-1)/2 pairs' margins f_ij (> 0: class i; SVC's ``decision_function``), a
    ``pairs`` expansion that ``probe_heads.couple_pairs`` turns into class scores (SVC counts their votes).
    Deterministic (libsvm draws nothing without probability=True). Up to ``GRAM_ROWS`` rows the kernel
    matrix is computed once (``gram``: one already computed, as ``svm_gram`` gives) and every binary SVM
    reads it; beyond, libsvm computes kernel values as it needs them (an n x n matrix would not fit).
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    if scheme not in SVM_SCHEMES:
        raise ValueError(f"unknown SVM scheme {scheme!r}; allowed: {', '.join(SVM_SCHEMES)}")
    X, y = np.asarray(X, np.float64), np.asarray(y, np.int64)
    k = max(int(n_classes), int(y.max()) + 1)
    if len(np.unique(y)) != k:
        raise ValueError(f"the training rows hold {len(np.unique(y))} of the {k} classes; a head needs every class")
    g = resolve_gamma(gamma, X)
    if gram is None and len(X) <= GRAM_ROWS:
        gram = svm_gram(X, g)

    def svc(labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if gram is not None:
                return SVC(C=C, kernel="precomputed", decision_function_shape="ovo").fit(gram, labels)
            return SVC(C=C, kernel="rbf", gamma=g, decision_function_shape="ovo", cache_size=500).fit(X, labels)

    if k == 2 or scheme == "ovr":
        fits = [svc(y)] if k == 2 else [svc((y == c).astype(np.int64)) for c in range(k)]
        used = np.unique(np.concatenate([f.support_ for f in fits]))
        w, b = np.zeros((k, len(used))), np.zeros(k)
        for c, f in zip([1] if k == 2 else range(k), fits):
            w[c, np.searchsorted(used, f.support_)] = f.dual_coef_[0]
            b[c] = f.intercept_[0]
        return KernelExpansion(X[used], w, b, g)
    clf = svc(y)
    dual, intercept = np.asarray(clf.dual_coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    owner = np.repeat(np.arange(k), clf.n_support_)  # each support row's class
    w = np.zeros((k * (k - 1) // 2, len(owner)))
    for p, (i, j) in enumerate((i, j) for i in range(k) for j in range(i + 1, k)):  # libsvm's own formula
        w[p] = np.where(owner == i, dual[j - 1], 0.0) + np.where(owner == j, dual[i], 0.0)
    return KernelExpansion(X[clf.support_], w, intercept.copy(), g, pairs=True)
