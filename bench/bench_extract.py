"""Benchmark: `extract` end to end on every compute path vs the tutorial's loop, in one run on the same images.

Paths (``--only``): bf16, bf16+compile, int8, int8+compile, fp32, and defaults (no precision or compile
asked: what ``--precision auto`` picks for this --n on this machine; the table names it). For each: end-to-end
img/s (compile time reported apart, as it is paid once per run), the network alone at the same batch size (just
before and just after, averaged), where the time went (waiting for decoded images, model, HDF5 writes, other), and
the ratio to bf16-eager. Also the bf16 and int8 matmul ceilings, decode
cost per image, and peak RSS at two n. Each measurement runs in its own subprocess so its peak
RSS is its own. Prints tables and, with --json-out, every figure as JSON. Not a test: figures
move with machine load, so compare the ratios measured within one run.

    python bench/bench_extract.py --n 256 --json-out bench-extract.json
    python bench/bench_extract.py --sweep     # batch size / decode workers / threads, quick

Another backbone beside VGG-16 (``--backbone NAME --weights FILE``): every path of NAME (fp32, bf16,
+compile, int8+compile, and its defaults: what --precision auto picks for it) and
VGG-16's defaults, interleaved in one run on the same photos (VGG-16 before and after, averaged), each
path's steady img/s, its ratio to VGG-16's default and its share of its FLOPs ceiling:

    python bench/bench_extract.py --backbone tf_efficientnet_lite0 \
        --weights ../shared/weights/tf_efficientnet_lite0_imagenet.pt --n 1000 --work-dir /tmp/bench
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
from typing import Optional

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

    from pipeline.extraction.backbones import load_backbone

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
    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.extraction.extract import ExtractConfig, extract

    kw = {"decode": a.decode, "batch_size": a.batch_size, **json.loads(a.extract_kw or "{}")}
    t0 = time.perf_counter()
    r = extract(ExtractConfig(data=a.data, n=a.n, backbone=a.backbone, weights=a.weights, cache_dir=a.cache_dir,
                              device=a.device, **kw))
    wall = time.perf_counter() - t0
    if a.paths:
        with FeatureCache(r.cache) as c:
            Path(a.paths).write_text(json.dumps(c.paths))
    return {"images": r.rows, "seconds": r.seconds, "img_per_s": r.wall_img_per_s, "wall_s": wall,
            "steady_img_per_s": r.img_per_s,  # extract's own figure: after calibration and compiling
            "compile_seconds": r.compile_seconds, "compiled": r.compiled, "decoding": r.decoding,
            "compile_cache": r.compile_cache, "calibration_reused": r.calibration_reused or "",
            "calibration_seconds": r.calibration_seconds or 0.0, "stage_seconds": r.stage_seconds,
            "precision": r.precision, "runtime": "torch", "flip": r.flip,
            "device": r.device, **kw,
            **peak_rss_mb()}


def child_matmul(a) -> dict:
    """The device's dense-matmul ceilings, 2048^3, best of ~3 s each: bf16 (fp32 where bf16 is missing)
    and, on the CPU, int8 x int8 -> int32 (``torch._int_mm``, what int8 convolutions reduce to)."""
    import torch

    from pipeline.devices import resolve_precision

    dev = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision("auto", dev), torch.float32)
    n = 2048
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    reps = 10 if dev.type == "cuda" else 1

    def best_seconds(op) -> float:
        for _ in range(3):
            op()
        sync()
        best, t_end = float("inf"), time.perf_counter() + 3
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            for _ in range(reps):
                op()
            sync()
            best = min(best, (time.perf_counter() - t) / reps)
        return best

    x, y = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    out = {"dtype": str(dtype).replace("torch.", ""), "gflop_per_s": 2 * n ** 3 / best_seconds(lambda: x @ y) / 1e9}
    if dtype != torch.float32:  # an fp32 path's ceiling
        xf, yf = x.float(), y.float()
        out["fp32_gflop_per_s"] = 2 * n ** 3 / best_seconds(lambda: xf @ yf) / 1e9
    if dev.type == "cpu":
        xi = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        yi = torch.randint(-128, 127, (n, n), dtype=torch.int8)
        out["int8_gop_per_s"] = 2 * n ** 3 / best_seconds(lambda: torch._int_mm(xi, yi)) / 1e9
    return out


def child_model(a) -> dict:
    """The network alone (no decoding, no writing), built exactly as extract builds it for one path
    (precision, compile; int8 calibrated on a few of the photos: speed does not depend on which),
    timed on random batches; with --sweep, at several batch sizes."""
    import torch

    from pipeline.data.folders import list_image_folder
    from pipeline.devices import resolve_device, resolve_precision
    from pipeline.extraction.backbones import load_backbone
    from pipeline.extraction.extract import ExtractConfig
    from pipeline.extraction.extract_range import feature_model

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    kw = json.loads(a.extract_kw or "{}")
    cfg = ExtractConfig(data=a.data, backbone=a.backbone, weights=a.weights, device=a.device,
                        **{"calib_n": 16, "batch_size": a.batch_size, **kw})
    backbone = load_backbone(a.backbone, a.weights)
    precision = resolve_precision(cfg.precision, dev, int8_ok=True)
    model, _, _ = feature_model(cfg, backbone, list_image_folder(a.data), dev, precision, cfg.compile == "on")
    out = {}
    for bs in (8, 16, 32, 64) if a.sweep else (cfg.batch_size,):
        x = torch.randn(bs, 3, 224, 224)
        model(x)  # compiles, if asked to
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            model(x)
            done += bs
        out[str(bs)] = done / (time.perf_counter() - t0)
    return {"img_per_s_by_batch": out, "threads": torch.get_num_threads(), "precision": precision,
            "compile_seconds": model.compile_seconds}


def child_decode(a) -> dict:
    """Decode + preprocess alone, in this process (one core), over the benchmark's photos: ms per image."""
    from pipeline.data.image_reader import ImageListDataset
    from pipeline.extraction.backbones import load_preprocessing

    paths = json.loads(Path(a.paths).read_text())
    ds = ImageListDataset(Path(a.data), [(p, 0) for p in paths], load_preprocessing(a.backbone, a.weights)[0])
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return {"images": len(ds), "ms_per_image": 1000 * (time.perf_counter() - t0) / len(ds)}


