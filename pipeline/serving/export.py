"""The export stage: a whole model (backbone + head) as one ONNX or TorchScript file, checked against predict.

The file takes a batch of preprocessed images, (N, 3, H, W) float32 at the weights' crop size, and
returns their class probabilities. What a program needs to feed it (the classes, the resize, crop,
mean and std, all taken from the checkpoint's own provenance record) is written inside it (ONNX
metadata_props, a TorchScript extra file) and beside it, as ``<output>.json`` with the
parity check's result; both hold one ``export_id``, so a reader refuses a sidecar written by another
export (``read_metadata``). Preprocessing drift is the usual reason an exported model predicts otherwise
than the tool: so every export runs the exported file (ONNX Runtime, or the TorchScript file loaded
back) fed by the export's decoding rule (``data.portable``: what any consumer can copy) against
predict's own path in fp32, both from each photo's bytes (odd modes included: ``ODD_MODES``), and fails
above a tolerance.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..cache.provenance import Preprocessing, package_version, versions
from ..config import ExportConfig, Placeholder, check_config, option_text
from ..data import portable
from ..data.image_reader import DECODE_VERSION, ImageListDataset, draft_short_side, read_items
from ..errors import PipelineError, UsageError
from ..extraction import backbones as bb
from ..files import (NAME_MAX, atomic_write, check_output, check_replaceable, clear_dead_temporaries, starts_with,
                     temporary_name, unwinding_on_signals, write_json, written_through)
from ..models.fused_models import fused_metadata, input_shape
from ..models.predict import list_inputs
from ..models.predict import ImageOutputs, iter_log_proba
from ..models.whole_models import (
    WithExtras,
    checkpoint_reads,
    model_from_checkpoint,
    network,
    read_checkpoint,
    split_extras,
)
from ..progress import progress

try:
    import fcntl
except ImportError:  # Windows: no flock; exports to one --output there are not serialised
    fcntl = None

log = logging.getLogger(__name__)

INPUT = "images"
#: the exported network's outputs, in order (the unknown score only when the head has one); each is
#: described in the metadata's "outputs"
OUTPUTS = ("probabilities", "unknown_score")
METADATA_VERSION = 1
#: the key of the metadata inside a TorchScript file (torch.jit.load(..., _extra_files={KEY: ""}))
TORCHSCRIPT_KEY = "transfer_pipeline.json"
#: the most bytes of metadata read from inside a TorchScript archive (an export's are a few KB)
MAX_METADATA_BYTES = 1_000_000
#: what each format needs beyond the required packages: (module, why), for one clear line when missing
NEEDS = {"onnx": (("onnx", "writes the file"), ("onnxscript", "torch's ONNX exporter"),
                  ("onnxruntime", "runs the parity check")),
         "torchscript": ()}


class ProbabilityNet(nn.Module):
    """A ``whole_models.TransferModel`` whose output is its calibrated probabilities, (N, classes) float32,
    not logs, and, when its head has an unknown score, that score too, (N,) float32 (above the metadata's
    ``unknown_threshold``: "none of these classes"): what predict computes, in one network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.extras = WithExtras(model)
        self.unknown, self.n_classes = bool(model.head.has_unknown), model.head.n_classes

    def forward(self, images):
        out = self.extras(images)
        probabilities = torch.exp(out[:, :self.n_classes]).float()
        return (probabilities, out[:, -1].float()) if self.unknown else probabilities


def sidecar_path(output) -> Path:
    """Where the metadata goes beside an exported file: its name + .json (model.onnx.json, model.ts.json:
    an ONNX and a TorchScript export of one model side by side keep their own)."""
    out = Path(output)
    return out.with_name(out.name + ".json")


def lock_path(output) -> Path:
    """The lock file beside an exported file (.model.onnx.lock), there only while an export puts the file and
    its sidecar in place (``.DIGEST.lock`` for a name too long for that)."""
    return temporary_name(Path(output), ".lock", pid=False)


