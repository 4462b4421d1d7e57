"""Calibrated probabilities: one temperature per head, and the measures that say whether "0.9" comes true.

A head's log-probabilities divided by a temperature T and normalised again keep every prediction (the
argmax does not move) but make its confidence honest: T > 1 softens an over-confident head, T < 1
sharpens a timid one. T is the one number that minimises the negative log-likelihood of held-out rows;
on a few hundred photos the validation split alone is too small to pin it down (measured on cats-vs-dogs:
T = 0.35 from 124 validation rows made the test ECE worse), so sklearn heads also use out-of-fold
predictions of the training rows (``model_selection.out_of_fold_log_proba``).
"""
from __future__ import annotations

import math

import numpy as np

#: the temperatures searched (log-uniformly); beyond them a head is broken, not miscalibrated
T_BOUNDS = (0.05, 20.0)
ECE_BINS = 15  # equal-width bins of the top probability, the usual choice
#: weight of a log-normal prior on T (centred on 1), in rows of evidence: where the rows say little (a
#: few, all classified right, whose NLL only falls as T -> 0) T stays near 1 instead of running to the bound
PRIOR_ROWS = 1.0


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def nll(logp: np.ndarray, y: np.ndarray) -> float:
    return float(-logp[np.arange(len(y)), y].mean())


def with_temperature(logp: np.ndarray, t: float) -> np.ndarray:
    """Log-probabilities at temperature ``t`` (from log-probabilities: they are logits up to a constant)."""
    return log_softmax(np.asarray(logp, np.float64) / t)


def fit_temperature(logp: np.ndarray, y: np.ndarray, bounds=T_BOUNDS, prior_rows: float = PRIOR_ROWS) -> float:
    """The T minimising the summed NLL of ``with_temperature(logp, T)`` plus ``prior_rows * log(T)^2``:
    golden-section search on log T (the objective has one minimum)."""
    logp, y = np.asarray(logp, np.float64), np.asarray(y, np.int64)
    if not len(y):
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    f = lambda s: len(y) * nll(with_temperature(logp, math.exp(s)), y) + prior_rows * s * s  # noqa: E731
    g = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):  # the bracket shrinks by 0.618 a step: 1e-12 of its width after 60
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return float(math.exp((lo + hi) / 2))


def fit_stack_weights(logps: list, y: np.ndarray, bounds=(0.0, 1.0 / T_BOUNDS[0]),
                      prior_rows: float = PRIOR_ROWS) -> list[float]:
    """Non-negative weights w minimising the summed NLL of softmax(sum_i w_i logps[i]) (held-out log-probabilities
    of several heads on the same rows) plus ``prior_rows * log(mean w)^2`` where the mean is above 1: each head's
    temperature and its share in one; a head that adds nothing gets weight 0. The prior is the temperature's
    (``fit_temperature``) against sharpening: rows all classified right (a few photos a class) make the NLL fall
    for ever as the weights grow; they ran to the bound, and the head said 1e-28 for a test photo it got wrong.
    Below 1 it would pull up the weight of a head that adds nothing (the cheapest way to raise the mean).
    L-BFGS-B from equal weights of 1."""
    from scipy.optimize import minimize

    logps, y = [np.asarray(lp, np.float64) for lp in logps], np.asarray(y, np.int64)
    if not len(y):
        return [1.0] * len(logps)

    def f(w):
        scale = max(math.log(max(float(np.mean(w)), 1e-12)), 0.0)
        return len(y) * nll(log_softmax(sum(wi * lp for wi, lp in zip(w, logps))), y) + prior_rows * scale * scale
    res = minimize(f, np.ones(len(logps)), bounds=[bounds] * len(logps), method="L-BFGS-B")
    return [float(w) for w in res.x]


def calibration_metrics(logp: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (``bins`` equal-width bins of the top probability, weighted by their
    share of rows), log-loss (mean NLL) and the multi-class Brier score (mean squared error of the
    probability vector against the one-hot label)."""
    logp, y = np.asarray(logp, np.float64), np.asarray(y, np.int64)
    p = np.exp(logp)
    conf, right = p.max(1), (p.argmax(1) == y)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return {"ece": float(ece), "log_loss": nll(logp, y), "brier": float(((p - onehot) ** 2).sum(1).mean())}


def reliability_bins(logp: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per bin of the top probability: its rows, mean confidence and accuracy (None where empty)."""
    p = np.exp(np.asarray(logp, np.float64))
    conf, right = p.max(1), (p.argmax(1) == np.asarray(y))
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    sums = lambda v: np.bincount(which, v.astype(np.float64), minlength=bins)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, acc = sums(conf) / count, sums(right) / count
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
            "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
            "accuracy": [None if c == 0 else float(v) for c, v in zip(count, acc)]}


def without_temperature(logp: np.ndarray, t: float) -> np.ndarray:
    """The uncalibrated log-probabilities back from those at temperature ``t`` (exactly: softmax(l / t)
    is log-linear in l, so multiplying by t and normalising undoes it)."""
    return log_softmax(np.asarray(logp, np.float64) * t)


def before_after(logp: np.ndarray, y: np.ndarray, t: float) -> dict:
    """Calibration measures of calibrated ``logp`` (at temperature ``t``) and of the same head without it."""
    return {"temperature": float(t), "before": calibration_metrics(without_temperature(logp, t), y),
            "after": calibration_metrics(logp, y)}
