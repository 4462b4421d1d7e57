#!/usr/bin/env python
"""The default stack's fold models averaged (CV bagging) instead of refitted on every row, scored offline on
head_table's paired splits (issue 33's calibration bar).

fit-head's default head holds out a stratified 1/8 of the training rows (validation), chooses its members' C by
5-fold CV on the rest, weights them on their out-of-fold (OOF) log-probabilities, refits each member on every
training row and applies the one temperature fitted on the OOF rows and the validation rows. The refit is
sharper than the fold models that temperature was fitted on (docs/heads.md, "Calibration over paired splits").
Here the fold models of the chosen setting are kept instead and their stack logits averaged: for the one-vs-rest
SVM and logistic regression that is one Linear over the union of the folds' support rows (and the rows
themselves), so still a ``Linear + LogSoftmax`` (given one gamma: 'scale' resolved on each fold's rows differs
by about 0.3 % between folds); for the one-vs-one pairs the folds' coupled log-probabilities are averaged (one
head would average the pair margins before coupling, a small difference). Per split, rows:

  default     the members refitted on every training row, at the temperature of the OOF + validation rows
  no refit    the members fitted on the CV rows (87.5 %) only, at the same temperature (fit-head --no-refit)
  bag         the mean of the CV's 5 fold models (70 % of the rows each: what fit-head has fitted already), at
              the temperature of their OOF rows + the bag's validation rows (variant a)
  bag T2      the same at T x T_bag4 / T_one: a two-level correction from the 10 models fitted without two
              folds each: for the rows of fold j the mean of the 4 that left j out (a bag of 4, honestly held
              out) and each of them alone; their two temperatures' ratio is how much softer or sharper a bag
              needs to be than one model (variant b)
  bag all     a second 5-fold CV of the chosen members on every training row (the validation rows included, 80 %
              each), their mean at their OOF rows' temperature: the bag's rows as many as the refit's nearly
  bag all T2  the same with the two-level correction of that CV
  old         the head issue 33 compares with (checkout 3992699^'s default): an RBF kernel logistic regression
              (exact below 2,000 rows; C and gamma by CV log-loss on the CV rows), fitted on the CV rows, at the
              temperature of its OOF + validation rows; simulated the same way

Each row's test accuracy (points), ECE (15 bins, ``calibration_metrics``) and log-loss, mean over the splits
and paired difference to ``default`` (d) and to ``old`` (o) +- the SE of the mean; the mean temperatures and
the fit seconds of the refit, of the bag's fold models and of bag all's.

    python bench/bagging_sim.py NAME TRAIN.h5[,TEST.h5] SPLITS KEPT.pkl [--no-old] [--no-val]   # collect, score
    python bench/bagging_sim.py --score KEPT.pkl [KEPT2.pkl ...]                                 # score only

``--no-val``: no validation split (the CV on every training row; ``bag all`` is then ``bag``). Collecting is
resumable (KEPT.pkl keeps each split as it is done; a larger SPLITS adds splits, the first ones unchanged).
E.g. on VGG-16 fp32 caches of food10's two folders (``cli.py extract --data .../food10/train --n all ...``):
``OMP_NUM_THREADS=1 python bench/bagging_sim.py food10 TRAIN.h5,TEST.h5 20 food10_bag.pkl`` (about 30 s a split
on one core). A simulation: compare its rows with each other, not with head_table's levels.
"""
import itertools
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_table import HOLDOUT, paired_splits, pooled_maps  # noqa: E402
from stack_rule_sim import best  # noqa: E402

from pipeline.heads.calibration import (calibration_metrics, fit_temperature, log_softmax,  # noqa: E402
                                        with_temperature)
from pipeline.heads.epoch_loop import split_indices  # noqa: E402
from pipeline.heads.feature_views import apply_view  # noqa: E402
from pipeline.heads.model_selection import (AUTO_GRID, KERNEL_GRID, CVOptions, fit_setting,  # noqa: E402
                                            stack_weights, tune)


VAL_FRACTION = 0.125  # fit-head's --val-fraction: the CV and the stack's weights see the other 7/8

def fitted_log_proba(x, y, setting, shape, k, rows_out):
    """A member (``setting``) fitted on rows ``x``/``y``: its log-probabilities of each array in ``rows_out``
    and its fit seconds."""
    t0 = time.time()
    head, _ = fit_setting({"avg": x}, y, setting, in_shape=shape, n_classes=k)
    sec = time.time() - t0
    return [head.log_proba_of_rows(r) for r in rows_out], sec


