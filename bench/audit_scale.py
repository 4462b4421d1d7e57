"""The audit at 25,000 rows: out-of-fold refits and the duplicate search, timed (target: < 2 min on 2 cores).

Rows are synthetic but realistic: the 1,000 real avg-pooled VGG-16 rows of catsdogs (the cache in
CACHE) repeated with Gaussian noise (NOISE x each feature's std), so classes overlap as real photos'
do. ``python bench/audit_scale.py [N] [landmarks]``; prints the seconds of each part.
"""
import os
import sys
import time

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")
CACHE = os.environ.get("AUDIT_BENCH_CACHE", "/tmp/h20/caches/vgg16-nall-3fa45b23bc7d.h5")
NOISE = float(os.environ.get("AUDIT_BENCH_NOISE", "0.5"))


def synthetic_rows(n: int, seed: int = 0):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.cache_views import CacheViews

    with FeatureCache(CACHE) as c:
        views = CacheViews(c, np.arange(c.n))
        avg, y = views["avg"], views.labels
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(y), n)
    x = avg[pick] + rng.normal(0, NOISE, (n, avg.shape[1])).astype(np.float32) * avg.std(0)
    return np.maximum(x, 0).astype(np.float32), y[pick]


def main():
    from pipeline.reports.duplicates import l2_rows, similar_pairs
    from pipeline.reports.label_issues import label_issues

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 25000
    landmarks = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    avg, y = synthetic_rows(n)
    t0 = time.time()
    r = label_issues(avg, y, ["Cat", "Dog"], landmarks=landmarks)
    t1 = time.time()
    x = l2_rows(avg)
    found = similar_pairs(x, threshold=0.97, k=10)
    t2 = time.time()
    print(f"rows {n}: label issues {t1 - t0:.1f} s (choosing C/gamma {r['choose_seconds']:.1f} s, "
          f"{r['setting']}, oof acc {r['oof_acc']:.3f}, {len(r['flagged'])} flagged); "
          f"duplicate search + kNN {t2 - t1:.1f} s ({len(found['pairs'])} pairs); total {t2 - t0:.1f} s")


if __name__ == "__main__":
    main()
