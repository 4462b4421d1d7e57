"""How similar near copies of real photos are, against distinct photos: the measurement behind NEAR_DUPLICATE.

COPIES: a cache of a folder holding, for 60 catsdogs photos, the photo re-saved (``.orig``) and five
copies: JPEG quality 50 (``.q50``), half size (``.half``), centre crops keeping 90 % and 80 % of each
side (``.crop90``, ``.crop80``), and a 10 % side crop resized to 60 % at quality 70 (``.side``).
DISTINCT: a cache of 1,000 different photos (catsdogs). Prints each kind's minimum similarity to its
original and percentiles of every photo's closest distinct photo.
``python bench/near_duplicates.py COPIES.h5 DISTINCT.h5``
"""
import sys
from collections import defaultdict

import numpy as np

from pipeline.cache.feature_cache import FeatureCache
from pipeline.heads.cache_views import CacheViews
from pipeline.reports.duplicates import l2_rows, similar_pairs


def rows(path):
    with FeatureCache(path) as c:
        return l2_rows(CacheViews(c, np.arange(c.n))["avg"]), c.paths


def main():
    x, paths = rows(sys.argv[1])
    index = {p: i for i, p in enumerate(paths)}
    sims = defaultdict(list)
    for p, i in index.items():
        stem, kind = p.rsplit(".", 2)[0], p.rsplit(".", 2)[1]
        if kind != "orig":
            sims[kind].append(float(x[i] @ x[index[f"{stem}.orig.jpg"]]))
    for kind, s in sorted(sims.items()):
        print(f"copy {kind:<7} vs its original: min {min(s):.4f}  median {np.median(s):.4f}  (n={len(s)})")
    d, _ = rows(sys.argv[2])
    nearest = similar_pairs(d, threshold=2.0, k=1)["knn_sim"][:, 0]
    q = np.percentile(nearest, [50, 99, 99.9, 100])
    print(f"closest distinct photo ({len(d)} photos): median {q[0]:.4f}  99th pct {q[1]:.4f}  99.9th {q[2]:.4f}  "
          f"max {q[3]:.4f}")
    orig = [i for p, i in index.items() if p.endswith(".orig.jpg")]
    o = x[orig]
    s = o @ o.T
    np.fill_diagonal(s, -1)
    print(f"closest other original among the {len(orig)} originals: max {s.max():.4f}")


if __name__ == "__main__":
    main()