def fold_models(x, y, splits, settings, shape, k, others):
    """Each member fitted on each fold's training part: {"oof": per member its held-out log-probabilities,
    "others": per member per fold its log-probabilities of each array in ``others``, "pair_out": {(j1, j2): (the
    rows of folds j1 and j2, per member the log-probabilities of a model fitted without both)}, "sec": the fold
    models' fit seconds}."""
    fold = np.empty(len(y), np.int64)
    for j, (_, held) in enumerate(splits):
        fold[held] = j
    out = {"oof": [np.zeros((len(y), k)) for _ in settings], "others": [[] for _ in settings], "fold": fold,
           "sec": 0.0, "pair_out": {}}
    for a, held in splits:
        for m, s in enumerate(settings):
            (lh, *lo), sec = fitted_log_proba(x[a], y[a], s, shape, k, [x[held], *others])
            out["oof"][m][held] = lh
            out["others"][m].append(lo)
            out["sec"] += sec
    for j1, j2 in itertools.combinations(range(len(splits)), 2):
        a = np.flatnonzero((fold != j1) & (fold != j2))
        b = np.flatnonzero((fold == j1) | (fold == j2))
        out["pair_out"][(j1, j2)] = (b, [fitted_log_proba(x[a], y[a], s, shape, k, [x[b]])[0][0] for s in settings])
    return out


def collect(paths, count, kept_path, old=True, val_fraction=VAL_FRACTION):
    """Per split, as fit-head does it (a stratified 1/8 of the training rows held out for validation, the CV on
    the rest): the stack's weights and out-of-fold log-probabilities; its members' validation and test
    log-probabilities fitted on the CV rows (87.5 %) and test log-probabilities refitted on every row; the fold
    models of that CV and of a second 5-fold CV on every training row, with their two-folds-out models; the
    simulated old head's. Kept as it goes (resumable)."""
    maps, labels, classes, n_train, _ = pooled_maps(paths)
    n_test = len(labels) - n_train if len(paths) == 2 else HOLDOUT
    shape, k = tuple(maps.shape[1:]), len(classes)
    x_all = apply_view(maps, "avg").astype(np.float32)
    del maps
    kept = pickle.loads(kept_path.read_bytes()) if kept_path.exists() else {}
    for i, (tr, te) in enumerate(paired_splits(labels, n_test, count)):
        if i in kept:
            continue
        t0, y, x, xt = time.time(), labels[tr], x_all[tr], x_all[te]
        cv, val = split_indices(y, val_fraction, 0) if val_fraction else (np.arange(len(y)), np.arange(0))
        res = tune({"avg": x[cv]}, y[cv], tuple({**g, "view": ["avg"], "normalize": ["l2"]} for g in AUTO_GRID),
                   CVOptions(folds=5, seed=0, score="accuracy", threads=1), in_shape=shape)
        members = [best(res["table"], "svm", "ovr"), *([best(res["table"], "svm", "ovo")] if k > 2 else []),
                   best(res["table"], "logreg")]
        settings = [m["setting"] for m in members]
        oof = [res["oof"][m["key"]] for m in members]
        r = {"y": y, "yt": labels[te], "cv": cv, "val": val, "w": stack_weights(oof, y[cv]), "oof": oof,
             "keys": [m["key"] for m in members], "val87": [], "test87": [], "test": [], "refit_sec": 0.0}
        for s in settings:
            (lv, lt), _ = fitted_log_proba(x[cv], y[cv], s, shape, k, [x[val], xt])
            r["val87"].append(lv)
            r["test87"].append(lt)
            (lt,), sec = fitted_log_proba(x, y, s, shape, k, [xt])
            r["test"].append(lt)
            r["refit_sec"] += sec
        r["bag"] = fold_models(x[cv], y[cv], res["splits"], settings, shape, k, [x[val], xt])
        every = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
        r["bag_all"] = fold_models(x, y, every, settings, shape, k, [xt])
        if old:
            kres = tune({"avg": x[cv]}, y[cv], ({**KERNEL_GRID, "view": ["avg"], "normalize": ["l2"]},),
                        CVOptions(folds=5, seed=0, score="log_loss", threads=1), in_shape=shape)
            (lv, lt), _ = fitted_log_proba(x[cv], y[cv], kres["best"]["setting"], shape, k, [x[val], xt])
            t = fit_temperature(np.concatenate([kres["oof"][kres["best"]["key"]], lv]), np.r_[y[cv], y[val]])
            r["old"], r["old_key"] = with_temperature(lt, t), kres["best"]["key"]
        kept[i] = r
        kept_path.write_bytes(pickle.dumps(kept))
        print(f"split {i}: {time.time() - t0:.0f} s (refit {r['refit_sec']:.1f} s, fold models {r['bag']['sec']:.1f} s;"
              f" fold OOF vs tune's: {max(np.abs(a - b).max() for a, b in zip(r['bag']['oof'], oof)):.2g})",
              file=sys.stderr, flush=True)
    return kept


