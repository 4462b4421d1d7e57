#!/usr/bin/env python
"""Calibration and unknown inputs on the proxies: the README's table.

Unknown inputs: the default head fitted on catsdogs (fit-head's defaults), catsdogs_test as the known photos,
foreign photos from every folder of ../shared/data that is not pets (caltech20 and scenes6, test and train);
dogbreeds20 is pets (dogs of 20 breeds) and shown, not counted. Per foreign set: AUROC of the unknown score
(known vs foreign), the share flagged at the score that keeps 95 % of the known test photos, and the share
flagged at the checkpoint's own threshold (chosen on held-out training photos), with the share of known test
photos that threshold keeps; the head's own top probability as the score, for comparison. The cost of keeping
fewer training rows (--unknown-rows) is measured on the same sets.

Calibration: ECE (15 bins), log-loss and Brier without and with the head's temperature, on photos the head
never saw: catsdogs -> catsdogs_test, caltech20/train -> test, scenes6/train -> test, and dogbreeds20 (270
photos, no test folder) by repeated stratified 5-fold cross-validation: 5 repetitions with different fold seeds,
each photo predicted once per repetition by a head fitted (as fit-head fits it, temperature included) on the
other four fifths, so 5 out-of-fold predictions of every photo from 5 different heads; the measures pool all
1,350 predictions (the head's calibration on unseen photos, with less binning noise than 270 rows give).
--calibrate cv (the default: out-of-fold training rows + validation rows) against --calibrate val.
"ECE floor": the ECE a perfectly calibrated head would still show on these predictions (labels drawn from its
own calibrated probabilities, 200 draws): the noise of a 15-bin ECE on a few hundred photos. On the pooled
dogbreeds20 predictions one label is drawn per photo (from the mean of its 5 predictions) and shared by all
5: the photo's label is one draw, not five, so the floor keeps the noise of 270 photos that pooling cannot remove.

Added time per photo: the head with and without its unknown score, on one CPU thread, batches of 1 and 32,
with the catsdogs head's own known rows and with 5,000 and 25,000 (random normalised rows: the cost depends
only on their number).

    python bench/calibration_unknown.py --data ../shared/data --weights ../shared/weights/vgg16_features_imagenet.pt \\
        --cache-dir /tmp/caches
    python bench/calibration_unknown.py --cache-dir /tmp/caches --only calibration --proxy dogbreeds20  # ~1 min

Caches are found in --cache-dir (a complete cache of the whole folder) or made there with the project's extract.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FOLDERS = ("catsdogs", "catsdogs_test", "caltech20/train", "caltech20/test", "scenes6/train", "scenes6/test",
           "dogbreeds20")
FOREIGN = ("caltech20/test", "scenes6/test", "caltech20/train", "scenes6/train")
CALIBRATION = (("catsdogs", "catsdogs_test"), ("caltech20/train", "caltech20/test"), ("scenes6/train", "scenes6/test"),
               ("dogbreeds20", None))
CV_REPEATS = 5  # dogbreeds20: repetitions of the 5-fold CV (different fold seeds), all predictions pooled


def find_caches(args) -> dict:
    """folder -> cache path: a complete whole-folder cache in --cache-dir whose data path ends with it, or a new one."""
    from pipeline.cache.feature_cache import list_caches

    found = {}
    for info in list_caches(args.cache_dir)[0]:
        config = json.loads(info.attrs.get("config", "{}"))
        if info.complete and config.get("n") == 0 and not config.get("flip"):
            for folder in FOLDERS:
                if str(config.get("data", "")).rstrip("/").endswith(folder):
                    found.setdefault(folder, str(info.path))
    for folder in FOLDERS:
        if folder not in found:
            from pipeline.config import ExtractConfig
            from pipeline.extraction.extract import extract

            found[folder] = extract(ExtractConfig(data=str(Path(args.data) / folder), n=0, weights=args.weights,
                                                  cache_dir=args.cache_dir, flip=False)).cache
    return found


def fit(cache: str, runs: str, train_idx=None, val_idx=None, **options):
    """A head fitted as fit-head fits it (all rows of a cache, or the given rows): (ProbeHead on the CPU, trust)."""
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.config import FitHeadConfig
    from pipeline.heads.epoch_loop import split_indices
    from pipeline.heads.fit_head import fit_on_rows

    cfg = FitHeadConfig(cache=cache, runs_dir=runs, **options)
    with FeatureCache(cache) as c:
        if train_idx is None:
            train_idx, val_idx = split_indices(c.labels, cfg.val_fraction, cfg.seed)
        f = fit_on_rows(cfg, c, train_idx, val_idx, "cpu")
    return f.head.cpu().eval(), f.trust


def scores(head, cache: str, rows=None):
    """(log-probabilities, unknown scores, labels) of a cache's rows through the head."""
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.cache_views import head_scores

    with FeatureCache(cache) as c:
        rows = np.arange(c.n) if rows is None else np.sort(rows)
        logp, ood = head_scores(head, c, rows, "cpu", 2048)
        return logp, ood, c.labels[rows]


