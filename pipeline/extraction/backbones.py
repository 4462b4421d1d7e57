"""Pretrained torchvision backbones as frozen feature extractors, with their preprocessing.

Weights come from torchvision's weights API (downloaded into ``$TORCH_HOME`` when online), a
local state-dict file (normalisation from a JSON sidecar with the same stem), or ``none``
(random init, for tests). Preprocessing always comes from the weights' own ``transforms()``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import PipelineError, UsageError

if TYPE_CHECKING:  # only for annotations: importing torch here would slow every cache hit
    from torch import nn
    from torchvision.transforms._presets import ImageClassification

# torch and torchvision are imported inside functions: a cache hit must not pay for importing them.


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and which part of it extracts features."""

    name: str  # the --backbone value
    build: Callable[[], "nn.Module"]  # the full model with random weights (classifier included)
    features: Callable[["nn.Module"], "nn.Module"]  # the part before global pooling, from the full model
    feature_prefixes: tuple[str, ...]  # state-dict key prefixes that part needs (loaded strictly)
    torchvision_name: Optional[str] = None  # name for torchvision's weights registry; None for custom models
    transform: Optional[Callable[[], "ImageClassification"]] = None  # preprocessing for custom models
    classifier_in: Optional[Callable[["nn.Module"], int]] = None  # in_features of the original classifier
    # How the original classifier reads the map, so a new head is its equivalent: 'none' = flattened
    # (VGG: Linear(512*7*7, classes)), 'avg' = global average pooling first (ResNet, MobileNet, EfficientNet).
    pool: str = "none"
    # The feature part's blocks, first to last, for "unfreeze the last k blocks"; None = its children.
    blocks: Optional[Callable[["nn.Module"], list]] = None


def _tv(name: str, features, prefixes, classifier_in, pool="none", blocks=None) -> BackboneSpec:
    def build():
        from torchvision.models import get_model

        return get_model(name, weights=None)

    return BackboneSpec(
        name=name,
        build=build,
        features=features,
        feature_prefixes=prefixes,
        torchvision_name=name,
        classifier_in=classifier_in,
        pool=pool,
        blocks=blocks,
    )


def _resnet_trunk(m):
    from torch import nn

    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


_RESNET_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


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


def _resnet_blocks(trunk) -> list:
    """ResNet blocks: the stem (conv1, bn1, relu, maxpool), then layer1..layer4."""
    from torch import nn

    children = list(trunk.children())
    return [nn.Sequential(*children[:4]), *children[4:]]


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": _tv("vgg16", lambda m: m.features, ("features.",), lambda m: m.classifier[0].in_features,
                 blocks=split_at_maxpool),
    "vgg19": _tv("vgg19", lambda m: m.features, ("features.",), lambda m: m.classifier[0].in_features,
                 blocks=split_at_maxpool),
    "resnet18": _tv("resnet18", _resnet_trunk, _RESNET_PREFIXES, lambda m: m.fc.in_features, "avg", _resnet_blocks),
    "resnet50": _tv("resnet50", _resnet_trunk, _RESNET_PREFIXES, lambda m: m.fc.in_features, "avg", _resnet_blocks),
    "mobilenet_v3_large": _tv(
        "mobilenet_v3_large", lambda m: m.features, ("features.",), lambda m: m.classifier[0].in_features, "avg"
    ),
    "efficientnet_b0": _tv(
        "efficientnet_b0", lambda m: m.features, ("features.",), lambda m: m.classifier[1].in_features, "avg"
    ),
}


def register_backbone(spec: BackboneSpec) -> None:
    """Add a backbone (tests register tiny ones; users may add their own)."""
    BACKBONES[spec.name] = spec


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


@dataclass
class LoadedBackbone:
    """A backbone with its weights loaded, ready to extract features."""

    spec: BackboneSpec
    model: "nn.Module"  # the full model (the classifier may hold random weights, see ``covers``)
    transform: "ImageClassification"  # PIL image -> normalised tensor, from the weights
    weights_id: str  # torchvision weights name ('VGG16_Weights.IMAGENET1K_V1'), 'file:<name>' or 'none'
    weights_sha256: str = ""  # sha256 of a local weights file
    covers: str = "all"  # which part the weights cover: 'all' or 'features'
    categories: list = field(default_factory=list)  # ImageNet class names when the weights have them

    @property
    def features(self):
        return self.spec.features(self.model)

    @property
    def mean(self) -> list[float]:
        return [float(x) for x in self.transform.mean]

    @property
    def std(self) -> list[float]:
        return [float(x) for x in self.transform.std]