@contextmanager
def output_lock(output):
    """Hold ``lock_path(output)`` (waiting for another export's short hold), so two exports to one --output
    put their pairs in place one after the other: the last one's file beside the last one's sidecar, never
    interleaved. The holder removes the file; a waiter that then locks a removed file opens it again."""
    if fcntl is None:  # no flock (Windows): nothing to hold, and an open lock file could not be removed there
        yield
        return
    lock = lock_path(output)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some network mounts): put the pair in place unlocked
            os.close(fd)
            log.warning("cannot lock %s (%s): two exports to %s at once could mix their files", lock, e, output)
            yield
            return
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed it: lock the one there now
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while holding it: a waiter on this file sees it gone and opens again
        os.close(fd)


def embedded_metadata(path) -> Optional[dict]:
    """The metadata written inside an exported file (ONNX metadata_props, the TorchScript extra file); None when
    it holds none. ONNX values that are not strings are stored as JSON, strings as they are."""
    import zipfile

    if zipfile.is_zipfile(path):  # a TorchScript file is a zip archive
        extra = torchscript_extra(path)
        return json.loads(extra) if extra else None
    import onnx

    from google.protobuf.message import DecodeError

    try:
        # the binary format only, as export writes it: by default onnx.load reads a '.json' name (the sidecar itself,
        # passed by mistake) as JSON protobuf, and its ParseError was a traceback
        props = {p.key: p.value for p in onnx.load(str(path), format="protobuf",
                                                    load_external_data=False).metadata_props}
    except DecodeError as e:
        raise ValueError(e) from None
    return {key: decoded(key, value) for key, value in props.items()} or None


def torchscript_extra(path) -> str:
    """The metadata file inside a TorchScript archive ('' when it holds none), read as a zip member: torch.jit.load
    deserializes the program (running its __setstate__ methods) and its weights, which reading the metadata of a
    file of unknown origin must not do. ValueError for a zip that is no TorchScript archive (no constants.pkl:
    a torch.save checkpoint, say) or metadata past MAX_METADATA_BYTES."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            tops = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/constants.pkl")}
            if len(tops) != 1:
                raise ValueError("a zip archive, but not TorchScript's (no constants.pkl)")
            member = f"{tops.pop()}/extra/{TORCHSCRIPT_KEY}"
            if member not in names:
                return ""
            if z.getinfo(member).file_size > MAX_METADATA_BYTES:
                raise ValueError(f"its {TORCHSCRIPT_KEY} is over {MAX_METADATA_BYTES} bytes")
            return z.read(member).decode("utf-8")
    except zipfile.BadZipFile as e:  # a damaged member (its CRC): not an OSError or ValueError
        raise ValueError(f"a damaged zip archive ({e})") from None


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file an earlier export wrote: an ONNX (a protobuf starting with its ir_version) or a
    TorchScript archive (a zip) whose metadata, inside or (stripped by a tool) in the sidecar beside it, has an
    export_id. Only such files begin as they do: a photo, a cache or a README is never parsed."""
    if not starts_with(path, b"\x08", b"PK\x03\x04"):
        return False
    try:
        inside = embedded_metadata(path)
    except Exception:  # noqa: BLE001 (onnx and torch raise what they like on a file of another format)
        return False
    if inside is None:
        return is_sidecar(sidecar_path(path))
    return isinstance(inside, dict) and "export_id" in inside


def is_sidecar(path: Path) -> bool:
    """Whether ``path`` is the metadata an export wrote beside its file (a JSON object with an export_id)."""
    try:
        value = json.loads(path.read_bytes()[:MAX_METADATA_BYTES + 1])
        return isinstance(value, dict) and "export_id" in value
    except (OSError, ValueError, TypeError):
        return False


