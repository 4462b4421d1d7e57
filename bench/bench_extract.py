"""Benchmark: `extract` (defaults, end to end) vs the tutorial's loop, in one run on the same images.

Each measurement runs in its own subprocess so its peak RSS is its own. Prints a table and,
with --json-out, writes every figure as JSON. Not a test: figures move with machine load, so
compare the ratios measured within one run.

    python bench/bench_extract.py --n 96 --json-out bench-extract.json
    python bench/bench_extract.py --sweep     # batch size / decode workers / threads, quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "catsdogs"
WEIGHTS = SHARED / "weights" / "vgg16_features_imagenet.pt"


# -- measurements, each run in a child process -------------------------------------------------
def peak_rss_mb() -> dict:
    """This process's peak RSS, and the largest of its finished children's (decoding workers)."""
    import resource

    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"rss_mb": hwm / 1024, "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_tutorial(a) -> dict:
    """The tutorial's loop: ImageFolder-style PIL loading, Resize/CenterCrop/ToTensor/Normalize,
    fp32, batch 8, every batch's features kept and joined with torch.cat at the end."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.backbones import load_backbone

    b = load_backbone(a.backbone, a.weights)
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(b.mean, b.std)])
    paths = json.loads(Path(a.paths).read_text())

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(Path(a.data) / paths[i]).convert("RGB"))

    dev = torch.device(a.device)
    net = b.features.eval().to(dev)
    t0 = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x in DataLoader(Images(), batch_size=8):
            feats.append(net(x.to(dev)))
    out = torch.cat(feats).cpu()
    seconds = time.perf_counter() - t0
    return {"images": len(out), "seconds": seconds, "img_per_s": len(out) / seconds, "threads": torch.get_num_threads(),
            **peak_rss_mb()}


def child_extract(a) -> dict:
    """`extract` with its defaults (decode, model, HDF5 write) into a fresh cache folder."""
    from pipeline.cache import FeatureCache
    from pipeline.extract import ExtractConfig, extract

    kw = {"decode": a.decode, **json.loads(a.extract_kw or "{}")}
    t0 = time.perf_counter()
    r = extract(ExtractConfig(data=a.data, n=a.n, backbone=a.backbone, weights=a.weights, cache_dir=a.cache_dir,
                              device=a.device, **kw))
    wall = time.perf_counter() - t0
    if a.paths:
        with FeatureCache(r["cache"]) as c:
            Path(a.paths).write_text(json.dumps(c.paths))
    return {"images": r["rows"], "seconds": r["seconds"], "img_per_s": r["img_per_s"], "wall_s": wall,
            "precision": r["precision"], "device": r["device"], **kw, **peak_rss_mb()}


def child_matmul(a) -> dict:
    """The device's dense-matmul ceiling: 2048^3 in bf16 (fp32 where bf16 is missing), best of ~3 s."""
    import torch

    from pipeline.device import resolve_precision

    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision("auto", dev), torch.float32)
    n = 2048
    x, y = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        x @ y
    sync()
    best, t_end = float("inf"), time.perf_counter() + 3
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(10 if dev.type == "cuda" else 1):
            x @ y
        sync()
        best = min(best, (time.perf_counter() - t) / (10 if dev.type == "cuda" else 1))
    return {"dtype": str(dtype).replace("torch.", ""), "gflop_per_s": 2 * n ** 3 / best / 1e9}


def child_model(a) -> dict:
    """The network alone (no decoding, no writing) at a few batch sizes, for choosing the default."""
    import torch

    from pipeline.backbones import load_backbone
    from pipeline.device import resolve_device, resolve_precision
    from pipeline.inference import Inference

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device("cpu")
    model = Inference(load_backbone(a.backbone, a.weights).features, dev, resolve_precision("auto", dev),
                      "none", "float16")
    out = {}
    for bs in (8, 16, 32, 64):
        x = torch.randn(bs, 3, 224, 224)
        model(x)
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            model(x)
            done += bs
        out[str(bs)] = done / (time.perf_counter() - t0)
    return {"img_per_s_by_batch": out, "threads": torch.get_num_threads()}


