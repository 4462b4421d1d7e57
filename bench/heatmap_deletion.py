#!/usr/bin/env python
"""Is the heatmap honest? A deletion test of the heatmaps (docs/heatmaps.md's table).

A head is fitted (fit-head's defaults unless --head) on the training folder's VGG-16 cache; each test photo goes
once through the backbone and the head (its class, probability and heatmap from that one pass,
``network(maps=True)``); then the hottest 20 % of the photo's pixels (the map upsampled bilinearly to the crop
the network saw) are blanked, and separately the coldest 20 % (the map is signed: the most evidence against the
class) and a random 20 % (a reference), each filled
with the photo's mean colour (--fill mean) or a heavy blur of it (--fill blur), and each blanked photo runs
again. The drop of the originally predicted class's probability is recorded for each. An honest map makes the
hot drop larger than the cold drop on most photos: the table gives that share, the mean drops, and how often
the hot blanking changes the predicted class.

    python bench/heatmap_deletion.py --data ../shared/data --weights ../shared/weights/vgg16_features_imagenet.pt \\
        --cache-dir features --n 100

--n: test photos per proxy (a seeded stratified sample; 0 = all). A cache of the training folder is taken from
--cache-dir or --reuse when one of the whole folder made with these very weights (sha256) and without pooling is
there, else extracted into --cache-dir. The test photos are never cached: they run through the network.
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

PROXIES = {"catsdogs": ("catsdogs", "catsdogs_test"), "caltech20": ("caltech20/train", "caltech20/test")}
KINDS = ("hot", "cold", "random")


def find_cache(folder: Path, weights: Path, dirs: list) -> str:
    """A complete cache of the whole ``folder`` made with ``weights`` (checked by sha256) and spatial maps, else a
    new one in ``dirs[0]``."""
    from pipeline.cache.feature_cache import list_caches
    from pipeline.extraction.backbones import file_sha256
    from pipeline.extraction.extract import ExtractConfig, extract

    sha = file_sha256(weights)
    for d in dirs:
        for info in list_caches(d)[0] if Path(d).is_dir() else []:
            a = info.attrs
            if (Path(a.get("data_root", "")).resolve() == folder.resolve() and a.get("weights_sha256") == sha
                    and int(a.get("n_requested", -1)) == 0 and tuple(info.feature_shape) == (512, 7, 7)):
                print(f"reusing {info.path} for {folder}", file=sys.stderr)
                return str(info.path)
    return extract(ExtractConfig(data=str(folder), n=0, backbone="vgg16", weights=str(weights),
                                 cache_dir=str(dirs[0]))).cache


def blanked(x, cam, share: float, fill: str, rng):
    """The photo tensor ``x`` (3, S, S) with its hottest, coldest and a random ``share`` of pixels filled."""
    import torch
    from torchvision.transforms.functional import gaussian_blur

    from pipeline.runs.figures import upsample

    s = x.shape[-1]
    heat = upsample(np.asarray(cam, np.float32), (s, s)).ravel()
    k = int(round(share * heat.size))
    order = np.argsort(heat, kind="stable")
    picks = {"hot": order[-k:], "cold": order[:k], "random": rng.choice(heat.size, k, replace=False)}
    width = s // 4 * 2 + 1  # a blur half the crop wide: the blanked area keeps its colours, not its shapes
    filler = (gaussian_blur(x[None], [width, width], [s / 8, s / 8])[0] if fill == "blur"
              else x.mean(dim=(1, 2), keepdim=True).expand_as(x))
    out = []
    for kind in KINDS:
        mask = torch.zeros(s * s, dtype=torch.bool)
        mask[torch.from_numpy(picks[kind])] = True
        mask = mask.view(1, s, s)
        out.append(torch.where(mask, filler, x))
    return out


def example_strip(transform, x, cam, variants):
    """One photo as a strip: its heatmap over it, then the photo with its hot and its cold share blanked."""
    from PIL import Image

    from pipeline.heads.heatmaps import overlay
    from pipeline.runs.figures import denormalise

    mean, std = [float(m) for m in transform.mean], [float(s) for s in transform.std]
    tiles = [overlay(transform, x, cam)] + [Image.fromarray(np.round(255 * denormalise(v, mean, std)).astype(np.uint8))
                                            for v in variants[:2]]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (t.width + 8), 0))
    return strip


def deletion(head_pt: str, test: Path, weights: Path, n: int, share: float, fill: str, batch: int, seed: int,
             precision: str, examples: Path = None, n_examples: int = 0) -> dict:
    from pipeline.data.folders import list_image_folder, stratified_order
    from pipeline.data.image_reader import Item
    from pipeline.models.predict import iter_log_proba, read_images
    from pipeline.models.whole_models import load_model, map_grid, network, split_extras, split_maps

    listing = list_image_folder(test)
    order = stratified_order(listing.labels, seed)
    chosen = [listing.files[i] for i in (order[:n] if n else order)]
    lm = load_model(head_pt, str(weights))
    explained = network(lm, "cpu", precision, maps=True)
    plain = network(lm, "cpu", precision)
    grid, k = map_grid(lm), len(lm.classes)
    items = read_images([(f.path, f.label) for f in chosen], lm.transform, explained, batch, 0, listing.root)
    rng = np.random.default_rng(seed)
    drops = {kind: [] for kind in KINDS}
    flips, correct, started = {kind: 0 for kind in KINDS}, 0, time.time()

    def score(pending) -> None:
        """The blanked photos of ``pending`` (photo, its log-probabilities, its variants) through the plain
        network (the one loop, on tensors), and each variant's drop of the photo's class."""
        nonlocal correct
        variants = (Item(i, v, -1, f"<blanked {i}>") for i, v in enumerate(v for *_, vs in pending for v in vs))
        again = [split_extras(out, k)[0] for _, out in iter_log_proba(plain, variants, batch)]
        for j, (g, logp, _) in enumerate(pending):
            c = int(logp.argmax())
            correct += c == g.label
            for m, kind in enumerate(KINDS):
                after = again[len(KINDS) * j + m]
                drops[kind].append(float(np.exp(logp[c]) - np.exp(after[c])))
                flips[kind] += int(after.argmax()) != c

    pending = []
    for g, out in iter_log_proba(explained, items, batch):  # the photo's class, probability and map: one pass
        if out is None:
            continue
        rest, cam = split_maps(out, grid)
        variants = blanked(g.image, cam, share, fill, rng)
        if examples and g.position < n_examples:
            examples.mkdir(parents=True, exist_ok=True)
            example_strip(lm.transform, g.image, cam, variants).save(
                examples / f"{test.parent.name}-{test.name}-{g.position}.png")
        pending.append((g, split_extras(rest, k)[0], variants))
        if len(pending) == batch:
            score(pending)
            pending = []
    score(pending)
    d = {kind: np.array(v) for kind, v in drops.items()}
    photos = len(d["hot"])
    return {"photos": photos, "accuracy": correct / photos, "seconds": round(time.time() - started, 1),
            "hot_beats_cold": float((d["hot"] > d["cold"]).mean()),
            "hot_beats_random": float((d["hot"] > d["random"]).mean()),
            **{f"mean_drop_{kind}": float(d[kind].mean()) for kind in KINDS},
            **{f"median_drop_{kind}": float(np.median(d[kind])) for kind in KINDS},
            **{f"class_changed_{kind}": flips[kind] / photos for kind in KINDS}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data", default="../shared/data", type=Path)
    p.add_argument("--weights", default="../shared/weights/vgg16_features_imagenet.pt", type=Path)
    p.add_argument("--cache-dir", default="features", type=Path, help="where extract keeps caches (its default)")
    p.add_argument("--reuse", action="append", default=[], help="more folders to find the training caches in")
    p.add_argument("--proxy", action="append", choices=sorted(PROXIES), help="default: both")
    p.add_argument("--head", default="auto", help="fit-head --head (auto: the default SVM + logreg blend)")
    p.add_argument("--n", type=int, default=100, help="test photos per proxy (stratified, seeded); 0 = all")
    p.add_argument("--share", type=float, default=0.2, help="share of the pixels blanked")
    p.add_argument("--fill", choices=("mean", "blur"), default="mean")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write the results as JSON here too")
    p.add_argument("--examples", type=Path, help="write the first few photos as strips here: map, hot and cold blanked")
    p.add_argument("--n-examples", type=int, default=4)
    args = p.parse_args(argv)

    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    results = {}
    for proxy in args.proxy or sorted(PROXIES):
        train, test = (args.data / part for part in PROXIES[proxy])
        cache = find_cache(train, args.weights, [args.cache_dir, *args.reuse])
        with tempfile.TemporaryDirectory() as runs:
            head = fit_head(FitHeadConfig(cache=cache, head=args.head, runs_dir=runs)).checkpoint
            results[proxy] = {"head": args.head, "fill": args.fill, "share": args.share,
                              **deletion(head, test, args.weights, args.n, args.share, args.fill, args.batch_size,
                                         args.seed, args.precision, args.examples, args.n_examples)}
        print(json.dumps({proxy: results[proxy]}), file=sys.stderr)
    print("| test folder | photos | head accuracy | hot > cold | hot > random | mean drop: hot | cold | random "
          "| class changed: hot | cold |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for proxy, r in results.items():
        print(f"| {PROXIES[proxy][1]} | {r['photos']} | {r['accuracy']:.3f} | {r['hot_beats_cold']:.1%} | "
              f"{r['hot_beats_random']:.1%} | {r['mean_drop_hot']:.3f} | {r['mean_drop_cold']:.3f} | "
              f"{r['mean_drop_random']:.3f} | {r['class_changed_hot']:.1%} | {r['class_changed_cold']:.1%} |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
