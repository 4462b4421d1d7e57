"""Duplicates and leaks: the same photo twice (same bytes), or nearly (re-encoded, resized, slightly cropped).

Near copies are found by the cosine similarity of max-pooled, l2-normalised backbone features (the
``max`` view; ``avg`` for caches stored pooled) above ``NEAR_DUPLICATE`` (chosen by measurement,
docs/audit.md: max-pooled rows told copies from distinct photos far better than average-pooled ones,
whose closest distinct tabby cats scored as high as a half-size copy). The
search is blocked matrix products (a block of rows against all others), so memory stays at one
block x N similarities whatever the folder's size; the same pass keeps each row's nearest neighbours,
from which the outlier score comes (rows far from every other photo). Pairs are grouped by union-find.

Max pooling keeps what is in a photo and drops where: two different photos of one kind of thing (three
daisies on grass) can score above the threshold. So each candidate is confirmed by a second check that
looks at the layout (``layout_similarity``): the cosine similarity of the two whole cached maps (C x H x W), cell
by cell, the better of the straight and the mirrored comparison (Caltech's leopards recur as mirror
images). A copy keeps its layout (resized, re-encoded, cropped by a tenth: 0.66 and more on the proxies),
distinct photos mostly do not (0.70 at most, all but 2 of 111 below 0.65, among the pairs closest in the
max view: docs/audit.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..config import NEAR_DUPLICATE
from ..heads.unknown_score import pooled_rows_np
from ..progress import progress

#: The view near copies are compared in, where the cache has it (bench/near_duplicates.py).
VIEW = "max"
#: Bytes held at once while one block of rows is compared with all the others.
BLOCK_BYTES = 128 << 20
#: What each similarity of a block holds: itself (float32), its negation and argpartition's int64 indices of the
#: nearest neighbours and of the candidates (a block sized on the float32 alone peaked at 6x BLOCK_BYTES: 740 MB).
BYTES_PER_SIMILARITY = 16
#: The second check: a near-copy candidate is confirmed when its maps' layout similarity reaches this. Measured
#: (docs/audit.md): copies above NEAR_DUPLICATE scored 0.66-1.0 (108 planted on three proxies, the lowest a 10 %
#: side cut shrunk to 60 %; the 17 real ones 0.83-1.0), the 111 distinct photos closest in the max view 0.16-0.70,
#: all but two below 0.65.
SAME_LAYOUT = 0.65
#: Near-copy candidates kept per photo (its most similar ones): in a folder of near-identical shots nearly every
#: pair passes the threshold (30 % of 25,000 photos' 312 M pairs: gigabytes, then hours of the second check);
#: this many per photo still joins a group of any size, each photo to its closest copies.
PAIRS_PER_ROW = 16


def layout_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For pairs of maps ``a[n]``, ``b[n]`` ((N, C, H, W)): the cosine similarity of the whole maps, cell by
    cell, or of ``a`` and ``b`` mirrored left to right if that is higher (a mirror image is a copy too)."""
    a, b = l2_rows(np.asarray(a).reshape(len(a), -1)), np.asarray(b)
    flat, mirrored = (l2_rows(m.reshape(len(b), -1)) for m in (b, b[..., ::-1]))
    return np.maximum((a * flat).sum(1), (a * mirrored).sum(1))


