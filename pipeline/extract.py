"""The extract stage: image folder -> frozen CNN -> HDF5 feature cache, resumable and reused.

reader (``ImageListDataset`` in a DataLoader) -> model (``FeatureModel``) -> writer
(``cache.CacheWriter``). The cache's name is a fingerprint of everything that changes its
contents, so the same request is answered from disk without importing torch.
"""
from __future__ import annotations

import json
import logging
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np

from . import backbones as bb
from . import distributed
from .cache import (
    STORAGE_DTYPES,
    CacheBusy,
    CacheError,
    CacheInfo,
    CacheWriter,
    cache_file_name,
    fingerprint,
    now_iso,
    read_info,
)
from .data import ImageFolderListing, list_image_folder, stratified_order
from .device import resolve_workers

log = logging.getLogger(__name__)

POOLS = ("none", "avg")
DECODERS = ("pil", "device")


@dataclass
class ExtractConfig:
    """What to extract, from where, and how."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    n: int = 800  # how many good images (a seeded stratified sample); 0 = all
    backbone: str = "vgg16"  # a name from backbones.BACKBONES
    weights: str = "DEFAULT"  # torchvision weights name, path to a state-dict file, or 'none'
    batch_size: int = 32  # images per forward pass (and per committed write)
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    workers: int = -1  # decoding processes; -1 = one per CPU core (at most 8), 0 = decode in-process
    seed: int = 0  # which n images: the seed of the stratified sample
    dtype: str = "float16"  # storage dtype of features: float16 (half the size, same accuracy) or float32
    precision: str = "auto"  # compute precision: auto (bf16 where supported), fp32, bf16, fp16 (CUDA)
    pool: str = "none"  # 'none' keeps the C x H x W map; 'avg' stores globally averaged C x 1 x 1 vectors
    decode: str = "pil"  # 'pil' (JPEGs decoded by the workers) or 'device' (decode_jpeg on the device: nvJPEG)
    cache_dir: str = "features"  # where caches live
    shard_dir: str = ""  # under torchrun: where each rank's shard files go ('' = <cache_dir>/<cache name>.shards)
    command: str = ""  # the command line, recorded so an incomplete cache can say how to finish it


def validate(cfg: ExtractConfig) -> None:
    if cfg.n < 0:
        raise ValueError(f"--n must be 0 (all) or positive, got {cfg.n}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; allowed: {', '.join(STORAGE_DTYPES)}")
    if cfg.pool not in POOLS:
        raise ValueError(f"unknown --pool {cfg.pool!r}; allowed: {', '.join(POOLS)}")
    if cfg.decode not in DECODERS:
        raise ValueError(f"unknown --decode {cfg.decode!r}; allowed: {', '.join(DECODERS)}")
    bb.get_spec(cfg.backbone)
    if not Path(cfg.data).is_dir():
        raise ValueError(f"data folder {cfg.data!r} does not exist; `python cli.py fetch-data` downloads the Kaggle "
                         "cats-vs-dogs set to data/PetImages, or pass --data DIR")
    if bb.is_weights_path(cfg.weights) and not Path(cfg.weights).is_file():
        raise ValueError(f"weights file {cfg.weights!r} does not exist")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict:
    return {"python": platform.python_version(),
            **{p: _version(p) for p in ("torch", "torchvision", "h5py", "numpy", "pillow", "transfer-pipeline")}}


def weights_identity(cfg: ExtractConfig) -> dict:
    """What names the weights, without loading them: a torchvision name, or a file's hash + sidecar."""
    if cfg.weights.lower() == "none":
        return {"weights": "none"}
    if bb.is_weights_path(cfg.weights):
        p = Path(cfg.weights)
        return {"weights_sha256": bb.file_sha256(p), "sidecar": bb.read_sidecar(p)}
    return {"weights": cfg.weights.split(".")[-1]}


def cache_key(cfg: ExtractConfig, listing: ImageFolderListing) -> str:
    """Fingerprint of everything that changes the cache's contents (not batch size or workers)."""
    return fingerprint({
        "format": 1, "data": listing.fingerprint(), "backbone": cfg.backbone, **weights_identity(cfg),
        "n": cfg.n, "seed": cfg.seed, "dtype": cfg.dtype, "precision": cfg.precision, "pool": cfg.pool,
        "torchvision": _version("torchvision"),
        **({"decode": cfg.decode} if cfg.decode != "pil" else {}),  # another decoder: slightly other pixels
    })


# -- reader ------------------------------------------------------------------------------------
class ImageListDataset:
    """Candidates in selection order -> (position, tensor or None, label, path, reason).

    With ``raw_jpeg``, JPEGs come back undecoded (their bytes as a 1-D uint8 tensor) for
    ``device_decode``; everything else is decoded here as usual.
    """

    def __init__(self, root: Path, items: list, transform, start: int = 0, raw_jpeg: bool = False):
        self.root, self.items, self.transform, self.start, self.raw_jpeg = root, items, transform, start, raw_jpeg

    def __len__(self):
        return len(self.items) - self.start

    def __getitem__(self, i):
        from .data import ImageLoadError, load_rgb

        pos = self.start + i
        path, label = self.items[pos]
        try:
            if self.raw_jpeg:
                import torch

                from .data import jpeg_bytes

                data = jpeg_bytes(self.root / path)
                if data is not None:
                    return pos, torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path, None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF warnings: the image itself decoded
                return pos, self.transform(load_rgb(self.root / path)), label, path, None
        except ImageLoadError as e:
            return pos, None, label, path, e.reason


