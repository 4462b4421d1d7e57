"""Does suggest beat random picks? Test accuracy against labels used, on the proxies' VGG-16 caches.

Per proxy and seed: 2 labelled photos per class (seeded), the rest of the training folder as the pool, its
labels revealed only for the photos picked. Each round the head is fitted on the labelled rows, scored on
the test folder, and picks one more photo per class-count (``--step`` x classes) from the pool, by each rule
of ``suggest`` (pipeline.reports.suggest.rank_pool, the code the command runs) and at random. The head is
the fast one, a logistic regression on average-pooled l2 rows (C=100, suggest --head logreg: the default head's
CV search every round of every seed would take hours on 2 cores). dogbreeds20 has no test folder: each
seed holds out 3 photos per class as its test set.

``python bench/suggest_curve.py [--seeds 5] [--rules diverse-uncertain,margin,random] [--plot docs/img/x.png]``;
caches from SUGGEST_CACHES (default /work/fcache/i33: VGG-16 from ../shared/weights, bf16, all photos).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = Path(os.environ.get("SUGGEST_CACHES", "/work/fcache/i33"))
PROXIES = {  # name: (training cache, test cache or None: hold out HOLD_OUT photos per class)
    "caltech20": ("vgg16-nall-edb6ee958551.h5", "vgg16-nall-b83469320683.h5"),
    "scenes6": ("vgg16-nall-7630424dfbd3.h5", "vgg16-nall-891d2afaeea2.h5"),
    "dogbreeds20": ("vgg16-nall-da56170b320b.h5", None),
}
START, HOLD_OUT = 2, 3


def avg_rows(name: str):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.cache_views import CacheViews
    from pipeline.heads.unknown_score import pooled_rows_np

    with FeatureCache(CACHES / name) as c:
        return pooled_rows_np(CacheViews(c, np.arange(c.n)).load(["avg"])["avg"]), np.asarray(c.labels, np.int64)


def per_class(y: np.ndarray, k: int, rng) -> np.ndarray:
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in np.unique(y)])


def fit_proba(x, y, n_classes, seed):
    from pipeline.heads.model_selection import class_proba
    from pipeline.heads.sklearn_fits import fit_logreg

    clf = fit_logreg(x, y, 100.0, seed)
    return lambda z: class_proba(clf, z, n_classes)


def curve(x, y, xt, yt, rule, seed, rounds, step):
    """Test accuracy after each round (labels used: START x K, then + step x K a round)."""
    from pipeline.reports.suggest import rank_pool

    rng = np.random.default_rng(seed)
    k = len(np.unique(y))
    labelled = list(per_class(y, START, rng))
    out = []
    for r in range(rounds + 1):
        proba = fit_proba(x[labelled], y[labelled], k, seed)
        out.append(float((proba(xt).argmax(1) == yt).mean()))
        if r == rounds:
            break
        pool = np.setdiff1d(np.arange(len(y)), labelled)
        if len(pool) < step * k:
            out += [np.nan] * (rounds - r)
            break
        picks = rank_pool(x[pool], x[labelled], proba(x[pool]), step * k, rule, seed=seed * 1000 + r)
        labelled += pool[picks].tolist()
    return out


def run(name, rules, seeds, rounds, step):
    train, test = PROXIES[name]
    x, y = avg_rows(train)
    out = {}
    for rule in rules:
        curves = []
        for s in range(seeds):
            if test is None:  # a held-out part of the folder, per seed
                hold = per_class(y, HOLD_OUT, np.random.default_rng(10_000 + s))
                keep = np.setdiff1d(np.arange(len(y)), hold)
                curves.append(curve(x[keep], y[keep], x[hold], y[hold], rule, s, rounds, step))
            else:
                xt, yt = TEST_ROWS.setdefault(test, avg_rows(test))
                curves.append(curve(x, y, xt, yt, rule, s, rounds, step))
        out[rule] = np.array(curves)
    return out


TEST_ROWS: dict = {}


def per_class_labels(r, step):
    return START + r * step


def first_reaching(mean_curve, target, step):
    """Labels per class at which a curve first reaches ``target`` (None: never within the rounds)."""
    hit = np.flatnonzero(np.nan_to_num(mean_curve, nan=-1) >= target - 1e-9)
    return per_class_labels(int(hit[0]), step) if len(hit) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--rules", default="diverse-uncertain,margin,diverse,random")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8, help="rounds after the start (labels per class: 2 + rounds)")
    ap.add_argument("--step", type=int, default=1, help="photos per class added each round")
    ap.add_argument("--plot", help="write the curves to this PNG")
    ap.add_argument("--json", help="write the curves to this JSON file")
    a = ap.parse_args()
    rules = a.rules.split(",")
    results = {}
    for name in a.proxies.split(","):
        t = time.time()
        res = run(name, rules, a.seeds, a.rounds, a.step)
        results[name] = res
        print(f"{name} ({time.time() - t:.0f} s, {a.seeds} seeds; mean test accuracy, +- std over seeds)")
        header = "labels/class " + " ".join(f"{per_class_labels(r, a.step):>13}" for r in range(a.rounds + 1))
        print(header)
        for rule, c in res.items():
            m, s = np.nanmean(c, 0), np.nanstd(c, 0)
            print(f"{rule:<12} " + " ".join(f"{mm:6.3f}+-{ss:.3f}" for mm, ss in zip(m, s)))
        if "random" in res:
            rnd = np.nanmean(res["random"], 0)
            target_r = min(a.rounds, (10 - START) // a.step)
            target = rnd[target_r]
            for rule in rules:
                if rule != "random":
                    print(f"  {rule}: reaches random's {target:.3f} at {per_class_labels(target_r, a.step)} "
                          f"labels/class with {first_reaching(np.nanmean(res[rule], 0), target, a.step)}")
        sys.stdout.flush()
    if a.json:
        Path(a.json).write_text(json.dumps({n: {r: c.tolist() for r, c in res.items()} for n, res in results.items()}))
    if a.plot:
        plot(results, a.step, a.plot)


def plot(results, step, path):
    from pipeline.runs.figures import save
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(results), 3.2))
    for ax, (name, res) in zip(fig.subplots(1, len(results), squeeze=False)[0], results.items()):
        for rule, c in res.items():
            xs = [per_class_labels(r, step) for r in range(c.shape[1])]
            m, s = np.nanmean(c, 0), np.nanstd(c, 0)
            ax.plot(xs, m, marker=".", label=rule, lw=2 if rule in ("diverse-uncertain", "random") else 1)
            ax.fill_between(xs, m - s, m + s, alpha=0.15)
        ax.set_title(name)
        ax.set_xlabel("labels per class")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("test accuracy")
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


if __name__ == "__main__":
    main()