def stack(w, lps):
    return log_softmax(sum(wi * lp for wi, lp in zip(w, lps)))


def two_level_ratio(w, bag, y):
    """T of bags of (folds - 1) two-folds-out models over T of those models alone, on the rows each left out."""
    fold, bags, ones = bag["fold"], np.zeros_like(bag["oof"][0]), []
    for j in range(fold.max() + 1):
        rows = np.flatnonzero(fold == j)
        each = []
        for (j1, j2), (b, lps) in bag["pair_out"].items():
            if j in (j1, j2):
                at = np.searchsorted(b, rows)
                each.append(stack(w, [lp[at] for lp in lps]))
        bags[rows] = log_softmax(np.mean(each, 0))
        ones.extend((rows, e) for e in each)
    return fit_temperature(bags, y) / fit_temperature(np.concatenate([e for _, e in ones]),
                                                      np.concatenate([y[rows] for rows, _ in ones]))


def variants(r):
    """{row: calibrated test log-probabilities} of one split, and the temperatures."""
    y, w, cv, val = r["y"], r["w"], r["cv"], r["val"]
    yc = np.r_[y[cv], y[val]]
    t = fit_temperature(np.concatenate([stack(w, r["oof"]), stack(w, r["val87"])]), yc)
    mean = lambda bag, at: log_softmax(np.mean([stack(w, [m[j][at] for m in bag["others"]])  # noqa: E731
                                                for j in range(len(bag["others"][0]))], 0))
    b, ba = r["bag"], r["bag_all"]
    t_bag = fit_temperature(np.concatenate([stack(w, b["oof"]), mean(b, 0)]), yc)
    t_all = fit_temperature(stack(w, ba["oof"]), y)
    ratio, ratio_all = two_level_ratio(w, b, y[cv]), two_level_ratio(w, ba, y)
    out = {"default": with_temperature(stack(w, r["test"]), t),
           "no refit": with_temperature(stack(w, r["test87"]), t),
           "bag": with_temperature(mean(b, 1), t_bag), "bag T2": with_temperature(mean(b, 1), t_bag * ratio),
           "bag all": with_temperature(mean(ba, 0), t_all),
           "bag all T2": with_temperature(mean(ba, 0), t_all * ratio_all)}
    if "old" in r:
        out["old"] = r["old"]
    return out, {"T": t, "T bag": t_bag, "T bag all": t_all, "ratio": ratio, "ratio all": ratio_all}


def score(kept_paths):
    for path in kept_paths:
        kept = pickle.loads(Path(path).read_bytes())
        rows, temps, sec = {}, [], []
        for r in kept.values():
            v, tt = variants(r)
            temps.append(tt)
            sec.append((r["refit_sec"], r["bag"]["sec"], r["bag_all"]["sec"]))
            for name, lp in v.items():
                m = calibration_metrics(lp, r["yt"])
                rows.setdefault(name, []).append((100 * np.mean(lp.argmax(1) == r["yt"]), m["ece"], m["log_loss"]))
        rows = {n: np.array(v) for n, v in rows.items()}
        se = lambda d: d.std(ddof=1) / np.sqrt(len(d))  # noqa: E731
        print(f"{path}: {len(kept)} splits; each measure's mean, then its paired difference +- SE to the default "
              f"(d) and to the old head (o)")
        print("| row | accuracy, points | ECE | log-loss |\n|---|---|---|---|")
        for n, v in rows.items():
            cells = []
            for c, f in ((0, "{:+.2f}"), (1, "{:+.4f}"), (2, "{:+.4f}")):
                s = f.format(v[:, c].mean()).lstrip("+")
                for base in ("default", "old"):
                    if base in rows and base != n:
                        d = v[:, c] - rows[base][:, c]
                        s += f" {base[0]} {f.format(d.mean())} +- {f.format(se(d)).lstrip('+')}"
                cells.append(s)
            print(f"| {n} | " + " | ".join(cells) + " |")
        tt = {k: np.array([t[k] for t in temps]) for k in temps[0]}
        print("  temperatures (mean): " + ", ".join(f"{k} {v.mean():.3f}" for k, v in tt.items()))
        s = np.array(sec)
        print(f"  fit seconds a split (mean): the members refitted on every row {s[:, 0].mean():.1f}; the CV's 5 fold "
              f"models of them {s[:, 1].mean():.1f} (fitted already); bag all's 5 {s[:, 2].mean():.1f}")


if __name__ == "__main__":
    if sys.argv[1] == "--score":
        score(sys.argv[2:])
    else:
        name, paths, count, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), Path(sys.argv[4])
        collect(paths, count, out, old="--no-old" not in sys.argv,
                val_fraction=0.0 if "--no-val" in sys.argv else VAL_FRACTION)
        score([out])