def unknown_table(caches: dict, runs: str) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    out = []
    for cap in (0, 400, 100):  # 0: the default (every training row: 876 < 5,000)
        head, trust = fit(caches["catsdogs"], runs, unknown_rows=cap or 5000)
        logp_k, ood_k, _ = scores(head, caches["catsdogs_test"])
        conf_k = -logp_k.max(1)  # the head's own score: 1 - top probability, in log form
        t95, c95 = np.quantile(ood_k, 0.95), np.quantile(conf_k, 0.95)
        for folder in (*FOREIGN, "dogbreeds20") if cap == 0 else FOREIGN[:2]:
            logp_f, ood_f, _ = scores(head, caches[folder])
            y = np.r_[np.zeros(len(ood_k)), np.ones(len(ood_f))]
            row = {"known_rows": trust["known_rows"], "bytes": trust["known_rows_bytes"], "foreign": folder,
                   "photos": len(ood_f), "auroc": roc_auc_score(y, np.r_[ood_k, ood_f]),
                   "flagged_at_95": float((ood_f > t95).mean()),
                   "flagged_at_threshold": float((ood_f > trust["unknown_threshold"]).mean()),
                   "known_kept_at_threshold": float((ood_k <= trust["unknown_threshold"]).mean())}
            if cap == 0:
                conf_f = -logp_f.max(1)
                row.update(auroc_top_p=roc_auc_score(y, np.r_[conf_k, conf_f]),
                           flagged_top_p_at_95=float((conf_f > c95).mean()))
            out.append(row)
    return out


