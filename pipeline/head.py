"""The fit-head stage: a Linear + LogSoftmax classifier trained from a feature cache in seconds.

Features stream from HDF5 in contiguous blocks (shuffled block order, shuffled rows within a
block), so memory stays bounded for caches larger than RAM.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .cache import FeatureCache, newest_cache, source_changes
from .training import per_class_accuracy, run_epochs, split_indices, train_one_epoch, validate_training

log = logging.getLogger(__name__)


@dataclass
class FitHeadConfig:
    """How to train the head, and on which cache."""

    cache: Optional[str] = None  # cache file; None = the newest complete cache in cache_dir
    cache_dir: str = "features"  # where to look for the newest cache
    epochs: int = 10  # passes over the training split
    lr: float = 0.01  # Adam learning rate
    batch_size: int = 32  # rows per optimisation step
    val_fraction: float = 0.125  # share of rows held out for validation (stratified; 100 of 800)
    dropout: float = 0.0  # dropout before the linear layer when > 0
    seed: int = 0  # seeds the split, the initialisation and the shuffling
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda'
    block_rows: int = 2048  # rows read from disk at once (bounds memory: block_rows x row size)
    scale_features: bool = True  # train on features / RMS (folded into the saved weights): sane losses at lr 0.01
    runs_dir: str = "runs"  # where the checkpoint, history and curves go (one folder per run)


def resolve_cache(cache: Optional[str], cache_dir: str) -> tuple[Path, Optional[dict]]:
    """The cache to use, and (when none was named) a description of the one picked by default.

    The default, the newest complete cache in ``cache_dir``, is announced on stderr: a run that
    silently trained on another extraction than the user thought is worse than a longer log.
    """
    if cache:
        return Path(cache), None
    info = newest_cache(cache_dir)
    chosen = {k: info.summary()[k] for k in ("path", "rows", "backbone", "created")}
    log.info("using the newest cache %s (%d rows, %s, created %s); --cache picks another",
             chosen["path"], chosen["rows"], chosen["backbone"], chosen["created"])
    return info.path, chosen


def feature_rms(cache: FeatureCache, indices: np.ndarray, block_rows: int) -> float:
    """Root-mean-square of the features over (up to one block of) ``indices``."""
    _, feats = next(cache.iter_batches(indices, 256, block_rows))
    sample = feats.astype(np.float32)
    return float(np.linalg.norm(sample) / np.sqrt(sample.size)) or 1.0


def fold_scale(head, scale: float) -> None:
    """Make ``head(x)`` equal what it computed on ``x * scale``: Linear(W, b)(s x) = Linear(s W, b)(x)."""
    import torch

    linear = [m for m in head if isinstance(m, torch.nn.Linear)][0]
    with torch.no_grad():
        linear.weight.mul_(scale)


def evaluate_head(head, cache: FeatureCache, indices: np.ndarray, device, block_rows: int,
                  batch_size: int = 256, scale: float = 1.0) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean NLL and log-probabilities (rows in ``indices`` order) over some cache rows."""
    import torch

    head.eval()
    out = np.zeros((len(indices), len(cache.classes)), np.float32)
    i = 0
    with torch.inference_mode():
        for rows, feats in cache.iter_batches(indices, batch_size, block_rows):  # in sorted row order
            lp = head(torch.from_numpy(feats.astype(np.float32)).to(device) * scale).float().cpu().numpy()
            out[i:i + len(lp)] = lp
            i += len(lp)
    order = np.sort(indices)
    y = cache.labels[order]
    nll = float(-out[np.arange(len(y)), y].mean())
    acc = float((out.argmax(1) == y).mean())
    return acc, nll, out


def fit_head(cfg: FitHeadConfig) -> dict:
    """Train the head on the cache's train split; returns metrics and where the outputs went."""
    import torch

    from .device import resolve_device
    from .models import build_head
    from .progress import progress
    from .provenance import Provenance
    from .paths import atomic_write
    from .runs import finish_run, new_run_dir

    validate_training(cfg, positive=("epochs", "batch_size", "block_rows"))
    path, default_cache = resolve_cache(cfg.cache, cfg.cache_dir)
    device = resolve_device(cfg.device)
    with FeatureCache(path) as cache:
        changed = source_changes(cache.info)
        if changed:
            log.warning("%s: %s", path, changed)
        train_idx, val_idx = split_indices(cache.labels, cfg.val_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)
        head = build_head(cache.feature_shape, len(cache.classes), cfg.dropout).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
        scale = 1.0 / feature_rms(cache, train_idx, cfg.block_rows) if cfg.scale_features else 1.0
        rng = np.random.default_rng(cfg.seed)

        def minibatches(epoch: int):
            bar = progress(total=len(train_idx), desc=f"epoch {epoch}", unit="row", leave=False)
            for rows, feats in cache.iter_batches(train_idx, cfg.batch_size, cfg.block_rows, rng):
                yield (torch.from_numpy(feats.astype(np.float32)).to(device) * scale,
                       torch.from_numpy(cache.labels[rows]).to(device))
                bar.update(len(rows))
            bar.close()

        def one_epoch(epoch: int):
            acc, loss, _ = train_one_epoch(head, opt, minibatches(epoch), device)
            return acc, loss, {}

        def validate():
            return evaluate_head(head, cache, val_idx, device, cfg.block_rows, scale=scale)[:2]

        t0 = time.time()
        history = run_epochs(cfg.epochs, one_epoch, validate)
        fit_seconds = time.time() - t0
        fold_scale(head, scale)  # the saved head takes raw cached features
        _, _, logp = evaluate_head(head, cache, val_idx, device, cfg.block_rows)
        y_val = cache.labels[np.sort(val_idx)]
        per_class = per_class_accuracy(y_val, logp.argmax(1), cache.classes)
        out_dir = new_run_dir(cfg.runs_dir, "fit-head")
        ckpt = {
            "kind": "fit-head", **Provenance.from_cache_attrs(cache.attrs).checkpoint_fields(),
            "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
            "in_shape": list(cache.feature_shape), "in_features": int(np.prod(cache.feature_shape)),
            "dropout": cfg.dropout, "config": asdict(cfg),
            "cache": str(path), "cache_fingerprint": cache.attrs["fingerprint"], "metrics": history[-1],
        }
        atomic_write(out_dir / "head.pt", lambda tmp: torch.save(ckpt, tmp))
    last = history[-1]
    curves = finish_run(out_dir, cfg.runs_dir, "fit-head", history, [out_dir / "head.pt"], cache=str(path),
                        params=asdict(cfg),
                        metrics={k: last[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")})
    return {"cache": str(path), "run_dir": str(out_dir), "checkpoint": str(out_dir / "head.pt"),
            "curves": str(curves),
            "train_rows": int(len(train_idx)), "val_rows": int(len(val_idx)), "val_acc": last["val_acc"],
            "val_loss": last["val_loss"], "train_acc": last["train_acc"], "train_loss": last["train_loss"],
            "per_class_val_acc": per_class, "fit_seconds": fit_seconds, "history": history,
            "source_changed": changed, "default_cache": default_cache}
