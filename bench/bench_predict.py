"""Benchmark: the one-offs paid once, and predict (and serve) beside extract's steady rate, in one run.

Each step is the CLI in a fresh process, timed whole (Python start-up included):

1. ``extract --n N`` with the defaults into an empty project (its first ever run: calibration and a cold
   compile where ``auto`` picks int8 + compile), then the same extract into a new cache folder sharing the
   first one's one-offs folder (``PIPELINE_ONEOFFS_DIR``): a fresh process with a warm project cache.
2. the tutorial's loop on ``--tutorial-n`` of the same photos (bench_extract's), for the "x tutorial" ratios.
3. ``fit-head`` on the first cache, then ``predict`` of ``--predict-n`` photos of another folder in a fresh
   process (whole-process img/s, and predict's rate after its start-up: model load and one-offs), against
   extract's steady img/s; with ``--serve``, ``bench_serve.py``'s 8 clients against the same head.

    python bench/bench_predict.py --n 1000 --predict-n 400 --work-dir /tmp/bench-predict
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def cli(args: list, env: dict) -> tuple[float, str, str]:
    """(seconds, stdout, stderr) of ``python cli.py ARGS`` in a fresh process."""
    print(f"[bench] cli.py {' '.join(args[:1])} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    seconds = time.perf_counter() - started
    if r.returncode:
        sys.exit(f"cli.py {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return seconds, r.stdout, r.stderr


def extract(a, cache_dir: Path, oneoffs: Path) -> dict:
    seconds, out, err = cli(["extract", "--data", a.data, "--n", str(a.n), "--weights", a.weights,
                             "--cache-dir", str(cache_dir), "--json"], {"PIPELINE_ONEOFFS_DIR": str(oneoffs)})
    r = json.loads(out)
    return {"process_seconds": seconds, "whole_process_img_per_s": r["computed"] / seconds,
            "steady_img_per_s": r["img_per_s"], "precision": r["precision"], "compiled": r["compiled"],
            "compile_seconds": r["compile_seconds"], "compile_cache": r.get("compile_cache", ""),
            "calibration_seconds": r.get("calibration_seconds", 0.0),
            "calibration_reused": r.get("calibration_reused", ""), "decoding": r.get("decoding", ""),
            "cache": r["cache"], "stderr": [line for line in err.splitlines() if "precision auto" in line
                                            or line.startswith("extracted")]}


def tutorial(a, work: Path, cache: str) -> dict:
    """bench_extract's tutorial loop on the first ``tutorial_n`` photos of the cache (fp32, batch 8)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.cache.feature_cache import FeatureCache

    with FeatureCache(cache) as c:
        paths = list(c.paths[:a.tutorial_n])
    listing = work / "tutorial-paths.json"
    listing.write_text(json.dumps(paths))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_extract.py"), "--child", "tutorial", "--device",
                        "cpu", "--data", a.data, "--weights", a.weights, "--backbone", "vgg16", "--paths",
                        str(listing)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        sys.exit(f"tutorial failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def predict(a, head: str, oneoffs: Path) -> dict:
    photos = sorted(str(p) for p in Path(a.predict_data).rglob("*.jpg"))[:a.predict_n]
    seconds, out, err = cli(["predict", "--model", head, "--format", "json", *photos],
                            {"PIPELINE_ONEOFFS_DIR": str(oneoffs)})
    rows = json.loads(out)
    return {"photos": len(photos), "rows": len(rows) if isinstance(rows, list) else None,
            "process_seconds": seconds, "whole_process_img_per_s": len(photos) / seconds,
            "stderr_tail": err.splitlines()[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "data" / "catsdogs"))
    p.add_argument("--predict-data", default=str(SHARED / "data" / "catsdogs_test"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "vgg16_features_imagenet.pt"))
    p.add_argument("--n", type=int, default=1000, help="photos extract takes (the defaults decide the path)")
    p.add_argument("--predict-n", type=int, default=400)
    p.add_argument("--tutorial-n", type=int, default=128, help="photos the tutorial loop is timed on")
    p.add_argument("--serve", action="store_true", help="also bench_serve.py's 8 clients on the head")
    p.add_argument("--work-dir", default="/tmp/bench-predict")
    p.add_argument("--json-out")
    a = p.parse_args()
    work = Path(a.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    oneoffs = work / "oneoffs"  # empty: the first extract is a project's first ever run
    r = {"load_average": os.getloadavg(), "cores": os.cpu_count()}
    r["extract_first"] = extract(a, work / "features-first", oneoffs)
    r["extract_warm"] = extract(a, work / "features-warm", oneoffs)
    r["tutorial"] = tutorial(a, work, r["extract_first"]["cache"])
    _, out, _ = cli(["fit-head", "--cache", r["extract_first"]["cache"], "--head", "linear", "--runs-dir",
                     str(work / "runs"), "--json"], {})
    head = json.loads(out)["checkpoint"]
    r["predict"] = predict(a, head, oneoffs)
    if a.serve:
        s = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--model", head, "--clients", "8"],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_ONEOFFS_DIR": str(oneoffs)})
        r["serve"] = {"returncode": s.returncode, "stdout_tail": s.stdout.splitlines()[-12:]}
    r["load_average_after"] = os.getloadavg()
    steady = r["extract_warm"]["steady_img_per_s"]
    tut = r["tutorial"]["img_per_s"]
    print(f"{r['cores']} cores, load average {r['load_average'][0]:.1f} -> {r['load_average_after'][0]:.1f}")
    for k in ("extract_first", "extract_warm"):
        e = r[k]
        print(f"{k}: {e['precision']}{'+compile' if e['compiled'] else ''}, whole process "
              f"{e['whole_process_img_per_s']:.2f} img/s ({e['whole_process_img_per_s'] / tut:.2f}x tutorial), steady "
              f"{e['steady_img_per_s']:.2f}; calibration {e['calibration_seconds']:.1f} s"
              f"{' reused' if e['calibration_reused'] else ''}, compile {e['compile_seconds']:.1f} s "
              f"({e['compile_cache'] or '-'}); {e['decoding']}")
    print(f"tutorial loop: {tut:.2f} img/s ({a.tutorial_n} photos)")
    q = r["predict"]
    print(f"predict {q['photos']} photos, fresh process: {q['whole_process_img_per_s']:.2f} img/s whole process, "
          f"{q['whole_process_img_per_s'] / steady:.2f}x extract's steady {steady:.2f}")
    if a.serve:
        print("\n".join(r["serve"]["stdout_tail"]))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
