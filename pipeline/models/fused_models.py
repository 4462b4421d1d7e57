"""A head on fused features as one network: every backbone on its own preprocessing of the photo.

A fit-head checkpoint fitted on several caches (``heads.fused_views``) runs, wherever a model runs
(predict, evaluate --data, fit-head --test-data's scoring aside, export, serve, the API), as
``FusedModel``: backbone i sees channels 3i..3i+2 of the input, which ``StackedTransform`` filled with
the photo preprocessed as backbone i's weights ask (resize, crop, interpolation, mean, std); each map
becomes its view, l2-normalised, side by side (``fused_views.fuse_maps``, the rows the head was fitted
on); the head reads that. One input tensor keeps every runner (``Inference``, the micro-batcher, the
ONNX and TorchScript exports) as it is for one backbone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..heads.fused_views import fuse_maps


class StackedTransform:
    """A photo (PIL) -> (3k, S, S): backbone i's preprocessing of it in channels 3i..3i+2, at the top left of
    an S x S canvas (S the largest crop; zeros around a smaller one).

    ``resize_size`` and ``antialias`` are what the reader reads to decode a large JPEG at a reduced scale:
    the largest resize of the parts, so every part still resizes down (a part with a smaller resize then
    gets a photo decoded a little larger than extract gave it: numbers within JPEG decoding noise)."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)
        self.sizes = [int(t.crop_size[0]) for t in self.transforms]
        self.side = max(self.sizes)
        self.crop_size = [self.side]
        sizes = [getattr(t, "resize_size", None) for t in self.transforms]
        self.resize_size = [max(s[0] for s in sizes)] if all(isinstance(s, (list, tuple)) for s in sizes) else None
        self.antialias = all(getattr(t, "antialias", False) for t in self.transforms)

    @property
    def input_shape(self) -> tuple:
        return (3 * len(self.transforms), self.side, self.side)

    def __call__(self, image) -> torch.Tensor:
        out = torch.zeros(self.input_shape)
        for i, t in enumerate(self.transforms):
            x = t(image)
            out[3 * i:3 * i + 3, :x.shape[1], :x.shape[2]] = x
        return out


class FusedModel(nn.Module):
    """``parts`` (``whole_models.TransferModel``s without heads: their ``head_input`` is the map each cache
    holds, pooled or mirror-averaged as it was) on their slices of a ``StackedTransform`` input -> the
    fused row -> ``head``. The interface of a TransferModel (``head``, ``head_input``, ``on_features``)."""

    def __init__(self, parts: Sequence[nn.Module], sizes: Sequence[int], view: str, head: nn.Module):
        super().__init__()
        self.parts, self.sizes, self.view, self.head = nn.ModuleList(parts), [int(s) for s in sizes], view, head
        self.backbone = "+".join(p.backbone for p in parts)

    def head_input(self, x):
        maps = [part.head_input(x[:, 3 * i:3 * i + 3, :s, :s])
                for i, (part, s) in enumerate(zip(self.parts, self.sizes))]
        return fuse_maps(maps, self.view)

    def on_features(self, fn, f):
        return self.parts[0].on_features(fn, f)  # full precision, as for one backbone

    def forward(self, x):
        return self.on_features(self.head, self.head_input(x))

    def set_trainable(self, unfreeze: int) -> None:
        """Every backbone frozen, the head trainable; unfreezing a backbone is refused (not supported)."""
        if unfreeze:
            raise UsageError(f"a head on fused features ({self.backbone}) keeps its backbones frozen")
        for part in self.parts:
            part.set_trainable(0)
            part.requires_grad_(False)
        self.head.requires_grad_(True)


def input_shape(transform) -> tuple:
    """(channels, H, W) of what a model's preprocessing gives: a ``StackedTransform``'s, or (3, crop, crop)."""
    shape = getattr(transform, "input_shape", None)
    return tuple(shape) if shape else (3, int(transform.crop_size[0]), int(transform.crop_size[0]))


def fused_metadata(ckpt: dict, transform: StackedTransform, input_name: str) -> dict:
    """What an exported fused model needs fed, in its metadata: the stacked input and each part's preprocessing."""
    from ..cache.provenance import Preprocessing

    parts = ckpt["fused"]["parts"]
    pre = [Preprocessing.from_dict(p["preprocessing"]) for p in parts]
    backbones = ", ".join(p["backbone"] for p in parts)
    part_keys = ("backbone", "weights", "weights_sha256", "pool", "flip", "in_shape", "block")
    return {
        "input": {"name": input_name, "shape": ["N", *transform.input_shape], "dtype": "float32",
                  "what": f"the photo preprocessed once per backbone (preprocessing[i], for {backbones}), "
                          f"part i in channels 3i..3i+2 at the top left of a {transform.side} x {transform.side} "
                          "canvas, zeros elsewhere"},
        "preprocessing": [{**p.to_dict(), "steps": p.describe(), "backbone": part["backbone"],
                           "channels": [3 * i, 3 * i + 3]}
                          for i, (p, part) in enumerate(zip(pre, parts))],
        "fused": {"view": ckpt["fused"]["view"],
                  "parts": [{k: part.get(k) for k in part_keys} for part in parts]},
    }
