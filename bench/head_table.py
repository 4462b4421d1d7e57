#!/usr/bin/env python
"""The README's head table: fit-head's defaults against the plain scikit-learn recipes, on many paired splits
of six proxies, and the default head's fit time and memory at 800 and 25,000 rows.

One test folder of 300 photos cannot resolve one point (three photos), so each proxy's training and test
photos are pooled and split again, ``--splits`` times (stratified, seeded, of the original sizes: the test
part as large as the test folder; dogbreeds20, which has none, 80/20), and every candidate is scored on the
same splits. The table gives each candidate's mean test accuracy and its mean *paired* difference to the
best plain recipe (the one with the higher mean) with the standard error of that mean (std / sqrt(splits)).

Proxies (``--data``): catsdogs + catsdogs_test, caltech20, scenes6, food10, signdigits10 (train/ + test/
pooled) and dogbreeds20. Rows are read from the caches (so a split costs no extraction): plain caches, one
view of each photo, made by the project's extract (``--backbone``, ``--weights``, n=0, --no-flip) into
``--cache-dir`` or found there, or named with ``--cache proxy=TRAIN.h5[,TEST.h5]`` (another backbone's caches).
``--fuse proxy=TRAIN.h5[,TEST.h5]`` (another backbone's caches of the same photos) also scores every candidate on
the fused rows, as ``fit-head --cache A --cache B`` fits them (heads/fused_views.py: each cache's avg row
l2-normalised as one block, side by side), in the first caches' row order, so on the same splits; those
candidates are named ``NAME+fused`` and compared with the single backbone's recipes. fit-head's default head
there is what ``fit-head --cache A --cache B`` does: the fused rows or one backbone's block alone, whichever
wins its CV (``fit_head.fit_fused_or_alone``; the choice is logged beside each split's result).

Candidates (``--candidates``; each fits on the split's training rows and predicts its test rows):
  svc       the plain recipe: avg-pooled l2 rows, GridSearchCV(SVC(), {"C": [0.1, 1, 10, 100]}, cv=5)
  logreg    GridSearchCV(LogisticRegression(max_iter=2000), {"C": [0.1, 1, 10, 100, 1000]}, cv=5), same rows
  defaults  fit-head as the README runs it (FitHeadConfig() on the training rows: its validation split and all)
  tune      the same with --tune
  others    any ``name=option:value,...`` of FitHeadConfig (e.g. ``kernel=head:kernel``)

    python bench/head_table.py                        # every proxy, 20 splits, the default candidates
    python bench/head_table.py --only scenes6 --candidates svc logreg defaults --splits 30
    python bench/head_table.py --pipeline-root /work/main --label before   # an older checkout's defaults
    python bench/head_table.py --backbone tf_efficientnet_lite0 --weights W --only dogbreeds20 \
        --fuse dogbreeds20=VGG16.h5                   # Lite0 alone and fused with VGG-16, same splits

fit-head candidates also keep their test rows' calibration (ECE, its floor as calibration_unknown.py draws it,
log-loss, Brier; at the head's temperature); ``--calibration-base NAME`` tables each one's against candidate
NAME's on the same splits (issue 33's bar: no worse than the default head when it was filed, e.g. that checkout's
run as ``--label " filing"`` with HEAD_TABLE_PIPELINE; docs/heads.md "Calibration over paired splits").

Each (proxy, candidate, split)'s predictions are kept in ``--results`` (JSON), so a rerun computes only
what is missing and a candidate added later is paired with the same splits.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("HEAD_TABLE_PIPELINE") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

PROXIES = {  # name: (train folder, test folder or None: 80/20 splits)
    "catsdogs": ("catsdogs", "catsdogs_test"),
    "caltech20": ("caltech20/train", "caltech20/test"),
    "scenes6": ("scenes6/train", "scenes6/test"),
    "dogbreeds20": ("dogbreeds20", None),
    "food10": ("food10/train", "food10/test"),
    "signdigits10": ("signdigits10/train", "signdigits10/test"),
}
SPLITS = 20  # paired splits per proxy: the standard error of a mean difference is about 0.2-0.4 points
HOLDOUT = 0.2  # a proxy without a test folder: its held-out share
# the plain scikit-learn recipes: (estimator, grid of C), on avg-pooled l2 rows, 5-fold CV; compare-sklearn's
# PLAIN_RECIPES (a test keeps the two equal), written here too so the bar does not move with HEAD_TABLE_PIPELINE
RECIPES = {
    "svc": ("SVC-RBF", [0.1, 1, 10, 100]),
    "logreg": ("LogisticRegression", [0.1, 1, 10, 100, 1000]),
}
FIT_HEAD = {"defaults": {}, "tune": {"tune": True}}


# -- the caches --------------------------------------------------------------------------------------------
def found_caches(args) -> dict:
    """{data folder: the newest complete plain cache of it in --cache-dir} of --backbone (any, if not given)
    and --weights' file: caches made already, at any precision, are used as they are."""
    from pipeline.cache.feature_cache import list_caches

    good, _ = list_caches(args.cache_dir) if Path(args.cache_dir).is_dir() else ([], [])
    out: dict = {}
    for info in good:  # newest first
        made = json.loads(info.attrs.get("config", "{}"))
        if (made.get("flip") or made.get("n") not in (0, None) or made.get("pool") not in (None, "none")
                or (getattr(args, "backbone", None) and info.attrs["backbone"] != args.backbone)
                or Path(args.weights).name not in str(info.attrs.get("weights", ""))):
            continue
        out.setdefault(str(Path(info.attrs["data_root"]).resolve()), info)
    return out