def decoded(key: str, value: str):
    """One ONNX metadata_props value as written: JSON unless it was a string (export_id always is)."""
    if key == "export_id":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_metadata(path) -> dict:
    """An exported file's metadata: the one inside it, plus the sidecar's parity check when the sidecar is from
    the same export. A sidecar whose export_id differs (another export's, or an older one's: two exports to one
    --output, or one stopped between writing the file and its sidecar) is refused in one line, never used."""
    path = Path(path)
    side = sidecar_path(path)
    try:
        inside = embedded_metadata(path)
    except (RuntimeError, ValueError, OSError) as e:  # (the TorchScript reader's errors are RuntimeErrors)
        first = (str(e).splitlines() or [type(e).__name__])[0]  # torch's lines below it: its C++ trace
        hint = f" (it looks like the metadata beside an export: pass the exported file {path.stem!r})" \
            if path.suffix.lower() == ".json" else ""
        raise PipelineError(f"{str(path)!r} is no ONNX or TorchScript file: {first}{hint}") from None
    beside = json.loads(side.read_text()) if side.is_file() else None
    if inside is None and beside is None:
        raise PipelineError(f"{str(path)!r} holds no export metadata and has no {side.name} beside it: "
                            "export it with python cli.py export")
    if inside is not None and beside is not None and inside.get("export_id") != beside.get("export_id"):
        raise PipelineError(mismatch(path, side, inside.get("export_id"), beside.get("export_id")))
    if inside is None:  # a file whose metadata a tool stripped: the sidecar is all there is
        return beside
    return {**inside, **({"parity": beside["parity"]} if beside and "parity" in beside else {})}


def mismatch(path, side, inside, beside) -> str:
    """The one line a reader refuses a sidecar from another export with."""
    return (f"{str(side)!r} is not the metadata of {str(path)!r} (export_id {beside} beside a file of export_id "
            f"{inside}): another export wrote one of them; export the model again to that --output")