def _keep_list(batch):
    return batch


def iter_candidates(dataset: ImageListDataset, workers: int):
    """The dataset's items in order, decoded by ``workers`` background processes started right away.

    Start them before opening any file for writing: forked workers inherit open descriptors
    (and HDF5's lock on them), which would outlive a killed parent for a few seconds.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=_keep_list,
                        prefetch_factor=4 if workers else None)
    return (item for chunk in iter(loader) for item in chunk)


# -- model -------------------------------------------------------------------------------------
class FeatureModel:
    """A frozen feature extractor on a device and precision: a batch of image tensors -> numpy features.

    Fast paths: channels_last weights and inputs (what oneDNN and cuDNN run fastest), autocast
    in bf16/fp16 (``precision``), on CUDA a page-locked staging buffer so the host-to-device copy
    is asynchronous, and a batch that runs out of GPU memory is split (``device.AdaptiveBatch``).
    The output is cast once, on the device, to the storage dtype in plain NCHW layout: the only
    copy between the network and the HDF5 writer.
    """

    def __init__(self, features, device, precision: str, pool: str, out_dtype: str):
        import torch

        from .device import AdaptiveBatch

        self.device, self.precision, self.pool, self.out_dtype = device, precision, pool, np.dtype(out_dtype)
        self.torch_out = getattr(torch, self.out_dtype.name)
        self.net = features.eval().to(device, memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # every batch has the same input size
        self._staging = None  # pinned host buffer the batches are stacked into (CUDA only)
        self.run = AdaptiveBatch(self._forward, on_oom=torch.cuda.empty_cache if self.cuda else None)

    def stack(self, tensors: list):
        """Stack per-image tensors into one batch; on CUDA straight into pinned memory."""
        import torch

        if not self.cuda or tensors[0].device.type == "cuda":  # decoded on the GPU already
            return torch.stack(tensors)
        shape = (len(tensors), *tensors[0].shape)
        buf = self._staging
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != tensors[0].dtype:
            buf = self._staging = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
        return torch.stack(tensors, out=buf[:shape[0]])

    def __call__(self, x) -> np.ndarray:
        """``x``: a (B, 3, H, W) float tensor or a list of (3, H, W) tensors -> (B, C, H', W') array."""
        if isinstance(x, (list, tuple)):
            x = self.stack(list(x))
        return self.run(x)

    def _forward(self, x) -> np.ndarray:
        import torch

        from .device import autocast

        with torch.inference_mode():
            with autocast(self.device, self.precision):
                y = self.net(x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            if self.pool == "avg":
                y = torch.nn.functional.adaptive_avg_pool2d(y.float(), 1)
            # one cast + relayout on the device; .cpu() copies only from a GPU (and synchronises,
            # so the pinned staging buffer is free again for the next batch)
            y = y.to(self.torch_out, memory_format=torch.contiguous_format).cpu()
        return y.numpy()


# -- the stage ---------------------------------------------------------------------------------
def _hit(info: CacheInfo, started: float) -> dict:
    return {"cache": str(info.path), "hit": True, "rows": info.rows, "skipped": int(info.attrs.get("skipped_rows", 0)),
            "feature_shape": list(info.feature_shape), "classes": info.classes, "seconds": time.time() - started}


def existing_cache(path: Path, key: str) -> Optional[CacheInfo]:
    """The cache at ``path`` when it belongs to this request (complete, or to resume), else None.

    A file that is damaged, foreign or of another fingerprint is moved aside (never deleted) and
    extraction starts again; a file another process holds is an error (CacheBusy).
    """
    if not path.exists():
        return None
    try:
        info = read_info(path)
        if info.attrs["fingerprint"] != key:
            raise CacheError("fingerprint differs")
        return info
    except CacheBusy:
        raise
    except CacheError as e:
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        log.warning("cache %s could not be resumed (%s); moved it to %s and starting again", path, e, aside)
        return None


def extract(cfg: ExtractConfig) -> dict:
    """Run (or reuse, or resume) one extraction; returns a summary with the cache path."""
    started = time.time()
    validate(cfg)
    listing = list_image_folder(cfg.data)
    total = len(listing.files)
    if cfg.n > total:
        raise ValueError(f"--n {cfg.n} is more than the {total} images in {cfg.data}")
    key = cache_key(cfg, listing)
    path = Path(cfg.cache_dir) / cache_file_name(cfg.backbone, cfg.n, key)
    if distributed.world_size() > 1:  # started by torchrun: this rank extracts its shard
        return distributed.extract_sharded(cfg, listing, key, path, started)
    info = existing_cache(path, key)
    if info is not None and info.complete:
        return _hit(info, started)
    if info is not None:
        log.info("resuming %s from row %d", path, info.rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _run(cfg, listing, key, path, resumed=info)


def _run(cfg: ExtractConfig, listing: ImageFolderListing, key: str, path: Path, resumed: Optional[CacheInfo] = None,
         part: "distributed.Part | None" = None) -> dict:
    """Extract into ``path`` (continuing ``resumed``, its validated progress); with ``part``, only its candidate
    positions (one shard of a torchrun run)."""
    from .progress import progress

    from .device import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    backbone = bb.load_backbone(cfg.backbone, cfg.weights)
    model = FeatureModel(backbone.features, device, precision, cfg.pool, cfg.dtype)
    backbone.model = None  # the classifier (about 500 MB for VGG-16) is not needed to extract
    order = stratified_order(listing.labels, cfg.seed)
    items = [(listing.files[i].path, listing.files[i].label) for i in order]
    target = part.take if part else (cfg.n or len(items))
    attrs = {
        "fingerprint": key, "backbone": cfg.backbone, "weights": backbone.weights_id,
        "weights_sha256": backbone.weights_sha256, "weights_covers": backbone.covers,
        "weights_path": str(Path(cfg.weights).resolve()) if backbone.weights_sha256 else "",
        "mean": np.array(backbone.mean), "std": np.array(backbone.std),
        "transform": backbone.describe_transform(), "classes": json.dumps(list(listing.classes)),
        "seed": cfg.seed, "n_requested": cfg.n, "sample": "seeded, stratified by class (proportional)",
        "data_root": str(Path(cfg.data).resolve()), "data_fingerprint": listing.fingerprint(),
        "n_source_files": len(items), "dtype": cfg.dtype, "precision": precision, "device": str(device),
        "pool": cfg.pool, "batch_size": cfg.batch_size, "versions": json.dumps(versions()),
        "created": now_iso(), "command": cfg.command, "config": json.dumps(asdict(cfg)),
        **(part.attrs if part else {}),
    }
    workers = resolve_workers(cfg.workers)
    if resumed is not None and resumed.attrs["precision"] != precision:
        raise ValueError(f"{path} was started in precision {resumed.attrs['precision']!r} and this run computes in "
                         f"{precision!r}; pass --precision {resumed.attrs['precision']} to finish it")
    start = max(int(resumed.attrs["next_candidate"]) if resumed else 0, part.first if part else 0)
    if part:
        items = items[:part.stop]
    rows = start_rows = resumed.rows if resumed else 0
    # the decoding workers fork before the cache file is opened, so they never hold it
    dataset = ImageListDataset(listing.root, items, backbone.transform, start=start, raw_jpeg=cfg.decode == "device")
    candidates = iter_candidates(dataset, workers) if rows < target else iter(())
    if cfg.decode == "device":
        from .device_decode import decode_on_device

        candidates = decode_on_device(candidates, backbone.transform, device, listing.root)
    t0 = time.time()
    with CacheWriter(path, attrs, source=listing) as writer:
        if writer.rows != start_rows:
            raise CacheError(f"{path} changed while this extraction started; run it again")
        bar = progress(total=target, initial=start_rows, unit="img", desc="extract")
        good, bad = [], []

        def commit(next_candidate: int) -> None:
            nonlocal rows, good, bad
            feats = model([g[1] for g in good]) if good else None
            writer.append(feats, [g[2] for g in good], [g[3] for g in good], next_candidate,
                          [(b[3], b[4]) for b in bad])
            rows += len(good)
            bar.update(len(good))
            bar.set_postfix(skipped=writer.skipped_rows, refresh=False)
            good, bad = [], []

        pos = writer.next_candidate - 1
        try:
            for item in candidates:
                pos = item[0]
                if item[1] is None:
                    log.warning("skipping %s: %s", item[3], item[4])
                    bad.append(item)
                    continue
                good.append(item)
                if len(good) == cfg.batch_size or rows + len(good) == target:
                    commit(pos + 1)
                    if rows == target:
                        break
            if good or bad:
                commit(pos + 1)
        finally:
            bar.close()
        skipped = writer.skipped_rows
        if rows == 0 and not part:
            raise ValueError(f"no image in {cfg.data} could be decoded ({skipped} tried); run check-images on it")
        if rows < target and not part:
            log.warning("only %d good images of the %d %s (%d skipped)", rows, target,
                        "asked for" if cfg.n else "files", skipped)
        writer.finish()
        shape = list(writer.f["features"].shape[1:]) if "features" in writer.f else []
    seconds = time.time() - t0
    computed = rows - start_rows
    return {"cache": str(path), "hit": False, "rows": rows, "computed": computed, "resumed_from": start_rows,
            "skipped": skipped, "feature_shape": shape, "classes": list(listing.classes),
            "device": str(device), "precision": precision, "seconds": seconds,
            "img_per_s": computed / seconds if seconds > 0 else 0.0}