def caches(args, flip=False) -> dict:
    """proxy -> [training cache, test cache (if any)]: ``--cache``'s, plain caches found in --cache-dir (a
    training and test cache made at the same precision), or made by the project's extract (n=0): the test
    folder with its training cache's network (precision, int8 calibration)."""
    from pipeline.config import ExtractConfig
    from pipeline.extraction.extract import extract

    named = dict(getattr(args, "cache", None) or [])
    found = found_caches(args) if not flip else {}
    out = {}
    for name, (train, test) in PROXIES.items():
        if args.only and name not in args.only:
            continue
        if name in named:
            out[name] = named[name]
            continue
        have = [found.get(str((Path(args.data) / f).resolve())) for f in (train, test) if f]
        if all(have) and len({json.loads(i.attrs["config"]).get("precision") for i in have}) == 1:
            out[name] = [str(i.path) for i in have]
            continue
        kw = {"n": 0, "weights": args.weights, "cache_dir": args.cache_dir, "flip": flip,
              **({"backbone": args.backbone} if getattr(args, "backbone", None) else {})}
        first = extract(ExtractConfig(data=str(Path(args.data) / train), precision=args.precision, **kw))
        out[name] = [first.cache]
        if test:
            same = {"precision": first.precision,
                    **({"calib_data": str(Path(args.data) / train)} if first.precision == "int8" else {})}
            out[name].append(extract(ExtractConfig(data=str(Path(args.data) / test), **{**kw, **same})).cache)
    return out


def pooled_maps(paths: list, fuse: list | None = None) -> tuple:
    """(maps (N, C, H, W) float16, labels, classes, rows of the training cache, None) of the caches pooled; with
    ``fuse`` (another backbone's caches of the same folders, in the same order) each cache's fused rows
    with its counterpart, as (N, D, 1, 1) float32 maps in ``paths``' row order, and the blocks' sizes."""
    from pipeline.cache.feature_cache import FeatureCache

    if fuse and len(fuse) != len(paths):
        raise SystemExit(f"--fuse names {len(fuse)} caches for {len(paths)}: {', '.join(map(str, paths))}")
    if fuse:
        from pipeline.heads.fused_views import FusedRows
    maps, labels, classes = [], [], None
    for k, p in enumerate(paths):
        with (FusedRows([p, fuse[k]]) if fuse else FeatureCache(p)) as c:
            if classes is not None and list(c.classes) != classes:
                raise SystemExit(f"{p}: classes {list(c.classes)} differ from the training cache's {classes}")
            classes = list(c.classes)
            maps.append(np.concatenate([b[sel] for _, b, sel in c.iter_blocks(np.arange(c.n), 512)]))
            labels.append(np.asarray(c.labels, np.int64))
            blocks = getattr(c, "block_sizes", None)
    return np.concatenate(maps), np.concatenate(labels), classes, len(labels[0]), blocks


def paired_splits(labels: np.ndarray, n_test: int, count: int, seed: int = 0) -> list:
    """``count`` seeded stratified (train, test) index splits with ``n_test`` test rows (a share when < 1)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=count, test_size=n_test, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in sss.split(np.zeros(len(labels)), labels)]


# -- the candidates ------------------------------------------------------------------------------------------
def l2_avg(maps: np.ndarray) -> np.ndarray:
    from pipeline.heads.feature_views import Normalizer, apply_view

    return Normalizer("l2").transform(apply_view(maps, "avg").astype(np.float64))


def recipe_predict(kind: str, a, ya, b) -> np.ndarray:
    """A plain recipe (RECIPES[kind]) fitted on rows ``a`` (C by 5-fold CV), predicting rows ``b``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    est, grid = RECIPES[kind]
    est = SVC() if est == "SVC-RBF" else LogisticRegression(max_iter=2000)
    return GridSearchCV(est, {"C": grid}, cv=5, n_jobs=1).fit(a, ya).predict(b)


