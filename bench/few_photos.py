#!/usr/bin/env python
"""The default head on a few photos a class: how each member's C is chosen among CV-accuracy ties.

fit-head's default (``fit_head._default_row``) takes each member's C (one-vs-rest SVM, SVC's pairs, logistic
regression) by CV accuracy, ties going to the lower CV log-loss at the member's own temperature. With a few
photos a class every C often ties (all out-of-fold rows right), and the log-loss picks the sharpest logistic
regression (C=1000). This replays the default with other tie rules, patched into ``_default_row``:

  cur     the default's: CV accuracy, then CV log-loss
  minC    CV accuracy, then the smallest C (the most regularised of those as accurate)
  lrmin   minC for logistic regression only (the SVMs as cur)
  minC1   minC only where the member's best CV accuracy is 1 (every out-of-fold row right), else cur

    python bench/few_photos.py draws TRAIN.h5[,TEST.h5] PER DRAWS cur minC ...  # PER photos a class, the rest test
    python bench/few_photos.py ties NAME TRAIN.h5[,TEST.h5] SPLITS [I,J,..]    # head_table's splits: do rules differ?

``draws``: seeded draws of PER rows a class from the pooled caches (draw s: numpy's default_rng(s)), the default
head fitted on them as ``Head().fit(X, y)`` (its validation split and all), every other row its test; prints each
rule's test log-loss, ECE, Brier and accuracy per draw, their means and the paired difference to the first rule
± its standard error. ``ties``: head_table's paired splits of a proxy (``--splits`` of head_table's), fit-head's
default run as head_table runs it; per split and member the Cs tied on CV accuracy and the C each rule would
choose, then how often a rule would choose another C than the default; only those splits' heads differ, and they
are fitted again under the rule and scored on the split's test rows (I,J,..: only those splits).
docs/heads.md, "Few photos, all right", has the numbers.
"""
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_table import HOLDOUT, fit_head_predict, paired_splits, pooled_maps  # noqa: E402

from pipeline.heads import fit_head as fh  # noqa: E402
from pipeline.heads.model_selection import expand_grid, setting_key, stacked_row  # noqa: E402

RULES = ("cur", "minC", "lrmin", "minC1")
CHOICES: list = []  # each member's choice under the rule in force, and every rule's


def rule_key(rule: str, rows: list):
    """The sort key choosing a member's row among ``rows`` (its Cs) under ``rule``."""
    top = max(r["acc_mean"] for r in rows)

    def key(r):
        smallest = rule == "minC" or (rule == "lrmin" and r["setting"]["head"] == "logreg") or (
            rule == "minC1" and top == 1.0)
        return -r["acc_mean"], r["setting"]["C"] if smallest else r["log_loss_mean"]
    return key


def patched(rule: str):
    """``fit_head._default_row`` with the members' Cs chosen under ``rule`` (recording every rule's choice)."""

    def default_row(cfg, shape, result):
        keys = {setting_key(s) for s in expand_grid(fh._auto_grid(cfg), shape)}
        rows = [r for r in result["table"] if r["key"] in keys]

        def best(kind, scheme=None):
            mine = [r for r in rows if r["setting"]["head"] == kind and scheme in (None, r["setting"].get("scheme"))]
            if not mine:
                return None
            top = max(r["acc_mean"] for r in mine)
            CHOICES.append({"member": kind + (f"-{scheme}" if scheme else ""), "cv_acc": top,
                            "tied": [r["setting"]["C"] for r in mine if r["acc_mean"] == top],
                            **{k: min(mine, key=rule_key(k, mine))["setting"]["C"] for k in RULES}})
            return min(mine, key=rule_key(rule, mine))

        svm, logreg = best("svm", "ovr"), best("logreg")
        pairs = best("svm", "ovo") if int(np.max(result["labels"])) > 1 else None
        return stacked_row(svm, logreg, result, pairs)
    return default_row