def conv_gflop_per_image(backbone: str, weights: str) -> float:
    """2 x the multiply-adds of every convolution for one image at the backbone's crop (224 x 224 for
    ImageNet models), counted with forward hooks (a depthwise convolution: one input channel per output)."""
    import torch

    from pipeline.extraction.backbones import load_backbone

    loaded = load_backbone(backbone, weights)
    net, crop = loaded.features.eval(), loaded.transform.crop_size[0]
    macs = []

    def hook(m, inp, out):
        macs.append(out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, 3, crop, crop))
    for h in hs:
        h.remove()
    return 2 * sum(macs) / 1e9


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else ""


CHILDREN = {"tutorial": child_tutorial, "extract": child_extract, "matmul": child_matmul, "model": child_model,
            "decode": child_decode}

#: the compute paths, as extract options
PATHS = {"bf16": {"precision": "bf16", "compile": "off"}, "bf16+compile": {"precision": "bf16", "compile": "on"},
         "int8": {"precision": "int8", "compile": "off"}, "int8+compile": {"precision": "int8", "compile": "on"},
         "fp32": {"precision": "fp32", "compile": "off"},
         "defaults": {}}  # extract's own choice (--precision auto: int8 + compile from 1,000 images on VNNI CPUs)


# -- the parent --------------------------------------------------------------------------------
def default_path(a) -> dict:
    """The precision and compile choice extract's defaults make for this run (as extract decides them)."""
    from pipeline.devices import resolve_device, resolve_precision
    from pipeline.extraction.extract import ExtractConfig, auto_precision
    from pipeline.extraction.extract_range import should_compile

    cfg = ExtractConfig(data=a.data, n=a.n, weights=a.weights, device=a.device)
    dev = resolve_device(a.device)
    precision = resolve_precision(auto_precision(cfg, a.n)[0], dev, int8_ok=True)
    return {"precision": precision, "compile": "on" if should_compile("auto", precision, dev, a.n) else "off"}



