"""How often suggest's unknown flag is wrong: photos of the labelled classes flagged, photos of a held-out class not.

scenes6: the training cache less one class is the labelled folder, the whole test cache the pool (each class held
out in turn, then none); dogbreeds20 (no test folder): per seed, half of 18 breeds' photos labelled, the other half
and 2 held-out breeds the pool. Scores and threshold are suggest's own (``reports.suggest.unknown_scores``); the
suggested photos are ranked by ``rank_pool`` (diverse-uncertain) with the fast head (logistic regression on
average-pooled l2 rows, C=100, as bench/suggest_curve.py). Measured in docs/suggest.md.

``python bench/suggest_false_alarms.py --scenes6 TRAIN.h5,TEST.h5 --dogbreeds20 ALL.h5 [--known-share 0.95]``
(caches of ../shared/data/scenes6/{train,test} and dogbreeds20, any backbone; extract --n 0).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(path: str):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.cache_views import CacheViews

    with FeatureCache(path) as c:
        return CacheViews(c, np.arange(c.n)).load(["avg"])["avg"], np.asarray(c.labels), list(c.classes)


def measure(lab, lab_y, pool, pool_y, held, k: int, seed: int, share: float) -> dict:
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads.unknown_score import pooled_rows_np
    from pipeline.reports.suggest import rank_pool, unknown_scores

    ood, thr = unknown_scores(pool, lab, seed, share)
    flag, known = ood > thr, ~np.isin(pool_y, held)
    z, zp = pooled_rows_np(lab), pooled_rows_np(pool)
    order = rank_pool(zp, z, LogisticRegression(C=100, max_iter=2000).fit(z, lab_y).predict_proba(zp), k,
                      "diverse-uncertain", seed)
    picked = known[order]
    rate = lambda f, m: f"{f[m].mean():6.1%} of {m.sum():3d}" if m.any() else "     - of   0"  # noqa: E731
    return {"threshold": thr, "known": rate(flag, known), "held_out": rate(flag, ~known),
            "suggested_known": rate(flag[order], picked), "false_alarms": flag[known].mean()}


def show(tag: str, r: dict) -> None:
    print(f"{tag:44s} threshold {r['threshold']:.3f}; flagged: labelled classes {r['known']}, held out "
          f"{r['held_out']}; among the suggested, labelled classes {r['suggested_known']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes6", help="TRAIN.h5,TEST.h5")
    ap.add_argument("--dogbreeds20", help="a cache of the whole folder")
    ap.add_argument("--known-share", type=float, default=0.95)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    if a.scenes6:
        train, test = a.scenes6.split(",")
        tr, tr_y, classes = load(train)
        te, te_y, _ = load(test)
        rates = []
        for h, name in enumerate(classes):
            r = measure(tr[tr_y != h], tr_y[tr_y != h], te, te_y, [h], 50, 0, a.known_share)
            rates.append(r["false_alarms"])
            show(f"scenes6, {name} held out", r)
        show("scenes6, none held out", measure(tr, tr_y, te, te_y, [], 50, 0, a.known_share))
        print(f"scenes6: labelled classes flagged, mean of the held-out runs {np.mean(rates):.1%}")
    if a.dogbreeds20:
        db, db_y, classes = load(a.dogbreeds20)
        rng, rates = np.random.default_rng(0), []
        for seed in range(a.seeds):
            held = rng.choice(len(classes), 2, replace=False)
            lab, pool = [], []
            for c in range(len(classes)):
                idx = rng.permutation(np.flatnonzero(db_y == c))
                pool += list(idx) if c in held else list(idx[len(idx) // 2:])
                lab += [] if c in held else list(idx[:len(idx) // 2])
            lab, pool = np.array(lab), np.array(pool)
            r = measure(db[lab], db_y[lab], db[pool], db_y[pool], list(held), 30, seed, a.known_share)
            rates.append(r["false_alarms"])
            show(f"dogbreeds20 seed {seed}, {'+'.join(classes[i] for i in held)} held out", r)
        print(f"dogbreeds20: labelled classes flagged, mean {np.mean(rates):.1%}")


if __name__ == "__main__":
    main()
