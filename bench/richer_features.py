#!/usr/bin/env python
"""Screen richer features before any becomes a cache option: VGG-16's pool4 map, average-pooled (512 more
numbers per photo, from the same forward pass), beside the pool5 average every head reads today.

One forward pass per photo (bf16, decoding in turns as extract does) keeps the global average of pool4
(after block 4) and pool5 (after block 5); then each combination (each part l2-normalised, weighted,
the whole l2-normalised again) is scored as ``view_screen.py`` scores views: the scikit-learn recipes and
the default head. Test folders as head_table's; dogbreeds20 on five seeded stratified 80/20 splits of
this script's own listing order (so its absolute figures differ from head_table's splits; compare rows).

    python bench/richer_features.py --only scenes6 caltech20 --specs p5 p5+p4 p5+0.5*p4
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from head_table import PROXIES  # noqa: E402  (bench/ is the script's folder)
from view_screen import SPLITS, l2, reference_scores  # noqa: E402

LAYERS = {"p4": 23, "p5": 30}  # index in vgg16.features of the max-pool ending block 4 / block 5


def pooled_layers(folder: str, weights: str) -> tuple:
    """({layer: (N, 512) global averages}, labels) of every good photo of ``folder``."""
    import torch

    from pipeline.data.folders import list_image_folder
    from pipeline.data.image_reader import ImageListDataset, batches, read_items
    from pipeline.extraction.backbones import load_backbone

    b = load_backbone("vgg16", weights)
    net = b.spec.features(b.model).eval()
    listing = list_image_folder(folder)
    ds = ImageListDataset(listing.root, [(f.path, f.label) for f in listing.files], b.transform)
    out, labels = {k: [] for k in LAYERS}, []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for batch in batches(read_items(ds, -1, torch.device("cpu"), 32), 32):  # decoding as extract's
            if not batch.good:  # only unreadable files
                continue
            x = batch.images().contiguous(memory_format=torch.channels_last)
            for i, layer in enumerate(net):
                x = layer(x)
                for k, idx in LAYERS.items():
                    if i == idx:
                        out[k].append(x.float().mean((2, 3)).numpy())
            labels += [g.label for g in batch.good]
    return {k: np.concatenate(v) for k, v in out.items()}, np.array(labels)


def rows(parts: dict, spec: str) -> np.ndarray:
    """'p5+0.5*p4' -> l2(concat(l2(p5), 0.5 * l2(p4)))."""
    out = []
    for term in spec.split("+"):
        w, _, name = term.rpartition("*")
        out.append(float(w or 1) * l2(parts[name]))
    return l2(np.concatenate(out, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--weights", default="../shared/weights/vgg16_features_imagenet.pt")
    p.add_argument("--only", nargs="*", choices=list(PROXIES))
    p.add_argument("--specs", nargs="+", default=["p5", "p5+p4", "p5+0.5*p4"])
    args = p.parse_args()
    import pipeline
    from pipeline.heads.epoch_loop import split_indices

    for name, (train, test) in PROXIES.items():
        if args.only and name not in args.only:
            continue
        x, y = pooled_layers(str(Path(args.data) / train), args.weights)
        xt, yt = pooled_layers(str(Path(args.data) / test), args.weights) if test else (None, None)
        for spec in args.specs:
            t0, r = time.time(), rows(x, spec)
            if test:
                rt = rows(xt, spec)
                res = [{**reference_scores(r, y, rt, yt),
                        "default head": float((pipeline.Head().fit(r, y).predict(rt) == yt).mean())}]
            else:
                res = [{**reference_scores(r[a], y[a], r[b], y[b]),
                        "default head": pipeline.Head(val_fraction=0.2, seed=s).fit(r, y).metrics_["val_acc"]}
                       for s, (a, b) in enumerate(split_indices(y, 0.2, s) for s in range(SPLITS))]
            means = {k: round(float(np.mean([q[k] for q in res])), 4) for k in res[0]}
            print(json.dumps({"proxy": name, "features": spec, **means, "seconds": round(time.time() - t0, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