def run_child(kind: str, a, env: Optional[dict] = None, **extra) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--device", a.device, "--data", a.data, "--weights", a.weights,
            "--backbone", a.backbone, "--n", str(extra.pop("n", a.n)), "--seconds", str(a.seconds),
            "--batch-size", str(a.batch_size),
            "--decode", a.decode]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    print(f"[bench] {kind} {extra or ''}", file=sys.stderr, flush=True)
    res = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if res.returncode:
        sys.exit(f"{kind} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main_bench(a) -> dict:
    from pipeline.devices import resolve_device

    a.device = str(resolve_device(a.device))
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    paths = tmp / "paths.json"
    gflop = conv_gflop_per_image(a.backbone, a.weights)
    r = {"machine": {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(),
                     "python": platform.python_version(), "device": a.device, "gpu": gpu_name(a.device)},
         "n": a.n, "batch_size": a.batch_size, "gflop_per_image": gflop}
    r["matmul"] = run_child("matmul", a)
    r["paths"] = {}
    for name in [p for p in a.only if a.device == "cpu" or "int8" not in p]:  # int8 is a CPU path
        kw = json.dumps(PATHS[name] or default_path(a))
        # an empty Inductor cache per path: the compile time reported is a cold one, as on a new machine
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}")}
        # the network alone just before and just after extract, averaged: a shared machine's speed drifts
        # by several % within minutes, and one sample taken at another moment moves the ratio as much
        alone_env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}-alone")}  # extract's compile stays cold
        before = run_child("model", a, alone_env, extract_kw=kw)
        e = run_child("extract", a, env, cache_dir=tmp / name, extract_kw=json.dumps(PATHS[name]),
                      **({} if paths.exists() else {"paths": paths}))
        if name == "defaults":  # the network alone as extract chose it
            kw = json.dumps({"precision": e["precision"], "compile": "on" if e["compiled"] else "off"})
            name = f"defaults ({e['precision']}{'+compile' if e['compiled'] else ''})"
        after = run_child("model", a, alone_env, extract_kw=kw)
        st, busy = e["stage_seconds"], e["seconds"] - e["compile_seconds"]
        stages = {"input": st["input"], "model": st["model"] - e["compile_seconds"], "write": st["write"]}
        stages["other"] = max(0.0, busy - sum(stages.values()))
        alone = [m["img_per_s_by_batch"][str(a.batch_size)] for m in (before, after)]
        model_alone = sum(alone) / 2
        r["paths"][name] = {**e, "model_alone_img_per_s": model_alone, "model_alone_before_after": alone,
                            "end_to_end_vs_model_alone": e["steady_img_per_s"] / model_alone,
                            "stage_share": {k: v / busy for k, v in stages.items()}}
    r["tutorial"] = run_child("tutorial", a, paths=paths)
    r["decode"] = run_child("decode", a, paths=paths)
    base = r["paths"].get("bf16") or next(iter(r["paths"].values()))
    for q in r["paths"].values():
        q["vs_bf16_eager"] = q["steady_img_per_s"] / base["steady_img_per_s"]
        q["vs_tutorial"] = q["steady_img_per_s"] / r["tutorial"]["img_per_s"]
        ceiling = r["matmul"].get("int8_gop_per_s") if q["precision"] == "int8" else r["matmul"]["gflop_per_s"]
        q["fraction_of_ceiling"] = q["steady_img_per_s"] * gflop / ceiling if ceiling else None
    flat = [run_child("extract", a, n=k, cache_dir=tmp / f"flat{k}") for k in (a.flat_small, a.flat_large)]
    r["rss_flatness"] = {"n": [a.flat_small, a.flat_large], "rss_mb": [f["rss_mb"] for f in flat],
                         "img_per_s": [f["img_per_s"] for f in flat],
                         "ratio": flat[1]["rss_mb"] / flat[0]["rss_mb"]}
    return r


#: every path of another backbone, beside VGG-16's defaults ("defaults": what --precision auto picks for it)
VERSUS_PATHS = ("defaults", "fp32", "bf16", "fp32+compile", "bf16+compile", "int8+compile")
PATHS["fp32+compile"] = {"precision": "fp32", "compile": "on"}


