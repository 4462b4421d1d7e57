"""Classifier heads ("probes") on cached feature maps, and the search for the best one.

What is here, and why:

- ``view_rows`` / ``CacheRows`` / ``CacheViews``: a view of cache rows, computed while the cache
  streams in blocks (views are never stored). Pooled views are small (512 or 1024 floats a row) and
  are materialised; the flat view (25,088 floats a row for VGG-16) is better streamed.
- ``fit_logreg`` / ``fit_kernel``: scikit-learn fits on view rows (LogisticRegression; Nystroem RBF
  map + LogisticRegression). ``train_linear``: a torch Linear head with weight decay and early
  stopping on the validation loss, the best epoch's weights restored.
- ``ProbeHead``: one torch module for all of them (view -> normalisation -> optional RBF map ->
  Linear -> LogSoftmax) taking raw cached (B, C, H, W) features; its checkpoint is plain tensors
  plus a small config dict, so ``torch.load(weights_only=True)`` reads it. ``from_logreg`` and
  ``from_kernel`` turn the scikit-learn fits into one with the same probabilities.
- ``tune``: stratified k-fold cross-validation over a small grid; a table and the winner.

"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn

from .feature_views import (
    VIEWS,
    Normalizer,
    allowed_views,
    apply_view,
    apply_view_torch,
    check_norm,
    check_view,
    view_dim,
)

log = logging.getLogger(__name__)

HEAD_KINDS = ("logreg", "kernel", "torch")
CONFIG_KIND = "probe-head"
CONFIG_VERSION = 1
LOG_FLOOR = 1e-15  # probabilities are clipped here for log-loss (as sklearn.metrics.log_loss)

#: The grid ``tune`` searches by default (views a pooled cache lacks are dropped). Measured with
#: 5-fold CV on VGG-16 caches (cats-vs-dogs 800 rows, 20 dog breeds 270 rows): l2 rows + avg view won
#: both, at C 100-1000 (l2 rows are small, so they want little regularisation); rms and standardize
#: and the max view were worse; the flat view costs 49x the memory and time (add it to a grid by hand).
DEFAULT_GRID = {
    "head": ["logreg", "kernel"],
    "view": ["avg", "avgmax"],
    "normalize": ["l2"],
    "C": [1.0, 10.0, 100.0, 1000.0],
    "gamma": ["scale"],
    "n_components": [1000],
}
#: Per-kind defaults filled into a setting that leaves them out.
SETTING_DEFAULTS = {
    "logreg": {"view": "avg", "normalize": "l2", "C": 100.0},
    "kernel": {"view": "avg", "normalize": "l2", "C": 100.0, "gamma": "scale", "n_components": 1000},
    "torch": {"view": "flat", "normalize": "l2", "lr": 1e-2, "weight_decay": 1e-4, "max_epochs": 100,
              "patience": 5, "batch_size": 32},
}
_SETTING_KEYS = {k: tuple(v) for k, v in SETTING_DEFAULTS.items()}


# -- streaming views out of a cache ------------------------------------------------------------
def _view_rows_multi(cache, indices, views: Sequence[str], block_rows: int, max_bytes: float) -> dict:
    indices = np.sort(np.asarray(indices))
    for v in views:
        check_view(v, cache.feature_shape)
    need = sum(len(indices) * view_dim(v, cache.feature_shape) * 4 for v in views)
    if need > max_bytes:
        raise ValueError(f"the {'/'.join(views)} view of {len(indices)} rows is {need / 1e9:.1f} GB as float32, "
                         f"over the {max_bytes / 1e9:.1f} GB limit; stream it with CacheRows instead")
    out = {v: np.empty((len(indices), view_dim(v, cache.feature_shape)), np.float32) for v in views}
    i = 0
    for rows, block, sel in cache.iter_blocks(indices, block_rows):
        part = block[sel]
        for v in views:
            out[v][i:i + len(rows)] = apply_view(part, v)
        i += len(rows)
    return out


def view_rows(cache, indices, view: str, block_rows: int = 2048, max_bytes: float = 4e9
              ) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) for cache rows ``indices``, X the float32 ``view`` rows, both in sorted row order.

    The cache streams block by block, so memory is one block plus the result; ``max_bytes``
    refuses a result that would not fit (the flat view of a large cache: use ``CacheRows``).
    """
    x = _view_rows_multi(cache, indices, (view,), block_rows, max_bytes)[view]
    return x, np.asarray(cache.labels[np.sort(np.asarray(indices))], np.int64)


