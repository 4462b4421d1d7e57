"""The one torch trainer of a linear head: Adam with weight decay, early stopping on the validation loss.

fit-head's ``--head linear`` and the torch settings of ``tune`` both train through ``train_linear``.
Rows come either from arrays of view rows (pooled views: small, held in memory) or streamed from a
cache (``CacheRows``: the flat view of many rows, never all in memory). The epoch loop itself is the
one train/finetune use too (``epoch_loop.run_epochs``), so every trainer prints the same lines.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..progress import progress
from .cache_views import CacheRows, as_float32, evaluate_head, fit_normalizer_stream
from .epoch_loop import run_epochs, train_one_epoch
from .feature_views import Normalizer, check_view, view_dim
from .probe_heads import ProbeHead


class _OnViewRows(nn.Module):
    """A head after its view (normalisation, Linear, LogSoftmax): what trains on rows already viewed."""

    def __init__(self, head: ProbeHead):
        super().__init__()
        self.head = head

    def forward(self, z):
        return self.head.classify(self.head.norm(z))


def _normalizer(train, view: str, normalize) -> Normalizer:
    if isinstance(normalize, Normalizer):
        return normalize
    if normalize not in ("rms", "standardize"):
        return Normalizer(normalize)
    if isinstance(train, CacheRows):
        return fit_normalizer_stream(train, view, normalize)
    return Normalizer(normalize).fit(np.asarray(train[0]))


@dataclass(frozen=True)
class LinearTraining:
    """How a linear head trains (fit-head's --head linear options, or a torch setting of ``tune``): Adam's rate
    and weight decay, at most ``epochs``, early stopping after ``patience`` epochs without a lower validation
    loss, the mini-batch size, dropout before the Linear layer, and the seed of all of it."""

    lr: float = 0.03
    weight_decay: float = 1e-4
    epochs: int = 100
    patience: int = 5
    batch_size: int = 32
    dropout: float = 0.0
    seed: int = 0


def train_linear(train, val, *, n_classes: int, in_shape, view: str = "avg", normalize="l2",
                 training: LinearTraining = LinearTraining(), device="cpu") -> tuple[ProbeHead, list[dict]]:
    """A linear ProbeHead trained with Adam; returns (head, per-epoch history).

    ``train`` / ``val``: ``(rows, labels)`` arrays of ``view`` rows, or ``CacheRows`` to stream (any view).
    ``normalize``: a kind (fitted here on the training rows) or a fitted ``Normalizer``. With
    ``training.patience``, training stops after that many epochs without a lower validation loss and the best
    epoch's weights are put back. Seeded (the initialisation as after the tutorial's
    ``torch.manual_seed(seed)``, the shuffling, dropout); the caller's torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        return _train(train, val, n_classes, in_shape, view, normalize, training, device)


def _train(train, val, n_classes, in_shape, view, normalize, training: LinearTraining, device):
    in_shape = tuple(int(s) for s in in_shape)
    check_view(view, in_shape)
    normalizer = _normalizer(train, view, normalize)
    torch.manual_seed(training.seed)
    head = ProbeHead(in_shape, n_classes, view, normalizer.kind, dropout=training.dropout)
    head.set_normalizer(normalizer)
    head.to(device)
    opt = torch.optim.Adam(head.linear.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    rng = np.random.default_rng(training.seed)
    batch_size = training.batch_size

    if isinstance(train, CacheRows):
        cache = train.cache

        def minibatches(epoch: int):
            bar = progress(total=len(train), desc=f"epoch {epoch}", unit="row", leave=False)
            for rows, feats in cache.iter_batches(train.indices, batch_size, train.block_rows, rng):
                yield as_float32(feats, device), torch.from_numpy(cache.labels[rows]).to(device)
                bar.update(len(rows))
            bar.close()

        model = head

        def validate():
            return evaluate_head(head, cache, val.indices, device, val.block_rows)[:2]
    else:
        d = view_dim(view, in_shape)

        def tensors(rows_labels):
            x, y = rows_labels
            x = np.asarray(x, np.float32)
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"rows of shape {x.shape[1:]} are not the {view!r} view of {in_shape} maps ({d})")
            return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(
                np.asarray(y, np.int64)).to(device)

        (x_tr, y_tr), (x_va, y_va) = tensors(train), tensors(val)
        model = _OnViewRows(head)

        def minibatches(epoch: int):
            order = torch.from_numpy(rng.permutation(len(y_tr))).to(device)
            return ((x_tr[b], y_tr[b]) for b in order.split(batch_size))

        def validate():
            model.eval()
            with torch.inference_mode():
                lp = model(x_va)
            return float((lp.argmax(1) == y_va).float().mean()), float(nn.functional.nll_loss(lp, y_va))

    def one_epoch(epoch: int):
        acc, loss, _ = train_one_epoch(model, opt, minibatches(epoch), device, epoch=epoch)
        return acc, loss, {}

    history = run_epochs(training.epochs, one_epoch, validate, patience=training.patience, model=head)
    return head.eval(), history
