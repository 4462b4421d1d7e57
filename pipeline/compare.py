"""The compare-sklearn stage: scikit-learn logistic regression vs the torch head, same split."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from .cache import FeatureCache
from .head import FitHeadConfig, fit_head, resolve_cache
from .training import per_class_accuracy, split_indices, validate_split
from .ledger import append_run
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    """Which cache and split, and the settings of each model."""

    cache: Optional[str] = None  # cache file; None = the newest complete cache in cache_dir
    cache_dir: str = "features"  # where to look for the newest cache
    val_fraction: float = 0.125  # the same meaning and default as fit-head
    seed: int = 0  # the split seed, shared with fit-head
    C: float = 1.0  # inverse regularisation strength of LogisticRegression
    max_iter: int = 1000  # lbfgs iterations
    scale: bool = True  # standardise features first (lbfgs converges far faster on VGG's unscaled maps)
    head: Optional[FitHeadConfig] = None  # settings for the torch head trained alongside (cache/split filled in)
    block_rows: int = 2048  # rows read from disk at once


def load_rows(cache: FeatureCache, indices: np.ndarray, block_rows: int) -> np.ndarray:
    """Rows ``indices`` (sorted) as a float32 (len, C*H*W) array, filled block by block."""
    d = int(np.prod(cache.feature_shape))
    x = np.empty((len(indices), d), np.float32)
    i = 0
    for rows, block, sel in cache.iter_blocks(indices, block_rows):
        x[i:i + len(rows)] = block[sel].reshape(len(rows), d)
        i += len(rows)
    return x


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    p = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return float(-np.log(p).mean())


def fit_sklearn(cfg: CompareConfig, cache: FeatureCache) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_idx, val_idx = split_indices(cache.labels, cfg.val_fraction, cfg.seed)
    gb = len(train_idx) * int(np.prod(cache.feature_shape)) * 4 / 1e9
    log.info("loading %d training rows (%.2f GB as float32) for scikit-learn", len(train_idx), gb)
    x_train = load_rows(cache, train_idx, cfg.block_rows)
    y_train = cache.labels[train_idx]
    steps = [StandardScaler()] if cfg.scale else []
    model = make_pipeline(*steps, LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
    t0 = time.time()
    model.fit(x_train, y_train)
    seconds = time.time() - t0
    del x_train
    x_val = load_rows(cache, val_idx, cfg.block_rows)
    y_val = cache.labels[val_idx]
    proba = np.zeros((len(y_val), len(cache.classes)))
    proba[:, model.classes_] = model.predict_proba(x_val)
    pred = proba.argmax(1)
    return {"per_class_val_acc": per_class_accuracy(y_val, pred, cache.classes),"model": f"sklearn LogisticRegression(C={cfg.C}{', scaled' if cfg.scale else ''})",
            "val_acc": float((pred == y_val).mean()), "val_loss": log_loss(y_val, proba),
            "fit_seconds": seconds, "train_rows": int(len(train_idx)), "val_rows": int(len(val_idx)),
            "iterations": int(np.max(model[-1].n_iter_))}


def compare_sklearn(cfg: CompareConfig) -> dict:
    """Fit the torch head and a LogisticRegression on the same cached split; both results."""
    validate_split(cfg.val_fraction, cfg.seed)
    if cfg.C <= 0 or cfg.max_iter < 1:
        raise UsageError(f"--C must be positive and --max-iter >= 1, got C={cfg.C}, max_iter={cfg.max_iter}")
    path, default_cache = resolve_cache(cfg.cache, cfg.cache_dir)
    head_cfg = replace(cfg.head or FitHeadConfig(), cache=str(path), val_fraction=cfg.val_fraction, seed=cfg.seed)
    torch_result = fit_head(head_cfg)
    with FeatureCache(path) as cache:
        sk = fit_sklearn(cfg, cache)
    head = {"model": f"torch Linear+LogSoftmax ({head_cfg.epochs} epochs, Adam lr={head_cfg.lr})",
            "val_acc": torch_result["val_acc"], "val_loss": torch_result["val_loss"],
            "fit_seconds": torch_result["fit_seconds"], "train_rows": torch_result["train_rows"],
            "val_rows": torch_result["val_rows"], "per_class_val_acc": torch_result["per_class_val_acc"]}
    append_run(head_cfg.runs_dir, "compare-sklearn", cache=str(path), params=asdict(cfg),
               metrics={"val_acc": head["val_acc"], "val_loss": head["val_loss"],
                        "sklearn_val_acc": sk["val_acc"], "sklearn_val_loss": sk["val_loss"]},
               outputs=[torch_result["run_dir"]])
    return {"cache": str(path), "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                                          "train_rows": sk["train_rows"], "val_rows": sk["val_rows"]},
            "models": [head, sk], "head_run_dir": torch_result["run_dir"],
            "source_changed": torch_result["source_changed"], "default_cache": default_cache}


def format_table(result: dict) -> str:
    rows = [("model", "val acc", "val log-loss", "fit time")]
    for m in result["models"]:
        rows.append((m["model"], f"{m['val_acc']:.3f}", f"{m['val_loss']:.4f}", f"{m['fit_seconds']:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in result["models"]:
        accs = ", ".join(f"{c} {a:.3f}" for c, a in m["per_class_val_acc"].items() if a is not None)
        lines.append(f"per-class val acc, {m['model'].split(' (')[0]}: {accs}")
    s = result["split"]
    lines.append(f"(same split: {s['train_rows']} train / {s['val_rows']} val rows, seed {s['seed']}; "
                 f"cache {result['cache']})")
    return "\n".join(lines)
