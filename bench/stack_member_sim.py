#!/usr/bin/env python
"""Would a fourth member help the default stack? A simulation on head_table's paired splits.

The default head stacks a one-vs-rest SVM, SVC's own pairs (several classes) and logistic regression, weighted
to the lowest out-of-fold NLL. This adds the exact RBF kernel logistic regression (``KERNEL_GRID``: a Nystroem
map over every training row, C and gamma by the same CV) as a fourth member and scores both stacks, the kernel
head alone and the two plain recipes on the same splits. Simulated, not fit-head itself: CV on every training
row (no validation split), each member refitted on all of them, test predictions from the fitted heads
(``fit_setting``), so compare the change between the stacks, not their level with head_table's ``defaults``.
docs/heads.md has the figures (not adopted).

    python bench/stack_member_sim.py NAME TRAIN.h5[,TEST.h5] SPLITS RESULTS.json   # resumable
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from head_table import HOLDOUT, l2_avg, paired_splits, pooled_maps, recipe_predict  # noqa: E402

from pipeline.heads.calibration import fit_stack_weights  # noqa: E402
from pipeline.heads.model_selection import (  # noqa: E402
    AUTO_GRID,
    KERNEL_GRID,
    CVOptions,
    fit_setting,
    stack_setting,
    tune,
)

KINDS = ("stack3", "stack4", "kernel", "svc", "logreg")


def best(table: list, kind: str, scheme=None):
    """The default head's pick of one kind: the highest CV accuracy, then the lowest log-loss."""
    return min((r for r in table if r["setting"]["head"] == kind and scheme in (None, r["setting"].get("scheme"))),
               key=lambda r: (-r["acc_mean"], r["log_loss_mean"]), default=None)


def log_proba(head, maps: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head.cpu().eval()(torch.from_numpy(np.asarray(maps, np.float32))).double().numpy()


def one_split(maps, labels, classes, av, tr, te) -> dict:
    """Every candidate's test accuracy on one split, and the stacks' weights."""
    y, n = labels[tr], len(classes)
    rows = np.asarray(maps[tr], np.float32)
    kernel_grid = {**KERNEL_GRID, "view": ["avg"], "normalize": ["l2"], "n_components": [len(tr)]}
    grid = tuple({**g, "view": ["avg"], "normalize": ["l2"]} for g in AUTO_GRID) + (kernel_grid,)
    res = tune(rows, y, grid, CVOptions(folds=5, seed=0, score="accuracy", threads=2))
    svm, lr, ker = best(res["table"], "svm", "ovr"), best(res["table"], "logreg"), best(res["table"], "kernel")
    pairs = best(res["table"], "svm", "ovo") if n > 2 else None
    three, _ = stack_setting(svm, lr, res["oof"], y, pairs)
    members = [svm, *([pairs] if pairs else []), lr, ker]
    w4 = fit_stack_weights([res["oof"][r["key"]] for r in members], y)
    lp3 = log_proba(fit_setting(rows, y, three, n_classes=n)[0], maps[te])
    lk = log_proba(fit_setting(rows, y, ker["setting"], n_classes=n)[0], maps[te])
    lp4 = log_proba(fit_setting(rows, y, {**three, "weights": tuple(w4[:-1])}, n_classes=n)[0], maps[te]) + w4[-1] * lk
    predictions = {"stack3": lp3.argmax(1), "stack4": lp4.argmax(1), "kernel": lk.argmax(1),
                   **{k: recipe_predict(k, av[tr], y, av[te]) for k in ("svc", "logreg")}}
    return {**{k: float((p == labels[te]).mean()) for k, p in predictions.items()},
            "w3": list(three["weights"]), "w4": w4, "kernel_setting": ker["key"]}


def summary(name: str, store: dict) -> str:
    """Each candidate against the better plain recipe, and the fourth member's change, in points ± SE."""
    acc = {k: np.array([store[s][k] for s in store]) for k in KINDS}
    n = len(acc["svc"])
    better = "svc" if acc["svc"].mean() >= acc["logreg"].mean() else "logreg"

    def points(d):
        return f"{100 * d.mean():+.2f} ± {100 * d.std(ddof=1) / np.sqrt(n):.2f}"

    lines = [f"{name}: {n} splits, the better recipe {better}"]
    lines += [f"  {k}: {acc[k].mean():.4f}, {points(acc[k] - acc[better])}" for k in ("stack3", "stack4", "kernel")]
    lines.append(f"  stack4 - stack3: {points(acc['stack4'] - acc['stack3'])}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    name, paths, count, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), Path(sys.argv[4])
    maps, labels, classes, n_train, _ = pooled_maps(paths)
    av = l2_avg(maps)
    store = json.loads(out.read_text()) if out.is_file() else {}
    n_test = len(labels) - n_train if len(paths) == 2 else HOLDOUT
    for i, (tr, te) in enumerate(paired_splits(labels, n_test, count)):
        if str(i) not in store:
            t0 = time.time()
            store[str(i)] = {**one_split(maps, labels, classes, av, tr, te), "seconds": time.time() - t0}
            out.write_text(json.dumps(store))
            print(name, i, {k: store[str(i)][k] for k in KINDS}, file=sys.stderr, flush=True)
    print(summary(name, store))


if __name__ == "__main__":
    main()
