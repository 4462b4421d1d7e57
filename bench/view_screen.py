#!/usr/bin/env python
"""Screen candidate views of the cached maps before any becomes a fit-head view: each one scored by the plain
scikit-learn recipes (SVC-RBF and LogisticRegression, 5-fold CV on C) and by the default head (``pipeline.Head``
on the view's rows), on the proxies of ``head_table.py`` (same caches, same test folders and splits).

Candidates, each l2-normalised: ``avg`` (fit-head's default view), ``sqrt`` (power-normalised average),
``gem3`` (generalised mean, p = 3), ``spp`` (the average plus the four 4x4 corners of the 7x7 map, a spatial
pyramid) and ``halves`` (the average plus top and bottom halves: layout without left-right order, so a
mirrored photo gives the same row).

    python bench/view_screen.py --views avg spp halves --only caltech20 scenes6
    python bench/view_screen.py --caches scenes6=features/a.h5,features/b.h5   # caches made already

Not a test: one run per proxy, where one test photo is 0.25-0.33 points.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from head_table import cache_arguments, caches, recipe_scores  # noqa: E402  (bench/ is the script's folder)

SPLITS = 5  # dogbreeds20: seeded 80/20 splits, as the screen in docs/heads.md was run


def l2(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def view_rows(x: np.ndarray, name: str) -> np.ndarray:
    """(N, C, H, W) maps -> (N, d) rows of the candidate view ``name``."""
    avg = x.mean((2, 3))
    h, w = x.shape[2:]
    top, left = (h + 1) // 2, (w + 1) // 2  # 7 -> 4: the halves share the middle row / column
    if name == "avg":
        return l2(avg)
    if name == "sqrt":
        return l2(np.sqrt(np.maximum(avg, 0)))
    if name == "gem3":
        return l2(np.mean(np.maximum(x, 0) ** 3, (2, 3)) ** (1 / 3))
    if name == "spp":
        corners = [x[:, :, r, c].mean((2, 3)) for r in (slice(0, top), slice(h - top, h))
                   for c in (slice(0, left), slice(w - left, w))]
        return l2(np.concatenate([l2(avg)] + [0.5 * l2(q) for q in corners], 1))
    if name == "halves":
        halves = [x[:, :, r].mean((2, 3)) for r in (slice(0, top), slice(h - top, h))]
        return l2(np.concatenate([l2(avg)] + [0.7 * l2(q) for q in halves], 1))
    raise ValueError(f"unknown view {name!r}; allowed: avg, sqrt, gem3, spp, halves")


def maps(path: str) -> tuple:
    from pipeline.cache.feature_cache import FeatureCache

    with FeatureCache(path) as c:
        rows = np.arange(c.n)
        x = np.concatenate([b.astype(np.float32)[s] for _, b, s in c.iter_blocks(rows, 512)])
        return x, np.asarray(c.labels)


def reference_scores(a, ya, b, yb) -> dict:
    """Test accuracy of each plain scikit-learn recipe (head_table's) on these rows."""
    return {f"sklearn {kind}": r["acc"] for kind, r in recipe_scores(a, ya, b, yb).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache_arguments(p)
    p.add_argument("--views", nargs="+", default=["avg", "sqrt", "gem3", "spp", "halves"])
    p.add_argument("--caches", nargs="+", metavar="NAME=TRAIN.h5[,TEST.h5]",
                   help="existing caches instead of extracting (a proxy name, its training cache, its test cache)")
    args = p.parse_args()
    import pipeline
    from pipeline.heads.epoch_loop import split_indices

    given = {k: v.split(",") for k, v in (c.split("=", 1) for c in args.caches)} if args.caches else None
    for name, paths in (given or caches(args)).items():
        x, y = maps(paths[0])
        if len(paths) == 2:
            xt, yt = maps(paths[1])
            splits = []
        else:  # dogbreeds20: fit-head's own seeded stratified 80/20 splits, as head_table
            splits = [split_indices(y, 0.2, s) for s in range(SPLITS)]
        for v in args.views:
            t0, rows = time.time(), view_rows(x, v)
            if len(paths) == 2:
                res = [{**reference_scores(rows, y, view_rows(xt, v), yt),
                        "default head": float((pipeline.Head().fit(rows, y).predict(view_rows(xt, v))
                                               == yt).mean())}]
            else:  # as head_table: the head's own validation split is the held-out 20 %
                res = [{**reference_scores(rows[a], y[a], rows[b], y[b]),
                        "default head": pipeline.Head(val_fraction=0.2, seed=s).fit(rows, y)
                        .metrics_["val_acc"]} for s, (a, b) in enumerate(splits)]
            print(json.dumps({"proxy": name, "view": v, **{k: round(float(np.mean([r[k] for r in res])), 4)
                                                          for k in res[0]}, "seconds": round(time.time() - t0, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
