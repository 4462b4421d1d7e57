"""Benchmark: the prediction service under concurrent clients against predict, and an export's speed.

In one run, on the same photos:

* ``predict``: ``pipeline.predict_files`` in this process (decoding workers, batches of --batch-size):
  img/s over the rows (model loading not counted, as predict reports it);
* ``serve``: ``cli.py serve`` started on a free localhost port, then --clients threads each sending one
  photo per POST /predict until --n photos are answered: img/s (photos / wall time from the first
  request to the last answer) and p50 / p95 latency per request; a warm-up request is not counted.
  Every photo's class is compared with predict's; the server's /health says how many forward passes
  it ran (so the mean batch size the micro-batcher formed);
* ``export`` (with --export FILE.onnx): one batch of --export-batch preprocessed photos through ONNX
  Runtime and through the project's own CPU path (``Inference``, fp32 and the default precision),
  median of --rounds: img/s, and the largest probability difference from fp32.

Loopback only, bounded by --n and --timeout. Not a test: numbers move with the machine's load, so compare
the ratios within one run (and say when the machine was shared).

    python bench/bench_serve.py --model runs/<stamp>-fit-head/head.pt --export catsdogs.onnx \\
        --photos ../shared/data/catsdogs_test --n 400 --clients 8 --json-out bench-serve.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ROOT.parent / "shared" / "data" / "catsdogs_test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_predict(model: str, photos: list[str], args) -> dict:
    import pipeline

    rows = pipeline.predict_files(model, photos, precision=args.precision, batch_size=args.batch_size,
                                  workers=args.workers)
    r = rows.result
    return {"img_per_s": r.img_per_s, "seconds": r.seconds, "classes": [row["class"] for row in rows]}


def start_server(model: str, port: int, args) -> subprocess.Popen:
    prefix = ["-c", "import tests.tiny, cli; cli.cli()"] if args.tiny else [str(ROOT / "cli.py")]
    cmd = [sys.executable, *prefix, "-q", "serve", "--model", model, "--port", str(port), "--precision", args.precision,
           "--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the clients run
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    return proc


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until the service at ``url`` answers /health; SystemExit (with its log, when it keeps one) if it exits or
    takes longer than ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log = getattr(proc, "log", None)
            if log is not None:
                log.seek(0)
            raise SystemExit(f"serve did not start{': ' + log.read()[-2000:] if log is not None else ''}")
        time.sleep(0.2)


def run_serve(model: str, photos: list[str], args) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, args)
    try:
        wait_healthy(url, proc)
        blobs = [Path(p).read_bytes() for p in photos]
        with httpx.Client() as c:  # warm-up: the first forward pass allocates
            c.post(f"{url}/predict", files=[("files", ("warm.jpg", blobs[0], "image/jpeg"))], timeout=60)
        before = httpx.get(f"{url}/health").json()
        classes, latencies, errors = [None] * len(photos), [], []
        next_photo = iter(range(len(photos)))
        lock = threading.Lock()
        stop_at = time.monotonic() + args.timeout

        def client():
            with httpx.Client(timeout=120) as c:
                while time.monotonic() < stop_at:
                    with lock:
                        k = next(next_photo, None)
                    if k is None:
                        return
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/predict", files=[("files", (Path(photos[k]).name, blobs[k], "image/jpeg"))])
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        if r.status_code == 200:
                            classes[k] = r.json()[0]["class"]
                        else:
                            errors.append(f"{r.status_code} {r.text[:100]}")

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = httpx.get(f"{url}/health").json()
        if args.screenshot:
            screenshot(url, photos[:: max(1, len(photos) // 3)][:3], args.screenshot)
        answered = sum(c is not None for c in classes)
        batches = after["batches"] - before["batches"]
        return {"img_per_s": answered / wall, "seconds": wall, "answered": answered, "errors": errors[:5],
                "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
                "forward_passes": batches, "mean_batch": (after["images"] - before["images"]) / max(1, batches),
                "classes": classes}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def screenshot(url: str, photos: list[str], out: str) -> None:
    """The page after picking ``photos``, as a PNG (headless Debian chromium, as tests/test_web_page.py)."""
    from playwright.sync_api import sync_playwright

    from tests.test_web_page import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 560})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('about').textContent.includes('classes')")
        page.set_input_files("#picker", photos)
        page.wait_for_function(f"document.querySelectorAll('.card[data-status]').length == {len(photos)}",
                               timeout=120_000)
        page.screenshot(path=out, full_page=True)
        browser.close()


def run_export(model: str, export: str, photos: list[str], args) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from pipeline.data.image_reader import load_transformed
    from pipeline.devices import resolve_precision
    from pipeline.extraction.inference import Inference
    from pipeline.models.whole_models import load_model

    lm = load_model(model)
    x = torch.stack([load_transformed(p, lm.transform) for p in photos[:args.export_batch]])
    session = ort.InferenceSession(export, providers=["CPUExecutionProvider"])

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return len(x) / statistics.median(times), out

    out = {}
    ort_ips, ort_p = timed(lambda: session.run(None, {"images": x.numpy()})[0])
    out["onnxruntime fp32"] = {"img_per_s": ort_ips, "probabilities": ort_p}
    cpu = torch.device("cpu")
    for precision in dict.fromkeys(["fp32", resolve_precision("auto", cpu)]):
        inference = Inference(lm.model, cpu, precision)
        ips, logp = timed(lambda: inference(x))
        out[f"project {precision}"] = {"img_per_s": ips, "probabilities": np.exp(logp)}
    ref = out["project fp32"]["probabilities"]
    return {name: {"img_per_s": v["img_per_s"], "max_abs_diff_vs_fp32": float(np.abs(v["probabilities"] - ref).max())}
            for name, v in out.items()} | {"batch": len(x), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a head.pt or model.pt")
    ap.add_argument("--photos", default=str(PHOTOS), help="a folder of photos (spread over its sorted list)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=-1, help="predict's decoding processes")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the clients may take in all")
    ap.add_argument("--export", help="an ONNX export of --model: time it against the project's CPU path")
    ap.add_argument("--export-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--screenshot", help="also write a PNG of the page with a few of the photos classified")
    ap.add_argument("--tiny", action="store_true", help="register the tests' tiny backbones (a quick self-check)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    args.model = str(Path(args.model).resolve())  # serve runs from the project's root
    if args.tiny:
        import tests.tiny  # noqa: F401
    from pipeline.models.predict import list_inputs
    from pipeline.serving.export import spread

    photos = spread(list_inputs([args.photos]), args.n)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "n": len(photos), "clients": args.clients,
              "batch_size": args.batch_size, "precision": args.precision}
    print(f"predict on {len(photos)} photos ...", file=sys.stderr)
    pred = run_predict(args.model, photos, args)
    print(f"serve: {args.clients} clients ...", file=sys.stderr)
    served = run_serve(args.model, photos, args)
    same = sum(a == b for a, b in zip(pred.pop("classes"), served.pop("classes")))
    result.update(predict=pred, serve=served, same_class=same, serve_vs_predict=served["img_per_s"] / pred["img_per_s"])
    if args.export:
        print("export speed ...", file=sys.stderr)
        result["export"] = run_export(args.model, args.export, photos, args)
    print(f"| | img/s | p50 ms | p95 ms |\n|---|---|---|---|\n"
          f"| predict (batch {args.batch_size}) | {pred['img_per_s']:.1f} | | |\n"
          f"| serve, {args.clients} clients x 1 photo per request | {served['img_per_s']:.1f} "
          f"| {served['p50_ms']:.0f} | {served['p95_ms']:.0f} |\n\n"
          f"serve / predict = {result['serve_vs_predict']:.2f}; same class {same}/{len(photos)}; "
          f"{served['forward_passes']} forward passes (mean batch {served['mean_batch']:.1f})")
    if args.export:
        e = result["export"]
        print(f"\n| batch of {e['batch']} | img/s | max |p - p(fp32)| |\n|---|---|---|")
        for name, v in e.items():
            if isinstance(v, dict):
                print(f"| {name} | {v['img_per_s']:.1f} | {v['max_abs_diff_vs_fp32']:.2g} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
