"""The audit on noisy copies of the proxies: recall of injected wrong labels, injected leaks found.

For each proxy (a training cache and a test cache of the same photos as in ../shared): 5 % of the
training labels are moved to another class (seeded; the rows' features do not change when a photo
changes folder, which is what extract's reuse by content relies on, so the labels are moved in memory),
and 12 training photos are copied into the test set resized to half, re-encoded at JPEG quality 50,
cropped to 90 % or cut at one side and shrunk (``VARIANTS``; only these 12 are extracted, with the
training cache's backbone, weights and precision). Prints recall of the injected labels in the top k
and top 2k (k = number injected) for the audit's ranking (out-of-fold probabilities of the default
kernel head) and for the reference (cleanlab's find_label_issues ranking on out-of-fold probabilities of
a plain scikit-learn LogisticRegression, standardised avg rows), and the leaks found vs injected.
``python bench/audit_noisy.py [--weights W]``; caches from AUDIT_CACHES (default /tmp/h20/caches).
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CACHES = Path(os.environ.get("AUDIT_CACHES", "/tmp/h20/caches"))
PROXIES = {  # name: (training cache, test cache)
    "catsdogs": ("vgg16-nall-3fa45b23bc7d.h5", "vgg16-nall-30d8dc471e99.h5"),
    "caltech20": ("vgg16-nall-f4ddfd2a57e0.h5", "vgg16-nall-9b7add06132f.h5"),
    "scenes6": ("vgg16-nall-a0380f303f9c.h5", "vgg16-nall-62710555e679.h5"),
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
    r = extract(ExtractConfig(data=str(folder), n=0, weights=weights or made["weights"], cache_dir=str(workdir),
                              dtype=made["dtype"], precision=made["precision"], workers=1))
    with FeatureCache(r["cache"]) as c:
        at = {p: j for j, p in enumerate(c.paths)}
        _, near = rows(c)
        return near[[at[n] for n in names]]


def run(name, weights, workdir):
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.reports import duplicates as dup
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
        copies = leak_rows(train, picks, weights, workdir)
        x = dup.l2_rows(near)
        clean_cross = dup.similar_pairs(dup.l2_rows(test_near), x, k=1)["pairs"]
        cross = dup.similar_pairs(dup.l2_rows(np.concatenate([test_near, copies])), x, k=1)["pairs"]
        n_test = len(test_near)
        found = {(int(a) - n_test, int(b)) for a, b in zip(*cross[:2]) if a >= n_test}
        injected = {(j, int(picks[j])) for j in range(LEAKS)}
        other = [(test.paths[a], train.paths[b], round(float(s), 4)) for a, b, s in zip(*clean_cross)]
        within = dup.similar_pairs(x, k=1)["pairs"]
        print(f"{name}: {len(y)} training rows, {k} labels moved; audit head {ours['setting']} "
              f"({ours['seconds']:.1f} s)")
        print(f"  label errors: top-k recall {recall_at(ours['ranking'], wrong, k):.3f} (reference "
              f"{recall_at(ref_rank, wrong, k):.3f}), top-2k {recall_at(ours['ranking'], wrong, 2 * k):.3f} "
              f"(reference {recall_at(ref_rank, wrong, 2 * k):.3f}); flagged {len(ours['flagged'])} "
              f"(reference {len(ref_flagged)}), of them injected {len(set(ours['flagged']) & set(wrong))}")
        print(f"  leaks: {len(found & injected)} of {len(injected)} injected found, "
              f"{len(found - injected)} false among the injected copies; pairs between the original folders "
              f"(not injected): {len(other)} {other[:6]}")
        print(f"  near duplicates within the training folder: {len(within[0])} pairs "
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