def recipe_scores(a, ya, b, yb) -> dict:
    """Each plain recipe fitted on (a, ya) and scored on (b, yb): {name: {acc, seconds}} (view_screen's)."""
    out = {}
    for kind, (est, _) in RECIPES.items():
        t0 = time.time()
        out[f"{est}"] = {"acc": float((recipe_predict(kind, a, ya, b) == yb).mean()), "seconds": time.time() - t0}
    return out


def fit_head_predict(options: dict, maps, labels, classes, tr, te, blocks=None) -> tuple:
    """fit-head with ``options`` on rows ``tr`` (its own validation split taken from them, as on a cache),
    predicting rows ``te``: (their calibrated log-probabilities, what it chose). ``blocks``: the fused rows'
    block sizes, for fit-head's choice between the fused rows and each cache alone (``fit_fused_or_alone``)."""
    import torch

    from pipeline.config import FitHeadConfig
    from pipeline.heads.cache_views import FeatureArray
    from pipeline.heads.epoch_loop import split_indices
    from pipeline.heads.fit_head import fit_on_rows

    rows = FeatureArray(maps[tr], labels[tr], classes)
    cfg = FitHeadConfig(**options)
    columns = slice(None)
    if blocks:
        from pipeline.heads.fit_head import fit_fused_or_alone

        ends = np.cumsum([0, *blocks])
        parts = [FeatureArray(maps[tr][:, a:b], labels[tr], classes) for a, b in zip(ends[:-1], ends[1:])]
        fit, chosen, _, _ = fit_fused_or_alone(cfg, rows, parts, "cpu", cfg)
        if chosen is not rows:
            k = next(i for i, p in enumerate(parts) if p is chosen)
            columns = slice(ends[k], ends[k + 1])
    else:
        train_idx, val_idx = split_indices(rows.labels, cfg.val_fraction, cfg.seed)
        fit = fit_on_rows(cfg, rows, train_idx, val_idx, "cpu")
    with torch.no_grad():
        logp = fit.head.cpu().eval()(torch.from_numpy(np.asarray(maps[te][:, columns], np.float32)))
    choice = (fit.tuning or {}).get("choice")
    if fit.tuning and "fusion" in fit.tuning:
        choice = f"{next(r['rows'] for r in fit.tuning['fusion'] if r['chosen'])}: {choice}"
    return logp.numpy(), choice


def parse_candidate(text: str) -> tuple:
    """'name' (a recipe or FIT_HEAD's) or 'name=option:value,...' -> (name, kind, fit-head options)."""
    name, _, opts = text.partition("=")
    if not opts:
        if name in RECIPES:
            return name, "recipe", None
        if name in FIT_HEAD:
            return name, "fit-head", FIT_HEAD[name]
        raise SystemExit(f"unknown candidate {name!r}: {', '.join([*RECIPES, *FIT_HEAD])} or name=option:value,...")
    parsed = {}
    for pair in opts.split(","):
        k, _, v = pair.partition(":")
        try:
            parsed[k] = json.loads(v)
        except ValueError:
            parsed[k] = v
    return name, "fit-head", parsed


# -- the table -----------------------------------------------------------------------------------------------
def run_proxy(name: str, paths: list, candidates: list, splits: int, store: dict, save, label: str,
              first: int = 0, fuse: list | None = None) -> None:
    """Every candidate's test predictions on splits ``first`` ... ``splits`` - 1 of ``name`` not in ``store`` yet
    (saved as they come); with ``fuse``, on the fused rows (see ``pooled_maps``), as ``NAME+fused``."""
    from calibration_unknown import ece_floor
    from pipeline.heads.calibration import calibration_metrics, fit_temperature, with_temperature

    maps, labels, classes, n_train, blocks = pooled_maps(paths, fuse)
    suffix = "+fused" if fuse else ""
    n_test = len(labels) - n_train if len(paths) == 2 else HOLDOUT
    av = None
    for i, (tr, te) in enumerate(paired_splits(labels, n_test, splits)):
        if i < first:
            continue
        for cand, kind, opts in candidates:
            key = f"{name}|{cand}{suffix}{label if kind == 'fit-head' else ''}|{i}"
            if key in store:
                continue
            t0 = time.time()
            calibration = {}  # fit-head's test ECE, log-loss and Brier (the recipes give no probabilities)
            if kind == "recipe":
                av = l2_avg(maps) if av is None else av
                pred, choice = recipe_predict(cand, av[tr], labels[tr], av[te]), None
            else:  # fused rows: their own avg view, as FusedRows.head_config gives fit-head
                logp, choice = fit_head_predict({**opts, **({"features": "avg"} if fuse else {})}, maps, labels,
                                                classes, tr, te, blocks)
                pred, calibration = logp.argmax(1), calibration_metrics(logp, labels[te])
                calibration["ece_floor"] = ece_floor(logp, draws=100)
                best_t = with_temperature(logp, fit_temperature(logp, labels[te], prior_rows=0))
                calibration["ece_best_t"] = calibration_metrics(best_t, labels[te])["ece"]
            store[key] = {"acc": float((pred == labels[te]).mean()), "rows": int(len(te)),
                          "seconds": time.time() - t0, "choice": choice, **calibration}
            print(f"{key}: {store[key]['acc']:.4f} ({store[key]['seconds']:.1f} s, {choice})", file=sys.stderr,
                  flush=True)
            save()


