"""The fit-head stage: a Linear + LogSoftmax classifier trained from a feature cache in seconds.

Features stream from HDF5 in contiguous blocks (shuffled block order, shuffled rows within a
block), so memory stays bounded for caches larger than RAM.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .cache import FeatureCache, newest_cache, source_changes

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


def validate_common(val_fraction: float, seed: int) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")


def validate_training(cfg, positive: tuple = (), non_negative: tuple = ()) -> None:
    """The option checks fit-head, train and finetune share (split, counts, lr, dropout)."""
    validate_common(cfg.val_fraction, cfg.seed)
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")


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


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified train/val split of row indices (both sorted).

    Each class gives round(val_fraction x its size) rows to validation (at least one when it has
    two or more), so 800 balanced rows at 0.125 split 700/100. fit-head and compare-sklearn both
    call this, so they see the same split.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(val_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        val.extend(rng.permutation(idx)[:k].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"--val-fraction {val_fraction} leaves an empty split of {len(labels)} rows")
    return train, val


def build_head(in_shape, n_classes: int, dropout: float = 0.0):
    """Flatten + (Dropout) + Linear(C*H*W, classes) + LogSoftmax: the tutorial's head."""
    from torch import nn

    in_features = int(np.prod(in_shape))
    layers = [nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(in_features, n_classes), nn.LogSoftmax(dim=1)]
    return nn.Sequential(*layers)


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


def per_class_accuracy(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    return {c: float((pred[y == i] == i).mean()) if (y == i).any() else None for i, c in enumerate(classes)}


def run_dir(runs_dir: str, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{stamp}-{kind}"
    d, k = base, 1
    while d.exists():
        k += 1
        d = base.with_name(f"{base.name}-{k}")
    d.mkdir(parents=True)
    return d


def fit_head(cfg: FitHeadConfig) -> dict:
    """Train the head on the cache's train split; returns metrics and where the outputs went."""
    import torch
    from torch import nn
    from .progress import progress

    from . import plots
    from .device import resolve_device

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
        loss_fn = nn.NLLLoss()
        scale = 1.0 / feature_rms(cache, train_idx, cfg.block_rows) if cfg.scale_features else 1.0
        rng = np.random.default_rng(cfg.seed)
        history = []
        t0 = time.time()
        for epoch in range(1, cfg.epochs + 1):  # epochs count from 1 everywhere: logs, history, curves
            head.train()
            seen = correct = 0
            loss_sum = 0.0
            bar = progress(total=len(train_idx), desc=f"epoch {epoch}", unit="row", leave=False)
            for rows, feats in cache.iter_batches(train_idx, cfg.batch_size, cfg.block_rows, rng):
                x = torch.from_numpy(feats.astype(np.float32)).to(device) * scale
                y = torch.from_numpy(cache.labels[rows]).to(device)
                opt.zero_grad()
                out = head(x)
                loss = loss_fn(out, y)
                loss.backward()
                opt.step()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += int((out.argmax(1) == y).sum())
                bar.update(len(y))
            bar.close()
            val_acc, val_loss, _ = evaluate_head(head, cache, val_idx, device, cfg.block_rows, scale=scale)
            row = {"epoch": epoch, "train_acc": correct / seen, "val_acc": val_acc,
                   "train_loss": loss_sum / seen, "val_loss": val_loss, "seconds": time.time() - t0}
            history.append(row)
            print(f"Epoch {epoch}, Train acc={row['train_acc']:.3f}, Val acc={val_acc:.3f}, "
                  f"Train loss={row['train_loss']:.3f}, Val loss={val_loss:.3f}", file=sys.stderr)
        fit_seconds = time.time() - t0
        fold_scale(head, scale)  # the saved head takes raw cached features
        _, _, logp = evaluate_head(head, cache, val_idx, device, cfg.block_rows)
        y_val = cache.labels[np.sort(val_idx)]
        per_class = per_class_accuracy(y_val, logp.argmax(1), cache.classes)
        out_dir = run_dir(cfg.runs_dir, "fit-head")
        ckpt = {
            "kind": "fit-head", "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
            "in_shape": list(cache.feature_shape), "in_features": int(np.prod(cache.feature_shape)),
            "classes": list(cache.classes), "dropout": cfg.dropout, "config": asdict(cfg),
            "cache": str(path), "cache_fingerprint": cache.attrs["fingerprint"],
            "backbone": cache.attrs["backbone"], "weights": cache.attrs["weights"],
            "weights_sha256": cache.attrs.get("weights_sha256", ""), "weights_path": cache.attrs.get("weights_path", ""),
            "mean": list(cache.attrs["mean"]), "std": list(cache.attrs["std"]),
            "transform": cache.attrs["transform"], "pool": cache.attrs.get("pool", "none"),
            "metrics": history[-1],
        }
        torch.save(ckpt, out_dir / "head.pt")
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        curves = plots.curves(history, out_dir / "curves.png")
    last = history[-1]
    from .ledger import append_run

    append_run(cfg.runs_dir, "fit-head", cache=str(path), params=asdict(cfg),
               metrics={k: last[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")},
               outputs=[out_dir / "head.pt", curves])
    return {"cache": str(path), "run_dir": str(out_dir), "checkpoint": str(out_dir / "head.pt"),
            "curves": str(curves),
            "train_rows": int(len(train_idx)), "val_rows": int(len(val_idx)), "val_acc": last["val_acc"],
            "val_loss": last["val_loss"], "train_acc": last["train_acc"], "train_loss": last["train_loss"],
            "per_class_val_acc": per_class, "fit_seconds": fit_seconds, "history": history,
            "source_changed": changed, "default_cache": default_cache}