class CacheViews(Mapping):
    """Lazy {view: rows} over some cache rows, for ``tune``: each view read once, when first asked for.

    ``load(views)`` reads several views in one pass over the cache.
    """

    def __init__(self, cache, indices, block_rows: int = 2048, max_bytes: float = 4e9):
        self.cache, self.block_rows, self.max_bytes = cache, block_rows, max_bytes
        self.indices = np.sort(np.asarray(indices))
        self.labels = np.asarray(cache.labels[self.indices], np.int64)
        self.feature_shape = tuple(cache.feature_shape)
        self._rows: dict = {}

    def load(self, views: Sequence[str]) -> "CacheViews":
        todo = [v for v in dict.fromkeys(views) if v not in self._rows]
        if todo:
            self._rows.update(_view_rows_multi(self.cache, self.indices, todo, self.block_rows, self.max_bytes))
        return self

    def __getitem__(self, view: str) -> np.ndarray:
        return self.load([view])._rows[view]

    def __iter__(self):
        return iter(allowed_views(self.feature_shape))

    def __len__(self):
        return len(allowed_views(self.feature_shape))


@dataclass
class CacheRows:
    """Cache rows to stream through ``train_linear`` (the flat view of many rows: never all in memory)."""

    cache: Any  # a pipeline.cache.feature_cache.FeatureCache
    indices: np.ndarray
    block_rows: int = 2048

    def __post_init__(self):
        self.indices = np.sort(np.asarray(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.cache.feature_shape)

    def batches(self, view: str, batch_size: int, rng: Optional[np.random.Generator] = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(view rows float32, labels) minibatches; with ``rng``, blocks and rows within them shuffled."""
        for rows, feats in self.cache.iter_batches(self.indices, batch_size, self.block_rows, rng):
            yield apply_view(feats, view), np.asarray(self.cache.labels[rows], np.int64)


def fit_normalizer_stream(rows: CacheRows, view: str, kind: str, batch_size: int = 512) -> Normalizer:
    """A normaliser fitted on streamed cache rows (one pass, float64 sums)."""
    check_norm(kind)
    if kind in ("none", "l2"):
        return Normalizer(kind)
    return Normalizer(kind).fit_batches(x for x, _ in rows.batches(view, batch_size))


# -- ProbeHead -----------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """view -> normalisation -> optional RBF (Nystroem) map -> Linear -> LogSoftmax, on raw cached maps.

    Input: (B, C, H, W) features as the cache stores them (any float dtype: cast to the head's).
    Output: (B, classes) log-probabilities. All numbers live in ``state_dict`` (buffers
    ``norm_rms`` / ``norm_mean`` + ``norm_std``, ``landmarks`` + ``kernel_norm``, the Linear);
    ``config`` is plain Python. ``checkpoint()`` / ``from_checkpoint()`` round-trip through
    ``torch.save`` / ``torch.load(weights_only=True)``. With view 'flat', normalisation 'none'
    and no kernel it computes exactly the tutorial's Flatten + Linear(C*H*W) + LogSoftmax.
    """

    def __init__(self, in_shape, n_classes: int, view: str = "flat", normalize: str = "none",
                 kernel_components: int = 0, gamma: Optional[float] = None, dropout: float = 0.0,
                 dtype=None):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        check_view(view, self.in_shape)
        check_norm(normalize)
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        if kernel_components and (gamma is None or gamma <= 0):
            raise ValueError(f"an RBF kernel map needs gamma > 0, got {gamma}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dtype = dtype or torch.float32
        self.view, self.normalize, self.n_classes = view, normalize, int(n_classes)
        self.kernel_components = int(kernel_components)
        self.gamma = float(gamma) if self.kernel_components else None
        self.dropout_p = float(dropout)
        d = view_dim(view, self.in_shape)
        if normalize == "rms":
            self.register_buffer("norm_rms", torch.ones((), dtype=dtype))
        elif normalize == "standardize":
            self.register_buffer("norm_mean", torch.zeros(d, dtype=dtype))
            self.register_buffer("norm_std", torch.ones(d, dtype=dtype))
        if self.kernel_components:
            m = self.kernel_components
            self.register_buffer("landmarks", torch.zeros(m, d, dtype=dtype))
            self.register_buffer("kernel_norm", torch.zeros(m, m, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(self.kernel_components or d, self.n_classes, dtype=dtype)
        self.log_softmax = nn.LogSoftmax(dim=1)

    # -- the plain description ------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {"kind": CONFIG_KIND, "version": CONFIG_VERSION, "in_shape": list(self.in_shape),
                "n_classes": self.n_classes, "view": self.view, "normalize": self.normalize,
                "kernel": "rbf" if self.kernel_components else None,
                "kernel_components": self.kernel_components, "gamma": self.gamma, "dropout": self.dropout_p}

    def describe(self) -> str:
        k = f", RBF Nystroem m={self.kernel_components} gamma={self.gamma:.4g}" if self.kernel_components else ""
        return f"ProbeHead(view={self.view}, normalize={self.normalize}{k}, classes={self.n_classes})"

    def checkpoint(self) -> dict:
        """{"config": plain dict, "state_dict": CPU tensors}: what a head.pt needs to rebuild this head."""
        return {"config": self.config, "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, config: dict, state_dict: dict) -> "ProbeHead":
        """Rebuild from ``checkpoint()``'s two parts (dtype taken from the saved Linear weights)."""
        if config.get("kind") != CONFIG_KIND or config.get("version") != CONFIG_VERSION:
            raise ValueError(f"not a probe-head config (kind {config.get('kind')!r}, "
                             f"version {config.get('version')!r}; this code reads version {CONFIG_VERSION})")
        head = cls(config["in_shape"], config["n_classes"], config["view"], config["normalize"],
                   config.get("kernel_components") or 0, config.get("gamma"), config.get("dropout", 0.0),
                   dtype=state_dict["linear.weight"].dtype)
        head.load_state_dict(state_dict)
        return head

    @classmethod
    def from_legacy(cls, state_dict: dict, in_shape, dropout: float = 0.0) -> "ProbeHead":
        """A fit-head checkpoint's Flatten + (Dropout) + Linear + LogSoftmax state_dict, as a ProbeHead."""
        keys = [k for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 2]
        if len(keys) != 1:
            raise ValueError(f"expected one Linear layer in the state_dict, found keys {sorted(state_dict)}")
        w, b = state_dict[keys[0]], state_dict[keys[0][:-len("weight")] + "bias"]
        return cls.from_linear(w, b, in_shape, dropout=dropout)

    @classmethod
    def from_linear(cls, weight, bias, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None,
                    dropout: float = 0.0, dtype=None) -> "ProbeHead":
        """A head from a (classes, d) weight and (classes,) bias over ``view`` rows normalised by ``normalizer``."""
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        normalizer = normalizer or Normalizer("none")
        head = cls(in_shape, weight.shape[0], view, normalizer.kind, dropout=dropout,
                   dtype=dtype or (weight.dtype if weight.is_floating_point() else None))
        head.set_normalizer(normalizer)
        head.set_linear(weight, bias)
        return head

    # -- filling in the numbers -----------------------------------------------------------
    def set_normalizer(self, normalizer: Normalizer) -> None:
        if normalizer.kind != self.normalize:
            raise ValueError(f"this head normalises with {self.normalize!r}, not {normalizer.kind!r}")
        if not normalizer.fitted:
            raise ValueError(f"the {normalizer.kind!r} normalisation is not fitted")
        with torch.no_grad():
            if self.normalize == "rms":
                self.norm_rms.fill_(normalizer.rms)
            elif self.normalize == "standardize":
                self.norm_mean.copy_(torch.as_tensor(np.asarray(normalizer.mean)))
                self.norm_std.copy_(torch.as_tensor(np.asarray(normalizer.std)))

    def normalizer(self) -> Normalizer:
        """The numpy ``Normalizer`` this head applies (float64 copies of its buffers)."""
        if self.normalize == "rms":
            return Normalizer("rms", rms=float(self.norm_rms))
        if self.normalize == "standardize":
            return Normalizer("standardize", mean=self.norm_mean.double().cpu().numpy(),
                              std=self.norm_std.double().cpu().numpy())
        return Normalizer(self.normalize)

    def set_kernel(self, landmarks, kernel_norm) -> None:
        with torch.no_grad():
            self.landmarks.copy_(torch.as_tensor(landmarks))
            self.kernel_norm.copy_(torch.as_tensor(kernel_norm))

    def set_linear(self, weight, bias) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight))
            self.linear.bias.copy_(torch.as_tensor(bias))

    # -- computing ------------------------------------------------------------------------
    def norm(self, z):
        """The fitted normalisation of (B, d) view rows."""
        if self.normalize == "rms":
            return z / self.norm_rms
        if self.normalize == "l2":
            n = z.norm(dim=1, keepdim=True)
            return z / torch.where(n == 0, torch.ones_like(n), n)
        if self.normalize == "standardize":
            return (z - self.norm_mean) / self.norm_std
        return z

    def kernel_map(self, z):
        """Nystroem's transform: exp(-gamma ||z - landmark||^2) @ K_mm^{-1/2}^T (as sklearn computes it)."""
        lm = self.landmarks
        d2 = (z * z).sum(1, keepdim=True) - 2.0 * (z @ lm.T) + (lm * lm).sum(1)[None, :]
        return torch.exp(-self.gamma * d2.clamp_min(0.0)) @ self.kernel_norm.T

    def embed(self, x):
        """Raw (B, C, H, W) maps -> what the Linear layer sees."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"this head takes features of shape {self.in_shape}, got {tuple(x.shape[1:])}")
        z = self.norm(apply_view_torch(x.to(self.linear.weight.dtype), self.view))
        return self.kernel_map(z) if self.kernel_components else z

    def classify(self, z):
        """Log-probabilities from embedded rows (what ``train_linear`` optimises)."""
        return self.log_softmax(self.linear(self.dropout(z)))

    def forward(self, x):
        return self.classify(self.embed(x))


# -- scikit-learn -> ProbeHead -------------------------------------------------------------------
def _logreg_linear(clf) -> tuple[np.ndarray, np.ndarray]:
    """(classes, d) weights and (classes,) biases whose softmax is ``clf.predict_proba``.

    Binary: sklearn's p(class 1) = sigmoid(w.x + b), and softmax([0, w.x + b]) is exactly
    [1 - sigmoid, sigmoid]. Multiclass (multinomial): softmax(W x + b) directly.
    """
    classes = np.asarray(clf.classes_)
    k = len(classes)
    if not np.array_equal(classes, np.arange(k)):
        raise ValueError(f"the classifier was fitted on labels {classes.tolist()}; a head needs every class "
                         f"0..K-1 in its training rows")
    coef = np.asarray(clf.coef_, np.float64)
    b = np.asarray(clf.intercept_, np.float64).reshape(-1)
    if k == 2:
        return np.vstack([np.zeros_like(coef), coef]), np.array([0.0, b[0]])
    if getattr(clf, "multi_class", "multinomial") == "ovr" or getattr(clf, "solver", "") == "liblinear":
        raise ValueError("one-vs-rest logistic regression is not a softmax; fit a multinomial one (lbfgs)")
    return coef, b


def from_logreg(clf, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None, dtype=None):
    """A ProbeHead giving ``clf.predict_proba`` (clf fitted on ``normalizer``-normalised ``view`` rows).

    float64 by default, so its probabilities match scikit-learn's to ~1e-12, not float32's ~1e-6.
    """

    w, b = _logreg_linear(clf)
    return ProbeHead.from_linear(w, b, in_shape, view, normalizer, dtype=dtype or torch.float64)


def from_kernel(nystroem, clf, in_shape, view: str = "flat", normalizer: Optional[Normalizer] = None, dtype=None):
    """A ProbeHead giving ``clf.predict_proba(nystroem.transform(rows))`` for an RBF Nystroem map."""

    if nystroem.kernel != "rbf":
        raise ValueError(f"only the RBF kernel converts to a ProbeHead, not {nystroem.kernel!r}")
    landmarks = np.asarray(nystroem.components_, np.float64)
    gamma = nystroem.gamma if nystroem.gamma is not None else 1.0 / landmarks.shape[1]  # rbf_kernel's default
    normalizer = normalizer or Normalizer("none")
    w, b = _logreg_linear(clf)
    head = ProbeHead(in_shape, w.shape[0], view, normalizer.kind, kernel_components=len(landmarks),
                               gamma=float(gamma), dtype=dtype or torch.float64)
    if landmarks.shape[1] != view_dim(view, in_shape):
        raise ValueError(f"the Nystroem map was fitted on {landmarks.shape[1]}-d rows; the {view!r} view "
                         f"of {tuple(in_shape)} maps is {view_dim(view, in_shape)}-d")
    head.set_normalizer(normalizer)
    head.set_kernel(landmarks, nystroem.normalization_)
    head.set_linear(w, b)
    return head


# -- scikit-learn fits ---------------------------------------------------------------------------
def fit_logreg(X: np.ndarray, y: np.ndarray, C: float = 1.0, seed: int = 0, max_iter: int = 1000):
    """A multinomial (lbfgs) LogisticRegression on view rows; L2 penalty 1/C. Deterministic for a seed."""

    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        log.info("LogisticRegression(C=%g) stopped at max_iter=%d before converging", C, max_iter)
    return clf


def resolve_gamma(gamma, X: np.ndarray) -> float:
    """An RBF gamma: a number as is, 'scale' = 1 / (d * var(X)) (scikit-learn's SVC rule), 'g*scale' = g times that.

    For l2-normalised rows 'scale' is about 1 (squared distances lie in [0, 4]).
    """
    if isinstance(gamma, str):
        g, _, rest = gamma.partition("*") if "*" in gamma else ("1", "*", gamma)
        if rest.strip() != "scale":
            raise ValueError(f"gamma must be a number, 'scale' or 'G*scale', got {gamma!r}")
        var = float(np.var(X, dtype=np.float64))
        return float(g) / (X.shape[1] * var) if var > 0 else float(g)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return float(gamma)


def kernel_features(nystroem, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``nystroem.transform(X)`` in float64, chunk by chunk (bounded temporary memory)."""
    out = np.empty((len(X), nystroem.normalization_.shape[0]), np.float64)
    for i in range(0, len(X), chunk):
        out[i:i + chunk] = nystroem.transform(np.asarray(X[i:i + chunk], np.float64))
    return out


def fit_kernel(X: np.ndarray, y: np.ndarray, gamma="scale", n_components: int = 1000, C: float = 1.0,
               seed: int = 0, max_iter: int = 1000):
    """(Nystroem, LogisticRegression): an RBF kernel approximation on ``n_components`` seeded landmark rows.

    Landmarks are drawn with ``seed``; the map and the fit run in float64 (a kernel matrix is
    badly conditioned, and float32 noise through K^{-1/2} would cost the torch copy its 1e-5 match).
    """

    m = min(int(n_components), len(X))
    if m < 1:
        raise ValueError(f"n_components must be positive, got {n_components}")
    g = resolve_gamma(gamma, X)
    pick = np.sort(np.random.default_rng(seed).choice(len(X), m, replace=False))
    ny = Nystroem(kernel="rbf", gamma=g, n_components=m, random_state=seed).fit(np.asarray(X[pick], np.float64))
    return ny, fit_logreg(kernel_features(ny, X), y, C, seed, max_iter)


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


# -- one setting, fitted ------------------------------------------------------------------------
def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:

    idx = np.arange(len(y))
    a, b = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    return np.sort(a), np.sort(b)


def complete_setting(setting: dict) -> dict:
    """A setting with its kind's defaults filled in and unknown keys refused."""
    kind = setting.get("head", "logreg")
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; allowed: {', '.join(HEAD_KINDS)}")
    extra = set(setting) - {"head"} - set(_SETTING_KEYS[kind])
    if extra:
        raise ValueError(f"a {kind!r} head takes {', '.join(_SETTING_KEYS[kind])}; not {', '.join(sorted(extra))}")
    out = {"head": kind, **SETTING_DEFAULTS[kind], **setting}
    if out["view"] not in VIEWS:
        raise ValueError(f"unknown view {out['view']!r}; allowed views: {', '.join(VIEWS)}")
    check_norm(out["normalize"])
    return out


def setting_key(setting: dict) -> str:
    """A short stable name: 'logreg|avg|l2|C=100', 'kernel|avg|l2|C=10|gamma=scale|m=1000', 'torch|flat|l2|lr=0.01|wd=0.0001'."""
    s = complete_setting(setting)
    base = f"{s['head']}|{s['view']}|{s['normalize']}"
    if s["head"] == "torch":
        return f"{base}|lr={s['lr']:g}|wd={s['weight_decay']:g}"
    base += f"|C={s['C']:g}"
    if s["head"] == "kernel":
        base += f"|gamma={s['gamma'] if isinstance(s['gamma'], str) else format(s['gamma'], 'g')}|m={s['n_components']}"
    return base


def fit_setting(X, y: np.ndarray, setting: dict, in_shape=None, n_classes: Optional[int] = None, seed: int = 0,
                max_iter: int = 1000):
    """Fit one setting (e.g. ``tune``'s winner) on all of ``X`` and return (ProbeHead, info).

    ``X``: raw (N, C, H, W) maps, or a mapping {view: rows} such as ``CacheViews`` (then ``in_shape``
    comes from its ``feature_shape`` or must be given). A torch head holds out a stratified 1/8 of
    the rows for early stopping. The head is float64 for scikit-learn kinds, float32 for torch.
    """
    s = complete_setting(setting)
    rows, in_shape = _rows_for(X, in_shape)
    check_view(s["view"], in_shape)
    x = rows(s["view"])
    y = np.asarray(y, np.int64)
    n_classes = n_classes or int(y.max()) + 1
    t0 = time.time()
    if s["head"] == "torch":
        a, b = _stratified_holdout(y, 0.125, seed)
        head, rep = train_linear((x[a], y[a]), (x[b], y[b]), n_classes=n_classes, in_shape=in_shape,
                                 view=s["view"], normalize=s["normalize"], lr=s["lr"],
                                 weight_decay=s["weight_decay"], max_epochs=s["max_epochs"],
                                 patience=s["patience"], batch_size=s["batch_size"], seed=seed)
        info = {k: rep[k] for k in ("best_epoch", "best_val_loss", "epochs_run", "stopped_early")}
    else:
        nm = Normalizer(s["normalize"]).fit(x)
        xn = nm.transform(x)
        if s["head"] == "logreg":
            clf = fit_logreg(xn, y, s["C"], seed, max_iter)
            head, info = from_logreg(clf, in_shape, s["view"], nm), {}
        else:
            ny, clf = fit_kernel(xn, y, s["gamma"], s["n_components"], s["C"], seed, max_iter)
            head, info = from_kernel(ny, clf, in_shape, s["view"], nm), {"gamma": float(ny.gamma)}
        info["iterations"] = int(np.max(clf.n_iter_))
        if head.n_classes != n_classes:
            raise ValueError(f"the training rows hold {head.n_classes} of the {n_classes} classes")
    info.update(setting=s, key=setting_key(s), fit_seconds=time.time() - t0, rows=len(y))
    return head, info


# -- cross-validated choice ------------------------------------------------------------------------
def _rows_for(X, in_shape):
    """(view -> rows function, feature shape) for raw maps or a {view: rows} mapping."""
    if isinstance(X, np.ndarray) and X.ndim == 4:
        cache: dict = {}

        def rows(v):
            if v not in cache:
                cache[v] = apply_view(X, v)
            return cache[v]
        return rows, tuple(X.shape[1:])
    if isinstance(X, Mapping):
        shape = tuple(in_shape or getattr(X, "feature_shape", None) or ())
        if not shape:
            raise ValueError("pass in_shape with a {view: rows} mapping (the cached (C, H, W) feature shape)")

        def rows(v):
            try:
                return np.asarray(X[v])
            except KeyError:
                raise ValueError(f"no rows for view {v!r} in the mapping (has {', '.join(X)})") from None
        return rows, shape
    raise TypeError("X must be raw (N, C, H, W) maps or a {view: rows} mapping such as CacheViews")


def expand_grid(grid, feature_shape=None) -> list[dict]:
    """Complete settings from a grid: a dict of lists (product per head kind, each kind taking only its
    own keys) or a list of setting dicts. With ``feature_shape``, views it lacks are dropped from a
    dict grid (so the default grid works on pooled caches) and refused in a list."""
    if isinstance(grid, Mapping):
        g = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()}
        unknown = set(g) - {"head"} - set().union(*map(set, _SETTING_KEYS.values()))
        if unknown:
            raise ValueError(f"unknown grid keys: {', '.join(sorted(unknown))}")
        if feature_shape is not None and "view" in g:
            ok = allowed_views(feature_shape)
            g["view"] = [v for v in g["view"] if v in ok]
            if not g["view"]:
                raise ValueError(f"none of the grid's views is allowed for features {tuple(feature_shape)}; "
                                 f"allowed views: {', '.join(ok)}")
        out = []
        for kind in g.get("head", ["logreg"]):
            keys = [k for k in _SETTING_KEYS.get(kind, ()) if k in g]
            for combo in itertools.product(*(g[k] for k in keys)):
                out.append(complete_setting({"head": kind, **dict(zip(keys, combo))}))
    else:
        out = [complete_setting(dict(s)) for s in grid]
    if feature_shape is not None:
        for s in out:
            check_view(s["view"], feature_shape)
    seen, unique = set(), []
    for s in out:
        k = setting_key(s)
        if k not in seen:
            seen.add(k)
            unique.append(s)
    if not unique:
        raise ValueError("the grid holds no settings")
    return unique


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-probability of the true class, clipped at 1e-15."""
    p = np.clip(proba[np.arange(len(y)), y], LOG_FLOOR, 1.0)
    return float(-np.log(p).mean())


def _proba(clf, z: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.zeros((len(z), n_classes))
    p[:, np.asarray(clf.classes_)] = clf.predict_proba(z)
    return p


def tune(X, y: np.ndarray, grid=None, folds: int = 5, seed: int = 0, *, in_shape=None, score: str = "log_loss",
         max_iter: int = 1000, threads: Optional[int] = None,
         on_setting: Optional[Callable[[dict], None]] = None) -> dict:
    """Stratified k-fold cross-validation of every setting in ``grid`` (default ``DEFAULT_GRID``).

    ``X``: raw (N, C, H, W) maps or a {view: rows} mapping (``CacheViews``); ``y``: labels 0..K-1.
    Normalisation statistics, kernel landmarks and early-stopping splits are fitted inside each
    fold's training part only. Deterministic for a seed (the folds, landmarks and torch heads are
    seeded; lbfgs is deterministic); only the 'seconds' column varies. The winner has the lowest
    mean log-loss (``score='accuracy'``: highest mean accuracy), ties going to the other measure and
    then to the earlier setting. ``threads`` caps BLAS and torch threads meanwhile: many small fits
    on a busy machine run up to 10x faster on one thread than fighting over several.
    Returns {"table": [per setting: key, setting, acc_mean, acc_std, log_loss_mean, log_loss_std,
    seconds (mean fit time per fold)], "best": the winning row, "folds", "seed", "score", "rows"}.
    """
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads):
                return tune(X, y, grid, folds, seed, in_shape=in_shape, score=score, max_iter=max_iter,
                            on_setting=on_setting)
        finally:
            torch.set_num_threads(before)

    if score not in ("log_loss", "accuracy"):
        raise ValueError(f"score must be 'log_loss' or 'accuracy', got {score!r}")
    rows, shape = _rows_for(X, in_shape)
    settings = expand_grid(DEFAULT_GRID if grid is None else grid, shape)
    y = np.asarray(y, np.int64)
    n_classes = int(y.max()) + 1
    smallest = int(np.bincount(y, minlength=n_classes).min())
    if folds < 2 or smallest < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {max(folds, 2)} rows of every class; "
                         f"the smallest class has {smallest}")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    results = {setting_key(s): {"acc": [], "ll": [], "sec": []} for s in settings}

    def record(s, proba, yte, sec):
        r = results[setting_key(s)]
        r["acc"].append(float((proba.argmax(1) == yte).mean()))
        r["ll"].append(log_loss(yte, proba))
        r["sec"].append(sec)

    groups: dict = {}
    for s in settings:
        groups.setdefault((s["view"], s["normalize"]), []).append(s)
    for (view, norm), group in groups.items():
        x = rows(view)
        for tr, te in splits:
            t0 = time.time()
            nm = Normalizer(norm).fit(x[tr])
            xtr, xte = nm.transform(x[tr]), nm.transform(x[te])
            t_norm = time.time() - t0
            for s in (s for s in group if s["head"] == "logreg"):
                t0 = time.time()
                clf = fit_logreg(xtr, y[tr], s["C"], seed, max_iter)
                record(s, _proba(clf, xte, n_classes), y[te], t_norm + time.time() - t0)
            kernels: dict = {}
            for s in (s for s in group if s["head"] == "kernel"):
                kernels.setdefault((s["gamma"], s["n_components"]), []).append(s)
            for (gamma, m), ks in kernels.items():
                t0 = time.time()
                from sklearn.kernel_approximation import Nystroem

                mm = min(int(m), len(tr))
                g = resolve_gamma(gamma, xtr)
                pick = np.sort(np.random.default_rng(seed).choice(len(tr), mm, replace=False))
                ny = Nystroem(kernel="rbf", gamma=g, n_components=mm, random_state=seed).fit(
                    np.asarray(xtr[pick], np.float64))
                ztr, zte = kernel_features(ny, xtr), kernel_features(ny, xte)
                t_map = time.time() - t0
                for s in ks:
                    t0 = time.time()
                    clf = fit_logreg(ztr, y[tr], s["C"], seed, max_iter)
                    record(s, _proba(clf, zte, n_classes), y[te], t_norm + t_map + time.time() - t0)
            for s in (s for s in group if s["head"] == "torch"):
                t0 = time.time()
                a, b = _stratified_holdout(y[tr], 0.125, seed)
                head, _ = train_linear((x[tr][a], y[tr][a]), (x[tr][b], y[tr][b]), n_classes=n_classes,
                                       in_shape=shape, view=view, normalize=norm, lr=s["lr"],
                                       weight_decay=s["weight_decay"], max_epochs=s["max_epochs"],
                                       patience=s["patience"], batch_size=s["batch_size"], seed=seed)
                import torch  # (this call may be tune's inner one, without the threads branch's import)

                with torch.no_grad():
                    zt = head.norm(torch.from_numpy(np.ascontiguousarray(x[te], np.float32)))
                    proba = head.classify(zt).double().exp().numpy()
                record(s, proba, y[te], time.time() - t0)
        for s in group:
            if on_setting:
                on_setting(_row(s, results[setting_key(s)]))
    table = [_row(s, results[setting_key(s)]) for s in settings]
    if score == "log_loss":
        order = sorted(range(len(table)), key=lambda i: (table[i]["log_loss_mean"], -table[i]["acc_mean"], i))
    else:
        order = sorted(range(len(table)), key=lambda i: (-table[i]["acc_mean"], table[i]["log_loss_mean"], i))
    return {"table": table, "best": table[order[0]], "ranking": [table[i]["key"] for i in order],
            "folds": folds, "seed": seed, "score": score, "rows": int(len(y))}


def _row(s: dict, r: dict) -> dict:
    return {"key": setting_key(s), "setting": s,
            "acc_mean": float(np.mean(r["acc"])), "acc_std": float(np.std(r["acc"])),
            "log_loss_mean": float(np.mean(r["ll"])), "log_loss_std": float(np.std(r["ll"])),
            "seconds": float(np.mean(r["sec"]))}


def format_table(result: dict, top: Optional[int] = None) -> str:
    """``tune``'s table as text, best first (the winner marked with *)."""
    by_key = {r["key"]: r for r in result["table"]}
    keys = result["ranking"][:top] if top else result["ranking"]
    w = max(len("setting"), *(len(k) for k in keys))
    lines = [f"  {'setting':<{w}}  acc (mean±std)   log-loss (mean±std)  fit s/fold",
             f"  {'-' * w}  ---------------  -------------------  ----------"]
    for k in keys:
        r = by_key[k]
        mark = "*" if k == result["best"]["key"] else " "
        lines.append(f"{mark} {k:<{w}}  {r['acc_mean']:.3f} ± {r['acc_std']:.3f}    "
                     f"{r['log_loss_mean']:.4f} ± {r['log_loss_std']:.4f}     {r['seconds']:8.2f}")
    lines.append(f"({result['folds']}-fold stratified CV over {result['rows']} rows, seed {result['seed']}; "
                 f"chosen by {result['score'].replace('_', '-')})")
    return "\n".join(lines)