def draws(paths: list, per: int, count: int, rules: list) -> None:
    from pipeline import Head
    from pipeline.heads.calibration import calibration_metrics

    maps, labels, _, _, _ = pooled_maps(paths)
    X = maps.astype(np.float32).mean((2, 3))[:, :, None, None]  # the avg view: the default head's
    out = {r: [] for r in rules}
    for s in range(count):
        rng = np.random.default_rng(s)
        tr = np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False)
                             for c in range(int(labels.max()) + 1)])
        te = np.setdiff1d(np.arange(len(labels)), tr)
        for rule in rules:
            fh._default_row, CHOICES[:] = patched(rule), []
            logp = np.log(np.clip(Head().fit(X[tr], labels[tr]).predict_proba(X[te]), 1e-300, None))
            m = {**calibration_metrics(logp, labels[te]), "acc": float((logp.argmax(1) == labels[te]).mean())}
            out[rule].append(m)
            chosen = ", ".join(f"{c['member']} C={c[rule]:g} (cv acc {c['cv_acc']:.3f}, tied {c['tied']})"
                               for c in CHOICES)
            print(f"draw {s} {rule}: " + " ".join(f"{k} {v:.4f}" for k, v in m.items()) + f"; {chosen}", flush=True)
    for rule in rules:
        print(f"mean {rule}: " + " ".join(f"{k} {np.mean([m[k] for m in out[rule]]):.4f}" for k in out[rule][0]))
    for rule in rules[1:]:
        for k in ("log_loss", "ece", "brier", "acc"):
            d = np.array([a[k] - b[k] for a, b in zip(out[rule], out[rules[0]])])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            print(f"{rule} - {rules[0]}, {k}: {d.mean():+.4f} ± {se:.4f}")


def ties(name: str, paths: list, count: int, only=None) -> None:
    from pipeline.heads.calibration import calibration_metrics

    maps, labels, classes, n_train, _ = pooled_maps(paths)
    n_test = len(labels) - n_train if len(paths) == 2 else HOLDOUT
    rows, changed = [], {k: [] for k in RULES[1:]}
    for i, (tr, te) in enumerate(paired_splits(labels, n_test, count)):
        if only is not None and i not in only:
            continue
        fh._default_row, CHOICES[:] = patched("cur"), []
        logp = fit_head_predict({}, maps, labels, classes, tr, te)[0]
        base = {**calibration_metrics(logp, labels[te]), "acc": float((logp.argmax(1) == labels[te]).mean())}
        here = list(CHOICES)
        for c in here:
            rows.append({"split": i, **c})
            print(f"{name} split {i} {c['member']}: cv acc {c['cv_acc']:.4f}, tied {c['tied']}, "
                  + ", ".join(f"{k} C={c[k]:g}" for k in RULES), flush=True)
        for k in changed:  # the head a rule changes, scored on the split's test rows (head_table's measures)
            if any(c[k] != c["cur"] for c in here):
                fh._default_row = patched(k)
                logp = fit_head_predict({}, maps, labels, classes, tr, te)[0]
                m = calibration_metrics(logp, labels[te])
                d = {"split": i, "acc": float((logp.argmax(1) == labels[te]).mean()) - base["acc"],
                     **{x: m[x] - base[x] for x in ("ece", "log_loss", "brier")}}
                changed[k].append(d)
                print(f"  {k} on split {i}, minus the default: " + ", ".join(f"{x} {v:+.4f}" for x, v in d.items()
                                                                           if x != "split"), flush=True)
    print(f"{name}: {len(rows)} member choices over {len(only or range(count))} splits; every out-of-fold row right: "
          f"{sum(r['cv_acc'] == 1.0 for r in rows)}; two or more Cs tied: {sum(len(r['tied']) > 1 for r in rows)}")
    for k in RULES[1:]:
        other = [f"split {r['split']} {r['member']} {r['cur']:g} -> {r[k]:g}" for r in rows if r[k] != r["cur"]]
        print(f"  {k} chooses another C than the default: {len(other)}" + (f" ({'; '.join(other)})" if other else ""))
        if changed[k]:  # every other split's head is the default's, so the paired mean over all splits is this / count
            print(f"    paired difference over the {count} splits: " + ", ".join(
                f"{x} {sum(d[x] for d in changed[k]) / count:+.5f}" for x in ("acc", "ece", "log_loss", "brier")))
    print(json.dumps(rows), file=sys.stderr)


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    args = sys.argv[1:]
    if len(args) >= 5 and args[0] == "draws" and set(args[4:]) <= set(RULES):
        return draws(args[1].split(","), int(args[2]), int(args[3]), args[4:])
    if len(args) in (4, 5) and args[0] == "ties":
        only = [int(i) for i in args[4].split(",")] if args[4:] else None
        return ties(args[1], args[2].split(","), int(args[3]), only)
    print(__doc__.split("\n\n")[3], file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