def calibration_table(caches: dict, runs: str, proxies=None) -> list[dict]:
    from sklearn.model_selection import StratifiedKFold

    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.calibration import calibration_metrics, reliability_bins, without_temperature
    from pipeline.heads.epoch_loop import split_indices

    out = []
    for train, test in CALIBRATION:
        if proxies and train not in proxies:
            continue
        for how in ("cv", "val"):
            t0 = time.time()
            if test:
                head, trust = fit(caches[train], runs, calibrate=how)
                logp, _, y = scores(head, caches[test])
                temps = [trust["temperature"]]
                before = without_temperature(logp, trust["temperature"])
                photo, per_repeat = None, []
            else:  # repeated 5-fold CV over the whole folder: every photo predicted by heads that never saw it
                with FeatureCache(caches[train]) as c:
                    labels = c.labels[:]
                logps, befores, temps = [], [], []
                for rep in range(CV_REPEATS):
                    logp, before = np.zeros((len(labels), labels.max() + 1)), np.zeros((len(labels), labels.max() + 1))
                    for outer, held in StratifiedKFold(5, shuffle=True, random_state=rep).split(labels, labels):
                        tr, va = (outer[i] for i in split_indices(labels[outer], 0.125, rep))
                        head, trust = fit(caches[train], runs, tr, va, calibrate=how, seed=rep)
                        lp, _, _ = scores(head, caches[train], held)
                        logp[np.sort(held)] = lp
                        before[np.sort(held)] = without_temperature(lp, trust["temperature"])
                        temps.append(trust["temperature"])
                    logps.append(logp)
                    befores.append(before)
                per_repeat = [calibration_metrics(lp, labels)["ece"] for lp in logps]
                logp, before = np.concatenate(logps), np.concatenate(befores)
                y, photo = np.tile(labels, CV_REPEATS), np.tile(np.arange(len(labels)), CV_REPEATS)
            b, a = calibration_metrics(before, y), calibration_metrics(logp, y)
            floor = ece_floor(logp, photo)
            out.append({"proxy": f"{train} -> {test}" if test else f"{train} ({CV_REPEATS}x5-fold CV)",
                        "calibrate": how, "photos": len(y) if photo is None else len(labels), "predictions": len(y),
                        "temps": [float(t) for t in temps], "ece_after_per_repeat": per_repeat,
                        "reliability_before": reliability_bins(before, y), "reliability": reliability_bins(logp, y),
                        "accuracy": float((logp.argmax(1) == y).mean()),
                        "temperature": float(np.mean(temps)), "ece_before": b["ece"], "ece_after": a["ece"],
                        "ece_floor": floor,
                        "log_loss_before": b["log_loss"], "log_loss_after": a["log_loss"],
                        "brier_before": b["brier"], "brier_after": a["brier"], "seconds": time.time() - t0})
    return out


def ece_floor(logp: np.ndarray, photo=None, draws: int = 200) -> float:
    """The ECE a perfectly calibrated head would show on these predictions: labels drawn from its own
    probabilities (mean of ``draws``); an ECE near it is as good as this many photos can tell. ``photo``: which
    photo each prediction is of, where a photo has several; its label is drawn once (from the mean of its
    predictions) and shared by them, as the real label is."""
    from pipeline.heads.calibration import calibration_metrics

    rng = np.random.default_rng(0)
    p = np.exp(logp)
    p = p / p.sum(1, keepdims=True)
    photo = np.arange(len(p)) if photo is None else np.asarray(photo)
    q = np.zeros((photo.max() + 1, p.shape[1]))
    np.add.at(q, photo, p)
    cum = np.cumsum(q / q.sum(1, keepdims=True), 1)
    draw = lambda: np.minimum((rng.random((len(q), 1)) > cum).sum(1), p.shape[1] - 1)  # noqa: E731
    eces = [calibration_metrics(logp, draw()[photo])["ece"] for _ in range(draws)]
    return float(np.mean(eces))


