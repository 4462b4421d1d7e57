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

import numpy as np
import torch

BLOCK = 8192  # training rows compared at once: a (batch, BLOCK) similarity block, then the running top k


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
    (normalised, any float dtype), computed ``block`` rows of ``known`` at a time."""
    k = max(1, min(int(k), len(known)))
    best = None
    for s in range(0, len(known), block):
        sims = q @ known[s:s + block].to(q.dtype).T
        if best is not None:
            sims = torch.cat([best, sims], 1)
        best = sims.topk(min(k, sims.shape[1]), dim=1).values
    return 1.0 - best[:, k - 1]


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
    """The score that ``known_share`` of ``scores`` (known photos) stay at or under: above it is unknown."""
    return float(np.quantile(np.asarray(scores, np.float64), known_share, method="inverted_cdf"))  # the smallest such


def kept_indices(indices, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``indices`` (a seeded sample, sorted; 0 = all): the training rows a score keeps,
    chosen before any is read."""
    indices = np.asarray(indices)
    if cap and len(indices) > cap:
        indices = np.sort(np.random.default_rng(seed).choice(indices, cap, replace=False))
    return indices


def fit_unknown(train_rows: np.ndarray, val_rows: np.ndarray, k: int, known_share: float) -> tuple:
    """(known rows as float16, threshold, the validation rows' scores): ``train_rows`` kept, and the
    score that keeps ``known_share`` of the validation rows and of the kept rows (each scored against
    the others) known."""
    known = known_rows(train_rows)
    val_scores = scores_np(val_rows, known, k)
    threshold = threshold_for(np.concatenate([val_scores, held_out_scores(train_rows, known, k)]), known_share)
    return known, threshold, val_scores


def unknown_summary(known: np.ndarray, threshold: float, k: int, known_share: float) -> dict:
    """What a fit reports and records of its unknown score."""
    return {"unknown_threshold": threshold, "known_rows": int(len(known)), "known_rows_bytes": int(known.nbytes),
            "unknown_k": k, "known_share": known_share}
