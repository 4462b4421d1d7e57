"""What every training stage shares: option checks, the seeded split, one epoch loop, per-class accuracy.

fit-head (features from a cache) and train/finetune (images through a backbone) differ only in
where their minibatches come from; ``train_one_epoch`` and ``run_epochs`` are the same for both,
so they print the same per-epoch line and record the same history (epochs counted from 1).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from ..devices import autocast
from ..config import check_config, option_text
from ..errors import PipelineError, UsageError
from ..files import check_output
from ..progress import is_quiet


def validate_training(cfg, data: tuple = ()) -> None:
    """The checks fit-head, train and finetune share: every option within its spec's choices and range
    (config.check_config), and a --runs-dir outside ``data``, the photo folders the run reads (files.check_output)."""
    check_config(cfg)
    if getattr(cfg, "unknown_rows", None) == 1:  # refused before the fit, not after it (unknown_score.fit_unknown)
        from .unknown_score import one_kept_row

        raise UsageError(one_kept_row())
    check_output(cfg.runs_dir, data=data, what="--runs-dir", folder=True)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified train/val split of row indices (both sorted).

    Each class gives round(val_fraction x its size) rows to validation (at least one when it has
    two or more), so 800 balanced rows at 0.125 split 700/100. fit-head, compare-sklearn, train
    and evaluate all call this, so they see the same split.
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
        # only where every class has one row (a class of two or more gives each side one): no --val-fraction helps
        raise UsageError(f"{len(labels)} rows, no class with 2 of them, cannot be split into training and validation "
                         f"rows (whatever {option_text('val_fraction')}): a class needs at least 2 photos, one for "
                         "each; "
                         f"add photos (or take a larger {option_text('n')})")
    return train, val


def per_class_accuracy(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    return {c: float((pred[y == i] == i).mean()) if (y == i).any() else None for i, c in enumerate(classes)}


def train_one_epoch(model, opt, minibatches: Iterable, device, precision: str = "fp32",
                    print_every: int = 0, write: Callable[[str], None] = print, epoch: int = 1
                    ) -> tuple[float, float, int]:
    """One pass of NLL + the optimiser over ``(x, y)`` minibatches (tensors on ``device``).

    Returns (train accuracy, mean train loss, rows seen). With ``print_every``, a running line
    every that many minibatches.
    """

    model.train()
    seen = correct = 0
    loss_sum = 0.0
    for b, (x, y) in enumerate(minibatches, 1):
        opt.zero_grad()
        with autocast(device, precision):
            out = model(x)
        loss = torch.nn.functional.nll_loss(out.float(), y)
        if not math.isfinite(loss.item()):
            raise PipelineError(f"training diverged: the loss became {loss.item()} at epoch {epoch}, minibatch {b}; "
                                f"nothing was saved (lower {option_text('lr')}, or check the features for NaN/inf)")
        loss.backward()
        opt.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        if print_every and b % print_every == 0:
            write(f"Epoch {epoch}, batch {b}: running train acc={correct / seen:.3f}, loss={loss_sum / seen:.4f}")
    if not seen:
        raise UsageError("no training example in this epoch (every image unreadable?)")
    return correct / seen, loss_sum / seen, seen


def run_epochs(epochs: int, one_epoch: Callable[[int], tuple], validate: Callable[[], tuple], patience: int = 0,
               model=None, done: Sequence[dict] = (), on_epoch: Optional[Callable[[list], None]] = None) -> list[dict]:
    """Run up to ``epochs`` epochs (numbered from 1), printing a line for each; returns the history.

    ``one_epoch(epoch)`` -> (train acc, train loss, extra fields for the history row);
    ``validate()`` -> (val acc, val loss). With ``patience``, stop after that many epochs without a
    lower validation loss, and put ``model``'s weights of the best epoch back (early stopping).
    ``done``: the history of a resumed run (its next epoch comes next); ``on_epoch(history)`` after each.
    """

    history, best, best_state, waited = list(done), math.inf, None, 0
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(len(history) + 1, epochs + 1):
        train_acc, train_loss, extra = one_epoch(epoch)
        val_acc, val_loss = validate()
        if not math.isfinite(val_loss):
            raise PipelineError(f"the validation loss is {val_loss} at epoch {epoch}: some validation rows hold "
                                "non-finite features (NaN or inf); nothing was saved")
        history.append({"epoch": epoch, **extra, "train_acc": train_acc, "val_acc": val_acc,
                        "train_loss": train_loss, "val_loss": val_loss, "seconds": time.time() - t0})
        if not is_quiet():
            print(f"Epoch {epoch}, Train acc={train_acc:.3f}, Val acc={val_acc:.3f}, "
                  f"Train loss={train_loss:.3f}, Val loss={val_loss:.3f}", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(history)
        if not patience:
            continue
        if val_loss < best:
            best, waited = val_loss, 0
            best_state = copy.deepcopy(model.state_dict()) if model is not None else None
        else:
            waited += 1
            if waited >= patience:
                break
    if patience and best_state is not None:
        model.load_state_dict(best_state)
        if not is_quiet():
            at = min(history, key=lambda h: h["val_loss"])
            print(f"Best epoch {at['epoch']} of {len(history)} (val loss {at['val_loss']:.3f}): its weights are kept",
                  file=sys.stderr)
    return history
