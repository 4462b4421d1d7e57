"""Does a command's memory grow only with its rows, and does it keep saying how far it is? Ratios at two sizes.

``python bench/scale_rss.py [--small 2500] [--factor 10] [--workdir DIR] [--commands extract fit-head ...]``
generates two ImageFolders of noisy JPEGs (4 classes, 64-160 px, 1 file in 83 empty, truncated or not an image),
``small`` and ``factor`` x ``small`` files, and runs each command on both with the tiny random-weight backbone
(tests/tiny.py), so the tool's own overheads dominate the network's. Per command it prints the peak RSS of the
large run over the small one's, the RSS added per added row (KB; a row of the tiny backbone's cache is 1 KB as
float16, its avg view 32 bytes), the wall-time ratio (10 = linear in the rows) and the longest time between two
stderr lines of the large run (over 10 s is a silence the progress rules forbid). Each run's stdout is checked to
hold no progress line. Slow to run (a few minutes at the defaults on 2 cores); nothing here is an absolute claim.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"cat": (200, 80, 40), "dog": (40, 160, 60), "bird": (40, 60, 200), "fish": (180, 180, 40)}


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` files in four class folders; one in 83 broken (empty, truncated, random bytes), a few non-ASCII names."""
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = list(CLASSES)[i % 4]
        path = root / c / (f"{c}.{i}.jpg" if i % 997 else f"фото_{i}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(64, 161, 2))
        pixels = rng.normal(np.array(CLASSES[c], float) + rng.normal(0, 40, 3), 35, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)
        broken = i % 83
        if broken == 1:
            path.write_bytes(b"")
        elif broken == 2:
            path.write_bytes(path.read_bytes()[:200])
        elif broken == 3:
            path.write_bytes(rng.bytes(500))
    return root


def run(args: list, cwd: Path) -> dict:
    """One CLI run: {rss_mb, seconds, gap (longest time without a stderr line), stdout_progress, rc}."""
    code = "import sys, tests.tiny; sys.argv = ['cli.py'] + sys.argv[1:]; import cli; cli.cli()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    stamps, out = [started], []
    readers = [threading.Thread(target=lambda: [stamps.append(time.monotonic()) for _ in p.stderr]),
               threading.Thread(target=lambda: out.extend(p.stdout))]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    stamps.append(time.monotonic())
    return {"rss_mb": usage.ru_maxrss / 1024, "seconds": stamps[-1] - started, "rc": p.returncode,
            "gap": max(b - a for a, b in zip(stamps, stamps[1:])),
            "stdout_progress": sum(("%)" in line and "/s" in line) for line in out)}


def commands(data: Path, tag: str) -> dict:
    """Each command's arguments on ``data`` (``tag`` keeps the two sizes' caches and outputs apart)."""
    tiny = ["--backbone", "tiny", "--weights", "none"]
    cache_dir = ["--cache-dir", f"features-{tag}"]
    return {"extract": ["extract", "--data", str(data), "-n", "0", *tiny, *cache_dir],
            "fit-head": ["fit-head", *cache_dir, "--runs-dir", f"runs-{tag}"],
            "predict": ["predict", "--model", f"runs-{tag}/head.pt", str(data), "--output", f"pred-{tag}.csv"],
            "evaluate": ["evaluate", "--model", f"runs-{tag}/head.pt", "--data", str(data), "--runs-dir",
                         f"runs-{tag}"],
            "audit": ["audit", "--data", str(data), *tiny, *cache_dir, "--runs-dir", f"runs-{tag}"],
            "check-images": ["check-images", str(data)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2500)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--workdir", default=f"/tmp/{os.environ.get('USER', 'bench')}/scale_rss")
    ap.add_argument("--commands", nargs="+", default=["extract", "fit-head", "predict", "evaluate"],
                    help="also: audit (after extract), check-images")
    a = ap.parse_args()
    work = Path(a.workdir)
    sizes = {"small": a.small, "large": a.small * a.factor}
    found: dict = {}
    for tag, n in sizes.items():
        data = make_folder(work / f"data-{n}", n)
        for name in a.commands:
            if name in ("predict", "evaluate") and not (work / f"runs-{tag}" / "head.pt").exists():
                heads = sorted((work / f"runs-{tag}").glob("*-fit-head/head.pt"))
                if heads:
                    (work / f"runs-{tag}" / "head.pt").symlink_to(heads[-1].resolve())
            found[tag, name] = r = run(commands(data, tag)[name], work)
            if r["rc"]:
                sys.exit(f"{name} on {n} files failed (exit {r['rc']})")
    added = sizes["large"] - sizes["small"]
    print(f"{'command':<10} {'RSS large/small':>15} {'KB per added file':>18} {'wall large/small':>16} "
          f"{'longest silence (s)':>20} {'progress on stdout':>19}")
    for name in a.commands:
        s, big = found["small", name], found["large", name]
        print(f"{name:<10} {big['rss_mb'] / s['rss_mb']:>15.2f} {(big['rss_mb'] - s['rss_mb']) * 1024 / added:>18.2f} "
              f"{big['seconds'] / s['seconds']:>16.1f} {big['gap']:>20.1f} {big['stdout_progress']:>19}")
    print(f"({sizes['small']} and {sizes['large']} files; the tiny backbone's row is 1 KB as float16)")


if __name__ == "__main__":
    main()
