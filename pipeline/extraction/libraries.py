"""torchvision and timm models as backbones: which library a name means, the trunk each model is cut to,
its stages, and its own preprocessing record.

A bare name that only one library has means that library's model; torchvision wins a name both have
(``resnet18``), so every name that worked before timm keeps its meaning and its caches; ``timm:`` or
``torchvision:`` forces one. The cached map is the model's last spatial feature map:
- timm: ``forward_features`` (a ViT's patch tokens laid out as a map, without its class and register
  tokens; an NHWC model's map permuted to NCHW), with the modules it never calls (pooling, classifier)
  left out of the trunk;
- torchvision: the model's children up to its global pooling and classifier (VGG, MobileNet,
  EfficientNet, ConvNeXt: ``features``; ResNet: conv1 ... layer4), checked to run as a chain; DenseNet's
  ``features`` end with the ReLU its forward applies (``with_final_activation``). ConvNeXt's classifier opens
  with a LayerNorm of the pooled vector: a head's part, as in timm, so its map is the one its classifier pools.
Everything here imports torch, torchvision and timm inside functions.
"""
from __future__ import annotations

import difflib
import functools
import logging
import math
import re

from ..config import option_value
from ..errors import UsageError

log = logging.getLogger(__name__)

LIBRARIES = ("torchvision", "timm")


@functools.lru_cache(maxsize=1)
def torchvision_names() -> frozenset:
    """torchvision's classification models (not its detection or video ones)."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def timm_has(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def split_prefix(name: str) -> tuple[str, str]:
    """('timm' | 'torchvision' | '', bare name) of a --backbone value."""
    library, sep, bare = name.partition(":")
    if sep and library in LIBRARIES:
        return library, bare
    return "", name


def library_of(name: str) -> tuple[str, str]:
    """(library, bare name) a --backbone value resolves to; a usage error naming close matches if none has it."""
    library, bare = split_prefix(name)
    if library == "torchvision" and bare in torchvision_names():
        return library, bare
    if library == "timm" and timm_has(bare):
        return library, bare
    if not library:
        if bare in torchvision_names():
            return "torchvision", bare
        if timm_has(bare):
            return "timm", bare
    raise UsageError(unknown_name_message(name))


def unknown_name_message(name: str) -> str:
    import timm

    library, bare = split_prefix(name)
    names = sorted({*(torchvision_names() if library != "timm" else ()),
                    *(timm.list_models() if library != "torchvision" else ())})
    close = difflib.get_close_matches(bare, names, n=4, cutoff=0.6)
    where = f"{library} has no model" if library else "neither torchvision nor timm has a model"
    # the family the name was meant to be in (its longest run of letters: 'efficientnet' of 'tf_efficientnet_lit0'),
    # where timm has some; the listing said '*convnext*' whatever the name
    runs = sorted(re.findall(r"[a-z]{3,}", bare.lower()), key=len, reverse=True)
    family = next((r for r in runs if timm.list_models(f"*{r}*")), "convnext")
    return (f"unknown {option_value('backbone', name)}: {where} of that name"
            f"{'; close: ' + ', '.join(close) if close else ''}; list them with "
            f"python -c \"import timm; print(timm.list_models('*{family}*'))\" or "
            "python -c \"import torchvision; print(torchvision.models.list_models(torchvision.models))\"")


def canonical(library: str, bare: str) -> str:
    """The shortest name that means this model: bare, unless torchvision owns the bare name."""
    return f"timm:{bare}" if library == "timm" and bare in torchvision_names() else bare


# -- torchvision --------------------------------------------------------------------------------------
def _is_head_part(module) -> bool:
    """Global pooling, flattening, dropout, or a classifier (a container of single layers holding a Linear
    or ending in a global pool): what follows a torchvision model's last map."""
    from torch import nn

    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    if isinstance(module, (*pools, nn.Flatten, nn.Dropout, nn.Linear, nn.Identity)):
        return True
    children = list(module.children())
    if not children or any(list(c.children()) for c in children):
        return False
    return any(isinstance(c, nn.Linear) for c in children) or isinstance(children[-1], pools)


def with_final_activation(model):
    """``model`` with the activation its forward applies after its last feature module made a module of it, so the
    trunk's map is the one its classifier pools: DenseNet's ``forward`` runs ``F.relu`` on ``features``' output (its
    last module is ``norm5``, a BatchNorm), appended to ``features`` as ``relu5``. It has no weights (state-dict keys
    unchanged), and the forward's own ReLU after it changes nothing (``provenance.TRUNK_CHANGES``)."""
    from torch import nn
    from torchvision.models import DenseNet

    if isinstance(model, DenseNet) and not isinstance(model.features[-1], nn.ReLU):
        model.features.add_module("relu5", nn.ReLU())
    return model


