"""Benchmark: decode + preprocess per image with and without JPEG DCT-domain downscaling (``draft``).

Modes: ``full`` decodes every file at full size (what extract did before draft decoding); ``draft xK`` lets a large JPEG
decode at 1/2, 1/4 or 1/8 scale keeping its shorter side >= K x the transform's resize size
(``pipeline.data.image_reader.JPEG_DRAFT_MARGIN`` is the K the pipeline uses). Image sets:

* ``real``: photos from ../shared/data/catsdogs as they are (<= 500 px: draft never applies);
* ``up2000`` / ``up4000``: some of those photos upscaled (bicubic) to that long side, JPEG q90:
  large, but smooth (no detail beyond the original's);
* ``s1080``: the same photos upscaled to a *short* side of 1080 (a 1080p frame, a 1440 x 1080
  photo): draft x1 decodes them at 1/4, to a short side of 270, just above the resize's 256,
  so the final resize hardly filters: the worst case for draft x1;
* ``mos4000`` / ``mos1080``: 3000 x 4000 and 1920 x 1080 JPEGs (q90) tiled from photos at their own
  resolution: large *and* detailed at full size, the hard case for a reduced decode.

Large files are written under a temporary directory, removed at the end. Time: the mean per image of
``transform(load_rgb(path, ...))`` in this process with one torch thread (as in a decoding worker),
rounds interleaved across modes; the table gives the median over rounds. Fidelity, vs ``full``: the
max / mean absolute difference of the transformed tensors in 8-bit levels (tensor diff x std x 255),
and the cosine of VGG-16 feature maps (flattened 512x7x7, what extract stores with --pool none).
Not a test: times move with machine load, so compare ratios within one run.

    python bench/bench_decode.py --json-out bench-decode.json
    python bench/bench_decode.py --n-real 20 --n-large 4 --rounds 2 --no-features   # quick
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "catsdogs"
WEIGHTS = SHARED / "weights" / "vgg16_features_imagenet.pt"


def real_photos(data: Path, n: int) -> list[Path]:
    """``n`` photos, alternating classes, in a fixed order."""
    classes = sorted(d for d in data.iterdir() if d.is_dir())
    per = [sorted(c.glob("*.jpg"), key=lambda p: (len(p.name), p.name)) for c in classes]
    out = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    return out[:n]


def upscaled(sources: list[Path], side: int, out: Path, short: bool = False) -> list[Path]:
    """The photos upscaled (bicubic) so that their long (or with ``short``, short) side is ``side``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sources:
        with Image.open(src) as im:
            im = im.convert("RGB")
            s = side / (min(im.size) if short else max(im.size))
            big = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        p = out / f"{src.stem}.{side}.jpg"
        big.save(p, quality=90)
        paths.append(p)
    return paths