def require(fmt: str) -> None:
    """PipelineError in one line when a package that ``fmt`` needs is not installed."""
    missing = [f"{m} ({why})" for m, why in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise PipelineError(f"export {option_text('format', fmt)} needs {', '.join(missing)}: "
                            "pip install 'transfer-pipeline[export]'")


def metadata(cfg: ExportConfig, ckpt: dict, lm) -> dict:
    """Everything a program needs to use the exported file, from the checkpoint's own records."""
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    n, head = len(lm.classes), lm.model.head
    return {
        "metadata_version": METADATA_VERSION, "format": cfg.format,
        "input": {"name": INPUT, "shape": ["N", 3, pre.crop_size, pre.crop_size], "dtype": "float32",
                  "what": "RGB images after the preprocessing below (resize, center crop, /255, normalise)"},
        "outputs": [{"name": "probabilities", "shape": ["N", n], "dtype": "float32",
                     "what": "class probabilities (calibrated: the head's temperature applied), in the order of "
                             "classes"}]
        + ([{"name": "unknown_score", "shape": ["N"], "dtype": "float32",
             "what": "1 - cosine similarity to the k-th nearest training photo; above unknown_threshold: "
                     "none of these classes"}] if head.has_unknown else []),
        "classes": lm.classes,
        "preprocessing": {**pre.to_dict(), "steps": pre.describe()},
        "decoding": decoding(lm),
        "backbone": ckpt["backbone"], "weights": ckpt["weights"], "weights_sha256": ckpt.get("weights_sha256", ""),
        "flip": bool(ckpt.get("flip", False)), "head": ckpt["head"],
        "model": str(cfg.model), "model_kind": ckpt["kind"], "model_sha256": bb.file_sha256(cfg.model),
        "cache": ckpt.get("cache", ""), "cache_fingerprint": ckpt.get("cache_fingerprint", ""),
        "data_fingerprint": ckpt.get("data_fingerprint", ""),
        # a score above it means "none of these classes"; None: the model has no unknown score
        "unknown_threshold": head.threshold_used,
        "temperature": head.temperature_used,
        "versions": {**versions(), **{p: package_version(p) for p in ("onnx", "onnxruntime")}},
        **(fused_metadata(ckpt, lm.transform, INPUT) if ckpt.get("fused") else {}),  # several backbones' inputs
    }


def decoding(lm) -> dict:
    """How a photo's bytes become the RGB image that "preprocessing" takes: the one rule predict, serve and
    every consumer of the export follow (``data.portable``; examples/predict_onnx.py copies it)."""
    return {"rule": "data/portable.py of transfer-pipeline (docs/export-serve.md), copied verbatim by "
                    "examples/predict_onnx.py",
            "jpeg_draft_min_short_side": draft_short_side(lm.transform),
            "steps": [("a JPEG whose shorter side is >= 2 x jpeg_draft_min_short_side (when not null): "
                       "Image.draft('RGB', (D, D)) before decoding (DCT scale 1/2, 1/4 or 1/8); a baseline JPEG (its "
                       "first scan of all components) of more than 89478485 pixels, up to 268435455: that scale or "
                       "the smallest larger one within 89478485 (D null: the smallest)"),
                      ("modes I;16, I;16B, I;16L, I: round(clip(v, 0, 2**bits - 1) * 255 / (2**bits - 1)) as L, "
                       "bits from a TIFF's BitsPerSample else 16, then RGB"),
                      ("mode F: floor((clip(v, lo, hi) - lo) * 255 / (hi - lo) + 0.5) as L, lo = min(0, smallest "
                       "finite sample), hi = max(1, largest finite sample), NaN and -inf as lo, +inf as hi, then RGB"),
                      "RGBA, LA, PA and P with a transparent colour: composited over white",
                      "any other mode: Image.convert('RGB')",
                      ("EXIF Orientation 2-8: turned upright with ImageOps.exif_transpose's table (Image.transpose); "
                       "an EXIF block Pillow cannot read: as stored")],
            "decode_version": DECODE_VERSION}


# -- the sample photos -------------------------------------------------------------------------
def spread(files: list, n: int) -> list:
    """``n`` of ``files`` evenly spread over the list (every class of a sorted folder), all when n is 0."""
    if not n or n >= len(files):
        return list(files)
    return [files[int(i)] for i in np.linspace(0, len(files) - 1, n).round()]


def training_photos(ckpt: dict, n: int) -> list[str]:
    """The first ``n`` rows of a head's training cache (their photos, when still there), or ``n`` photos
    of a whole model's training folder; [] when neither is reachable."""
    cache = ckpt.get("cache")
    if cache and Path(cache).is_file():
        from ..cache.feature_cache import FeatureCache

        try:
            with FeatureCache(cache) as c:
                root = Path(c.attrs.get("data_root", ""))
                paths = [str(root / p) for p in c.paths[:n or None]]
            return [p for p in paths if os.path.isfile(p)]
        except (ValueError, OSError, PipelineError) as e:  # CacheError is a ValueError
            log.debug("cannot read the photos of %s: %s", cache, e)
            return []
    data = (ckpt.get("config") or {}).get("data")
    if data and os.path.isdir(data):
        return spread(list_inputs([data]), n)
    return []


def sample_photos(cfg: ExportConfig, ckpt: dict) -> list[str]:
    if cfg.check_data:
        return spread(list_inputs([cfg.check_data]), cfg.check_n)
    files = training_photos(ckpt, cfg.check_n)
    if not files:
        raise UsageError(f"no photos for the parity check: the training data of {cfg.model!r} is not reachable; "
                         f"pass {option_text('check_data', Placeholder('DIR'))}")
    return files


# -- writing and running the file ----------------------------------------------------------------
def output_names(net: ProbabilityNet) -> list[str]:
    return list(OUTPUTS if net.unknown else OUTPUTS[:1])


def write_onnx(net: nn.Module, example, path: Path, meta: dict) -> None:
    """``net`` as an ONNX file at ``path``, ``meta`` inside it (metadata_props), with ``meta["opset"]`` added: the
    file's ONNX opset."""
    import onnx

    batch = torch.export.Dim("batch", min=1)
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [c.level for c in chatty]
    try:
        for c in chatty:  # the exporter's INFO lines on its own passes
            c.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # and its notes on its internals
            torch.onnx.export(net, (example,), str(path), input_names=[INPUT], output_names=output_names(net),
                              dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False,
                              verbose=False, report=False)
    finally:
        for c, level in zip(chatty, levels):
            c.setLevel(level)
    model = onnx.load(str(path))
    # which runtimes can load the file: the exporter picks the opset (20 from torch 2.14: ONNX Runtime 1.17 or
    # newer), said nowhere before; written into ``meta`` too, so the sidecar says it as well
    meta["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, str(path))


def write_torchscript(net: nn.Module, example, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, still the way to C++
        traced = torch.jit.trace(net, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_KEY: json.dumps(meta)})


def put_in_place(tmp: Path, out: Path, side: Path, meta: dict) -> None:
    """The checked file at ``out`` and its metadata at ``side``, under the output's lock; the old sidecar removed
    once the new file is whole beside the old, just before it takes its name, so an export stopped in between leaves
    the new file alone, never beside the old one's metadata, and one that fails before (a full disk, copying to a
    link's file on another disk) leaves the old export whole (its sidecar, removed first, was lost). An ``out``
    that is a link is written through (``files.atomic_write``): the metadata goes beside the file it leads to as
    well (``through_sidecar``), where its old one would no longer match it."""
    sides = dict.fromkeys([side, through_sidecar(out)])

    def old_sides_removed():
        for s in sides:
            written_through(s).unlink(missing_ok=True)  # a link kept, as the file's: written through

    with output_lock(written_through(out)):  # the lock of the file replaced: an export to its own name waits too
        # t beside a link's file, maybe on another file system
        atomic_write(out, lambda t: shutil.move(tmp, t), before_replace=old_sides_removed)
        for s in sides:
            write_json(s, meta)


def through_sidecar(out: Path) -> Path:
    """The metadata file beside the file ``out`` leads to (``sidecar_path`` of a link's file; of ``out`` itself)."""
    return sidecar_path(written_through(out))


class ExportedRunner:
    """The exported file loaded back as another program would load it: (N, 3, H, W) array -> probabilities."""

    def __init__(self, path: Path, fmt: str):
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # warnings and up only
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = torch.jit.load(str(path), map_location="cpu")

    def __call__(self, images: np.ndarray) -> tuple:
        """(probabilities (N, classes), unknown scores (N,) or None)."""
        x = np.ascontiguousarray(images, np.float32)
        if self.fmt == "onnx":
            out = self.session.run(None, {INPUT: x})
        else:
            with torch.inference_mode():
                got = self.module(torch.from_numpy(x))
            out = [t.numpy() for t in got] if isinstance(got, (tuple, list)) else [got.numpy()]
        return out[0], (out[1] if len(out) > 1 else None)


#: The odd files every parity check adds, made from its first photo: (file name, how it is made). Each
#: mode where a decoder can silently differ from predict's (16-bit scaling, transparency, CMYK, a JPEG
#: large enough to be decoded reduced, float gray, a photo stored sideways with its EXIF Orientation);
#: examples/predict_onnx.py once differed on all of them.
ODD_MODES = ("gray16.png", "gray_alpha.png", "rgba.png", "palette_transparent.png", "cmyk.jpg", "large.jpg",
             "float.tif", "exif_rotated.jpg")


def odd_mode_files(photo: str, folder: Path, draft_side) -> list[str]:
    """ODD_MODES versions of ``photo`` written into ``folder``; their paths ([] when it cannot be read)."""
    from PIL import Image

    from ..data.folders import ImageLoadError, load_rgb

    try:
        rgb = load_rgb(photo)
    except ImageLoadError:
        return []
    gray = np.asarray(rgb.convert("L"), np.uint16)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, rgb.width).astype(np.uint8), (rgb.height, 1)), "L")
    long_side = 4 * (draft_side or 256)  # 2 x D on the shorter side at least: decoded reduced where predict does
    large = rgb.resize((long_side, long_side * 3 // 4), Image.Resampling.BICUBIC)
    made = {"gray16.png": Image.fromarray(gray * 257 + 40),  # I;16, using the whole 16-bit range
            "gray_alpha.png": Image.merge("LA", (rgb.convert("L"), alpha)),
            "rgba.png": Image.merge("RGBA", (*rgb.split(), alpha)),
            "palette_transparent.png": rgb.quantize(16), "cmyk.jpg": rgb.convert("CMYK"), "large.jpg": large,
            "float.tif": Image.fromarray(gray.astype(np.float32) / 255, "F"),  # in [0, 1]
            "exif_rotated.jpg": rgb.transpose(Image.Transpose.ROTATE_90)}  # stored sideways, Orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    options = {"palette_transparent.png": {"transparency": 0}, "exif_rotated.jpg": {"exif": exif}}
    paths = []
    for name in ODD_MODES:
        path = folder / name
        made[name].save(path, **options.get(name, {}))
        paths.append(str(path))
    return paths


def probabilities_of(lm, photos: list[str], cfg: ExportConfig, desc: str = "parity") -> ImageOutputs:
    """predict's path over ``photos`` (from their bytes, fp32 on the CPU, or the int8 network of an int8 head):
    the rows of the readable ones (log-probabilities, then any unknown score) and the unreadable ones."""
    items = read_items(ImageListDataset(Path(""), [(f, -1) for f in photos], lm.transform), cfg.workers)
    rows = iter_log_proba(network(lm, "cpu", "fp32"), items, cfg.batch_size)
    return ImageOutputs(warn=False).collect(progress(rows, total=len(photos), desc=desc, unit="img"))


def parity(lm, runner: ExportedRunner, files: list[str], cfg: ExportConfig, meta: dict) -> dict:
    """Each photo from its bytes, twice: predict's path (fp32, CPU), and the exported file fed by the export's
    decoding rule (``data.portable.preprocess``, what examples/predict_onnx.py runs); on the sample photos and
    on ODD_MODES versions of the first. The largest |probability difference| (and |unknown score difference|)
    and whether every photo gets the same class."""
    import tempfile

    n_classes = len(lm.classes)
    worst, worst_unknown, same, n = 0.0, 0.0, 0, 0
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        odd = odd_mode_files(files[0], Path(tmp), meta["decoding"]["jpeg_draft_min_short_side"]) if files else []
        got = probabilities_of(lm, files + odd, cfg)
        bad = list(got.bad.items())
        for i in range(0, len(got.rows), cfg.batch_size):  # the loop's batches (batch_size readable photos each)
            logp, score = split_extras(np.stack(got.rows[i:i + cfg.batch_size]).astype(np.float64), n_classes)
            ours = np.exp(logp)
            theirs, their_score = runner(np.stack([portable_input(p, meta) for p in got.paths[i:i + cfg.batch_size]]))
            theirs = theirs.astype(np.float64)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            if score is not None:
                worst_unknown = max(worst_unknown, float(np.abs(score - their_score).max()))
            same += int((ours.argmax(1) == theirs.argmax(1)).sum())
            n += len(ours)
    if not n:
        raise UsageError(f"none of the {len(files)} photos for the parity check could be read "
                         f"(first: {bad[0][0]}: {bad[0][1]})")
    return {"images": n - len(odd), "odd_modes": [Path(f).name for f in odd], "unreadable": len(bad),
            "max_abs_diff": worst, "max_abs_diff_unknown": worst_unknown,
            "same_class": same, "tolerance": cfg.tolerance,
            "passed": worst <= cfg.tolerance and worst_unknown <= cfg.tolerance and same == n,
            "runtime": "onnxruntime (CPU)" if runner.fmt == "onnx" else "torch.jit.load (CPU)",
            "reference": "predict's path, fp32 on the CPU, against the export fed by its decoding rule, both from "
                         "each photo's bytes"}


def float_for_int8(ckpt: dict, cfg: ExportConfig, files: list[str]):
    """The model an int8-cache head is exported as: its backbone in float (neither format holds oneDNN's prepacked
    int8 kernels; the float network is what the int8 one approximates, cosine 0.997 on VGG-16's rows), and how
    far its probabilities are from predict's, which runs the int8 network, on the sample photos."""
    int8 = probabilities_of(model_from_checkpoint(ckpt, cfg.model, cfg.weights), files, cfg, "predict (int8)")
    lm = model_from_checkpoint(ckpt, cfg.model, cfg.weights, trainable=True)  # the float backbone
    floats = probabilities_of(lm, files, cfg, "float backbone")
    if not int8.rows:  # nothing readable: the parity check says so
        return lm, {"images": 0}
    a, b = (np.exp(split_extras(np.stack(o.rows).astype(np.float64), len(lm.classes))[0]) for o in (int8, floats))
    gap = {"images": len(a), "max_abs_diff": float(np.abs(a - b).max()),
           "same_class": int((a.argmax(1) == b.argmax(1)).sum())}
    log.warning("%s was fitted on its cache's int8 features; the export runs %s in float (ONNX and TorchScript "
                "cannot hold oneDNN's int8 kernels): on %d sample photos its probabilities differ from predict's "
                "by up to %.3g, the same class on %d", cfg.model, ckpt["backbone"], gap["images"],
                gap["max_abs_diff"], gap["same_class"])
    return lm, gap


def portable_input(path: str, meta: dict) -> np.ndarray:
    """The export's input for one photo by its own decoding rule; a photo the rule cannot read fails the export."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # EXIF notes, as predict's
            return portable.preprocess(path, meta["preprocessing"], meta["decoding"])
    except (OSError, ValueError, SyntaxError) as e:
        raise PipelineError(f"{path}: predict reads it but the export's decoding rule (data/portable.py) "
                            f"does not: {e}") from None


#: the names a user reads as the other format; a file named for one format holding the other fails later, in the
#: runner it was handed to
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript", ".jit")}


def check_suffix(cfg: ExportConfig) -> None:
    """Refuse --output named for the other format (model.onnx written as TorchScript); other names pass."""
    suffix = Path(cfg.output).suffix.lower()
    for fmt, names in SUFFIXES.items():
        if fmt != cfg.format and suffix in names:
            raise UsageError(f"{option_text('output')} {cfg.output!r} names {'an' if fmt == 'onnx' else 'a'} {fmt} "
                             f"file but {option_text('format')} is {cfg.format!r}: pass {option_text('format', fmt)}, "
                             f"or name the file {Path(cfg.output).stem}{SUFFIXES[cfg.format][0]}")


def check_outputs(cfg: ExportConfig, ckpt: dict) -> tuple[Path, Path]:
    """(the file, its metadata file) once neither replaces what the export reads: the model, its weights
    and their sidecar, its cache, training photos (the default parity check's) and --check-data."""
    inputs, data = checkpoint_reads(ckpt, cfg.model, cfg.weights)
    inputs = [*inputs, (cfg.check_data, "the parity check's photos")]
    data = [*data, (cfg.check_data, "the parity check's photos")]
    out = check_output(cfg.output, inputs, data)
    check_replaceable(out, is_export, "an earlier export")
    side = sidecar_path(out)
    if len(os.fsencode(side.name)) > NAME_MAX:  # else 'unexpected OSError: File name too long' after the export
        raise UsageError(f"{option_text('output')} is named with {len(os.fsencode(out.name))} bytes: its metadata "
                         f"file (+ '.json') would be longer than a file name may be ({NAME_MAX} bytes); name it with "
                         f"{NAME_MAX - len('.json')} or fewer")
    what = f"the metadata file beside --output {cfg.output!r}:"
    side = check_output(side, inputs, data, what=what)
    check_replaceable(side, is_sidecar, "an earlier export's metadata", what=what, other="--output")
    through = through_sidecar(out)
    if through != side:  # --output a link: the metadata beside the file it leads to is replaced too
        what = f"the metadata file beside {str(written_through(out))!r}, which --output {cfg.output!r} links to:"
        check_replaceable(check_output(through, inputs, data, what=what), is_sidecar, "an earlier export's metadata",
                          what=what, other="--output")
    return out, side


@dataclass(frozen=True)
class ExportResult:
    """export's answer: the parity check against predict, and what was written (nothing when it failed)."""

    model: str
    kind: str
    format: str
    classes: list
    max_abs_diff: float  # the largest |probability difference| vs predict on the sample photos
    passed: bool  # within --tolerance: the file was written
    parity: dict  # the check in full: photos, odd-mode files, same class, tolerance
    output: Optional[str]  # the exported file; None when the check failed
    metadata: Optional[str]  # its .json sidecar; None when the check failed
    bytes: Optional[int] = None  # the file's size; None (and not in to_dict) when nothing was written

    def to_dict(self) -> dict:
        """The answer as --json prints it: no bytes when nothing was written."""
        d = asdict(self)
        if d["bytes"] is None:
            del d["bytes"]
        return d


def export(cfg: ExportConfig) -> ExportResult:
    """Write cfg.model as one cfg.format file (+ its .json sidecar) when it passes the parity check.

    A failed check writes nothing (the result says ``passed: False`` and by how much it failed).
    """
    check_config(cfg)
    if not cfg.output:
        raise UsageError(f"{option_text('output', Placeholder('FILE'))} is needed: where the exported model goes")
    check_suffix(cfg)  # before check_outputs, which makes --output's folder
    ckpt = read_checkpoint(cfg.model)
    out, side = check_outputs(cfg, ckpt)
    require(cfg.format)
    int8 = ckpt["kind"] == "fit-head" and ckpt.get("precision") == "int8"
    if int8 and ckpt.get("fused"):  # refused before anything is loaded
        raise UsageError(f"{cfg.model!r} runs its caches' int8 networks (prepacked oneDNN kernels), which neither "
                         "ONNX nor TorchScript can hold; fit the head on float caches "
                         f"(extract {option_text('precision', 'bf16')}) to export it")
    files = sample_photos(cfg, ckpt)
    if int8:
        lm, int8_gap = float_for_int8(ckpt, cfg, files)
    else:
        lm, int8_gap = model_from_checkpoint(ckpt, cfg.model, cfg.weights), None
    meta = {**metadata(cfg, ckpt, lm), "export_id": uuid.uuid4().hex}  # the file's and its sidecar's
    if int8_gap:  # what the file runs is not what the head's rows came from: said in its metadata too
        meta["int8_cache"] = {"network": "float (the int8 network cannot be exported)", "vs_predict": int8_gap}
    net = ProbabilityNet(lm.model).eval()
    tmp = temporary_name(out, ".export")  # .NAME.PID.export; a name of 240 characters failed 'File name too long'
    clear_dead_temporaries(out, ".export")  # a killed export's, as large as the model
    with unwinding_on_signals():  # SIGTERM or SIGHUP too removes the unchecked file (Ctrl-C always did)
        try:
            log.info("exporting %s (%s) as %s", cfg.model, ckpt["kind"], cfg.format)
            example = torch.zeros(2, *input_shape(lm.transform))  # 2, not 1: a batch of 1 would fix the batch size
            (write_onnx if cfg.format == "onnx" else write_torchscript)(net, example, tmp, meta)
            log.info("parity check on %d photo%s", len(files), "" if len(files) == 1 else "s")
            check = parity(lm, ExportedRunner(tmp, cfg.format), files, cfg, meta)
            if int8_gap:
                check["int8_cache"] = meta["int8_cache"]
            result = ExportResult(model=cfg.model, kind=ckpt["kind"], format=cfg.format, classes=lm.classes,
                                  max_abs_diff=check["max_abs_diff"], passed=check["passed"], parity=check,
                                  output=None, metadata=None)
            if check["passed"]:
                put_in_place(tmp, out, side, {**meta, "parity": check})
                result = replace(result, output=str(out), metadata=str(side), bytes=out.stat().st_size)
            else:
                log.warning("the %s export differs from predict by %.3g (tolerance %g; %d of %d photos of the same "
                            "class): nothing written", cfg.format, check["max_abs_diff"], cfg.tolerance,
                            check["same_class"], check["images"] + len(check["odd_modes"]))
            return result
        finally:
            if tmp.exists():
                tmp.unlink()