def conv_gflop_per_image(backbone: str, weights: str) -> float:
    """2 x the multiply-adds of every convolution for one 224 x 224 image, counted with forward hooks."""
    import torch

    from pipeline.backbones import load_backbone

    net = load_backbone(backbone, weights).features.eval()
    macs = []

    def hook(m, inp, out):
        macs.append(out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    for h in hs:
        h.remove()
    return 2 * sum(macs) / 1e9


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else ""


CHILDREN = {"tutorial": child_tutorial, "extract": child_extract, "matmul": child_matmul, "model": child_model}


# -- the parent --------------------------------------------------------------------------------
def run_child(kind: str, a, **extra) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--device", a.device, "--data", a.data, "--weights", a.weights,
            "--backbone", a.backbone, "--n", str(extra.pop("n", a.n)), "--seconds", str(a.seconds),
            "--decode", a.decode]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    print(f"[bench] {kind} {extra or ''}", file=sys.stderr, flush=True)
    res = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        sys.exit(f"{kind} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main_bench(a) -> dict:
    from pipeline.device import resolve_device

    a.device = str(resolve_device(a.device))
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    paths = tmp / "paths.json"
    gflop = conv_gflop_per_image(a.backbone, a.weights)
    r = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "python": platform.python_version(), "device": a.device, "gpu": gpu_name(a.device)},
         "n": a.n, "gflop_per_image": gflop}
    r["matmul"] = run_child("matmul", a)
    r["extract"] = run_child("extract", a, cache_dir=tmp / "main", paths=paths)
    r["tutorial"] = run_child("tutorial", a, paths=paths)
    flat = [run_child("extract", a, n=k, cache_dir=tmp / f"flat{k}") for k in (a.flat_small, a.flat_large)]
    r["rss_flatness"] = {"n": [a.flat_small, a.flat_large], "rss_mb": [f["rss_mb"] for f in flat],
                         "img_per_s": [f["img_per_s"] for f in flat],
                         "ratio": flat[1]["rss_mb"] / flat[0]["rss_mb"]}
    e, t, m = r["extract"], r["tutorial"], r["matmul"]
    r["ratio_extract_vs_tutorial"] = e["img_per_s"] / t["img_per_s"]
    r["extract_gflop_per_s"] = e["img_per_s"] * gflop
    r["tutorial_gflop_per_s"] = t["img_per_s"] * gflop
    r["fraction_of_matmul_ceiling"] = r["extract_gflop_per_s"] / m["gflop_per_s"]
    return r


def table(r: dict) -> str:
    e, t, m, f = r["extract"], r["tutorial"], r["matmul"], r["rss_flatness"]
    rows = [
        ("machine", f"{r['machine']['cores']} cores, {r['machine']['cpu']} {r['machine']['gpu']}".strip()),
        ("images (same files for both)", f"{r['n']} ({r['gflop_per_image']:.2f} GFLOP each, conv MACs x 2)"),
        (f"tutorial loop (fp32, batch 8, {r['machine']['device']})",
         f"{t['img_per_s']:.2f} img/s, {r['tutorial_gflop_per_s']:.0f} GFLOP/s, peak RSS {t['rss_mb']:.0f} MB"),
        (f"extract defaults ({e['precision']}, {e['device']})",
         f"{e['img_per_s']:.2f} img/s, {r['extract_gflop_per_s']:.0f} GFLOP/s, peak RSS {e['rss_mb']:.0f} MB "
         f"(+ workers {e['rss_workers_mb']:.0f} MB each)"),
        ("extract / tutorial", f"{r['ratio_extract_vs_tutorial']:.2f}x"),
        (f"{m['dtype']} 2048^3 matmul ceiling", f"{m['gflop_per_s']:.0f} GFLOP/s"),
        ("extract / ceiling", f"{100 * r['fraction_of_matmul_ceiling']:.0f} %"),
        (f"extract peak RSS n={f['n'][0]} vs n={f['n'][1]}",
         f"{f['rss_mb'][0]:.0f} MB vs {f['rss_mb'][1]:.0f} MB ({100 * (f['ratio'] - 1):+.1f} %)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def main_sweep(a) -> dict:
    """Quick scan of the knobs extract's defaults are chosen from."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    a.device = "cpu"  # the knobs below are the CPU path's
    out = {"model_only": run_child("model", a)}
    for threads in a.sweep_threads:
        out[f"model_only_threads{threads}"] = run_child("model", a, threads=threads)
    for workers in (0, 1, 2):
        kw = json.dumps({"workers": workers})
        out[f"extract_workers{workers}"] = run_child("extract", a, cache_dir=tmp / f"w{workers}", extract_kw=kw)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda; both loops use it")
    p.add_argument("--n", type=int, default=96, help="images for the tutorial-vs-extract comparison")
    p.add_argument("--decode", default="pil", choices=["pil", "device"], help="extract's --decode")
    p.add_argument("--flat-small", type=int, default=48, help="smaller n of the RSS-flatness pair")
    p.add_argument("--flat-large", type=int, default=240, help="larger n of the RSS-flatness pair")
    p.add_argument("--json-out", help="write all figures here as JSON")
    p.add_argument("--sweep", action="store_true", help="scan batch size, threads and decode workers (CPU) instead")
    p.add_argument("--sweep-threads", type=int, nargs="*", default=[1])
    p.add_argument("--seconds", type=float, default=5.0, help="time per batch size in the sweep")
    # internal: one measurement in a child process
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--extract-kw", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    r = main_sweep(a) if a.sweep else main_bench(a)
    print(json.dumps(r, indent=2) if a.sweep else table(r))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
