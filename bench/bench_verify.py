#!/usr/bin/env python
"""What ``extract --verify`` costs: sha256 of every image of a folder, as a hit checks a cache's rows.

    python bench/bench_verify.py ../shared/data/catsdogs

Reads the files once first (so the figures are from the page cache: a cold disk adds its read time),
then hashes them on one thread (``file_digest``) and as a hit does (``freshness.edited_rows``: a thread
per core, up to 8), and prints MB/s and what 25,000 photos of the folder's mean size would take.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from pipeline.cache.freshness import edited_rows
    from pipeline.data.folders import list_image_folder
    from pipeline.data.image_reader import file_digest

    listing = list_image_folder(a.folder)
    paths = [f.path for f in listing.files]
    size = sum(f.size for f in listing.files)
    for path in paths:
        (listing.root / path).read_bytes()
    for label, run in (("one thread", lambda: [file_digest(listing.root / q) for q in paths]),
                       ("edited_rows", lambda: edited_rows(listing.root, paths, ["?"] * len(paths)))):
        best = min(_seconds(run) for _ in range(a.repeat))
        per_photo = best / len(paths)
        print(f"{label}: {len(paths)} files, {size / 1e6:.1f} MB in {best:.3f} s: {size / 1e6 / best:.0f} MB/s; "
              f"25,000 such photos ({25000 * size / len(paths) / 1e9:.2f} GB) {25000 * per_photo:.1f} s")


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
