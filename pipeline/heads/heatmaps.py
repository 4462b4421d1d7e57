"""Class-activation maps: which part of the photo made a head's decision, from the backbone's last feature map.

Grad-CAM (Selvaraju et al. 2017): each channel of the (C, H, W) map is weighted by the spatial mean of the
class score's gradient with respect to it, and the weighted channels are summed into an H x W map. The
gradient is taken through the head's own torch graph (``ProbeHead``: view, normalisation, RBF map, Linear),
so every head kind (linear, logreg, kernel, svm, the default SVM + logreg blend) gets its map the same way;
for a head linear on the average-pooled map (the default view 'avg' with a linear or logreg head and no
l2 step) the weights are exactly the head's, divided by H x W: CAM (Zhou et al. 2016). A kernel head's
gradient is integrated on the path from the landmarks' centre to the photo's row (``class_direction``).

The score explained is the class's log-odds, log p / (1 - p) (its log-probability minus the log-sum of
the other classes'): a binary head converted from scikit-learn has a constant logit for class 0, whose
gradient would be zero, and a log-probability's gradient vanishes as p -> 1; the log-odds has neither flaw.

A cached map needs no second forward pass (the head alone runs, with a gradient); a photo one (the backbone
without a gradient, the head with one: ``whole_models.WithExtras(maps=True)``). A cache made with
``--pool avg`` holds (C, 1, 1) rows: no place is left to point at, which ``check_spatial`` says.

Own code rather than pytorch-grad-cam (``grad-cam`` on PyPI): that library hooks a layer of a model it runs
itself, so a cached map (the input, not a layer) and predict's one pass (rows and maps from the same forward)
do not fit it; it returns only maps already clipped, min-max scaled and resized with OpenCV, and it pulls
opencv-python and ttach in. The method itself is the few lines below.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..config import option_text
from ..errors import UsageError
from .cache_views import non_finite
from .feature_views import apply_view_torch


def check_spatial(feature_shape: Sequence[int], what: str = "this cache") -> None:
    """Refuse maps with no spatial extent (a ``--pool avg`` cache's (C, 1, 1) rows), in one line."""
    h, w = (int(s) for s in tuple(feature_shape)[-2:])
    if h * w == 1:
        raise UsageError(f"{what} holds pooled features {tuple(int(s) for s in feature_shape)}: no spatial map "
                         f"is left to explain; extract again without {option_text('pool', 'avg')} (the default keeps "
                         "the C x H x W map), "
                         "or explain photos (predict --explain, head.explain(photos))")


def log_odds(logp, target):
    """(B,) log p / (1 - p) of class ``target[b]`` from (B, K) log-probabilities (stable: no 1 - p)."""
    picked = logp.gather(1, target[:, None])[:, 0]
    others = logp.scatter(1, target[:, None], float("-inf"))
    return picked - torch.logsumexp(others, 1)


PATH_STEPS = 8  # kernel heads: points on the path from the landmarks' centre (their gradient is integrated)


def _rows(head, a, pool=None):
    """Maps -> the head's normalised view rows (what its kernel map or Linear layer sees)."""
    x = pool(a) if pool is not None else a
    if tuple(x.shape[1:]) != head.in_shape:
        raise ValueError(f"this head takes features of shape {head.in_shape}, got {tuple(x.shape[1:])}")
    return head.norm(apply_view_torch(x.to(head.linear.weight.dtype), head.view))


def class_direction(head, z, target, steps: int = PATH_STEPS):
    """(B, d): how each normalised row ``z`` moves a kernel head's log-odds of ``target``: the gradient averaged
    on the straight path from the landmarks' centre (the middle of the training rows, as the head knows them)
    to ``z`` (integrated gradients). A head linear in its rows needs none: its gradient at ``z`` is the path's.

    Why the path: an RBF head's gradient at a confidently classified row points at the nearest training
    rows (their noise, not their class), and so lit the deciding region of a crafted map in 60-65 % of
    maps; integrated from the centre, in every one (tests/test_heatmaps.py)."""
    centre = head.landmarks.mean(0, keepdim=True)
    t = ((torch.arange(steps, dtype=z.dtype, device=z.device) + 0.5) / steps)[:, None, None]
    points = centre + t * (z - centre)[None]
    points = points.reshape(-1, z.shape[1]).detach().requires_grad_(True)  # every point in one pass
    score = log_odds(head.classify(head.features(points)), target.repeat(steps))
    (g,) = torch.autograd.grad(score.sum(), points)
    return g.view(steps, *z.shape).mean(0)


def grad_cam(head, fmap, target=None, pool=None) -> tuple:
    """(log-probabilities (B, K), signed Grad-CAM maps (B, H, W)) of a ``ProbeHead`` on (B, C, H, W) maps.

    ``pool``: what a whole model applies to its backbone's map before the head (its global average pool),
    None for cached maps; ``target``: (B,) class indices to explain, default each row's predicted class.
    One forward pass of the head (a kernel head: one more, batched, along its path), with a gradient even under
    ``torch.inference_mode`` (the map is copied out of it first). The rows are independent (a head has no batch
    statistics in eval mode), so one backward gives every row's gradient.
    """
    check_spatial(fmap.shape, "the feature map")
    with torch.inference_mode(False), torch.enable_grad():
        a = fmap.detach().clone()
        a = (a if a.dtype in (torch.float32, torch.float64) else a.float()).requires_grad_(True)
        z = _rows(head, a, pool)
        logp = head.classify(head.features(z))
        picked = logp.argmax(1) if target is None else torch.as_tensor(target, device=logp.device).long()
        if head.kernel_components:
            direction = class_direction(head, z.detach(), picked.detach())
            (grad,) = torch.autograd.grad((direction * z).sum(), a)  # the direction, back through view and norm
        else:  # the gradient at z itself: straight back through the pass above, not a second one
            (grad,) = torch.autograd.grad(log_odds(logp, picked.detach()).sum(), a)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return logp.detach(), (weights * a.detach()).sum(1)


def head_maps(head, fmaps, target=None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities (N, K), signed maps (N, H, W)) of a ``ProbeHead`` on cached maps (N, C, H, W), in
    blocks; the head's own device and dtype."""
    fmaps = np.asarray(fmaps)
    check_spatial(fmaps.shape)
    param = next(iter(head.parameters()))
    out_logp, out_maps = [], []
    for i in range(0, len(fmaps), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(fmaps[i:i + batch_size], np.float32)).to(param.device)
        t = None if target is None else np.asarray(target)[i:i + batch_size]
        logp, maps = grad_cam(head, x, t)
        out_logp.append(logp.double().cpu().numpy())
        out_maps.append(maps.float().cpu().numpy())
    return np.concatenate(out_logp), np.concatenate(out_maps)


def cache_head_maps(head, cache, indices, batch_size: int = 64, block_rows: int = 2048) -> np.ndarray:
    """Signed maps (N, H, W) of some rows of a ``FeatureCache``, in sorted ``indices`` order, read block by
    block as ``cache_views.head_scores`` reads them: the head alone, never the backbone."""
    check_spatial(cache.feature_shape, f"cache {cache.path}")
    maps, bad = [], []
    for rows, feats in cache.iter_batches(np.asarray(indices, np.int64), batch_size, block_rows):
        finite = np.isfinite(np.asarray(feats).reshape(len(feats), -1)).all(1)  # else NaN maps, as scoring refuses
        bad.extend(int(r) for r in np.asarray(rows)[~finite])
        maps.append(head_maps(head, feats, batch_size=batch_size)[1])
    if bad:
        raise non_finite(bad)
    return np.concatenate(maps) if maps else np.zeros((0, *cache.feature_shape[1:]), np.float32)


def normalised(maps: np.ndarray) -> np.ndarray:
    """Maps for showing: negative parts (evidence against the class) cut to 0, each map scaled to a peak of 1
    (a map with no positive evidence stays 0)."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    peak = maps.reshape(len(maps), -1).max(1) if len(maps) else np.zeros(0, np.float32)
    return maps / np.where(peak > 0, peak, 1.0)[:, None, None]


def overlay(transform, image, cam):
    """The overlay PNG's picture of one photo: its network input (``image``, normalised by ``transform``, as the
    backbone saw it: resized and cropped) under its signed map ``cam`` (shown as ``normalised``)."""
    from ..runs.figures import denormalise, heatmap_overlay

    seen = denormalise(np.asarray(image), [float(m) for m in transform.mean], [float(s) for s in transform.std])
    return heatmap_overlay(seen, normalised(np.asarray(cam)[None])[0])
