"""The one fit of what makes a head's answers trustworthy, for every kind of model (fit-head's heads on
cached rows, train's and finetune's whole models on images): the temperature (``calibration.py``) and the
unknown score (``unknown_score.py``), both set on the head and recorded in its checkpoint.

The callers differ only in where the rows come from (a cache's average view, or one more pass of the
network over images), so they hand over the held-out log-probabilities and two readers of pooled rows.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch

from ..config import option_text
from .calibration import calibration_metrics, fit_temperature, with_temperature
from .trust_text import kept_text
from .unknown_score import fit_unknown, kept_indices, neighbours, unknown_summary

log = logging.getLogger(__name__)

NOT_CALIBRATED = {"temperature": 1.0, "calibration_rows": 0, "calibrated_on": "none"}


def fit_trust(cfg, head, calibration: Optional[tuple], train_idx, known_rows: Callable[[np.ndarray], np.ndarray],
              held_out_rows: Callable[[], np.ndarray]) -> dict:
    """Fit and set ``head``'s temperature and unknown score; {temperature, calibration_rows, calibrated_on,
    unknown_threshold, known_rows, ...} as checkpoints record them.

    ``cfg``: the trust options (``calibrate``, ``unknown_rows``, ``unknown_k``, ``known_share``, ``seed``);
    ``calibration``: (held-out log-probabilities, their labels, what they are: 'val', 'cv+val'), or None
    when ``cfg.calibrate`` is 'none'; ``known_rows(indices)``: the pooled rows of those training rows (only
    a seeded sample of ``unknown_rows`` of ``train_idx`` is read); ``held_out_rows()``: the held-out rows'."""
    trust = dict(NOT_CALIBRATED)
    if cfg.calibrate != "none" and calibration is not None:
        trust = _set_temperature(head, *calibration)
    if cfg.unknown_rows:
        trust.update(_set_unknown(cfg, head, known_rows(kept_indices(train_idx, cfg.unknown_rows, cfg.seed)),
                                  held_out_rows()))
    return trust


def _set_temperature(head, logp: np.ndarray, y: np.ndarray, source: str) -> dict:
    t = fit_temperature(logp, y)
    head.set_temperature(t)
    after = calibration_metrics(with_temperature(logp, t), y)
    log.info("calibration: T = %.3f from %d rows (%s): ECE %.4f -> %.4f", t, len(y), source,
             calibration_metrics(logp, y)["ece"], after["ece"])
    return {"temperature": t, "calibration_rows": int(len(y)), "calibrated_on": source}


def _set_unknown(cfg, head, train_rows: np.ndarray, held_out: np.ndarray) -> dict:
    """Keep the training rows in the head, and the threshold that keeps ``known_share`` of held-out rows known.
    k: ``neighbours``."""
    k = neighbours(cfg.unknown_k, len(train_rows))
    fit = fit_unknown(train_rows, held_out, k, cfg.known_share)
    head.set_unknown(torch.from_numpy(fit.known), k, fit.threshold)
    head.to(head.linear.weight.device)
    val_kept = float((fit.val_scores <= fit.threshold).mean()) if len(fit.val_scores) else None
    summary = {**unknown_summary(fit, k, cfg.known_share), "val_known_kept": val_kept}
    fewer = "" if k == cfg.unknown_k else (f" ({option_text('unknown_k', cfg.unknown_k)}: at most the kept rows "
                                           "less one)")
    log.info("unknown score: %d training rows kept (%.1f MB), k = %d%s, threshold %.4f (%s)", len(fit.known),
             fit.known.nbytes / 1e6, k, fewer, fit.threshold, kept_text(summary))
    return summary
