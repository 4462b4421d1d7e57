"""Accuracy parity of the fast path: fp32 vs bf16 (or another --precision) on real images and weights.

Extracts the same ``--n`` images twice (stored as float32 so only the compute precision differs),
reports the per-image cosine similarity of the feature maps (min / mean) and the fit-head
validation accuracy on each cache (same split, seed and settings).

    python bench/parity.py --n 200 --json-out parity.json
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


def main() -> None:
    from pipeline.cache import FeatureCache
    from pipeline.extract import ExtractConfig, extract
    from pipeline.head import FitHeadConfig, fit_head

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--precisions", nargs=2, default=["fp32", "bf16"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json-out")
    a = p.parse_args()
    r: dict = {"n": a.n, "precisions": a.precisions}
    with tempfile.TemporaryDirectory() as tmp:
        feats = {}
        for prec in a.precisions:
            e = extract(ExtractConfig(data=a.data, n=a.n, backbone=a.backbone, weights=a.weights, dtype="float32",
                                      precision=prec, cache_dir=f"{tmp}/features"))
            with FeatureCache(e["cache"]) as c:
                feats[prec] = (c.paths, c.features[: c.n].reshape(c.n, -1))
            h = fit_head(FitHeadConfig(cache=e["cache"], epochs=a.epochs, runs_dir=f"{tmp}/runs"))
            r[prec] = {"img_per_s": e["img_per_s"], "val_acc": h["val_acc"], "val_loss": h["val_loss"],
                       "val_rows": h["val_rows"]}
        (pa, fa), (pb, fb) = feats.values()
        assert pa == pb, "the two extractions did not pick the same images"
        cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
        r["cosine"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    x, y = a.precisions
    print(f"| cosine {y} vs {x}, {a.n} images (min / mean) | {r['cosine']['min']:.5f} / {r['cosine']['mean']:.5f} |")
    for prec in a.precisions:
        print(f"| fit-head val acc, {prec} cache ({r[prec]['val_rows']} val rows) | {r[prec]['val_acc']:.3f} "
              f"(val loss {r[prec]['val_loss']:.3f}) |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
