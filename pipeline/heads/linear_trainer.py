"""The one torch trainer of a linear head: Adam with weight decay, early stopping on the validation loss."""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .cache_views import CacheRows, fit_normalizer_stream
from .feature_views import (
    Normalizer,
    apply_view,
    check_view,
    view_dim,
)
from .probe_heads import ProbeHead

log = logging.getLogger(__name__)

# -- the torch trainer ---------------------------------------------------------------------------
def _prepared(source, view: str, normalizer: Normalizer, feature_shape: tuple):
    """An object with .n, .labels and .batches(batch_size, rng) of normalised view rows (float32)."""
    class _Arrays:
        def __init__(self, x, y):
            self.x, self.labels, self.n = x, np.asarray(y, np.int64), len(y)

        def batches(self, batch_size, rng=None):
            order = rng.permutation(self.n) if rng is not None else np.arange(self.n)
            for i in range(0, self.n, batch_size):
                b = order[i:i + batch_size]
                yield self.x[b], self.labels[b]

    class _Stream:
        def __init__(self, rows: CacheRows):
            self.rows, self.n = rows, len(rows)

        def batches(self, batch_size, rng=None):
            for x, y in self.rows.batches(view, batch_size, rng):
                yield normalizer.transform(x), y

    if isinstance(source, CacheRows):
        return _Stream(source)
    x, y = source
    x = np.asarray(x)
    if x.ndim == 4:
        x = apply_view(x, view)
    if x.shape[1] != view_dim(view, feature_shape):
        raise ValueError(f"rows of width {x.shape[1]} are not the {view!r} view of {feature_shape} maps")
    return _Arrays(np.ascontiguousarray(normalizer.transform(x.astype(np.float32, copy=False))), y)


def train_linear(train, val, *, n_classes: int, in_shape, view: str = "flat", normalize="l2",
                 lr: float = 1e-2, weight_decay: float = 1e-4, max_epochs: int = 100, patience: int = 5,
                 batch_size: int = 32, dropout: float = 0.0, seed: int = 0, device="cpu",
                 on_epoch: Optional[Callable[[dict], None]] = None):
    """Train a linear ProbeHead with Adam + weight decay, stopping early on the validation loss.

    ``train`` / ``val``: ``(X, y)`` arrays, X raw (N, C, H, W) maps or (N, d) ``view`` rows, or a
    ``CacheRows`` to stream; ``val=None`` trains ``max_epochs`` without early stopping.
    ``normalize``: a kind (fitted here on the training rows) or a fitted ``Normalizer``. Stops after
    ``patience`` epochs without a lower validation loss and restores the best epoch's weights.
    Seeded (initialisation, shuffling); the global torch RNG is left as it was.
    Returns (head on CPU, report: best_epoch (from 1), best_val_loss, best_val_acc, epochs_run,
    stopped_early, history of per-epoch dicts).
    """

    in_shape = tuple(in_shape)
    check_view(view, in_shape)
    if max_epochs < 1 or patience < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError("max_epochs, patience and batch_size must be >= 1, lr > 0 and weight_decay >= 0")
    if isinstance(normalize, str):
        if isinstance(train, CacheRows):
            normalizer = fit_normalizer_stream(train, view, normalize)
        else:
            x0 = np.asarray(train[0])
            normalizer = Normalizer(normalize).fit(apply_view(x0, view) if x0.ndim == 4 else x0)
    else:
        normalizer = normalize
    tr = _prepared(train, view, normalizer, in_shape)
    va = _prepared(val, view, normalizer, in_shape) if val is not None else None
    rng = np.random.default_rng(seed)
    loss_fn = nn.NLLLoss(reduction="sum")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProbeHead(in_shape, n_classes, view, normalizer.kind, dropout=dropout)
    head.set_normalizer(normalizer)
    head.to(device)
    opt = torch.optim.Adam(head.linear.parameters(), lr=lr, weight_decay=weight_decay)

    def evaluate(src) -> tuple[float, float]:
        head.eval()
        tot = correct = 0.0
        with torch.no_grad():
            for x, y in src.batches(1024):
                x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                lp = head.classify(x)
                tot += float(loss_fn(lp, y))
                correct += int((lp.argmax(1) == y).sum())
        return tot / src.n, correct / src.n

    history, best, best_state, best_epoch, bad = [], math.inf, None, 0, 0
    t0 = time.time()
    for epoch in range(1, max_epochs + 1):
        head.train()
        seen = correct = 0
        loss_sum = 0.0
        with torch.random.fork_rng(devices=[]):  # dropout masks: seeded per epoch, global RNG untouched
            torch.manual_seed(seed * 100003 + epoch)
            for x, y in tr.batches(batch_size, rng):
                x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
                opt.zero_grad()
                lp = head.classify(x)
                loss = loss_fn(lp, y)
                (loss / len(y)).backward()
                opt.step()
                seen += len(y)
                loss_sum += loss.item()
                correct += int((lp.argmax(1) == y).sum())
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if va is not None:
            row["val_loss"], row["val_acc"] = evaluate(va)
        row["seconds"] = time.time() - t0
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if va is None:
            continue
        if row["val_loss"] < best:
            best, best_epoch, bad = row["val_loss"], epoch, 0
            best_state = copy.deepcopy(head.linear.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        head.linear.load_state_dict(best_state)
    else:
        best_epoch = history[-1]["epoch"]
    head.eval().cpu()
    at = history[best_epoch - 1]
    report = {"best_epoch": best_epoch, "best_val_loss": at.get("val_loss"), "best_val_acc": at.get("val_acc"),
              "epochs_run": len(history), "stopped_early": len(history) < max_epochs, "history": history,
              "normalizer": normalizer.kind}
    return head, report


