#!/usr/bin/env python
"""Paired differences between candidates of different head_table runs (e.g. one backbone's caches against
another's), on the splits both have: head_table's splits depend only on the pooled labels' order, so two
runs on caches of the same photos in the same row order (extract lists a folder in one sorted order) are
paired split by split.

    python bench/paired_diff.py --proxy dogbreeds20 \\
        lite0.json:defaults+fused lite0.json:defaults vgg16.json:defaults

prints each candidate's mean test accuracy over the common splits and the first one's mean paired
difference to each other, in points, ± its standard error (std / sqrt(splits)).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def accuracies(spec: str, proxy: str) -> dict:
    """{split: accuracy} of FILE:CANDIDATE on ``proxy``."""
    path, _, cand = spec.rpartition(":")
    with open(path) as f:
        store = json.load(f)
    out = {}
    for key, r in store.items():
        p, c, split = key.rsplit("|", 2)
        if p == proxy and c == cand:
            out[int(split)] = r["acc"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy", required=True)
    p.add_argument("specs", nargs="+", help="FILE:CANDIDATE (the first is compared with each other)")
    a = p.parse_args()
    accs = [accuracies(s, a.proxy) for s in a.specs]
    common = sorted(set.intersection(*(set(x) for x in accs)))
    if not common:
        raise SystemExit(f"{a.proxy}: no split that every candidate has")
    first = np.array([accs[0][s] for s in common])
    print(f"{a.proxy} ({len(common)} splits): {a.specs[0]} {first.mean():.4f}")
    for spec, acc in zip(a.specs[1:], accs[1:]):
        other = np.array([acc[s] for s in common])
        d = first - other
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"  vs {spec} {other.mean():.4f}: {100 * d.mean():+.2f} ± {100 * se:.2f} points")


if __name__ == "__main__":
    main()
