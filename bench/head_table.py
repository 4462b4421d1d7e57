#!/usr/bin/env python
"""The README's head table: fit-head settings against plain scikit-learn recipes, on four proxies of photos
the heads never saw, and the default head's fit time and memory at 800 and 25,000 rows.

Proxies (../shared/data): catsdogs -> catsdogs_test, caltech20/train -> caltech20/test,
scenes6/train -> scenes6/test (a test folder each), and dogbreeds20 (270 photos, 20 breeds: --splits
seeded stratified 80/20 splits, mean accuracy on the held-out 20 %). fit-head holds out its validation split
(--val-fraction, 12.5 %) and trains on the rest; the references train on every training row.

References, on plain caches (one view of each photo): each 512x7x7 map average-pooled (avg) or average- and
max-pooled (avgmax), l2-normalised, then GridSearchCV(SVC(kernel="rbf"), C in [1, 10, 100], cv=5) or
GridSearchCV(LogisticRegression, C in [0.1 ... 1000], cv=5). For the proxies named after --flip, fit-head
runs on a flip cache (extract --flip) and the references on both; the table in docs/heads.md flips the two
proxies with at most 50 photos per class:

    python bench/head_table.py --data ../shared/data --weights ../shared/weights/vgg16_features_imagenet.pt \
        --flip caltech20 dogbreeds20

Caches are made with the project's extract (n=0) into --cache-dir, or found there (a cache hit);
--flip [PROXY ...] makes those proxies' caches (all of them with --flip alone) with extract --flip (each map the
mean of the photo's and its mirror image's) instead of extract's default (off).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROXIES = {  # name: (train folder, test folder or None for cross-validation)
    "catsdogs": ("catsdogs", "catsdogs_test"),
    "caltech20": ("caltech20/train", "caltech20/test"),
    "scenes6": ("scenes6/train", "scenes6/test"),
    "dogbreeds20": ("dogbreeds20", None),
}
SETTINGS = [  # (name, fit-head options)
    ("fit-head defaults (auto: exact RBF kernel head, C and gamma by 5-fold CV)", {}),
    ("fit-head --tune (every kind and view, 5-fold CV)", {"tune": True}),
    ("fit-head --head linear (the previous default)", {"head": "linear"}),
    ("fit-head --head logreg (C=100)", {"head": "logreg"}),
    ("fit-head --head kernel (C=100, gamma=scale)", {"head": "kernel"}),
]
SPLITS = 20  # dogbreeds20: seeded 80/20 splits (20: the standard error of a mean difference is about 0.4 points)


def flipped(args) -> set:
    """The proxies --flip names (every proxy for --flip alone, none without it)."""
    return set(PROXIES) if args.flip == [] else set(args.flip or ())


def caches(args, flip=None) -> dict:
    """proxy -> [training cache, test cache (if any)], made by the project's extract (n=0) or found in
    --cache-dir; ``flip`` None: on for the proxies --flip names (``flipped``), else ``flip`` for all."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction.extract import extract

    out = {}
    for name, (train, test) in PROXIES.items():
        if args.only and name not in args.only:
            continue
        kw = {"n": 0, "weights": args.weights, "cache_dir": args.cache_dir,
              "flip": name in flipped(args) if flip is None else flip}
        first = extract(ExtractConfig(data=str(Path(args.data) / train), precision=args.precision, **kw))
        out[name] = [first["cache"]]
        if test:  # the training cache's network: its precision, flip, and for int8 its calibration photos
            same = {"precision": first["precision"], "flip": first["flip"],
                    **({"calib_data": str(Path(args.data) / train)} if first["precision"] == "int8" else {})}
            out[name].append(extract(ExtractConfig(data=str(Path(args.data) / test), **{**kw, **same}))["cache"])
    return out