def main_versus(a) -> dict:
    """Every path of --backbone and VGG-16's defaults (before and after them), on the same photos, one run."""
    from pipeline.devices import resolve_device

    a.device = str(resolve_device(a.device))
    tmp = Path(a.work_dir or tempfile.mkdtemp(prefix="bench-versus-"))
    tmp.mkdir(parents=True, exist_ok=True)
    base_name, base_weights = a.beside.split("=", 1)
    base = argparse.Namespace(**{**vars(a), "backbone": base_name, "weights": base_weights})
    r = {"machine": {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(), "device": a.device},
         "n": a.n, "batch_size": a.batch_size, "backbone": a.backbone, "beside": base_name,
         "gflop_per_image": {a.backbone: conv_gflop_per_image(a.backbone, a.weights),
                             base_name: conv_gflop_per_image(base_name, base_weights)},
         "matmul": run_child("matmul", a), "runs": []}

    def extract_run(args, path: str, tag: str) -> dict:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{tag}")}
        e = run_child("extract", args, env, cache_dir=tmp / tag, extract_kw=json.dumps(PATHS[path]))
        m = r["matmul"]
        ceiling = m.get("int8_gop_per_s") if e["precision"] == "int8" else (
            m["gflop_per_s"] if e["precision"] == m["dtype"] else m.get("fp32_gflop_per_s", m["gflop_per_s"]))
        passes = 2 if e.get("flip") else 1  # flip: each photo and its mirror image
        e.update(backbone=args.backbone, path=path,
                 fraction_of_ceiling=e["steady_img_per_s"] * passes * r["gflop_per_image"][args.backbone] / ceiling)
        r["runs"].append(e)
        return e

    for k in range(a.rounds):
        before = extract_run(base, "defaults", f"base-{k}-before")
        mine = [extract_run(a, path, f"{path.replace('+', '-')}-{k}") for path in a.only_versus]
        after = extract_run(base, "defaults", f"base-{k}-after")
        reference = (before["steady_img_per_s"] + after["steady_img_per_s"]) / 2
        for e in mine:
            e["vs_beside_default"] = e["steady_img_per_s"] / reference
    return r


