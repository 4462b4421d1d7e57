""""None of these": how unlike the training photos an input is, from the features a head already sees.

A classifier's own top probability is a weak test of "is this a photo of one of my classes at all" (a
cats-vs-dogs head gives flowers 0.68 and rubbish 0.78); the distance of the photo's pooled features to
the training photos' is a strong one. The score is one minus the cosine similarity to the k-th nearest
training row (channels averaged over the map and l2-normalised; k = 10 ignores a few odd training
photos), the threshold the score that ``known_share`` of held-out photos stay under: the validation
rows, and each kept training row against the others (``held_out_scores``: on cats-vs-dogs the 124
validation rows alone set a threshold that kept 88 % of the test photos, with the 876 training rows
added 95 %). The training
rows are kept in float16 (1 KB a row for VGG-16's 512 channels), at most ``unknown_rows`` of them (a
seeded sample), and compared in blocks, so neither memory nor time grows with a 25,000-row cache.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..config import option_text
from ..errors import UsageError

BLOCK = 8192  # training rows compared at once: a (batch, BLOCK) similarity block, then the running top k
#: The lowest threshold: a photo's distance to its own kept row is rounding noise around 0, not 0 (measured on
#: VGG-16 rows of dogbreeds20, kept in float16: -5.5e-5 to +3.6e-5, fp32 and bf16 queries alike). Where the
#: held-out photos are that close to each other (identical training photos), the quantile is noise too
#: (-4.8e-7 was seen) and a threshold there called the training photos themselves unknown in fp32 and not in
#: bf16. 1e-3 is 20 times that noise and far below any threshold of real photos (0.2 to 0.5 here).
THRESHOLD_FLOOR = 1e-3


def one_kept_row() -> str:
    """The refusal of --unknown-rows 1, in the caller's terms (``unknown_rows=1`` from Python: config.option_text)."""
    return (f"{option_text('unknown_rows', 1)}: each kept training row is scored against the other kept rows to set "
            "the unknown threshold, and one has no other; give at least 2, or 0 for no unknown score")


class UnknownFit(NamedTuple):
    """What ``fit_unknown`` found: the rows kept, the threshold, and what that threshold keeps."""

    known: np.ndarray  # the kept training rows, normalised, float16
    threshold: float  # above it: unknown
    val_scores: np.ndarray  # the validation rows' scores
    kept: float  # the share of held-out scores (validation rows, kept rows against the others) at or under it
    held_out: int  # how many held-out scores the threshold was set on


def pooled_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps (or (B, C, 1, 1) pooled ones) -> (B, C) channel means, l2-normalised, float32."""
    z = x.float().mean(dim=(2, 3)) if x.dim() == 4 else x.float()
    n = z.norm(dim=1, keepdim=True)
    return z / torch.where(n == 0, torch.ones_like(n), n)


def pooled_rows_np(avg: np.ndarray) -> np.ndarray:
    """Average-view rows (N, C) -> l2-normalised float32 rows (what ``pooled_rows`` computes in torch)."""
    z = np.asarray(avg, np.float32)
    n = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(n == 0, 1.0, n)


def knn_distance(q: torch.Tensor, known: torch.Tensor, k: int, block: int = BLOCK) -> torch.Tensor:
    """1 - cosine similarity of each normalised row of ``q`` to its k-th nearest row of ``known``
    (normalised, any float dtype), computed ``block`` rows of ``known`` at a time; never below 0 (a photo
    that is a kept row gave -3.6e-07 from rounding, a 'negative distance' in predict's rows and the export's)."""
    k = max(1, min(int(k), len(known)))
    best = None
    for s in range(0, len(known), block):
        sims = q @ known[s:s + block].to(q.dtype).T
        if best is not None:
            sims = torch.cat([best, sims], 1)
        best = sims.topk(min(k, sims.shape[1]), dim=1).values
    return (1.0 - best[:, k - 1]).clamp(min=0.0)


def known_rows(rows: np.ndarray) -> np.ndarray:
    """Average-view rows as a checkpoint keeps them: normalised (``pooled_rows_np``), float16."""
    return pooled_rows_np(rows).astype(np.float16)


def scores_np(queries: np.ndarray, known: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    """``knn_distance`` of average-view rows ``queries`` (N, C) against float16 ``known`` rows."""
    known_t = torch.from_numpy(np.ascontiguousarray(known)).float()  # cast once, not once per batch
    q = pooled_rows_np(queries)
    return np.concatenate([knn_distance(torch.from_numpy(q[i:i + batch]), known_t, k).numpy()
                           for i in range(0, len(q), batch)]) if len(q) else np.zeros(0, np.float32)


def held_out_scores(rows: np.ndarray, known: np.ndarray, k: int) -> np.ndarray:
    """Scores of ``rows`` (the very rows ``known`` was made of) against the others: a row is its own
    nearest neighbour, so the (k + 1)-th is the k-th of the rest."""
    return scores_np(rows, known, k + 1)


def threshold_for(scores: np.ndarray, known_share: float) -> float:
    """The score that ``known_share`` of ``scores`` (known photos) stay at or under: above it is unknown;
    never below THRESHOLD_FLOOR (numerical noise is not a distance)."""
    share = float(np.quantile(np.asarray(scores, np.float64), known_share, method="inverted_cdf"))  # the smallest such
    return max(share, THRESHOLD_FLOOR)


def kept_indices(indices, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``indices`` (a seeded sample, sorted; 0 = all): the training rows a score keeps,
    chosen before any is read."""
    indices = np.asarray(indices)
    if cap and len(indices) > cap:
        indices = np.sort(np.random.default_rng(seed).choice(indices, cap, replace=False))
    return indices


def neighbours(k: int, kept: int) -> int:
    """The k of the k-th nearest neighbour used with ``kept`` known rows: at most the kept rows less one (each is
    scored against the others); --unknown-k 500 with 200 kept rows was said as k = 500 while every score was the
    distance to the 200th, the farthest."""
    return max(1, min(k, kept - 1))


def fit_unknown(train_rows: np.ndarray, val_rows: np.ndarray, k: int, known_share: float) -> UnknownFit:
    """``train_rows`` kept, and the score that keeps ``known_share`` of the validation rows and of the kept
    rows (each scored against the others) known; what it keeps measured on those same rows (more than
    ``known_share`` where scores tie or the floor lifts the threshold)."""
    if len(train_rows) < 2:  # its score against 'the others' was its distance to itself (0): a threshold at the
        # floor, every other photo 'unknown', said as "keeps 1 of 1 held-out photos (100%)"
        raise UsageError(one_kept_row())
    known = known_rows(train_rows)
    val_scores = scores_np(val_rows, known, k)
    held_out = np.concatenate([val_scores, held_out_scores(train_rows, known, k)])
    threshold = threshold_for(held_out, known_share)
    return UnknownFit(known, threshold, val_scores, float((held_out <= threshold).mean()), int(len(held_out)))


def unknown_summary(fit: UnknownFit, k: int, known_share: float) -> dict:
    """What a fit reports and records of its unknown score: the share it was asked to keep (``known_share``)
    and the share it kept (``known_kept`` of ``held_out_rows``)."""
    return {"unknown_threshold": fit.threshold, "known_rows": int(len(fit.known)),
            "known_rows_bytes": int(fit.known.nbytes), "unknown_k": k, "known_share": known_share,
            "known_kept": fit.kept, "held_out_rows": fit.held_out}