def torchvision_trunk(model):
    """The children of ``model`` before its trailing pooling and classifier, as one module (the child itself
    when there is one: VGG's ``features``, whose state-dict keys stay those of today's caches and models)."""
    from torch import nn

    children = list(model.children())
    cut = len(children)
    while cut > 0 and _is_head_part(children[cut - 1]):
        cut -= 1
    kept = children[:cut]
    if not kept:
        raise UsageError(f"cannot find the feature part of torchvision's {type(model).__name__}")
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def torchvision_pool(model) -> str:
    """'none' when the classifier reads the flattened map (VGG, AlexNet: an adaptive pool to 7x7), else 'avg'."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            return "avg" if all(s in (1, None) for s in size) else "none"
    return "avg"


def split_at_maxpool(features) -> list:
    """VGG-style blocks: the conv stages of a Sequential, each ending with its MaxPool."""
    from torch import nn

    blocks, current = [], []
    for m in features.children():
        current.append(m)
        if isinstance(m, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    if current:
        blocks.append(nn.Sequential(*current))
    return blocks


def torchvision_blocks(trunk) -> list:
    """Stages, first to last: VGG's conv stages (each ending at a MaxPool); a ``features`` Sequential's
    children (MobileNet, EfficientNet, ConvNeXt); a chain of children (ResNet): the leading single layers
    as one stem block, then each stage, a single layer after a stage joining it."""
    from torch import nn

    children = list(trunk.children())
    if any(isinstance(m, nn.MaxPool2d) for m in children) and not any(list(m.children()) for m in children):
        return split_at_maxpool(trunk)
    if not any(list(m.children()) for m in children):
        return children or [trunk]
    blocks, stem = [], []
    for m in children:
        if list(m.children()):
            if stem:
                blocks.append(nn.Sequential(*stem))
                stem = []
            blocks.append(nn.ModuleList([m]))
        elif blocks:
            blocks[-1].append(m)
        else:
            stem.append(m)
    if len(blocks) == 1 and len(list(blocks[0][0].children())) > 1:  # one container (Swin's features): its stages
        inner = list(blocks[0][0].children())
        return [*inner[:-1], nn.ModuleList([inner[-1], *list(blocks[0])[1:]])]
    return blocks


def torchvision_transform(bare: str):
    from torchvision.models import get_model_weights

    return get_model_weights(bare).DEFAULT.transforms()


# -- timm ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def timm_used_children(bare: str) -> frozenset:
    """The top-level modules ``forward_features`` calls or reads (found once per model on the meta device)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(bare, pretrained=False)
    used = set()
    # every module's call counts for its top-level child: a ModuleList forward_features iterates (CrossViT's
    # patch_embed, CoaT's serial_blocks1) is never called itself, only its members are
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name.split(".")[0]: used.add(name))
             for name, m in model.named_modules() if name]

    class Reads(type(model)):  # and so does a child it only reads: EVA-02 calls self.rope.get_embed(), not rope
        def __getattr__(self, name):
            if name in self.__dict__.get("_modules", {}):
                used.add(name)
            return super().__getattr__(name)

    model.__class__ = Reads
    size = timm_input_size(model.pretrained_cfg)
    try:
        with torch.no_grad():
            out = model.eval().forward_features(torch.empty(1, 3, size, size, device="meta"))
    except Exception as e:  # noqa: BLE001 -- a model that cannot run on 'meta': keep all but its classifier
        log.debug("cannot trace %s on the meta device (%s); its trunk keeps every module but the classifier", bare, e)
        head = str(model.pretrained_cfg.get("classifier") or "").split(".")[0]
        return frozenset(name for name, _ in model.named_children() if name != head)
    finally:
        for h in hooks:
            h.remove()
    check_timm_map(bare, out, model)
    return frozenset(used)


def check_timm_map(bare: str, out, model) -> None:
    """Refuse, in one line naming the model, a ``forward_features`` output this tool cannot cache as one
    C x H x W map: a list or tuple (CrossViT's two branches, CoaT's), or tokens that lay out as no map."""
    import torch

    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
        what = (f"a {type(out).__name__}" if not isinstance(out, torch.Tensor)
                else f"a {out.dim()}-d tensor {tuple(out.shape)}")
        raise UsageError(f"timm's {bare} is not supported as a backbone: its forward_features gives {what}, "
                         "not one feature map (docs/backbones.md)")
    if out.dim() == 3:
        token_grid(bare, out.shape[1] - int(getattr(model, "num_prefix_tokens", 0) or 0),
                   getattr(getattr(model, "patch_embed", None), "grid_size", None))


