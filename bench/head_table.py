#!/usr/bin/env python
"""The README's head table: fit-head settings on two proxies of photos never seen in training.

A: train on a cache of ../shared/data/catsdogs (n=800: 700 train / 100 val), test on a cache of
   ../shared/data/catsdogs_test (400 other photos), through fit-head's own --test-cache.
B: ../shared/data/dogbreeds20 (270 photos, 20 breeds): fit-head on 5 seeded, stratified 80/20
   splits of one cache (seeds 0-4); mean and std of the validation accuracy and log-loss.

    python bench/head_table.py --train A.h5 --test A_test.h5 --breeds B.h5 [--json out.json]

Make the caches first with `python cli.py extract --data ... --weights ...` (--n 800, --n 0, --n 0).
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

SETTINGS = [  # (name, fit-head options)
    ("seed recipe (flat, 1/RMS, Adam 0.01 x 10)", {"recipe": "seed"}),
    ("defaults: linear, avg, l2, early stopping", {}),
    ("linear, flat, l2", {"features": "flat"}),
    ("linear, max, l2", {"features": "max"}),
    ("linear, avgmax, l2", {"features": "avgmax"}),
    ("linear, avg, rms", {"normalize": "rms"}),
    ("linear, avg, none", {"normalize": "none"}),
    ("logreg, avg, l2, C=100", {"head": "logreg"}),
    ("logreg, avg, l2, C=10", {"head": "logreg", "C": 10.0}),
    ("logreg, avgmax, l2, C=100", {"head": "logreg", "features": "avgmax"}),
    ("logreg, flat, l2, C=100", {"head": "logreg", "features": "flat"}),
    ("logreg, avg, standardize, C=1", {"head": "logreg", "normalize": "standardize", "C": 1.0}),
    ("kernel, avg, l2, C=100", {"head": "kernel"}),
    ("--tune (every kind, 5-fold CV)", {"tune": True}),
]


def run(name: str, opts: dict, a: str, a_test: str, b: str, runs: str) -> dict:
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    t0 = time.time()
    ra = fit_head(FitHeadConfig(cache=a, test_cache=a_test, runs_dir=runs, **opts))
    seconds = time.time() - t0
    rb = [fit_head(FitHeadConfig(cache=b, val_fraction=0.2, seed=s, runs_dir=runs, **opts)) for s in range(5)]
    return {"setting": name, "options": opts, "A_test_acc": ra["test_acc"], "A_test_loss": ra["test_loss"],
            "A_val_acc": ra["val_acc"], "A_seconds": seconds,
            "B_acc": float(np.mean([r["val_acc"] for r in rb])), "B_acc_std": float(np.std([r["val_acc"] for r in rb])),
            "B_loss": float(np.mean([r["val_loss"] for r in rb])),
            "A_choice": (ra["tuning"] or {}).get("choice"), "B_choices": [(r["tuning"] or {}).get("choice") for r in rb]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="cache of catsdogs, n=800")
    p.add_argument("--test", required=True, help="cache of catsdogs_test (same backbone, weights, preprocessing)")
    p.add_argument("--breeds", required=True, help="cache of dogbreeds20")
    p.add_argument("--only", type=int, nargs="*", help="setting numbers to run (default: all)")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    from pipeline.progress import set_quiet

    set_quiet(True)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        print("| setting | A: test acc | A: test log-loss | A: fit s | B: acc (5 splits) | B: log-loss |")
        print("|---|---|---|---|---|---|")
        for i, (name, opts) in enumerate(SETTINGS):
            if a.only and i not in a.only:
                continue
            r = run(name, opts, a.train, a.test, a.breeds, runs)
            rows.append(r)
            print(f"| {name} | {r['A_test_acc']:.4f} | {r['A_test_loss']:.3f} | {r['A_seconds']:.1f} | "
                  f"{r['B_acc']:.3f} ± {r['B_acc_std']:.3f} | {r['B_loss']:.3f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