def timing(caches: dict, runs: str) -> list[dict]:
    import torch

    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.unknown_score import pooled_rows

    torch.set_num_threads(1)
    head, trust = fit(caches["catsdogs"], runs)
    with FeatureCache(caches["catsdogs_test"]) as c:
        x = torch.from_numpy(c.features[:64].astype(np.float32))
    out = []
    rng = np.random.default_rng(0)
    for n in (trust["known_rows"], 5000, 25000):
        if n != trust["known_rows"]:
            rows = pooled_rows(torch.from_numpy(rng.random((n, x.shape[1]), np.float32)))
            head.set_unknown(rows, trust["unknown_k"], trust["unknown_threshold"])
        for batch in (1, 32):
            def per_photo(fn) -> float:
                fn(x[:batch])  # warm
                t0, done = time.perf_counter(), 0
                while time.perf_counter() - t0 < 1.0:
                    for i in range(0, 32, batch):
                        fn(x[i:i + batch])
                        done += batch
                return (time.perf_counter() - t0) / done * 1000

            with torch.inference_mode():
                plain, both = per_photo(head), per_photo(head.scores)
            out.append({"known_rows": n, "bytes": n * x.shape[1] * 2, "batch": batch, "ms_head": plain,
                        "ms_head_and_unknown": both, "ms_added": both - plain})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--weights", default="../shared/weights/vgg16_features_imagenet.pt")
    p.add_argument("--cache-dir", default="features")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    p.add_argument("--only", choices=("unknown", "calibration", "timing"), action="append",
                   help="run only these parts (repeatable; default: all)")
    p.add_argument("--proxy", action="append", help="calibration: only these training folders (repeatable)")
    args = p.parse_args()
    from threadpoolctl import threadpool_limits

    caches = find_caches(args)
    parts = args.only or ("unknown", "calibration", "timing")
    with tempfile.TemporaryDirectory() as runs, threadpool_limits(1):
        result = {"caches": caches, "unknown": unknown_table(caches, runs) if "unknown" in parts else [],
                  "calibration": calibration_table(caches, runs, args.proxy) if "calibration" in parts else [],
                  "timing": timing(caches, runs) if "timing" in parts else []}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if result["unknown"]:
        print_unknown(result["unknown"])
    if result["calibration"]:
        print_calibration(result["calibration"])
    if result["timing"]:
        print_timing(result["timing"])


def print_unknown(rows: list) -> None:
    print("Unknown inputs: head on catsdogs, known = catsdogs_test (400 photos)")
    print(f"{'foreign photos':<18} {'n':>4} {'kept rows':>9} {'size':>7} {'AUROC':>6} {'flagged@95%':>11} "
          f"{'at its threshold':>16} {'known kept':>10} {'top-p AUROC':>11} {'top-p flagged':>13}")
    for r in rows:
        tp = (f"{r['auroc_top_p']:>11.3f} {r['flagged_top_p_at_95']:>13.1%}" if "auroc_top_p" in r else "")
        note = " (pets: not foreign)" if r["foreign"] == "dogbreeds20" else ""
        print(f"{r['foreign']:<18} {r['photos']:>4} {r['known_rows']:>9} {r['bytes'] / 1e6:>5.2f}MB "
              f"{r['auroc']:>6.3f} {r['flagged_at_95']:>11.1%} {r['flagged_at_threshold']:>16.1%} "
              f"{r['known_kept_at_threshold']:>10.1%} {tp}{note}")


def print_calibration(rows: list) -> None:
    print("\nCalibration (photos the head never saw; ECE: 15 bins)")
    print(f"{'proxy':<34} {'T from':<6} {'n':>8} {'acc':>5} {'T':>5} {'ECE':>15} {'ECE floor':>9} {'log-loss':>15} "
          f"{'Brier':>15}")
    for r in rows:
        n = str(r["photos"]) if r["predictions"] == r["photos"] else f"{r['predictions']}/{r['photos']}"
        print(f"{r['proxy']:<34} {r['calibrate']:<6} {n:>8} {r['accuracy']:>5.3f} {r['temperature']:>5.2f} "
              f"{r['ece_before']:>6.4f} -> {r['ece_after']:.4f} {r['ece_floor']:>9.4f} {r['log_loss_before']:>6.4f} -> "
              f"{r['log_loss_after']:.4f} {r['brier_before']:>6.4f} -> {r['brier_after']:.4f}")


def print_timing(rows: list) -> None:
    print("\nAdded time per photo (head on cached 512x7x7 maps, 1 CPU thread)")
    print(f"{'known rows':>10} {'size':>8} {'batch':>5} {'head ms':>8} {'+unknown ms':>11} {'added ms':>8}")
    for r in rows:
        print(f"{r['known_rows']:>10} {r['bytes'] / 1e6:>6.1f}MB {r['batch']:>5} {r['ms_head']:>8.3f} "
              f"{r['ms_head_and_unknown']:>11.3f} {r['ms_added']:>8.3f}")


if __name__ == "__main__":
    main()
