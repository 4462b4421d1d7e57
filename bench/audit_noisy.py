"""The audit on noisy copies of the proxies: recall of injected wrong labels, injected leaks found.

For each proxy (a training cache and a test cache of the same photos as in ../shared): 5 % of the
training labels are moved to another class (seeded; the rows' features do not change when a photo
changes folder, which is what extract's reuse by content relies on, so the labels are moved in memory),
and 12 training photos are copied into the test set resized to half, re-encoded at JPEG quality 50,
cropped to 90 % or cut at one side and shrunk (``VARIANTS``; only these 12 are extracted, with the
training cache's backbone, weights and precision). Prints recall of the injected labels in the top k
and top 2k (k = number injected) for the audit's ranking (out-of-fold probabilities of the default
kernel head) and for the reference (cleanlab's find_label_issues ranking on out-of-fold probabilities of
a plain scikit-learn LogisticRegression, standardised avg rows), and the leaks: the audit's own rule
(max-view cosine >= NEAR_DUPLICATE, confirmed by the layout check ``audit.confirmed``) on the test folder
with the copies added: recall (injected copies found) and every reported pair, so that the pairs between
the original folders can be looked at (precision = reported pairs that are copies / reported pairs).
``python bench/audit_noisy.py [--weights W] [proxies...]``; caches from AUDIT_CACHES (default
/work/fcache/i33: VGG-16 from ../shared/weights, all photos; food10's int8, the others bf16).
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CACHES = Path(os.environ.get("AUDIT_CACHES", "/work/fcache/i33"))
PROXIES = {  # name: (training cache, test cache)
    "catsdogs": ("vgg16-nall-277deaa51f09.h5", "vgg16-nall-8c8823214b51.h5"),
    "caltech20": ("vgg16-nall-edb6ee958551.h5", "vgg16-nall-b83469320683.h5"),
    "food10": ("vgg16-nall-15954980616a.h5", "vgg16-nall-9d1893c8c96e.h5"),
    "scenes6": ("vgg16-nall-7630424dfbd3.h5", "vgg16-nall-891d2afaeea2.h5"),
}
NOISE, LEAKS = 0.05, 12
VARIANTS = ("half", "q50", "crop90", "side")


def variant(im: Image.Image, kind: str) -> Image.Image:
    w, h = im.size
    if kind == "half":
        return im.resize((w // 2, h // 2), Image.BILINEAR)
    if kind == "crop90":
        return im.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    if kind == "side":
        return im.crop((0, 0, w - w // 10, h)).resize((int(w * 0.6), int(h * 0.6)))
    return im


def rows(cache):
    from pipeline.reports.audit import pooled

    avg, near = pooled(cache)
    return avg, near


def leak_rows(train, picks, weights, workdir):
    """Features of the injected copies (extracted like the training cache), in pick order."""
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.extraction.extract import ExtractConfig, extract

    root = Path(train.attrs["data_root"])
    folder = Path(workdir) / "leaks"
    names = []
    for k, i in enumerate(picks):
        rel = train.paths[i]
        kind = VARIANTS[k % len(VARIANTS)]
        dest = folder / rel.split("/")[0] / f"leak{k}-{kind}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        variant(Image.open(root / rel).convert("RGB"), kind).save(dest, quality=50 if kind == "q50" else 85)
        names.append(f"{dest.parent.name}/{dest.name}")
    if len(list(folder.iterdir())) < 2:  # extract wants two classes
        (folder / "zz_other").mkdir()
        shutil.copy(root / train.paths[0], folder / "zz_other" / "x.jpg")
    made = json.loads(train.attrs["config"])
    int8 = {k: made[k] for k in ("calib_n", "seed") if k in made} if made["precision"] == "int8" else {}
    r = extract(ExtractConfig(data=str(folder), n=0, weights=weights or made["weights"], cache_dir=str(workdir),
                              dtype=made["dtype"], precision=made["precision"], workers=1,
                              **({**int8, "calib_data": made.get("calib_data") or str(root)} if int8 else {})))
    with FeatureCache(r.cache) as c:
        at = {p: j for j, p in enumerate(c.paths)}
        _, near = rows(c)
        return near[[at[n] for n in names]], Path(r.cache), np.array([at[n] for n in names])


def run(name, weights, workdir):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.reports import duplicates as dup
    from pipeline.reports.audit import confirmed
    from pipeline.reports.label_issues import label_issues, rank_label_issues, recall_at, reference_out_of_fold

    train_name, test_name = PROXIES[name]
    with FeatureCache(CACHES / train_name) as train, FeatureCache(CACHES / test_name) as test:
        avg, near = rows(train)
        y = np.asarray(train.labels, np.int64)
        k_classes = len(train.classes)
        rng = np.random.default_rng(0)
        wrong = np.sort(rng.choice(len(y), round(NOISE * len(y)), replace=False))
        noisy = y.copy()
        noisy[wrong] = (y[wrong] + rng.integers(1, k_classes, len(wrong))) % k_classes
        ours = label_issues(avg, noisy, train.classes)
        ref_flagged, ref_rank, _ = rank_label_issues(noisy, reference_out_of_fold(avg, noisy, k_classes))
        k = len(wrong)
        picks = rng.choice(np.setdiff1d(np.arange(len(y)), wrong), LEAKS, replace=False)
        _, test_near = rows(test)
        copies, copies_path, copy_rows = leak_rows(train, picks, weights, workdir)
        x = dup.l2_rows(near)
        clean = dup.similar_pairs(dup.l2_rows(test_near), x, k=1)["pairs"]
        clean_kept, clean_refused = confirmed(clean, test.path, train.path)
        planted = dup.similar_pairs(dup.l2_rows(copies), x, k=1)["pairs"]
        # the copies' maps are in their own cache: confirm them against it (rows in copy order)
        kept, refused = confirmed((copy_rows[planted[0]], planted[1], planted[2]), copies_path, train.path)
        order = {int(r): j for j, r in enumerate(copy_rows)}
        found = {(order[int(a)], int(b)) for a, b in zip(*kept[:2])}
        injected = {(j, int(picks[j])) for j in range(LEAKS)}
        other = [(test.paths[a], train.paths[b], round(float(s), 4)) for a, b, s in zip(*clean_kept)]
        reported = len(found) + len(other)
        with FeatureCache(copies_path) as cc:  # each copy's layout similarity to its original
            from pipeline.reports.audit import read_maps

            layout = dup.layout_similarity(read_maps(cc, copy_rows), read_maps(train, picks))
        print("  planted copies' layout similarity to their original: " + ", ".join(
            f"{VARIANTS[j % len(VARIANTS)]} {v:.3f}" for j, v in enumerate(layout)))
        within, within_refused = confirmed(dup.similar_pairs(x, k=1)["pairs"], train.path, train.path)
        print(f"{name}: {len(y)} training rows, {k} labels moved; audit head {ours['setting']} "
              f"({ours['seconds']:.1f} s)")
        print(f"  label errors: top-k recall {recall_at(ours['ranking'], wrong, k):.3f} (reference "
              f"{recall_at(ref_rank, wrong, k):.3f}), top-2k {recall_at(ours['ranking'], wrong, 2 * k):.3f} "
              f"(reference {recall_at(ref_rank, wrong, 2 * k):.3f}); flagged {len(ours['flagged'])} "
              f"(reference {len(ref_flagged)}), of them injected {len(set(ours['flagged']) & set(wrong))}")
        print(f"  leaks: recall {len(found & injected)}/{len(injected)} injected copies found "
              f"({len(set(planted[0].tolist()) & set(copy_rows.tolist()))} above the threshold, {refused} candidate "
              f"pairs refused by the layout check); reported {reported}: {len(found & injected)} injected, "
              f"{len(found - injected)} other pairs of injected copies, {len(other)} between the original folders "
              f"({clean_refused} candidates refused): {other}")
        print(f"  near duplicates within the training folder: {len(within[0])} pairs ({within_refused} refused) "
              f"{[(train.paths[a], train.paths[b], round(float(s), 3)) for a, b, s in zip(*within)][:6]}")
        return {"name": name, "wrong": [train.paths[i] for i in wrong]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="")
    ap.add_argument("proxies", nargs="*", default=list(PROXIES))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        for name in a.proxies:
            run(name, a.weights, Path(work) / name)


if __name__ == "__main__":
    main()