def versus_table(r: dict) -> str:
    m = r["matmul"]
    lines = [f"{r['machine']['cores']} cores, {r['machine']['cpu']} ({' '.join(r['machine']['flags'])}); "
             f"{r['n']} photos, batch {r['batch_size']}; GFLOP/image: "
             + ", ".join(f"{k} {v:.2f}" for k, v in r["gflop_per_image"].items()),
             f"ceilings (2048^3 matmul): {m['dtype']} {m['gflop_per_s']:.0f} GFLOP/s"
             + (f", fp32 {m['fp32_gflop_per_s']:.0f}" if "fp32_gflop_per_s" in m else "")
             + (f", int8 {m['int8_gop_per_s']:.0f} GOP/s" if "int8_gop_per_s" in m else ""), "",
             "| backbone | path | precision | steady img/s | x beside's default | % of FLOPs ceiling "
             "| one-offs s (compile, calibration) |", "|---|---|---|---|---|---|---|"]
    for e in r["runs"]:
        ratio = f"{e['vs_beside_default']:.2f}x" if "vs_beside_default" in e else "(reference)"
        lines.append(f"| {e['backbone']} | {e['path']} | {e['precision']}"
                     f"{'+compile' if e['compiled'] else ''} "
                     f"| {e['steady_img_per_s']:.1f} | {ratio} | {100 * e['fraction_of_ceiling']:.1f} "
                     f"| {e['compile_seconds']:.0f}, {e['calibration_seconds']:.0f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The CPU features that decide bf16 and int8 speed (AMX tiles, AVX-512 BF16 / VNNI, AVX-VNNI)."""
    from pipeline.devices import cpu_flags as all_flags

    return sorted(f for f in all_flags() if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx_vnni"))


def table(r: dict) -> str:
    t, m, f, d, mach = r["tutorial"], r["matmul"], r["rss_flatness"], r["decode"], r["machine"]
    flags = " ".join(mach["flags"]) or "no AMX/VNNI"
    lines = [f"machine: {mach['cores']} cores, {mach['cpu']} {mach['gpu']} ({flags});"
             f" {r['n']} photos, batch {r['batch_size']}, {r['gflop_per_image']:.2f} GFLOP/image",
             f"ceilings (2048^3 matmul): {m['dtype']} {m['gflop_per_s']:.0f} GFLOP/s"
             + (f", int8 {m['int8_gop_per_s']:.0f} GOP/s" if "int8_gop_per_s" in m else ""),
             f"tutorial loop (fp32, batch 8): {t['img_per_s']:.2f} img/s; decode + preprocess alone: "
             f"{d['ms_per_image']:.1f} ms/image on one core",
             "",
             "| path | end to end img/s | x bf16 eager | x tutorial | model alone img/s (before / after) "
             "| end to end / model alone | compile s (cold) | calibration s "
             "| time: input wait / model / write / other | % of ceiling | peak RSS MB | decoding |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, q in r["paths"].items():
        sh = {k: f"{100 * v:.0f}" for k, v in q["stage_share"].items()}
        ceiling = f"{100 * q['fraction_of_ceiling']:.0f}" if q["fraction_of_ceiling"] else "-"
        failed = " (compile failed: eager)" if "compile" in name and not q["compiled"] else ""
        lines.append(
            f"| {name}{failed} | {q['steady_img_per_s']:.2f} | {q['vs_bf16_eager']:.2f}x | {q['vs_tutorial']:.2f}x "
            f"| {q['model_alone_img_per_s']:.2f} ({' / '.join(f'{v:.1f}' for v in q['model_alone_before_after'])}) "
            f"| {100 * q['end_to_end_vs_model_alone']:.0f} % "
            f"| {q['compile_seconds']:.1f} | {q['calibration_seconds']:.1f} "
            f"| {sh['input']} / {sh['model']} / {sh['write']} / {sh['other']} % "
            f"| {ceiling} | {q['rss_mb']:.0f} | {q.get('decoding', '')} |")
    lines += ["", f"extract peak RSS n={f['n'][0]} vs n={f['n'][1]}: {f['rss_mb'][0]:.0f} MB vs "
              f"{f['rss_mb'][1]:.0f} MB ({100 * (f['ratio'] - 1):+.1f} %)"]
    return "\n".join(lines)


def main_sweep(a) -> dict:
    """Quick scan of the knobs extract's defaults are chosen from."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    a.device = "cpu"  # the knobs below are the CPU path's
    out = {"model_only": run_child("model", a)}
    for threads in a.sweep_threads:
        out[f"model_only_threads{threads}"] = run_child("model", a, threads=threads)
    for workers in (-1, 0, 1, 2):  # -1: in turns with the network (threads); N: N background processes
        kw = json.dumps({"workers": workers})
        out[f"extract_workers{workers}"] = run_child("extract", a, cache_dir=tmp / f"w{workers}", extract_kw=kw)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda; both loops use it")
    p.add_argument("--n", type=int, default=256, help="images for every path and the tutorial loop")
    p.add_argument("--only", nargs="+", default=list(PATHS), choices=list(PATHS),
                   help="compute paths to measure (bf16 is the baseline of the ratios)")
    p.add_argument("--batch-size", type=int, default=32, help="extract's --batch-size on every path")
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
    p.add_argument("--beside", default=f"vgg16={WEIGHTS}",
                   help="NAME=WEIGHTS whose defaults another --backbone is measured beside")
    p.add_argument("--only-versus", nargs="+", default=list(VERSUS_PATHS), choices=list(VERSUS_PATHS),
                   help="another --backbone's paths to measure")
    p.add_argument("--rounds", type=int, default=1, help="another --backbone: times to repeat the interleaved runs")
    p.add_argument("--work-dir", help="another --backbone: where its caches go (a temporary folder by default)")
    a = p.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    versus = not a.sweep and a.backbone != a.beside.split("=", 1)[0]
    r = main_sweep(a) if a.sweep else main_versus(a) if versus else main_bench(a)
    print(json.dumps(r, indent=2) if a.sweep else versus_table(r) if versus else table(r))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