def mosaics(pool: list[Path], count: int, out: Path, size=(3000, 4000), tile=250) -> list[Path]:
    """``count`` images of ``size`` (w, h) tiled with ``tile``-px crops of photos at their own resolution
    (each mosaic its own seeded random draw of the crops)."""
    import random

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    crops = []
    for src in pool:
        with Image.open(src) as im:
            im = im.convert("RGB")
            if min(im.size) >= tile:
                x, y = (im.width - tile) // 2, (im.height - tile) // 2
                crops.append(im.crop((x, y, x + tile, y + tile)))
    if not crops:
        return []
    for j in range(count):
        rng = random.Random(j)
        canvas = Image.new("RGB", size)
        for y in range(0, size[1], tile):
            for x in range(0, size[0], tile):
                canvas.paste(rng.choice(crops), (x, y))
        p = out / f"mosaic.{size[0]}x{size[1]}.{j}.jpg"
        canvas.save(p, quality=90)
        paths.append(p)
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--n-real", type=int, default=40, help="real photos timed as they are")
    ap.add_argument("--n-large", type=int, default=8, help="photos upscaled per large size, and mosaics made")
    ap.add_argument("--sizes", default="2000,4000", help="long sides of the upscaled sets")
    ap.add_argument("--margins", default="1,2", help="draft margins K to compare with full decoding")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-features", action="store_true", help="skip the VGG-16 feature cosines")
    ap.add_argument("--json-out")
    a = ap.parse_args(argv)

    import torch

    from pipeline.data.folders import load_rgb
    from pipeline.data.image_reader import JPEG_DRAFT_MARGIN, draft_short_side
    from pipeline.extraction.backbones import load_backbone, load_preprocessing

    torch.set_num_threads(1)
    transform, weights_id = load_preprocessing("vgg16", a.weights)
    base = int(transform.resize_size[0])  # the resize size: draft x1
    pipeline_mode = f"draft x{draft_short_side(transform) // base}"  # what the pipeline does (JPEG_DRAFT_MARGIN)
    modes = {"full": None, **{f"draft x{int(m)}": int(m) * base for m in a.margins.split(",")}}
    std = torch.tensor(transform.std).view(3, 1, 1)

    real = real_photos(Path(a.data), max(a.n_real, 4 * a.n_large))
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        sets = {"real": real[:a.n_real]}
        src = real[:a.n_large]
        for s in (int(x) for x in a.sizes.split(",")):
            sets[f"up{s}"] = upscaled(src, s, Path(tmp) / f"up{s}")
        sets["s1080"] = upscaled(src, 1080, Path(tmp) / "s1080", short=True)
        sets["mos4000"] = mosaics(real, a.n_large, Path(tmp) / "mosaic")
        sets["mos1080"] = mosaics(real, a.n_large, Path(tmp) / "mosaic", size=(1920, 1080))

        def run(paths, mss):
            out = []
            for p in paths:
                out.append(transform(load_rgb(p, mss)))
            return out

        # timing: rounds interleaved across modes (the order rotated each round)
        times = {(s, m): [] for s in sets for m in modes}
        names = list(modes)
        for name in sets:  # warm-up, not counted: imports, file cache, allocator
            for m in names:
                run(sets[name][:2], modes[m])
        for r in range(a.rounds):
            for name in sets:
                order = names[r % len(names):] + names[:r % len(names)]
                for m in order:
                    t0 = time.perf_counter()
                    run(sets[name], modes[m])
                    times[(name, m)].append((time.perf_counter() - t0) / len(sets[name]) * 1000)

        # fidelity vs full decoding
        tensors = {(s, m): run(sets[s], modes[m]) for s in sets for m in modes}
        decoded = {(s, m): [min(load_rgb(p, modes[m]).size) for p in sets[s]] for s in sets for m in modes}
        model = None
        if not a.no_features:
            bb = load_backbone("vgg16", a.weights)
            model = bb.features.eval()

        def features(xs):
            with torch.inference_mode():
                return torch.cat([model(torch.stack(xs[i:i + 8])).flatten(1) for i in range(0, len(xs), 8)])

        rows = []
        for s in sets:
            ref = tensors[(s, "full")]
            ref_f = features(ref) if model is not None else None
            for m in modes:
                xs = tensors[(s, m)]
                diffs = [((x - y).abs() * std * 255) for x, y in zip(xs, ref)]
                same = all(bool(torch.equal(x, y)) for x, y in zip(xs, ref))
                row = {"set": s, "mode": m, "images": len(xs), "ms_per_image": statistics.median(times[(s, m)]),
                       "ms_rounds": times[(s, m)],
                       "speedup": statistics.median(times[(s, "full")]) / statistics.median(times[(s, m)]),
                       "short_side_full": statistics.mean(decoded[(s, "full")]),
                       "short_side_decoded": statistics.mean(decoded[(s, m)]),
                       "max_abs_levels": float(max(d.max() for d in diffs)),
                       "mean_abs_levels": float(statistics.mean(float(d.mean()) for d in diffs)),
                       "identical": same}
                if ref_f is not None:
                    cos = [1.0] * len(xs) if same else torch.nn.functional.cosine_similarity(
                        features(xs), ref_f, dim=1).tolist()
                    row.update(cos_min=min(cos), cos_mean=statistics.mean(cos), cos=cos)
                rows.append(row)

    import subprocess

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"# {platform.python_version()}, torch {torch.__version__}, {cpu}, 1 torch thread; weights {weights_id}; "
          f"resize {base}; the pipeline uses '{pipeline_mode}'; {a.rounds} rounds (median)")
    head = f"{'set':8} {'mode':9} {'imgs':>4} {'short px':>9} {'decoded':>8} {'ms/img':>8} {'speedup':>7} " \
           f"{'max|d|':>7} {'mean|d|':>7} {'cos min':>9} {'cos mean':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cos = f"{r['cos_min']:9.5f} {r['cos_mean']:9.5f}" if "cos_min" in r else f"{'-':>9} {'-':>9}"
        print(f"{r['set']:8} {r['mode']:9} {r['images']:4d} {r['short_side_full']:9.0f} "
              f"{r['short_side_decoded']:8.0f} {r['ms_per_image']:8.2f} {r['speedup']:6.2f}x "
              f"{r['max_abs_levels']:7.2f} {r['mean_abs_levels']:7.3f} {cos}")
    print("max|d|, mean|d|: tensor differences vs 'full' in 8-bit levels; cos: VGG-16 feature maps vs 'full'")
    result = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu, "weights": weights_id,
              "resize_size": base, "pipeline_margin": JPEG_DRAFT_MARGIN, "pipeline_mode": pipeline_mode,
              "rounds": a.rounds, "rows": rows}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
