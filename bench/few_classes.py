#!/usr/bin/env python
"""The default head on 5 photos a class of a few classes, as suggest fits it: how sure it is of the test photos.

Seeded draws (draw s: numpy's default_rng(s)) of K classes of a cache and PER photos of each; the default head
fitted on them as suggest fits it (``fit_head.default_head_on_rows``: every photo cross-validated, the folds as many
as the smallest class's photos, at most 5) or, with ``--head``, as ``Head(folds=4).fit(X, y)`` (its validation split
held out first, so 4 folds fit 5 photos a class); the classes' other photos are its test. Per draw and in the mean:
test log-loss, ECE, Brier, accuracy, the share of test photos at a top probability above 0.999, the wrong ones
and the wrong ones above 0.999; and the head's members' Cs, stack weights and pairs' scale.

    OMP_NUM_THREADS=1 python bench/few_classes.py CACHE.h5 [--classes 4] [--per 5] [--draws 12] [--head]

docs/heads.md, "Few photos, all right", has the numbers.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_table import pooled_maps  # noqa: E402

from pipeline import Head  # noqa: E402
from pipeline.config import FitHeadConfig  # noqa: E402
from pipeline.heads import fit_head as fh  # noqa: E402
from pipeline.heads.calibration import calibration_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per", type=int, default=5)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--head", action="store_true", help="Head(folds=4).fit(X, y) instead of suggest's head")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    maps, y, _, _, _ = pooled_maps([a.cache])
    X = maps.astype(np.float32).mean((2, 3))  # the avg view: the default head's
    chosen, default_row = [], fh._default_row

    def spy(cfg, shape, result):
        row = default_row(cfg, shape, result)
        chosen.append(row["setting"])
        return row
    fh._default_row = spy
    out, tests = [], []
    for s in range(a.draws):
        rng = np.random.default_rng(s)
        cls = np.sort(rng.choice(int(y.max()) + 1, a.classes, replace=False))
        tr = np.concatenate([rng.choice(np.flatnonzero(y == c), a.per, replace=False) for c in cls])
        te = np.setdiff1d(np.flatnonzero(np.isin(y, cls)), tr)
        yy = np.searchsorted(cls, y)
        tests.append(len(te))
        chosen.clear()
        t = time.time()
        if a.head:
            p = Head(folds=4).fit(X[tr][:, :, None, None], yy[tr]).predict_proba(X[te][:, :, None, None])
        else:
            head, _ = fh.default_head_on_rows({"avg": X[tr]}, yy[tr], a.classes, (X.shape[1], 1, 1),
                                              FitHeadConfig(seed=0))
            p = np.exp(head.log_proba_of_rows(X[te]))
        wrong = p.argmax(1) != yy[te]
        m = {**calibration_metrics(np.log(np.clip(p, 1e-300, None)), yy[te]), "acc": float(1 - wrong.mean()),
             "p999": float((p.max(1) > 0.999).mean()), "wrong": float(wrong.sum()),
             "wrong999": float((wrong & (p.max(1) > 0.999)).sum())}
        out.append(m)
        st = chosen[0] if chosen else {}
        print(f"draw {s} ({time.time() - t:.1f} s): " + " ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f" | C {st.get('C')} C_logreg {st.get('C_logreg')} C_pairs {st.get('C_pairs')} weights "
              f"{np.round(st.get('weights', ()), 3).tolist()} pair_scale {st.get('pair_scale', float('nan')):.3g}",
              flush=True)
    print(f"{np.mean(tests):.0f} test photos a draw; mean: " + " ".join(f"{k} {np.mean([m[k] for m in out]):.4f}"
                                                            for k in out[0]))


if __name__ == "__main__":
    main()
