"""The one temperature + unknown-score fit (heads/trust.py) that fit-head, train and finetune share."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.heads.calibration import fit_temperature
from pipeline.heads.probe_heads import ProbeHead
from pipeline.heads.trust import NOT_CALIBRATED, fit_trust


def _cfg(**kw):
    return SimpleNamespace(**{"calibrate": "val", "unknown_rows": 0, "unknown_k": 2, "known_share": 0.9, "seed": 0,
                              **kw})


def _logp(n=40, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, 2))
    return z - np.log(np.exp(z).sum(1, keepdims=True)), rng.integers(0, 2, n)


def test_calibrate_none_leaves_the_head_alone_and_reads_no_rows():
    head = ProbeHead((4, 1, 1), 2, "avg")

    def never(*_):
        raise AssertionError("no rows are read without an unknown score")

    assert fit_trust(_cfg(calibrate="none"), head, None, np.arange(10), never, never) == NOT_CALIBRATED
    assert not head.calibrated and not head.has_unknown


def test_the_temperature_and_the_unknown_score_are_fitted_and_set_on_the_head():
    head, (logp, y) = ProbeHead((4, 1, 1), 2, "avg"), _logp()
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(30, 4)).astype(np.float32)
    asked = []

    def known(idx):
        asked.append(idx)
        return rows[idx]

    trust = fit_trust(_cfg(unknown_rows=8), head, (logp, y, "val"), np.arange(30), known, lambda: rows[:5] + 0.01)
    assert trust["temperature"] == fit_temperature(logp, y) == pytest.approx(head.temperature_used)
    assert (trust["calibration_rows"], trust["calibrated_on"]) == (40, "val")
    assert len(asked) == 1 and len(asked[0]) == 8  # only the seeded sample of training rows is read
    assert head.has_unknown and trust["known_rows"] == 8 and trust["unknown_threshold"] == head.threshold_used


def test_k_is_at_most_the_kept_rows_less_one_and_says_so(caplog):
    """--unknown-k 500 with 30 kept rows was recorded and said as k = 500, every score then the distance to the
    farthest kept row; k is what the score uses, and the log line says why it is not what was asked."""
    head, rows = ProbeHead((4, 1, 1), 2, "avg"), np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    with caplog.at_level("INFO"):
        trust = fit_trust(_cfg(calibrate="none", unknown_rows=30, unknown_k=500), head, None, np.arange(30),
                          lambda idx: rows[idx], lambda: rows[:0])
    assert trust["unknown_k"] == head.unknown_k == 29
    assert "k = 29 (unknown_k=500: at most the kept rows less one)" in caplog.text
