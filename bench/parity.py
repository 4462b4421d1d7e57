"""Accuracy parity of the fast paths: each --precision vs fp32 on real photos and weights.

For every precision: extract ``--train`` (``--n`` images) and all of ``--test`` (stored as float32,
so only the compute differs; int8 calibrates on the training photos for both), then report
  * the per-image cosine of the test features vs fp32's: flat C x H x W maps and globally
    averaged C-vectors (what the default head reads), min / mean;
  * fit-head with its defaults trained on the training cache: test accuracy and log-loss;
  * with --breeds (default ../shared/data/dogbreeds20, 20 classes; '' to skip): fit-head's defaults
    on 5 seeded, stratified 80/20 splits of that folder's cache (int8 calibrated on it), mean accuracy.
Caches go to ``--cache-dir`` (reused by a second run) or a temporary folder.

    python bench/parity.py --precisions fp32 bf16 int8 --json-out parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_extract import DATA, WEIGHTS  # noqa: E402

TEST = DATA.parent / "catsdogs_test"
BREEDS = DATA.parent / "dogbreeds20"


def cosine(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"min": float(c.min()), "mean": float(c.mean())}


def main() -> None:
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.extraction.extract import ExtractConfig, extract
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(DATA))
    p.add_argument("--test", default=str(TEST))
    p.add_argument("--breeds", default=str(BREEDS), help="a many-class folder for split accuracy ('' = skip)")
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--n", type=int, default=800, help="training images (0 = all)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], help="the first is the reference")
    p.add_argument("--calib-n", type=int, default=ExtractConfig.calib_n)
    p.add_argument("--cache-dir", help="keep the caches here (reused next time) instead of a temporary folder")
    p.add_argument("--json-out")
    a = p.parse_args()
    r: dict = {"n": a.n, "precisions": a.precisions}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = a.cache_dir or f"{tmp}/features"
        test_feats = {}
        for prec in a.precisions:
            common = {"backbone": a.backbone, "weights": a.weights, "dtype": "float32", "precision": prec,
                      "cache_dir": cache_dir, "calib_n": a.calib_n}
            train = extract(ExtractConfig(data=a.train, n=a.n, **common))
            test = extract(ExtractConfig(data=a.test, n=0, calib_data=a.train if prec == "int8" else "", **common))
            with FeatureCache(test.cache) as c:
                test_feats[prec] = (c.paths, c.features[: c.n])
            h = fit_head(FitHeadConfig(cache=train.cache, test_cache=test.cache, runs_dir=f"{tmp}/runs"))
            r[prec] = {"train_img_per_s": train.img_per_s, "test_acc": h.metrics["test_acc"],
                       "test_loss": h.metrics["test_loss"], "test_rows": len(test_feats[prec][0]), "val_acc": h.val_acc}
            if a.breeds:
                breeds = extract(ExtractConfig(data=a.breeds, n=0, **common)).cache
                splits = [fit_head(FitHeadConfig(cache=breeds, val_fraction=0.2, seed=seed, runs_dir=f"{tmp}/runs"))
                          for seed in range(5)]
                acc = [s.val_acc for s in splits]
                r[prec]["breeds_acc"], r[prec]["breeds_acc_std"] = float(np.mean(acc)), float(np.std(acc))
            print(f"[parity] {prec}: test acc {h.metrics['test_acc']:.4f}", file=sys.stderr, flush=True)
        ref_paths, ref = test_feats[a.precisions[0]]
        for prec in a.precisions[1:]:
            paths, x = test_feats[prec]
            assert paths == ref_paths, "the extractions did not read the same images"
            r[prec]["cosine_flat"] = cosine(x, ref)
            r[prec]["cosine_avg"] = cosine(x.mean((2, 3)), ref.mean((2, 3)))
    ref_name = a.precisions[0]
    print(f"| precision | test acc ({r[ref_name]['test_rows']} photos) | test log-loss | cosine vs {ref_name}, "
          "flat (min / mean) | cosine, avg-pooled (min / mean) | breeds: acc (5 splits) |")
    print("|---|---|---|---|---|---|")
    for prec in a.precisions:
        q = r[prec]
        cos = (f"{q['cosine_flat']['min']:.5f} / {q['cosine_flat']['mean']:.5f} | "
               f"{q['cosine_avg']['min']:.5f} / {q['cosine_avg']['mean']:.5f}") if "cosine_flat" in q else "1 | 1"
        breeds = f"{q['breeds_acc']:.3f} ± {q['breeds_acc_std']:.3f}" if "breeds_acc" in q else "-"
        print(f"| {prec} | {q['test_acc']:.4f} | {q['test_loss']:.4f} | {cos} | {breeds} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
