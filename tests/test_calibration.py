"""Temperature scaling and the calibration measures: ECE, log-loss, Brier; an over-confident head fixed."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import Head
from pipeline.heads.calibration import (
    calibration_metrics,
    fit_stack_weights,
    fit_temperature,
    log_softmax,
    reliability_bins,
    with_temperature,
    without_temperature,
)


def _sampled(n: int, true_t: float, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / true_t): a head over-confident by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, (n, 3))
    p = np.exp(log_softmax(z / true_t))
    y = np.array([rng.choice(3, p=row) for row in p])
    return log_softmax(z), y


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at():
    logp, y = _sampled(4000, 2.5)
    t = fit_temperature(logp, y)
    assert t == pytest.approx(2.5, rel=0.1)
    before, after = calibration_metrics(logp, y), calibration_metrics(with_temperature(logp, t), y)
    assert after["ece"] < before["ece"] / 3 and after["log_loss"] < before["log_loss"]
    assert after["brier"] < before["brier"]


def test_few_rows_all_right_keep_the_temperature_near_one():
    logp = log_softmax(np.array([[2.0, 0.0]] * 8))  # 8 rows, each right at p = 0.88
    assert 0.3 < fit_temperature(logp, np.zeros(8, np.int64)) < 1.0  # sharper, but not to the bound (0.05)


def test_few_rows_all_right_keep_the_stack_weights_near_one():
    """Two heads' held-out rows, all classified right (10 photos a class): the weights ran to their bound (20 each)
    as the NLL fell for ever, and the stack said 1e-28 for a test photo it got wrong."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 9)
    logps = [log_softmax(np.where(np.eye(2)[y] > 0, 1.0, -1.0) * rng.uniform(0.5, 2.0, (18, 1))) for _ in range(2)]
    weights = fit_stack_weights(logps, y)
    assert 0.5 < np.mean(weights) < 5, weights
    wrong = log_softmax(sum(w * lp[:1, ::-1] for w, lp in zip(weights, logps)))  # a row as sure, the other way
    assert np.exp(wrong[0, 0]) > 1e-4


def test_stack_weights_with_evidence_are_the_nll_weights():
    """Hundreds of rows with their errors: the prior (one row's worth) moves the weights by under 2 %, sharpening
    (a timid head, weight ~2.5) or softening (an over-confident one, ~0.4: no prior; a useless second head stays
    at 0)."""
    for true_t in (0.4, 2.5):
        logp, y = _sampled(2000, true_t)
        noisy = log_softmax(np.log(np.exp(logp) + 0.5))
        weights = fit_stack_weights([logp, noisy], y)
        unbiased = fit_stack_weights([logp, noisy], y, prior_rows=0.0)
        assert np.allclose(weights, unbiased, rtol=0.02, atol=0.01), (weights, unbiased)
        assert weights[0] == pytest.approx(1 / true_t, rel=0.15) and weights[1] < 0.05


def test_without_temperature_undoes_it_exactly():
    logp, _ = _sampled(50, 1.0)
    assert np.allclose(without_temperature(with_temperature(logp, 3.7), 3.7), logp, atol=1e-12)


def test_measures_on_hand_made_rows():
    # 10 rows at p = 0.8, 8 right: calibrated (ECE 0); Brier = (8 * 0.08 + 2 * 1.28) / 10
    logp = np.log(np.array([[0.8, 0.2]] * 10))
    y = np.array([0] * 8 + [1] * 2)
    m = calibration_metrics(logp, y)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["brier"] == pytest.approx(0.32)
    assert m["log_loss"] == pytest.approx(-(8 * np.log(0.8) + 2 * np.log(0.2)) / 10)
    bins = reliability_bins(logp, y)
    assert sum(bins["count"]) == 10 and bins["accuracy"][12] == pytest.approx(0.8)  # 0.8 is in bin [0.8, 0.867)
    assert calibration_metrics(np.log(np.array([[0.99, 0.01]] * 4)), np.array([1, 1, 1, 1]))["ece"] == \
        pytest.approx(0.99)


def test_calibration_lowers_the_ece_of_an_over_confident_head():
    """Logistic regression with almost no regularisation on 120 noisy rows in 60 dimensions separates its
    training rows perfectly: huge weights, probabilities near 0 and 1, and a third of new rows wrong."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=60)

    def rows(n):
        x = rng.normal(size=(n, 60))
        return x, (x @ w + rng.normal(0, 8, n) > 0).astype(int)

    (x, y), (xt, yt) = rows(160), rows(2000)
    options = dict(head="logreg", C=1e5, normalize="none", val_fraction=0.25, unknown_rows=0)
    raw = Head(calibrate="none", **options).fit(x, y)
    cal = Head(calibrate="cv", **options).fit(x, y)
    assert raw.temperature_ == 1.0 and cal.temperature_ > 2  # softened
    ece_raw = calibration_metrics(raw.predict_log_proba(xt), yt)["ece"]
    ece_cal = calibration_metrics(cal.predict_log_proba(xt), yt)["ece"]
    assert ece_raw > 0.3 and ece_cal < 0.6 * ece_raw  # measured: 0.37 -> 0.19
    assert np.array_equal(raw.predict(xt), cal.predict(xt))  # the same answers, honest confidence