def recipe_scores(a, ya, b, yb) -> dict:
    """Each plain scikit-learn recipe (SVC-RBF or LogisticRegression, 5-fold CV on C) fitted on (a, ya) and
    scored on (b, yb): {kind: {acc, seconds, choice}}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    out = {}
    for kind, est, grid in (("SVC-RBF", SVC(kernel="rbf"), {"C": [1, 10, 100]}),
                            ("LogisticRegression", LogisticRegression(max_iter=2000), {"C": [0.1, 1, 10, 100, 1000]})):
        t0 = time.time()
        search = GridSearchCV(est, grid, cv=5, n_jobs=1).fit(a, ya)
        out[kind] = {"acc": float((search.predict(b) == yb).mean()), "seconds": time.time() - t0,
                     "choice": search.best_params_}
    return out


def reference_rows(x_tr, y_tr, x_te, y_te) -> dict:
    """The recipes on the avg and avgmax rows (x_tr, x_te: (avg, avgmax) each), trained on x_tr, scored on x_te."""
    return {f"sklearn {kind}, {view}, 5-fold CV on C": r
            for view, a, b in (("avg", x_tr[0], x_te[0]), ("avgmax", x_tr[1], x_te[1]))
            for kind, r in recipe_scores(a, y_tr, b, y_te).items()}


def pooled(cache, rows) -> tuple:
    from pipeline.heads.cache_views import CacheViews
    from pipeline.heads.feature_views import Normalizer

    v = CacheViews(cache, rows)
    return tuple(Normalizer("l2").transform(v[view]) for view in ("avg", "avgmax")), v.labels


def reference_table(name: str, paths: list, splits: int, label: str = "") -> list[dict]:
    """The scikit-learn reference rows on ``paths`` (a test cache, or ``splits`` seeded 80/20 splits)."""
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.epoch_loop import split_indices

    with FeatureCache(paths[0]) as c:
        if len(paths) == 2:
            with FeatureCache(paths[1]) as t:
                (xa, ya), (xb, yb) = pooled(c, np.arange(c.n)), pooled(t, np.arange(t.n))
            refs = [reference_rows(xa, ya, xb, yb)]
        else:
            refs = []
            for seed in range(splits):
                tr, te = split_indices(c.labels, 0.2, seed)
                (xa, ya), (xb, yb) = pooled(c, tr), pooled(c, te)
                refs.append(reference_rows(xa, ya, xb, yb))
    return [{"proxy": name, "setting": key + label, "acc": float(np.mean(accs)), "acc_std": float(np.std(accs)),
             "seconds": float(np.mean([r[key]["seconds"] for r in refs])), "choice": [r[key]["choice"] for r in refs]}
            for key in refs[0] for accs in [[r[key]["acc"] for r in refs]]]


def proxy_table(name: str, paths: list, runs: str, splits: int) -> list[dict]:
    """fit-head's settings on ``paths``: test accuracy on the test cache, or the mean over ``splits`` seeded
    80/20 splits (fit-head's validation split is the held-out 20 %)."""
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    rows = []
    for label, opts in SETTINGS:
        t0 = time.time()
        if len(paths) == 2:
            r = fit_head(FitHeadConfig(cache=paths[0], test_cache=paths[1], runs_dir=runs, **opts))
            accs, choices = [r["test_acc"]], [(r["tuning"] or {}).get("choice")]
        else:
            rs = [fit_head(FitHeadConfig(cache=paths[0], val_fraction=0.2, seed=s, runs_dir=runs, **opts))
                  for s in range(splits)]
            accs, choices = [x["val_acc"] for x in rs], [(x["tuning"] or {}).get("choice") for x in rs]
        rows.append({"proxy": name, "setting": label, "acc": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                     "seconds": (time.time() - t0) / len(accs), "choice": choices})
    return rows


TIMING = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import pipeline
from pipeline.cache.feature_cache import FeatureCache
from pipeline.heads.cache_views import CacheViews
with FeatureCache({cache!r}) as c:
    v = CacheViews(c, np.arange(c.n)); base, labels = v["avg"], v.labels
rng = np.random.default_rng(0)
pick = rng.integers(0, len(base), {rows})
x = base[pick] + rng.normal(0, 0.3, (len(pick), base.shape[1])).astype(np.float32) * base.std(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
head = pipeline.Head().fit(x, labels[pick])
print(json.dumps({{"rows": {rows}, "seconds": time.time() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": before / 1024, "val_acc": head.metrics_["val_acc"]}}))
"""


def timing(cache: str, rows: int) -> dict:
    """The default head's fit on ``rows`` synthetic 512-d rows (real catsdogs rows plus noise), in a fresh
    process so its peak memory is its own."""
    code = TIMING.format(root=str(Path(__file__).resolve().parents[1]), cache=cache, rows=rows)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``caches`` reads, for every script that makes or finds the proxies' caches."""
    p.add_argument("--data", default="../shared/data", help="folder holding the proxies' folders")
    p.add_argument("--weights", default="../shared/weights/vgg16_features_imagenet.pt")
    p.add_argument("--cache-dir", default="features", help="where the caches are made or found")
    p.add_argument("--only", nargs="*", choices=list(PROXIES), help="proxies to run (default: all)")
    p.add_argument("--flip", nargs="*", choices=list(PROXIES), metavar="PROXY",
                   help="extract these proxies' caches with --flip (all of them: --flip alone; default: none)")
    p.add_argument("--precision", default="auto", help="extract's --precision for the caches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_arguments(p)
    p.add_argument("--timing-rows", type=int, nargs="*", default=[800, 25000])
    p.add_argument("--splits", type=int, default=SPLITS, help="dogbreeds20: seeded 80/20 splits")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    from pipeline.progress import set_quiet

    set_quiet(True)
    made = caches(a)
    plain = caches(a, flip=False)  # the references see one view of each photo, as the recipe any user types
    rows = []
    print("| proxy | setting | test acc | fit s | chosen |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as runs:
        for name, paths in made.items():
            table = reference_table(name, plain[name], a.splits)
            if paths != plain[name]:  # a flip cache (--flip): the references on it too
                table += reference_table(name, paths, a.splits, " (on the flip cache)")
            for r in table + proxy_table(name, paths, runs, a.splits):
                rows.append(r)
                std = f" ± {r['acc_std']:.3f}" if r["acc_std"] else ""
                print(f"| {name} | {r['setting']} | {r['acc']:.4f}{std} | {r['seconds']:.1f} | {r['choice'][0]} |",
                      flush=True)
    if "catsdogs" in made:
        print("\n| rows | default fit s | peak RSS MB |\n|---|---|---|")
        for n in a.timing_rows:
            t = timing(made["catsdogs"][0], n)
            rows.append({"timing": t})
            print(f"| {n} | {t['seconds']:.1f} | {t['peak_rss_mb']:.0f} |", flush=True)
    print(f"\n(CPU: {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f} s of user time in this process)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
