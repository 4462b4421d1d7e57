"""Views of a cached feature map and their normalisation, chosen at fit time.

A cache stores the backbone's map as it came out, (N, C, H, W). Which vector a classifier sees is
decided when the head is fitted, and computed while the rows stream in (never stored):

- ``flat``: the C*H*W flatten, the seed tutorial's 25,088-vector for VGG-16;
- ``avg`` / ``max``: global average / max over H x W, C numbers;
- ``avgmax``: both, concatenated (2C).

A cache made with ``--pool avg`` holds (N, C, 1, 1): the average is all that is left, so only
``avg`` (and ``flat``, the same numbers) are allowed.

Normalisation, fitted on the training rows only and then applied unchanged at predict time:
``none``; ``rms`` (divide by one scalar, the training rows' global root-mean-square: keeps VGG's
caffe-scale features from blowing up optimisers); ``l2`` (each row to unit L2 norm, no statistic);
``standardize`` (per-feature mean/std, as scikit-learn's StandardScaler).

Every function has a numpy form (training, scikit-learn) and a torch form (``ProbeHead``) that agree.
numpy only at import; torch is imported inside the torch functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from ..config import NORMS, POOLED_VIEWS, VIEWS


def _shape(feature_shape: Sequence[int]) -> tuple:
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) != 3:
        raise ValueError(f"a cached feature map is (C, H, W); got shape {shape}")
    return shape


def is_pooled(feature_shape: Sequence[int]) -> bool:
    """True for a cache extracted with pooling: each map is (C, 1, 1)."""
    _, h, w = _shape(feature_shape)
    return h * w == 1


def allowed_views(feature_shape: Sequence[int]) -> tuple:
    """The views a cache of this feature shape supports."""
    return POOLED_VIEWS if is_pooled(feature_shape) else VIEWS


def check_view(view: str, feature_shape: Sequence[int]) -> None:
    """Refuse an unknown view, or a spatial view of a pooled cache, naming the allowed ones."""
    allowed = allowed_views(feature_shape)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; allowed views: {', '.join(allowed)}")
    if view not in allowed:
        raise ValueError(f"view {view!r} needs the spatial map, but this cache was made with pooling "
                         f"(features {tuple(feature_shape)}); allowed views: {', '.join(allowed)}")


def check_norm(kind: str) -> None:
    if kind not in NORMS:
        raise ValueError(f"unknown normalisation {kind!r}; allowed: {', '.join(NORMS)}")


def view_dim(view: str, feature_shape: Sequence[int]) -> int:
    """Length of the vector ``view`` makes of one (C, H, W) map."""
    check_view(view, feature_shape)
    c, h, w = _shape(feature_shape)
    return {"flat": c * h * w, "avg": c, "max": c, "avgmax": 2 * c}[view]


def apply_view(x: np.ndarray, view: str) -> np.ndarray:
    """(B, C, H, W) cached features -> (B, d) float32 rows of ``view`` (float16 caches are widened first)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {x.shape}")
    check_view(view, x.shape[1:])
    x = x.astype(np.float32, copy=False)
    if view == "flat":
        return x.reshape(len(x), -1)
    if view == "avg":
        return x.mean(axis=(2, 3), dtype=np.float32)
    if view == "max":
        return x.max(axis=(2, 3))
    return np.concatenate([x.mean(axis=(2, 3), dtype=np.float32), x.max(axis=(2, 3))], axis=1)


def apply_view_torch(x, view: str):
    """The torch form of ``apply_view``: (B, C, H, W) tensor -> (B, d), in x's dtype."""
    import torch

    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    check_view(view, x.shape[1:])
    if view == "flat":
        return x.flatten(1)
    if view == "avg":
        return x.mean(dim=(2, 3))
    if view == "max":
        return x.amax(dim=(2, 3))
    return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


@dataclass
class Normalizer:
    """A fitted normalisation: the kind plus its statistic, so predict time applies the same transform.

    ``rms`` keeps one scalar; ``standardize`` a mean and std per feature (std 0 -> 1, as
    StandardScaler); ``l2`` and ``none`` keep nothing. Statistics are accumulated in float64.
    """

    kind: str = "none"
    rms: Optional[float] = None
    mean: Optional[np.ndarray] = field(default=None, repr=False)
    std: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self):
        check_norm(self.kind)

    @property
    def fitted(self) -> bool:
        return {"rms": self.rms is not None, "standardize": self.mean is not None}.get(self.kind, True)

    def fit(self, x: np.ndarray) -> "Normalizer":
        """Fit on training rows (N, d)."""
        return self.fit_batches([x])

    def fit_batches(self, batches: Iterable[np.ndarray]) -> "Normalizer":
        """Fit from (n_i, d) batches streamed one at a time (sums in float64, one pass)."""
        if self.kind in ("none", "l2"):
            return self
        n, ss, mean, m2 = 0, 0.0, 0.0, 0.0
        for b in batches:
            b = np.asarray(b, np.float64)
            k = len(b)
            if k == 0:
                continue
            if self.kind == "rms":
                ss += float(np.sum(b * b))
                d = b.shape[1]
            else:  # Chan et al.'s pairwise merge of (count, mean, M2): exact zeros for constant features
                bm = b.mean(axis=0)
                bm2 = ((b - bm) ** 2).sum(axis=0)
                delta = bm - mean
                tot = n + k
                mean = mean + delta * (k / tot)
                m2 = m2 + bm2 + delta * delta * (n * k / tot)
            n += k
        if n == 0:
            raise ValueError("cannot fit a normalisation on zero rows")
        if self.kind == "rms":
            self.rms = float(np.sqrt(ss / (n * d))) or 1.0
        else:
            std = np.sqrt(m2 / n)
            std[std == 0] = 1.0  # constant features: centred, not scaled (as StandardScaler)
            self.mean, self.std = np.asarray(mean, np.float64), std
        return self

    def _need_fit(self):
        if not self.fitted:
            raise ValueError(f"the {self.kind!r} normalisation is not fitted")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply to (N, d) rows; keeps float32 input float32."""
        self._need_fit()
        x = np.asarray(x)
        dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float32
        if self.kind == "none":
            return x.astype(dt, copy=False)
        if self.kind == "rms":
            return (x / self.rms).astype(dt, copy=False)
        if self.kind == "l2":
            n = np.linalg.norm(x, axis=1, keepdims=True)
            n[n == 0] = 1.0
            return (x / n).astype(dt, copy=False)
        return ((x - self.mean) / self.std).astype(dt, copy=False)

    def state(self) -> dict:
        """Plain numbers (lists), JSON-friendly, for reports and ledgers."""
        out = {"kind": self.kind}
        if self.rms is not None:
            out["rms"] = self.rms
        if self.mean is not None:
            out["mean"], out["std"] = np.asarray(self.mean).tolist(), np.asarray(self.std).tolist()
        return out