def has_layout(feature_shape) -> bool:
    """Whether a cache's rows are maps with a layout to compare (not globally pooled C x 1 x 1 vectors)."""
    return int(np.prod(feature_shape[1:])) > 1


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so a dot product is the cosine similarity."""
    return pooled_rows_np(x)


def similar_pairs(x: np.ndarray, other: Optional[np.ndarray] = None, threshold: float = NEAR_DUPLICATE,
                  k: int = 10, desc: str = "audit: similarity search", per_row: int = PAIRS_PER_ROW) -> dict:
    """Pairs with cosine similarity >= ``threshold`` (each row's ``per_row`` most similar) and each row's ``k``
    nearest neighbours.

    Without ``other``: pairs (i, j) of rows of ``x`` with i < j, neighbours among the other rows of
    ``x``. With ``other`` (e.g. the training rows for test rows ``x``): pairs (i of x, j of other),
    neighbours among ``other``'s rows. Rows must be l2-normalised. Returns {"pairs": (i, j, sim)
    arrays, "knn": (N, k) indices, "knn_sim": (N, k) similarities, nearest first, "left_out": pairs above
    the threshold beyond ``per_row``}.
    """
    base = x if other is None else other
    n, m = len(x), len(base)
    k = max(0, min(k, m - (1 if other is None else 0)))
    block = int(max(16, min(4096, BLOCK_BYTES // max(BYTES_PER_SIMILARITY * m, 1))))
    pi, pj, ps, left_out = [], [], [], 0
    knn = np.zeros((n, k), np.int64)
    knn_sim = np.zeros((n, k), np.float32)
    bar = progress(total=n, desc=desc, unit="row")
    try:
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            s = x[lo:hi] @ base.T
            if other is None:
                s[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # a row is not its own neighbour
            if k:
                part = np.argpartition(-s, k - 1, axis=1)[:, :k]
                sims = np.take_along_axis(s, part, 1)
                order = np.argsort(-sims, axis=1, kind="stable")
                knn[lo:hi] = np.take_along_axis(part, order, 1)
                knn_sim[lo:hi] = np.take_along_axis(sims, order, 1)
            if other is None:  # each pair once: j > i
                s[np.arange(m)[None, :] <= np.arange(lo, hi)[:, None]] = -np.inf
            r, c, over = _most_similar(s, threshold, per_row)
            left_out += over
            pi.append(r + lo)
            pj.append(c)
            ps.append(s[r, c])
            bar.update(hi - lo)
    finally:
        bar.close()
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))  # noqa: E731
    return {"pairs": (cat(pi, np.int64), cat(pj, np.int64), cat(ps, np.float32)), "knn": knn, "knn_sim": knn_sim,
            "left_out": left_out}


def _most_similar(s: np.ndarray, threshold: float, per_row: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, columns) of ``s`` at least ``threshold``, at most ``per_row`` a row (its highest), and how many
    more there were."""
    above = s >= threshold
    counts = above.sum(1)
    if counts.max(initial=0) <= per_row:
        r, c = np.nonzero(above)
        return r, c, 0
    top = np.argpartition(-s, per_row - 1, axis=1)[:, :per_row]
    r, t = np.nonzero(np.take_along_axis(s, top, 1) >= threshold)
    return r, top[r, t], int(counts.sum()) - len(r)


def exact_pairs(digests: Sequence[str], other: Optional[Sequence[str]] = None) -> list[tuple[int, int]]:
    """(i, j) of rows with the same sha256 (i < j within one list; i of ``digests``, j of ``other``)."""
    if other is None:
        first: dict = {}
        out = []
        for i, d in enumerate(digests):
            if not d:
                continue
            if d in first:
                out.append((first[d], i))
            else:
                first[d] = i
        return out
    where: dict = {}
    for j, d in enumerate(other):
        if d:
            where.setdefault(d, []).append(j)
    return [(i, j) for i, d in enumerate(digests) if d for j in where.get(d, ())]


def groups(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected groups (union-find) of the rows joined by ``pairs``, each sorted, groups by first row."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict = {}
    for a, b in pairs:
        for v in (int(a), int(b)):
            members.setdefault(find(v), set()).add(v)
    return sorted((sorted(g) for g in members.values()), key=lambda g: g[0])


def outlier_scores(knn_sim: np.ndarray) -> np.ndarray:
    """1 - the mean similarity to a row's nearest neighbours: high for a photo like no other."""
    return 1.0 - knn_sim.mean(1) if knn_sim.size else np.zeros(len(knn_sim))


def outlier_threshold(scores: np.ndarray) -> float:
    """Scores above the upper quartile plus 3 interquartile ranges (Tukey's far-out fence) are outliers."""
    q1, q3 = np.percentile(scores, [25, 75])
    return float(q3 + 3 * (q3 - q1))