def summary(store: dict) -> dict:
    """{proxy: {candidate: {acc, splits, vs: {recipe: (mean paired difference, its standard error)}, best_recipe}}}
    over the splits every candidate of the proxy has; the best recipe is the one with the higher mean."""
    by: dict = {}
    for key, r in store.items():
        proxy, cand, split = key.rsplit("|", 2)
        by.setdefault(proxy, {}).setdefault(cand, {})[int(split)] = r["acc"]
    out = {}
    for proxy, cands in by.items():
        recipes = [c for c in RECIPES if c in cands]
        if not recipes:
            continue
        common = sorted(set.intersection(*(set(a) for a in cands.values())))
        if not common:
            continue
        best = max(recipes, key=lambda r: np.mean([cands[r][s] for s in common]))
        for cand, accs in cands.items():
            vs = {}
            for r in recipes:
                d = np.array([accs[s] - cands[r][s] for s in common])
                vs[r] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"))
            out.setdefault(proxy, {})[cand] = {"acc": float(np.mean([accs[s] for s in common])), "vs": vs,
                                               "splits": len(common), "best_recipe": best}
    return out


def markdown(table: dict) -> str:
    """One row per candidate, one column per proxy: mean accuracy, then the paired differences to each recipe
    in points +- their standard errors."""
    proxies = list(table)
    cands = list(dict.fromkeys(c for p in proxies for c in table[p]))
    head = "| candidate | " + " | ".join(f"{p} ({next(iter(table[p].values()))['splits']} splits)" for p in proxies)
    lines = [head + " |", "|---" * (len(proxies) + 1) + "|"]
    for c in cands:
        cells = []
        for p in proxies:
            r = table[p].get(c)
            vs = (r or {}).get("vs", {}).items()
            diffs = ", ".join(f"{100 * m:+.2f} ± {100 * se:.2f} vs {k}" for k, (m, se) in vs if k != c)
            cells.append("" if r is None else f"{r['acc']:.4f}" + (f" ({diffs})" if diffs else ""))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n(mean test accuracy over the paired splits; in brackets the mean paired "
                               "difference to each plain recipe, in points, ± its standard error)")


#: the test rows' calibration kept per split; ece_best_t: the ECE at the temperature that fits the test rows
#: themselves (what no temperature fitted before the test can beat), absent from older results ('-')
CALIBRATION = ("ece", "ece_floor", "ece_best_t", "log_loss", "brier")