def token_grid(bare: str, n: int, grid=None) -> tuple[int, int]:
    """(H, W) of ``n`` patch tokens: the patch embedding's grid, or the square they make; else a usage error."""
    if grid is not None and int(grid[0]) * int(grid[1]) == n:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(n)
    if side * side != n:
        raise UsageError(f"timm's {bare} is not supported as a backbone: its forward_features gives {n} tokens "
                         "beyond the class and register tokens timm counts (num_prefix_tokens), which lay out as "
                         "no square map (docs/backbones.md)")
    return side, side


def timm_input_size(cfg) -> int:
    size = tuple(cfg.get("input_size", (3, 224, 224)) if isinstance(cfg, dict) else cfg.input_size)
    if size[1] != size[2]:
        log.warning("timm's config asks for %dx%d inputs; this tool crops squares of %d", size[1], size[2], size[2])
    return int(size[2])


@functools.lru_cache(maxsize=1)
def timm_trunk_class():
    """The trunk class (defined on first use: this module imports no torch at import time)."""
    from torch import nn

    class TimmTrunk(nn.Module):
        """A timm model's ``forward_features`` as a C x H x W map; the modules it never calls (pooling,
        classifier) are not part of it (an Identity stands in), so they are neither saved nor trained."""

        def __init__(self, model, used):
            super().__init__()
            net = nn.Module.__new__(type(model))
            net.__dict__.update(model.__dict__)
            net._parameters, net._buffers = dict(model._parameters), dict(model._buffers)
            net._modules = {k: (m if k in used else nn.Identity()) for k, m in model._modules.items()}
            self.net = net
            self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
            self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
            self.arch = timm_arch(model)

        def forward(self, x):
            y = self.net.forward_features(x)
            if y.dim() == 3:  # a ViT: (B, prefix + H*W, C) tokens -> the patch tokens as a (B, C, H, W) map
                tokens = y[:, self.prefix_tokens:]
                h, w = token_grid(self.arch, tokens.shape[1],
                                  getattr(getattr(self.net, "patch_embed", None), "grid_size", None))
                return tokens.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
            return y.permute(0, 3, 1, 2) if self.nhwc else y


    return TimmTrunk


def timm_arch(model) -> str:
    return model.pretrained_cfg.get("architecture") or type(model).__name__


def timm_trunk(model):
    return timm_trunk_class()(model, timm_used_children(timm_arch(model)))


def timm_blocks(trunk) -> list:
    """The model's stages from timm's ``feature_info`` (each stage ends at a module it names); the stem
    joins the first, what follows the last (a final conv or norm) joins the last."""
    from torch import nn

    ends = [f["module"] for f in getattr(trunk.net, "feature_info", [])]
    if not ends:
        return [trunk]
    blocks, current = [], []
    for name, m in _pieces(trunk.net, set(ends)):
        current.append(m)
        if name in ends:
            blocks.append(nn.ModuleList(current))
            current = []
    if current and blocks:
        blocks[-1].extend(current)
    return blocks or [trunk]


def _pieces(module, ends: set, prefix: str = ""):
    """(dotted name, module) of the modules whose parameters are in the model, in order: a module that
    holds a stage end is walked into, every other one is one piece."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if full not in ends and any(e.startswith(full + ".") for e in ends):
            yield from _pieces(child, ends, full + ".")
        else:
            yield full, child


def timm_preprocessing(cfg) -> dict:
    """resize/crop/interpolation/mean/std from timm's pretrained config (``resolve_data_config``'s fields):
    the crop is the input size, the resize the crop over ``crop_pct``, as timm's eval transform does."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    crop = timm_input_size(cfg)
    if get("crop_mode", "center") not in ("center", None):
        log.warning("timm's config asks for crop mode %r; this tool center-crops", get("crop_mode"))
    return {"crop": crop, "resize": int(math.floor(crop / float(get("crop_pct", 0.875) or 0.875))),
            "interpolation": str(get("interpolation", "bicubic") or "bicubic"),
            "mean": [float(x) for x in get("mean", (0.485, 0.456, 0.406))],
            "std": [float(x) for x in get("std", (0.229, 0.224, 0.225))]}


def timm_pretrained_cfg(bare: str, tag: str = ""):
    import timm

    try:  # an unknown tag, or a model with no pretrained weights at all, is timm's RuntimeError ("a bug?")
        cfg = timm.models.get_pretrained_cfg(f"{bare}.{tag}" if tag else bare, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise UsageError(f"timm has no pretrained weights {tag or 'DEFAULT'!r} for {bare}; tags: "
                         f"{', '.join(n.split('.', 1)[1] for n in timm.list_pretrained(bare + '.*')) or 'none'}")
    return cfg


def timm_categories(model) -> list:
    """The class names of a timm model's ImageNet classifier (1k, 21k...), or [] for another head."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return []
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(len(info.label_names()))]


def timm_cache_dir() -> str:
    """Where timm's hub download keeps files (the Hugging Face cache)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"
