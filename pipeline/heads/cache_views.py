"""The one way heads read a cache: views of its rows, computed while it streams in blocks (never stored).

Pooled views are small (512 or 1024 floats a row for VGG-16) and are held in memory (``CacheViews``);
the flat view (25,088 floats a row) is streamed (``CacheRows``), so memory stays bounded at any size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ..cache.feature_cache import FeatureCache
from ..config import option_text
from ..data.folders import class_index, near_miss_text, unknown_classes
from ..errors import UsageError
from .feature_views import (
    Normalizer,
    allowed_views,
    apply_view,
    check_norm,
    check_view,
    view_dim,
)

log = logging.getLogger(__name__)

# -- streaming views out of a cache ------------------------------------------------------------
def _view_rows_multi(cache, indices, views: Sequence[str], block_rows: int, max_bytes: float) -> dict:
    indices = np.sort(np.asarray(indices))
    for v in views:
        check_view(v, cache.feature_shape)
    need = sum(len(indices) * view_dim(v, cache.feature_shape) * 4 for v in views)
    if need > max_bytes:
        raise ValueError(f"the {'/'.join(views)} view of {len(indices)} rows is {need / 1e9:.1f} GB as float32, "
                         f"over the {max_bytes / 1e9:.1f} GB limit; hold fewer rows, a pooled view "
                         f"({option_text('features', 'avg')}), or {option_text('head', 'linear')}, which streams them")
    out = {v: np.empty((len(indices), view_dim(v, cache.feature_shape)), np.float32) for v in views}
    i = 0
    for rows, block, sel in cache.iter_blocks(indices, block_rows):
        part = block[sel]
        for v in views:
            out[v][i:i + len(rows)] = apply_view(part, v)
        i += len(rows)
    for v in views:  # a NaN or inf would train or score silently wrong: refuse it here, where rows are read
        bad = np.flatnonzero(~np.isfinite(out[v]).all(1))
        if len(bad):
            raise non_finite(indices[bad])
    return out


def non_finite(rows) -> UsageError:
    """The one line that refuses cache rows (their indices) holding NaN or inf."""
    return UsageError(f"{len(rows)} cache rows hold non-finite features (NaN or inf), e.g. rows "
                      f"{[int(r) for r in rows[:5]]}: the cache is damaged; extract it again")


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


class FeatureArray:
    """Feature rows held in memory with the reading side of ``FeatureCache`` (n, labels, classes,
    feature_shape, iter_blocks, iter_batches), so a head fits on arrays exactly as on a cache file."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        features = np.asarray(features)
        if features.ndim == 2:  # (N, d) rows: a pooled cache's (N, d, 1, 1)
            features = features[:, :, None, None]
        if features.ndim != 4:
            raise ValueError(f"features must be (N, d) rows or (N, C, H, W) maps, got shape {features.shape}")
        self.features, self.labels = features, np.asarray(labels, np.int64)
        self.classes, self.n, self.feature_shape = list(classes), len(features), tuple(features.shape[1:])

    def iter_blocks(self, indices: np.ndarray, block_rows: int, shuffle_blocks: Optional[np.random.Generator] = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        indices = np.sort(np.asarray(indices))
        starts = np.arange(0, self.n, block_rows)
        if shuffle_blocks is not None:
            starts = shuffle_blocks.permutation(starts)
        for s in starts:
            lo, hi = np.searchsorted(indices, [s, s + block_rows])
            if lo < hi:
                yield indices[lo:hi], self.features[s:s + block_rows], indices[lo:hi] - s

    iter_batches = FeatureCache.iter_batches


# -- a cache's classes as a head's ------------------------------------------------------------------
def cache_classes_to_model(classes: list, cache) -> np.ndarray:
    """Each of the cache's class indices as the model's: a cache of some of the model's classes is scored as
    ``--data`` scores such a folder (matched by name); one with a class the model does not know is refused."""
    unknown = unknown_classes(cache.classes, classes)
    if unknown:
        raise UsageError(f"cache {cache.path} has classes {unknown} the model does not know; its classes: "
                         f"{', '.join(classes)}{near_miss_text(unknown, classes)}")
    return np.array([class_index(classes, c) for c in cache.classes], dtype=np.int64)


class Relabelled:
    """``rows`` (a ``FeatureCache``, ``FusedRows``) with ``classes`` (a head's) and its labels as their indices,
    matched by name (``cache_classes_to_model``); everything else is read through. A test set of some of a head's
    classes is then scored against all of them by the code that scores a cache (``evaluate_head``, the overlap,
    calibration), with no mapping of its own: its raw labels would index the wrong classes."""

    def __init__(self, rows, classes: Sequence[str]):
        self.rows, self.classes = rows, list(classes)
        self.labels = cache_classes_to_model(self.classes, rows)[np.asarray(rows.labels, np.int64)]

    def __getattr__(self, name: str):
        return getattr(self.rows, name)


# -- a head on cache rows ----------------------------------------------------------------------
def as_float32(feats: np.ndarray, device):
    """A minibatch of cached features as a float32 tensor on ``device``: the same numbers as
    ``feats.astype(np.float32)``, but widened by torch (vectorised: ~20x numpy's float16 cast) and,
    on an accelerator, after the copy (half the bytes to move)."""

    if not feats.dtype.isnative:  # a foreign byte order, which torch does not take
        feats = feats.astype(np.float32)
    return torch.from_numpy(feats).to(device).float()


def head_scores(head, cache: FeatureCache, indices: np.ndarray, device, block_rows: int,
                batch_size: int = 256) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Log-probabilities and unknown scores (None when the head has none) of some cache rows, in sorted
    ``indices`` order: one pass through ``head.scores``."""

    head.eval()
    out = np.zeros((len(indices), getattr(head, "n_classes", len(cache.classes))), np.float64)  # the head's classes
    ood = np.zeros(len(indices), np.float64) if getattr(head, "has_unknown", False) else None
    i, bad = 0, []
    with torch.inference_mode():
        for rows, feats in cache.iter_batches(indices, batch_size, block_rows):  # in sorted row order
            x = as_float32(feats, device)
            finite = torch.isfinite(x).flatten(1).all(1).cpu().numpy()
            if not finite.all():  # NaN probabilities, a NaN unknown score that is never above the threshold
                bad.extend(int(r) for r in np.asarray(rows)[~finite])  # (evaluate crashed on them): as fits refuse them
            lp, score = head.scores(x) if ood is not None else (head(x), None)
            out[i:i + len(lp)] = lp.double().cpu().numpy()
            if ood is not None:
                ood[i:i + len(lp)] = score.double().cpu().numpy()
            i += len(lp)
    if bad:
        raise non_finite(bad)
    return out, ood


def array_scores(head, X: np.ndarray, feature_shape, device, batch_size: int = 256
                 ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``head_scores`` of rows of cached features held in memory ((N, ...) with C*H*W values a row, as the
    API's arrays of features come), ``batch_size`` rows at a time."""
    rows = FeatureArray(np.asarray(X).reshape(len(X), *feature_shape), np.zeros(len(X), np.int64), ())
    return head_scores(head, rows, np.arange(len(X)), device, batch_size, batch_size)


def evaluate_head(head, cache: FeatureCache, indices: np.ndarray, device, block_rows: int,
                  batch_size: int = 256) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean NLL and log-probabilities (rows in sorted ``indices`` order) over some cache rows."""

    out, _ = head_scores(head, cache, indices, device, block_rows, batch_size)
    y = cache.labels[np.sort(indices)]
    nll = float(-out[np.arange(len(y)), y].mean())
    acc = float((out.argmax(1) == y).mean())
    return acc, nll, out
