"""The summary command: a model's layers, output shapes and (trainable) parameter counts, without weights.

Everything runs on PyTorch's 'meta' device: no weights are loaded or downloaded, nothing is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import SummaryConfig, check_config, option_text
from ..errors import UsageError
from ..extraction import backbones as bb
from .whole_models import TransferModel, count_params, head_in_shape, parse_unfreeze


@dataclass(frozen=True)
class SummaryResult:
    """summary's answer: the model's layers and its parameter counts under the freeze setting."""

    backbone: str
    classes: int
    pool: Optional[str]  # the head's pooling: the one asked for, else the backbone's own
    unfreeze: str
    input_shape: list  # [3, crop, crop]: the crop the counts and shapes are for
    blocks: int  # the backbone's blocks (what --unfreeze K counts from the end)
    total_params: int
    trainable_params: int
    frozen_params: int
    layers: list  # one dict per leaf module: layer, type, output_shape, params, trainable, block


def summarize(cfg: SummaryConfig) -> SummaryResult:
    """Layer-by-layer output shapes and parameter counts, and the totals under a freeze setting."""

    check_config(cfg)
    if cfg.crop_size and cfg.crop_size < 32:
        raise UsageError(f"{option_text('crop_size')} must be 0 (the weights' own) or at least 32, got {cfg.crop_size}")
    unfreeze = parse_unfreeze(cfg.unfreeze)
    own = bb.default_transform(cfg.backbone).crop_size[0]
    crop = cfg.crop_size or own
    pool = cfg.pool or bb.get_spec(cfg.backbone).pool
    try:
        in_shape = head_in_shape(cfg.backbone, crop, pool)
    except (AssertionError, RuntimeError, ValueError) as e:  # a ViT's patch grid is fixed: 224 only
        raise UsageError(f"{cfg.backbone} does not take a {crop}x{crop} input ({str(e).strip()}); leave "
                         f"{option_text('crop_size')} out for its own {own}") from None
    with torch.device("meta"):
        model = TransferModel(cfg.backbone, bb.bare_features(cfg.backbone, "meta"), in_shape, cfg.classes, pool,
                              cfg.dropout)
    model.set_trainable(unfreeze)
    block_of = {id(m): i for i, b in enumerate(model.blocks()) for m in b.modules()}
    shapes, hooks = {}, []
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            shapes.setdefault(name, list(output.shape[1:]))
        return hook

    for name, m in leaves:
        hooks.append(m.register_forward_hook(record(name)))
    with torch.no_grad():
        model(torch.empty(1, 3, crop, crop, device="meta"))
    for h in hooks:
        h.remove()
    layers = []
    for name, m in leaves:
        params = list(m.parameters())
        layers.append({"layer": name, "type": type(m).__name__, "output_shape": shapes.get(name),
                       "params": sum(p.numel() for p in params),
                       "trainable": sum(p.numel() for p in params if p.requires_grad),
                       "block": block_of.get(id(m))})
    total, trainable = count_params(model)
    return SummaryResult(backbone=cfg.backbone, classes=cfg.classes, pool=pool, unfreeze=cfg.unfreeze,
                         input_shape=[3, crop, crop], blocks=len(model.blocks()), total_params=total,
                         trainable_params=trainable, frozen_params=total - trainable, layers=layers)
