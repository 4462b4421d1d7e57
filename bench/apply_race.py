"""Two audit --apply at once on one folder, on a slow disk: how many photos are left.

A folder of 3 + 2 x PHOTOS generated JPEGs (blue, green, red); list A relabels every green photo
into blue as new.<i>.jpg, list B every red photo into the same names. Both run at once as two
processes, each with every fsync slowed to FSYNC_MS (a network disk). Prints the files before and
after, what each apply answered, and the seconds. Issue 31 measured 803 -> 605 files (before the
folder lock and the moves that never replace); nothing may be lost.
``python bench/apply_race.py [--photos 400] [--fsync-ms 50]``
"""
import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, photos: int) -> None:
    rng = np.random.default_rng(0)
    for c, n in (("blue", 3), ("green", photos), ("red", photos)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{c}.{i}.jpg")


def apply_slowly(fixes: str, data: str, out: str, fsync_ms: float, answers) -> None:
    from pipeline.data.apply_fixes import apply_fixes

    real = os.fsync
    os.fsync = lambda fd: (time.sleep(fsync_ms / 1000), real(fd))[1]
    try:
        answers[fixes] = f"moved {apply_fixes(fixes, data, Path(out)).moved}"
    except Exception as e:  # noqa: BLE001 - the answer is what is measured
        answers[fixes] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--fsync-ms", type=float, default=50.0)
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="apply-race-"))
    data = top / "data"
    make_folder(data, args.photos)
    lists = []
    for c in ("green", "red"):
        lists.append(top / f"{c}.csv")
        lists[-1].write_text("path,action,new_class,new_name\n" +
                             "".join(f"{c}/{c}.{i}.jpg,relabel,blue,new.{i}.jpg\n" for i in range(args.photos)))
    before = sum(1 for p in data.rglob("*") if p.is_file())
    answers = mp.Manager().dict()
    t0 = time.time()
    procs = [mp.Process(target=apply_slowly,
                        args=(str(f), str(data), str(top / f"run-{f.stem}"), args.fsync_ms, answers)) for f in lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    after = sum(1 for p in data.rglob("*") if p.is_file())
    print(f"files before {before}, after {after} ({time.time() - t0:.1f} s; fsync {args.fsync_ms:g} ms)")
    for f in lists:
        print(f"  {f.name}: {answers.get(str(f))}")


if __name__ == "__main__":
    main()