def calibration_markdown(store: dict, base: str) -> str:
    """fit-head candidates' test calibration over the paired splits both have: each one's mean ECE, ECE floor,
    log-loss and Brier, and the mean paired difference to candidate ``base`` (e.g. an older checkout's defaults)
    ± its SE."""
    by: dict = {}
    for key, r in store.items():
        proxy, cand, split = key.rsplit("|", 2)
        if "ece_floor" in r:
            by.setdefault(proxy, {}).setdefault(cand, {})[int(split)] = [r.get(m, np.nan) for m in CALIBRATION]
    lines = ["| proxy | candidate | splits | ECE | ECE floor | ECE at the test rows' T | log-loss | Brier |",
             "|---|---|---|---|---|---|---|---|"]
    for proxy, cands in by.items():
        if base not in cands:
            continue
        for cand, rows in cands.items():
            common = sorted(set(rows) & set(cands[base]))
            if len(common) < 2:
                continue
            a, b = np.array([rows[s] for s in common]), np.array([cands[base][s] for s in common])
            d, se = (a - b).mean(0), (a - b).std(0, ddof=1) / np.sqrt(len(common))
            cells = ["-" if np.isnan(x) else f"{m:.4f}" + ("" if cand == base else f" ({x:+.4f} ± {e:.4f})")
                     for m, x, e in zip(a.mean(0), d, se)]
            lines.append(f"| {proxy} | {cand} | {len(common)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n(mean over the paired splits of the test rows' calibration; in brackets the "
                               f"mean paired difference to {base!r} ± its standard error: lower is better)")


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
t0, c0 = time.time(), time.process_time()
head = pipeline.Head().fit(x, labels[pick])
print(json.dumps({{"rows": {rows}, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": before / 1024, "val_acc": head.metrics_["val_acc"]}}))
"""


def timing(cache: str, rows: int) -> dict:
    """The default head's fit on ``rows`` synthetic 512-d rows (real catsdogs rows plus noise), in a fresh
    process so its peak memory is its own."""
    code = TIMING.format(root=str(ROOT), cache=cache, rows=rows)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def named_cache(text: str) -> tuple:
    name, _, files = text.partition("=")
    if name not in PROXIES or not files:
        raise argparse.ArgumentTypeError(f"--cache takes proxy=TRAIN.h5[,TEST.h5] with a proxy of {', '.join(PROXIES)}")
    return name, files.split(",")


def cache_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``caches`` reads, for every script that makes or finds the proxies' caches."""
    p.add_argument("--data", default="../shared/data", help="folder holding the proxies' folders")
    p.add_argument("--backbone", help="extract's --backbone for the caches (default: extract's)")
    p.add_argument("--weights", default="../shared/weights/vgg16_features_imagenet.pt", help="extract's --weights")
    p.add_argument("--cache-dir", default="features", help="where the caches are made or found")
    p.add_argument("--cache", type=named_cache, action="append",
                   help="proxy=TRAIN.h5[,TEST.h5]: a cache made already (e.g. another backbone's); repeatable")
    p.add_argument("--only", nargs="*", choices=list(PROXIES), help="proxies to run (default: all)")
    p.add_argument("--precision", default="bf16", help="extract's --precision for the caches")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_arguments(p)
    p.add_argument("--candidates", nargs="*", default=["svc", "logreg", "defaults"])
    p.add_argument("--fuse", type=named_cache, action="append", default=[],
                   help="proxy=TRAIN.h5[,TEST.h5]: another backbone's caches of the same photos: also every "
                        "candidate on the fused rows (NAME+fused), same splits; repeatable")
    p.add_argument("--splits", type=int, default=SPLITS, help="paired splits per proxy")
    p.add_argument("--first-split", type=int, default=0,
                   help="start at this split (several processes, each its own --results, share the work)")
    p.add_argument("--results", nargs="+", default=["head_table.json"],
                   help="the per-split results, kept between runs (the first is written; all are read)")
    p.add_argument("--label", default="", help="appended to fit-head candidates' names (e.g. another checkout's)")
    p.add_argument("--calibration-base", metavar="CANDIDATE",
                   help="also a table of fit-head candidates' test calibration against this one's")
    p.add_argument("--timing-rows", type=int, nargs="*", default=[], help="also time the default fit (800 25000)")
    a = p.parse_args()
    from pipeline.progress import set_quiet

    set_quiet(True)
    candidates = [parse_candidate(c) for c in a.candidates]
    results = Path(a.results[0])
    store = {k: v for f in map(Path, reversed(a.results)) if f.exists() for k, v in json.loads(f.read_text()).items()}
    save = lambda: results.write_text(json.dumps(store, indent=1))  # noqa: E731
    made = caches(a)
    for name, paths in made.items():
        run_proxy(name, paths, candidates, a.splits, store, save, a.label, a.first_split)
        if name in dict(a.fuse):
            run_proxy(name, paths, candidates, a.splits, store, save, a.label, a.first_split, dict(a.fuse)[name])
    mine = {k: v for k, v in store.items() if k.split("|")[0] in made}
    print(markdown(summary(mine)))
    if a.calibration_base:
        print("\n" + calibration_markdown(mine, a.calibration_base))
    if a.timing_rows:
        print("\n| rows | default fit s | CPU s | peak RSS MB |\n|---|---|---|---|")
        for n in a.timing_rows:
            t = timing(made["catsdogs"][0], n)
            print(f"| {n} | {t['seconds']:.1f} | {t['cpu_seconds']:.1f} | {t['peak_rss_mb']:.0f} |", flush=True)
    print(f"\n(CPU: {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f} s of user time in this process)")


if __name__ == "__main__":
    main()
