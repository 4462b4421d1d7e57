"""Benchmark: fit-head's streaming read of a float16 cache vs a raw sequential h5py read of the same file.

Writes a synthetic cache (``--rows`` x 512 x 7 x 7 float16, VGG-16's feature shape; 25k rows are
1.25 GB) with the real CacheWriter, then, each in its own subprocess (for its own peak RSS):
  raw     -- h5py, sequential slices of ``--block-rows``, nothing else
  stream  -- FeatureCache.iter_batches over the training split as fit-head calls it (blocks in
             random order, rows shuffled within each)
  epoch   -- one real fit_head epoch (train + validation pass) on the cache
  default -- the default head (fit-head with no options: the SVM + logreg stack, CV, refit, calibration and
             the unknown score), wall seconds and peak RSS: under 2 minutes and 4 GB at 25,000 rows on 2 cores
raw and stream time ``--repeat`` passes each over an already open file (one pass = one epoch's
read; opening and validating the cache is once per run) and report the median pass.
Prints a table (rows/s, MB/s, ratio to raw, peak RSS) and, with --json-out, JSON.

    python bench/bench_fit_head.py --rows 25000 --json-out bench-fit-head.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (512, 7, 7)
KINDS = ("raw", "stream", "epoch", "default")


def make_cache(path: Path, rows: int, block: int = 1024) -> None:
    """A complete cache of separable random rows (two classes), written block by block."""
    from pipeline.cache.feature_cache import CacheWriter
    from pipeline.cache.provenance import Preprocessing, Provenance

    pre = Preprocessing(256, 224, "bilinear", True, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    attrs = {**Provenance("vgg16", "synthetic", "", "all", "", pre, ("a", "b"), "none", str(path.parent),
                          "synthetic").cache_attrs(),
             "fingerprint": "bench", "seed": 0, "n_requested": rows, "dtype": "float16",
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(SHAPE).astype(np.float32)
    with CacheWriter(path, attrs) as w:
        for s in range(0, rows, block):
            k = min(block, rows - s)
            y = rng.integers(0, 2, k)
            x = rng.standard_normal((k, *SHAPE), dtype=np.float32) + 0.05 * (2 * y - 1)[:, None, None, None] * direction
            w.append(x.astype(np.float16), y.tolist(), [f"{i}.jpg" for i in range(s, s + k)], s + k)
        w.finish()


def child(kind: str, path: str, block_rows: int, batch: int, repeat: int) -> dict:
    """Time ``kind`` in this process; raw and stream: ``repeat`` passes, the median reported.

    Only the pass itself is timed: opening the file (for the stream, FeatureCache's validation,
    the labels and the split) happens once per fit-head run, not per epoch, and stays outside the
    clock for both readers alike.
    """
    import resource

    import h5py

    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.heads.epoch_loop import split_indices
    from pipeline.heads.fit_head import FitHeadConfig, fit_head

    times = []
    if kind == "raw":
        with h5py.File(path, "r") as f:
            d = f["features"]
            n = d.shape[0]
            for _ in range(repeat):
                t0 = time.perf_counter()
                for s in range(0, n, block_rows):
                    d[s:s + block_rows]
                times.append(time.perf_counter() - t0)
    elif kind == "stream":
        with FeatureCache(path) as c:
            train, _ = split_indices(c.labels, 0.125, 0)
            n = len(train)
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in c.iter_batches(train, batch, block_rows, np.random.default_rng(0)):
                    pass
                times.append(time.perf_counter() - t0)
    elif kind == "default":
        with tempfile.TemporaryDirectory() as runs:
            t0 = time.perf_counter()
            r = fit_head(FitHeadConfig(cache=path, block_rows=block_rows, runs_dir=runs))
            times.append(time.perf_counter() - t0)  # the whole command's work (reading the rows included)
        n = r.train_rows + r.val_rows
    else:
        with tempfile.TemporaryDirectory() as runs:
            r = fit_head(FitHeadConfig(cache=path, epochs=1, block_rows=block_rows, batch_size=batch, runs_dir=runs,
                                       features="flat", normalize="rms", patience=0))  # the streaming path
        n = r.train_rows + r.val_rows
        times.append(r.fit_seconds)  # without torch's import
    seconds = float(np.median(times))
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return {"rows": n, "seconds": seconds, "all_seconds": times, "rows_per_s": n / seconds,
            "mb_per_s": n * np.prod(SHAPE) * 2 / seconds / 1e6, "rss_mb": hwm / 1024,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(kind: str, a, path: Path) -> dict:
    print(f"[bench] {kind}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--cache", str(path), "--block-rows",
                          str(a.block_rows), "--batch", str(a.batch), "--repeat", str(a.repeat)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=25000, help="rows of the synthetic cache (25000 = 1.25 GB)")
    p.add_argument("--block-rows", type=int, default=2048, help="fit-head's --block-rows")
    p.add_argument("--batch", type=int, default=32, help="fit-head's --batch-size")
    p.add_argument("--repeat", type=int, default=5, help="timed passes of raw and stream (median reported)")
    p.add_argument("--dir", help="where to write the cache (default: a temp folder, removed after)")
    p.add_argument("--json-out")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="what to time (default: all)")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.cache, a.block_rows, a.batch, a.repeat)))
        return
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        make_cache(path, a.rows)
        r = {"rows": a.rows, "file_mb": path.stat().st_size / 1e6, "write_s": time.perf_counter() - t0,
             "block_rows": a.block_rows, "repeat": a.repeat}
        run_child("raw", a, path)  # warm the page cache so every reader below sees the same state
        for kind in a.kinds:
            r[kind] = run_child(kind, a, path)
    for kind in ("stream", "epoch"):
        if kind in r and "raw" in r:
            r[kind]["ratio_to_raw"] = r[kind]["rows_per_s"] / r["raw"]["rows_per_s"]
    w = 38
    print(f"| {'cache':<{w}} | {a.rows} rows x {'x'.join(map(str, SHAPE))} float16, {r['file_mb']:.0f} MB |")
    for kind, what in (("raw", "raw sequential h5py read"), ("stream", "fit-head streaming (iter_batches, shuffled)"),
                       ("epoch", "one fit-head epoch (train + val)"), ("default", "the default head, whole fit")):
        if kind not in r:
            continue
        x = r[kind]
        ratio = f", {x['ratio_to_raw']:.2f}x raw" if "ratio_to_raw" in x else ""
        print(f"| {what:<{w}} | {x['seconds']:.2f} s, {x['rows_per_s']:.0f} rows/s, {x['mb_per_s']:.0f} MB/s{ratio}, "
              f"peak RSS {x['rss_mb']:.0f} MB |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