def is_weights_path(weights: str) -> bool:
    """A --weights value names a file when it has a path separator or a file-like suffix."""
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin")) or Path(weights).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finite_number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a weights file's sidecar is (``x.pt`` -> ``x.json``): its mean, std, arch and covers."""
    return Path(path).with_suffix(".json")


def weights_inputs(weights: Optional[str]) -> list[tuple[str, str]]:
    """A --weights file and its sidecar, for an output guard's inputs (files.check_output): the sidecar
    even when there is none yet (one written there would change the preprocessing); [] for a name."""
    if not weights or not is_weights_path(weights):
        return []
    return [(weights, "the backbone weights"), (str(sidecar_path(weights)), f"the sidecar of the weights {weights}")]


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a weights file (``x.pt`` -> ``x.json``), or {} when there is none."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"weights sidecar {str(side)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise UsageError(f"weights sidecar {str(side)!r} must hold a JSON object, not a {type(meta).__name__}")
    for key in ("mean", "std"):
        value = meta.get(key, [0.0] * 3 if key == "mean" else [1.0] * 3)
        if not (isinstance(value, list) and len(value) == 3 and all(_finite_number(x) for x in value)
                and (key == "mean" or all(x > 0 for x in value))):
            raise UsageError(f"weights sidecar {str(side)!r}: {key!r} must be a list of 3 finite numbers"
                             f"{' > 0' if key == 'std' else ''}, got {value!r}")
    return meta


def _default_transform(spec: BackboneSpec):
    from torchvision.models import get_model_weights

    if spec.transform is not None:
        return spec.transform()
    return get_model_weights(spec.torchvision_name).DEFAULT.transforms()


def _with_normalisation(t, mean, std):
    """The same resize/crop as ``t`` with another mean/std (a local file's sidecar)."""
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(
        crop_size=t.crop_size[0],
        resize_size=t.resize_size[0],
        mean=tuple(mean),
        std=tuple(std),
        interpolation=t.interpolation,
        antialias=t.antialias,
    )


def torchvision_weights(spec: BackboneSpec, name: str):
    """Resolve a torchvision weights name ('DEFAULT', 'IMAGENET1K_V1', 'VGG16_Weights.IMAGENET1K_V1')."""
    from torchvision.models import get_model_weights

    if spec.torchvision_name is None:
        raise UsageError(f"backbone {spec.name!r} has no torchvision weights; use --weights none or a file")
    enum = get_model_weights(spec.torchvision_name)
    short = name.split(".")[-1]
    allowed = ["DEFAULT"] + [w.name for w in enum]
    if short == "DEFAULT":
        return enum.DEFAULT
    if short not in enum.__members__:
        raise UsageError(
            f"unknown weights {name!r} for {spec.name}; allowed: {', '.join(allowed)}, none, or a path to a file"
        )
    return enum[short]


def expected_download_path(weights) -> Path:
    """Where torchvision keeps (and looks for) the downloaded file of these weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _download_state_dict(weights) -> dict:
    try:
        return weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        target = expected_download_path(weights)
        raise PipelineError(
            f"cannot download {weights} ({type(e).__name__}: {e}); offline? put {target.name} from "
            f"{weights.url} at {target} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}) "
            "or pass --weights PATH to a local state-dict file"
        ) from None


def _load_local(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: one line, never torch's advice to unpickle
        raise UsageError(f"weights file {str(path)!r} is not a loadable state dict ({unloadable_reason(e)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return obj


def unloadable_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line (torch's own message is a page
    that ends by suggesting ``weights_only=False``, which would run the file's code)."""
    text = str(e).strip()
    if "weights_only" in text or "Unsupported global" in text:
        return "it holds pickled Python objects, which are never loaded"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _apply_state_dict(spec: BackboneSpec, model, state: dict, source: str) -> str:
    """Load ``state`` into ``model``; the feature part strictly. Returns what it covers."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UsageError(f"weights {source} are not for {spec.name}: {first[0].strip()}") from None
    if unexpected:
        raise UsageError(
            f"weights {source} are not for {spec.name}: unexpected keys such as {unexpected[:3]}"
        )
    needed = [k for k in missing if k.startswith(spec.feature_prefixes)]
    if needed:
        raise UsageError(f"weights {source} lack {len(needed)} keys {spec.name} needs, such as {needed[:3]}")
    return "all" if not missing else "features"


def load_preprocessing(name: str = "vgg16", weights: str = "DEFAULT"):
    """(transform, weights id) of backbone ``name`` with ``weights``, without loading or downloading them.

    For what needs only the preprocessing (preview): torchvision's weights enum carries its
    ``transforms()``, and a local file's mean/std are in its sidecar.
    """
    spec = get_spec(name)
    if weights.lower() == "none":
        return _default_transform(spec), "none"
    if is_weights_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"weights file {str(path)!r} does not exist")
        meta = read_sidecar(path)
        if meta.get("arch") and meta["arch"] != name:
            raise UsageError(f"weights file {str(path)!r} is for {meta['arch']!r}, not {name!r} (its sidecar says so)")
        transform = _default_transform(spec)
        if "mean" in meta and "std" in meta:
            return _with_normalisation(transform, meta["mean"], meta["std"]), f"file:{path.name}"
        warnings.warn(f"no sidecar {path.with_suffix('.json').name} with mean/std; using the ImageNet defaults")
        return transform, f"file:{path.name}"
    w = torchvision_weights(spec, weights)
    return w.transforms(), str(w)


def load_backbone(name: str = "vgg16", weights: str = "DEFAULT") -> LoadedBackbone:
    """Build backbone ``name`` with ``weights`` (a torchvision name, a file path, or 'none'), in eval mode."""
    import torch

    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # 'none' means the same random weights in every process (resumable caches)
        model = spec.build()
    if weights.lower() == "none":
        warnings.warn(f"--weights none: {name} has random weights; features are only useful for tests")
        loaded = LoadedBackbone(spec, model, _default_transform(spec), "none", covers="none")
    elif is_weights_path(weights):
        path = Path(weights)
        transform, weights_id = load_preprocessing(name, weights)  # checks the sidecar before the big load
        covers = _apply_state_dict(spec, model, _load_local(path), f"file {str(path)!r}")
        loaded = LoadedBackbone(
            spec, model, transform, weights_id, weights_sha256=file_sha256(path),
            covers=read_sidecar(path).get("covers", covers) if covers == "features" else covers,
        )
    else:
        w = torchvision_weights(spec, weights)
        covers = _apply_state_dict(spec, model, _download_state_dict(w), str(w))
        loaded = LoadedBackbone(spec, model, w.transforms(), str(w), covers=covers,
                                categories=list(w.meta.get("categories", [])))
    loaded.model.eval()
    return loaded


# -- shapes, blocks and preprocessing, for building and rebuilding whole models ----------------------
def feature_blocks(spec: BackboneSpec, features) -> list:
    """The blocks of a feature part, first to last (``spec.blocks``, or its children)."""
    return spec.blocks(features) if spec.blocks else list(features.children())


def feature_shape(name: str, crop_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the map backbone ``name`` gives for a crop_size x crop_size input (no weights, no compute)."""
    import torch

    spec = get_spec(name)
    with torch.device("meta"):
        y = spec.features(spec.build())(torch.empty(1, 3, crop_size, crop_size))
    return tuple(int(d) for d in y.shape[1:])


def bare_features(name: str, device: str = "cpu"):
    """The feature part of ``name`` with uninitialised storage ('meta': no storage at all).

    For loading a complete saved state dict, or counting parameters, without initialising (and
    then throwing away) a classifier: VGG-16's alone has 120 M parameters.
    """
    import torch

    spec = get_spec(name)
    with torch.device("meta"):
        features = spec.features(spec.build())
    return features if device == "meta" else features.to_empty(device=device)


def default_transform(name: str):
    """The preprocessing of ``name``'s default weights (needs no download)."""
    return _default_transform(get_spec(name))
