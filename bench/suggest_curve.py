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
``--proxy NAME=TRAIN,TEST`` adds a proxy from two caches; ``--foreign CACHE --foreign-n 50`` mixes photos of none
of the classes into each seed's pool (a pick of one is a label spent on nothing); every rule's picks are counted
as foreign or not and flagged by suggest's unknown score or not, and a rule named RULE+known-first ranks the
flagged photos after the others (measured in docs/suggest.md: not suggest's ranking).
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


#: A rule named RULE + KNOWN_FIRST ranks the pool photos the unknown score flags after the others (rank_pool's
#: ``unknown``); every rule's picks are counted as flagged or not, foreign or not (``PICKS``).
KNOWN_FIRST = "+known-first"
PICKS: dict = {}
KNOWN_SHARE = [None]  # the unknown threshold's share (--known-share; None: suggest's)


def curve(x, y, xt, yt, rule, seed, rounds, step, foreign=None):
    """Test accuracy after each round (labels used: START x K, then + step x K a round). ``foreign``: rows of
    photos of none of the classes, in the pool from the start; one picked is a label spent on nothing (taken
    out of the pool, not learnt from: the user removed it)."""
    from pipeline.reports.suggest import rank_pool, unknown_scores

    rng = np.random.default_rng(seed)
    k = len(np.unique(y))
    if foreign is not None:
        x, y = np.concatenate([x, foreign]), np.concatenate([y, np.full(len(foreign), -1)])
    base, known_first = rule.removesuffix(KNOWN_FIRST), rule.endswith(KNOWN_FIRST)
    labelled = list(per_class(y[y >= 0], START, rng))
    spent: list = []  # foreign photos picked
    counts = PICKS.setdefault(rule, np.zeros(4, np.int64))  # picks: foreign flagged, foreign not, ours flagged, not
    out = []
    for r in range(rounds + 1):
        proba = fit_proba(x[labelled], y[labelled], k, seed)
        out.append(float((proba(xt).argmax(1) == yt).mean()))
        if r == rounds:
            break
        pool = np.setdiff1d(np.arange(len(y)), labelled + spent)
        if len(pool) < step * k:
            out += [np.nan] * (rounds - r)
            break
        ood, threshold = unknown_scores(x[pool], x[labelled], seed, KNOWN_SHARE[0])
        flagged = ood > threshold
        if known_first and 0 < flagged.sum() < len(pool):  # the flagged rows after the others
            ours, others = np.flatnonzero(~flagged), np.flatnonzero(flagged)
            picks = ours[rank_pool(x[pool][ours], x[labelled], proba(x[pool][ours]), step * k, base,
                                   seed=seed * 1000 + r)]
            if len(picks) < step * k:
                picks = np.concatenate([picks, others[rank_pool(
                    x[pool][others], np.concatenate([x[labelled], x[pool][picks]]), proba(x[pool][others]),
                    step * k - len(picks), base, seed=seed * 1000 + r)]])
        else:
            picks = rank_pool(x[pool], x[labelled], proba(x[pool]), step * k, base, seed=seed * 1000 + r)
        alien = y[pool[picks]] < 0
        counts += [int((alien & flagged[picks]).sum()), int((alien & ~flagged[picks]).sum()),
                   int((~alien & flagged[picks]).sum()), int((~alien & ~flagged[picks]).sum())]
        labelled += pool[picks][~alien].tolist()
        spent += pool[picks][alien].tolist()
    return out


def run(name, rules, seeds, rounds, step, foreign=None, foreign_n=0):
    train, test = PROXIES[name]
    x, y = avg_rows(train)
    fx = avg_rows(foreign)[0] if foreign else None
    out = {}
    for rule in rules:
        curves = []
        for s in range(seeds):
            alien = None if fx is None else fx[np.sort(np.random.default_rng(20_000 + s).choice(
                len(fx), min(foreign_n, len(fx)), replace=False))]
            if test is None:  # a held-out part of the folder, per seed
                hold = per_class(y, HOLD_OUT, np.random.default_rng(10_000 + s))
                keep = np.setdiff1d(np.arange(len(y)), hold)
                curves.append(curve(x[keep], y[keep], x[hold], y[hold], rule, s, rounds, step, alien))
            else:
                xt, yt = TEST_ROWS.setdefault(test, avg_rows(test))
                curves.append(curve(x, y, xt, yt, rule, s, rounds, step, alien))
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
    ap.add_argument("--proxies", help=f"which proxies [default: {','.join(PROXIES)}, or those of --proxy]")
    ap.add_argument("--rules", default="diverse-uncertain,margin,diverse,random")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=8, help="rounds after the start (labels per class: 2 + rounds)")
    ap.add_argument("--step", type=int, default=1, help="photos per class added each round")
    ap.add_argument("--proxy", action="append", default=[], metavar="NAME=TRAIN[,TEST]",
                    help="another proxy: its training cache and test cache (paths, or names under SUGGEST_CACHES)")
    ap.add_argument("--foreign", metavar="CACHE", help="a cache of photos of none of the classes, mixed into the pool")
    ap.add_argument("--foreign-n", type=int, default=50, help="photos of --foreign in each seed's pool (seeded)")
    ap.add_argument("--known-share", type=float, help="the unknown threshold's share [default: suggest's]")
    ap.add_argument("--plot", help="write the curves to this PNG")
    ap.add_argument("--json", help="write the curves to this JSON file")
    a = ap.parse_args()
    rules = a.rules.split(",")
    KNOWN_SHARE[0] = a.known_share
    for spec in a.proxy:
        name, _, caches = spec.partition("=")
        train, _, test = caches.partition(",")
        PROXIES[name] = (train, test or None)
    results = {}
    added = [spec.partition("=")[0] for spec in a.proxy]
    for name in a.proxies.split(",") if a.proxies else added or list(PROXIES):
        t = time.time()
        PICKS.clear()
        res = run(name, rules, a.seeds, a.rounds, a.step, a.foreign, a.foreign_n)
        results[name] = res
        print(f"{name} ({time.time() - t:.0f} s, {a.seeds} seeds; mean test accuracy, +- std over seeds)")
        header = "labels/class " + " ".join(f"{per_class_labels(r, a.step):>13}" for r in range(a.rounds + 1))
        print(header)
        for rule, c in res.items():
            m, s = np.nanmean(c, 0), np.nanstd(c, 0)
            print(f"{rule:<12} " + " ".join(f"{mm:6.3f}+-{ss:.3f}" for mm, ss in zip(m, s)))
        for rule, (ff, fn, of, on) in PICKS.items():
            print(f"  {rule}: picks of foreign photos {ff + fn} (flagged unknown {ff}), of the classes' {of + on} "
                  f"(flagged unknown {of})")
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
