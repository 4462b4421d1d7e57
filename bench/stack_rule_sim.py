#!/usr/bin/env python
"""Other rules for the default stack's weights, compared offline on head_table's paired splits.

The default head weights its members (a one-vs-rest SVM, SVC's own pairs with several classes, logistic
regression) to the lowest out-of-fold NLL (``fit_stack_weights``). Per split this keeps each member's
out-of-fold log-probabilities (the default's CV on every training row) and its test log-probabilities (refitted
alone on every training row: the stack's logits are the weighted sum of the members', so any weights can be
scored without refitting), and the plain recipes' test predictions; then it scores each rule on the same splits:

  nll     the weights that minimise the out-of-fold NLL (the default's below 30 rows a class)
  floor   the default's (``stack_weights``): the NLL's, but from 30 rows a class the SVMs keep 0.7 of the vote
  noisy   the NLL of labels right with probability 1 - eps and uniform otherwise, eps fitted with the weights
  equal   each member at its own temperature (``fit_temperature``), equal shares: no weights fitted
  sX      the SVMs' share X, logistic regression's 1 - X, each at its own temperature

    python bench/stack_rule_sim.py NAME TRAIN.h5[,TEST.h5] SPLITS KEPT.pkl   # collect (resumable), then score

A simulation: the CV runs on every training row (fit-head keeps a validation split), so compare rules with each
other, not with head_table's levels.
"""
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_table import HOLDOUT, l2_avg, paired_splits, pooled_maps, recipe_predict  # noqa: E402

from pipeline.heads.calibration import fit_stack_weights, fit_temperature, nll, with_temperature  # noqa: E402
from pipeline.heads.model_selection import AUTO_GRID, CVOptions, fit_setting, stack_weights, tune  # noqa: E402


def best(rows, kind, scheme=None):
    return min((r for r in rows if r["setting"]["head"] == kind and scheme in (None, r["setting"].get("scheme"))),
               key=lambda r: (-r["acc_mean"], r["log_loss_mean"]))


def log_proba(head, x):
    with torch.no_grad():
        return torch.log_softmax(head.cpu().eval()(torch.from_numpy(np.asarray(x, np.float32))).double(), 1).numpy()


def collect(paths, count, kept_path):
    """Each split's members' out-of-fold and test log-probabilities and the recipes' predictions, kept as it goes."""
    maps, labels, classes, n_train, _ = pooled_maps(paths)
    n_test = len(labels) - n_train if len(paths) == 2 else HOLDOUT
    av = l2_avg(maps)
    kept = pickle.loads(kept_path.read_bytes()) if kept_path.exists() else {}
    for i, (tr, te) in enumerate(paired_splits(labels, n_test, count)):
        if i in kept:
            continue
        t0, y, rows = time.time(), labels[tr], np.asarray(maps[tr], np.float32)
        res = tune(rows, y, tuple({**g, "view": ["avg"], "normalize": ["l2"]} for g in AUTO_GRID),
                   CVOptions(folds=5, seed=0, score="accuracy", threads=2))
        members = [best(res["table"], "svm", "ovr"), *([best(res["table"], "svm", "ovo")] if len(classes) > 2 else []),
                   best(res["table"], "logreg")]
        kept[i] = {"y": y, "yt": labels[te], "oof": [res["oof"][r["key"]] for r in members],
                   "test": [log_proba(fit_setting(rows, y, r["setting"], n_classes=len(classes))[0], maps[te])
                            for r in members],
                   **{k: recipe_predict(k, av[tr], y, av[te]) for k in ("svc", "logreg")}}
        kept_path.write_bytes(pickle.dumps(kept))
        print(f"split {i}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return kept


def noisy_weights(logps, y, eps_max=0.5):
    """Weights w >= 0 and eps minimising -mean log((1 - eps) p_y + eps / K); returns (w, eps)."""
    k, at = logps[0].shape[1], np.arange(len(y))

    def loss(v):
        lp = log_softmax(sum(w * lp for w, lp in zip(v[:-1], logps)), 1)[at, y]
        return -np.mean(np.logaddexp(np.log1p(-v[-1]) + lp, np.log(v[-1] / k)))

    res = minimize(loss, np.r_[np.ones(len(logps)), 0.01], bounds=[(0, 100)] * len(logps) + [(1e-6, eps_max)],
                   method="L-BFGS-B")
    return list(res.x[:-1]), float(res.x[-1])


def shares(r, svm_share=None):
    """Each member at its own temperature; the SVMs' share svm_share (None: every member equal)."""
    t = [1.0 / fit_temperature(lp, r["y"]) for lp in r["oof"]]
    if svm_share is None:
        return [ti / len(t) for ti in t]
    return [ti * svm_share / (len(t) - 1) for ti in t[:-1]] + [t[-1] * (1 - svm_share)]


RULES = {"nll": lambda r: fit_stack_weights(r["oof"], r["y"]), "floor": lambda r: stack_weights(r["oof"], r["y"]),
         "noisy": lambda r: noisy_weights(r["oof"], r["y"])[0],
         "equal": shares, **{f"s{x}": (lambda r, x=x: shares(r, x)) for x in (0.3, 0.5, 0.7)}}


def test_log_loss(w, r):
    """The stack's test log-loss at the temperature its out-of-fold log-probabilities give it (as fit-head's)."""
    t = fit_temperature(sum(wi * lp for wi, lp in zip(w, r["oof"])), r["y"])
    return nll(with_temperature(sum(wi * lp for wi, lp in zip(w, r["test"])), t), r["yt"])


def score(name, kept):
    acc = {k: [] for k in ("svc", "logreg", "svm alone", "logreg alone", *RULES)}
    loss = {k: [] for k in RULES}
    for r in kept.values():
        yt = r["yt"]
        acc["svc"].append(np.mean(r["svc"] == yt))
        acc["logreg"].append(np.mean(r["logreg"] == yt))
        acc["svm alone"].append(np.mean(r["test"][0].argmax(1) == yt))
        acc["logreg alone"].append(np.mean(r["test"][-1].argmax(1) == yt))
        for rule, weights in RULES.items():
            w = weights(r)
            acc[rule].append(np.mean(sum(wi * lp for wi, lp in zip(w, r["test"])).argmax(1) == yt))
            loss[rule].append(test_log_loss(w, r))
    acc = {k: np.array(v) for k, v in acc.items()}
    better = "svc" if acc["svc"].mean() >= acc["logreg"].mean() else "logreg"
    print(f"{name}: {len(kept)} splits, points against the better recipe ({better}) and the NLL weights, +- SE")
    for k in ("svm alone", "logreg alone", *RULES):
        d, n = 100 * (acc[k] - acc[better]), 100 * (acc[k] - acc["nll"])
        se = lambda v: v.std(ddof=1) / np.sqrt(len(v))  # noqa: E731
        ll = (f"   test log-loss vs nll {np.mean(np.subtract(loss[k], loss['nll'])):+.4f}" if k in loss else "")
        print(f"  {k:13s} {d.mean():+.2f} +- {se(d):.2f}   vs nll {n.mean():+.2f} +- {se(n):.2f}{ll}")


if __name__ == "__main__":
    name, paths, count, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), Path(sys.argv[4])
    score(name, collect(paths, count, out))
