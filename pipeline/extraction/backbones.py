"""Pretrained backbones (any torchvision classification model, any timm model) as frozen feature
extractors, with their preprocessing.

A --backbone value resolves in ``get_spec`` (which library, see ``libraries``); tests and users may
``register_backbone`` their own. Weights come from the library's own pretrained route (torchvision's
weights API into ``$TORCH_HOME``, timm's hub download into the Hugging Face cache), a local state-dict
file (preprocessing from a JSON sidecar with the same stem), or ``none`` (random init, for tests).
Preprocessing always comes from the model's own record: torchvision weights' ``transforms()``, timm's
pretrained config, or the sidecar.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from ..cache.provenance import TRUNK_CHANGES, trunk_change
from ..config import Placeholder, option_text, option_value
from ..errors import PipelineError, UsageError
from ..files import first_line
from . import libraries
from .libraries import split_at_maxpool  # noqa: F401 -- tests' tiny backbones split this way

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # only for annotations: importing torch here would slow every cache hit
    from torch import nn
    from torchvision.transforms._presets import ImageClassification

# torch, torchvision and timm are imported inside functions: a cache hit must not pay for importing them.


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and which part of it extracts features."""

    name: str  # the canonical --backbone value (``canonical_name``)
    build: Callable[[], "nn.Module"]  # the full model with random weights (classifier included)
    features: Callable[["nn.Module"], "nn.Module"]  # the part before global pooling, from the full model
    # state-dict key prefixes that part needs (loaded strictly); () = the keys of ``features``' tensors
    feature_prefixes: tuple[str, ...] = ()
    torchvision_name: Optional[str] = None  # name for torchvision's weights registry; None for others
    transform: Optional[Callable[[], "ImageClassification"]] = None  # preprocessing of random/file weights
    classifier_in: Optional[Callable[["nn.Module"], int]] = None  # in_features of the original classifier
    # How the original classifier reads the map, so a new head is its equivalent: 'none' = flattened
    # (VGG: Linear(512*7*7, classes)), 'avg' = global average pooling first (ResNet, MobileNet, timm models).
    pool: str = "none"
    # The feature part's blocks, first to last, for "unfreeze the last k blocks"; None = its children.
    blocks: Optional[Callable[["nn.Module"], list]] = None
    library: str = ""  # 'torchvision', 'timm', or '' for a registered backbone
    arch: str = ""  # the library's own name of the model


#: backbones registered by name (tests' tiny ones, users' own); library models resolve in ``get_spec``
BACKBONES: dict[str, BackboneSpec] = {}
_RESOLVED: dict[str, BackboneSpec] = {}


def trunk_version(name: str) -> str:
    """The trunk_version of canonical --backbone ``name``: '' for a trunk unchanged since its first caches (a
    registered backbone's too), else ``TRUNK_CHANGES``'. Without torch (a cache hit compares it)."""
    return "" if name in BACKBONES else TRUNK_CHANGES.get(name, ("", ""))[0]


def older_trunk(name: str, made: str) -> str:
    """Why rows, a head or a model of backbone ``name`` made with trunk_version ``made`` ('' = before any) are not
    what its trunk gives now, or '' when they are."""
    now = trunk_version(name)
    if str(made or "") == now:
        return ""
    return f"trunk_version {made or 1}, now {now or 1}: {trunk_change(name)}"


def register_backbone(spec: BackboneSpec) -> None:
    """Add a backbone (tests register tiny ones; users may add their own)."""
    BACKBONES[spec.name] = spec


def canonical_name(name: str) -> str:
    """The name caches and checkpoints record for a --backbone value: a registered name or a bare library
    name as given, ``torchvision:X`` as X (torchvision owns bare names), ``timm:X`` as X unless torchvision
    has an X too. Without torch for all but ``timm:`` names, so a cache hit stays torch-free."""
    if not name or not name.strip() or name != name.strip():
        raise UsageError(f"{option_text('backbone')} must be a model name, got {name!r}")
    if name in BACKBONES:
        return name
    library, bare = libraries.split_prefix(name)
    if library == "torchvision":
        return bare
    return libraries.canonical("timm", bare) if library == "timm" else name


def split_tag(name: str) -> tuple[str, str]:
    """(the --backbone value without a timm pretrained tag, the tag or ''): ``X.tag`` and ``timm:X.tag`` ->
    ('timm:X', 'tag'), split as timm's ``split_model_name_tag`` does (at the first '.'). Only timm's names have
    tags, so a tagged name is timm's model, even where torchvision has an X too (``resnet18.a1_in1k``). Without
    torch."""
    if name in BACKBONES:
        return name, ""
    library, bare = libraries.split_prefix(name)
    if library == "torchvision" or "." not in bare:
        return name, ""
    arch, tag = bare.split(".", 1)
    # '.x' was "unknown --backbone ''", and 'resnet18.' timm's resnet18 in a cache of its own
    if not arch.strip() or not tag.strip():
        raise UsageError(f"unknown {option_value('backbone', name)}: a timm model with a pretrained tag is written "
                         f"MODEL.TAG (convnext_tiny.fb_in22k), or give the tag as {option_text('weights')}")
    return f"timm:{arch}", tag


def canonical_request(name: str, weights: str) -> tuple[str, str]:
    """(canonical --backbone name, --weights) of a request, a timm pretrained tag written in the name moved to the
    weights: ``--backbone X.tag`` is ``--backbone X --weights tag``, one cache and one provenance. Beside
    ``--weights none`` or a file the tag names no weights in use and is dropped (random weights and a file are the
    same whatever tag was written); beside another tag it names a second network: a usage error. Without torch."""
    bare, tag = split_tag(name)
    if not tag:
        return canonical_name(name), weights
    if weights.lower() == "none" or is_weights_path(weights):
        return canonical_name(bare), weights
    if weights.upper() != "DEFAULT" and timm_tag(weights) != tag:
        raise UsageError(f"{option_text('backbone', name)} names timm's pretrained weights {tag!r}, but "
                         f"{option_text('weights', weights)} names {timm_tag(weights)!r}: give one of them "
                         f"({option_text('backbone', canonical_name(bare))} {option_text('weights', tag)}, or "
                         f"{option_text('backbone', canonical_name(bare))} {option_text('weights', weights)})")
    return canonical_name(bare), tag


def get_spec(name: str) -> BackboneSpec:
    """The backbone a --backbone value names (registered, torchvision or timm; a timm pretrained tag in it names
    weights, not the model: ``canonical_request``); a usage error if none."""
    if name in BACKBONES:
        return BACKBONES[name]
    name = split_tag(name)[0]
    if name not in _RESOLVED:
        library, bare = libraries.library_of(name)
        spec = (_torchvision_spec if library == "torchvision" else _timm_spec)(libraries.canonical(library, bare), bare)
        _RESOLVED[name] = _RESOLVED[spec.name] = spec
    return _RESOLVED[name]


def _torchvision_spec(name: str, bare: str) -> BackboneSpec:
    import torch
    from torchvision.models import get_model

    def build():
        return libraries.with_final_activation(get_model(bare, weights=None))

    transform = libraries.torchvision_transform(bare)
    with warnings.catch_warnings():  # GoogLeNet's and Inception's notes on their init: this build is only traced
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = meta_model(build)
    try:
        with torch.no_grad():
            size = transform.crop_size[0]
            out = libraries.torchvision_trunk(model)(torch.empty(1, 3, size, size, device="meta"))
        if out.dim() != 4:
            raise ValueError(f"its feature part gives a {out.dim()}-d output, not a map")
    except Exception as e:  # noqa: BLE001 -- a model whose forward is not a chain of its children
        # torch's own text (an assertion in the model's code, a shape) says nothing the user can act on: -v has it
        log.debug("torchvision's %s, its children run as a chain: %s: %s", bare, type(e).__name__, first_line(e, 300))
        raise UsageError(f"torchvision's {bare} is not a chain of layers this tool can cut before its pooling: its "
                         f"forward does more between its layers than run them in turn ({_not_a_chain(bare)}), so "
                         f"there is no feature map to cache; {timm_version(bare)} (docs/backbones.md)") from None
    return BackboneSpec(name=name, build=build, features=libraries.torchvision_trunk, torchvision_name=bare,
                        pool=libraries.torchvision_pool(model), blocks=libraries.torchvision_blocks,
                        library="torchvision", arch=bare)


def _not_a_chain(bare: str) -> str:
    """What a torchvision model refused as no chain does between its layers, in a few words."""
    if bare.startswith("vit_"):
        return "a vision transformer: it turns the image into patch tokens and adds a class token"
    if bare in ("googlenet", "inception_v3"):
        return "auxiliary classifiers branch off between its layers"
    if bare.startswith("maxvit"):
        return "it runs its stages from a list"
    return "it reshapes or branches"


#: timm's names of the torchvision models refused above whose name timm does not have
TIMM_VERSIONS = {"vit_b_16": "vit_base_patch16_224", "vit_b_32": "vit_base_patch32_224",
                 "vit_l_16": "vit_large_patch16_224", "vit_l_32": "vit_large_patch32_224",
                 "vit_h_14": "vit_huge_patch14_224", "maxvit_t": "maxvit_tiny_tf_224"}


def timm_version(bare: str) -> str:
    """What to use instead of torchvision's ``bare``: timm's version of it, by name where timm has one."""
    name = TIMM_VERSIONS.get(bare) or (f"timm:{bare}" if libraries.timm_has(bare) else "")
    if name:
        return f"use timm's version of it: {option_text('backbone', name)}"
    return f"timm has no {bare}; use a timm model ({option_text('backbone', Placeholder('timm:NAME'))})"


def meta_model(build):
    """``build()`` on the meta device (no storage, no initialisation); on the CPU first for a builder that
    computes with tensors (RegNet's widths)."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        return build().to("meta")


def _timm_spec(name: str, bare: str) -> BackboneSpec:
    def build():
        import timm

        return timm.create_model(bare, pretrained=False)

    def transform():
        return transform_of(libraries.timm_preprocessing(libraries.timm_pretrained_cfg(bare)))

    libraries.timm_used_children(bare)  # refuses a model with no map to cache now, before any file is made
    return BackboneSpec(name=name, build=build, features=libraries.timm_trunk, transform=transform,
                        pool="avg", blocks=libraries.timm_blocks, library="timm", arch=bare)


def transform_of(pre: dict):
    """A torchvision ``ImageClassification`` preset from a record of resize, crop, interpolation, mean, std."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=int(pre["crop"]), resize_size=int(pre["resize"]), mean=tuple(pre["mean"]),
                               std=tuple(pre["std"]), interpolation=InterpolationMode(pre["interpolation"]))


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
    def trunk_version(self) -> str:
        return trunk_version(self.spec.name)

    @property
    def mean(self) -> list[float]:
        return [float(x) for x in self.transform.mean]

    @property
    def std(self) -> list[float]:
        return [float(x) for x in self.transform.std]


def is_weights_path(weights: str) -> bool:
    """A --weights value names a file when it has a path separator or a file-like suffix."""
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin")) or Path(weights).is_file()


def weights_identity(weights: str) -> dict:
    """What names --weights, without loading them: a library's name, or a file's hash + sidecar."""
    if weights.lower() == "none":
        return {"weights": "none"}
    if is_weights_path(weights):
        return {"weights_sha256": file_sha256(weights), "sidecar": read_sidecar(Path(weights))}
    return {"weights": weights.split(".")[-1]}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hashed once per process while the file keeps its size and mtime: one extract
    names the weights in its cache key, its one-offs' keys and its provenance (a 528 MB VGG-16 file is ~1 s)."""
    st = os.stat(path)
    return _sha256_once(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_once(path: str, inode: int, size: int, mtime_ns: int) -> str:
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


#: interpolation names a sidecar may give (torchvision's InterpolationMode values)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a weights file (``x.pt`` -> ``x.json``), or {} when there is none: mean and std,
    and optionally resize, crop, interpolation, arch, library and covers."""
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
    for key in ("resize", "crop"):
        if key in meta and not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and meta[key] > 0):
            raise UsageError(f"weights sidecar {str(side)!r}: {key!r} must be a positive whole number of pixels, "
                             f"got {meta[key]!r}")
    if "interpolation" in meta and meta["interpolation"] not in INTERPOLATIONS:
        raise UsageError(f"weights sidecar {str(side)!r}: 'interpolation' must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {meta['interpolation']!r}")
    return meta


def _default_transform(spec: BackboneSpec):
    """The preprocessing of the model's own record: a registered spec's, torchvision's default weights', timm's
    default pretrained config's."""
    from torchvision.models import get_model_weights

    if spec.transform is not None:
        return spec.transform()
    return get_model_weights(spec.torchvision_name).DEFAULT.transforms()


def _with_sidecar(t, meta: dict):
    """``t`` with what a local file's sidecar says instead (mean/std; resize, crop, interpolation if given)."""
    pre = {"crop": t.crop_size[0], "resize": t.resize_size[0], "interpolation": t.interpolation.value,
           "mean": t.mean, "std": t.std}
    pre.update({k: meta[k] for k in pre if k in meta})
    out = transform_of(pre)
    out.antialias = t.antialias
    return out


def torchvision_weights(spec: BackboneSpec, name: str):
    """Resolve a torchvision weights name ('DEFAULT', 'IMAGENET1K_V1', 'VGG16_Weights.IMAGENET1K_V1')."""
    from torchvision.models import get_model_weights

    if spec.torchvision_name is None:
        raise UsageError(f"backbone {spec.name!r} has no torchvision weights; use {option_text('weights', 'none')} "
                         "or a file")
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


def timm_tag(weights: str) -> str:
    """timm's pretrained tag a --weights value names ('' = the model's default)."""
    return "" if weights.upper() == "DEFAULT" else weights.split(".")[-1]


def other_spelling(name: str, weights: str) -> str:
    """The other --weights value that names the same library weights as ``weights`` (a library's name, not
    'none' or a file): 'DEFAULT' <-> its own name (timm's default tag of the model, torchvision's default weights'
    name), or '' where there is none. Imports torch (the library's registry says which is the default)."""
    name, weights = canonical_request(name, weights)
    spec = get_spec(name)
    if spec.library == "timm":
        default, tag = libraries.timm_pretrained_cfg(spec.arch).tag, timm_tag(weights)
        return default if not tag else "DEFAULT" if tag == default else ""
    if spec.torchvision_name:
        from torchvision.models import get_model_weights

        default, short = get_model_weights(spec.torchvision_name).DEFAULT.name, weights.split(".")[-1]
        return default if short == "DEFAULT" else "DEFAULT" if short == default else ""
    return ""


def timm_weights_id(spec: BackboneSpec, weights: str) -> tuple:
    """(timm's pretrained config of --weights, its id as provenance records it: 'timm:<arch>.<tag>')."""
    cfg = libraries.timm_pretrained_cfg(spec.arch, timm_tag(weights))
    return cfg, f"timm:{spec.arch}.{cfg.tag}"


def expected_download_path(weights) -> Path:
    """Where torchvision keeps (and looks for) the downloaded file of these weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _download_state_dict(weights) -> dict:
    """The torchvision weights, downloaded once; torch.hub announces the download ('Downloading: ...') on
    stdout, which would put a line before `--json`'s object: it goes to stderr with the progress."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        target = expected_download_path(weights)
        raise PipelineError(
            f"cannot download {weights} ({type(e).__name__}: {e}); offline? put {target.name} from "
            f"{weights.url} at {target} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}) "
            f"or pass {option_text('weights', Placeholder('PATH'))} to a local state-dict file"
        ) from None


@contextlib.contextmanager
def _quiet_hub_retries():
    """huggingface_hub logs a warning for each retry of a failed request ("'[Errno -2] Name or service not
    known' thrown while requesting HEAD URL"): offline, two such lines came before the one-line error below,
    which says the same and what to do; a download that succeeds on a retry needs them no more."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


#: how long the one connect to the hub's host may take before timm's load is run from the cache alone
HUB_PROBE_TIMEOUT = 3.0


def _hub_unreachable() -> Optional[str]:
    """``host:port`` of the Hugging Face hub when one TCP connect to it fails within HUB_PROBE_TIMEOUT, else
    None. Offline, huggingface_hub retries each file five times with growing waits (about 47 s in all) before
    timm's load fails; this probe says so in seconds. No probe when HF_HUB_OFFLINE is set (the hub then asks
    no network anyway) or a proxy is set (the host may be reachable only through it)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or urllib.request.getproxies():
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:  # a bad port in HF_ENDPOINT: the hub's own error says so
        return None
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError:
        return f"{host}:{port}"
    return None


@contextlib.contextmanager
def _hub_offline():
    """huggingface_hub in offline mode for one load: it reads ``constants.HF_HUB_OFFLINE`` (set from the
    environment at its import) before each request, so that is what is set here, and given back after."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def _timm_pretrained(spec: BackboneSpec, weights: str):
    """timm's model with its pretrained weights (timm downloads them once into the Hugging Face cache)."""
    import timm

    cfg, weights_id = timm_weights_id(spec, weights)
    unreachable = _hub_unreachable()
    if unreachable:
        log.warning("the Hugging Face hub (%s) is unreachable: looking for timm's %s only in the hub's cache "
                    "(%s)", unreachable, weights_id[5:], libraries.timm_cache_dir())
    offline = _hub_offline() if unreachable else contextlib.nullcontext()
    try:
        # a download's messages are progress, not results (--json)
        with contextlib.redirect_stdout(sys.stderr), _quiet_hub_retries(), offline:
            return timm.create_model(f"{spec.arch}.{cfg.tag}", pretrained=True), cfg, weights_id
    except (UsageError, PipelineError):
        raise
    except Exception as e:  # noqa: BLE001 -- the hub's offline, HTTP and cache errors have no common class
        raise PipelineError(
            f"cannot download timm's {weights_id[5:]} ({type(e).__name__}: {first_line(e, 160)}); offline? fetch it "
            f"once where there is a network (it is kept in {libraries.timm_cache_dir()}, HF_HOME) or pass "
            f"{option_text('weights', Placeholder('PATH'))} to a local state-dict file with its .json sidecar "
            "(docs/backbones.md)"
        ) from None


def _load_local(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    obj = load_weights_only(path, f"weights file {str(path)!r} is not a loadable state dict")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return obj


def load_weights_only(path: Path, refusal: str):
    """``torch.load(path, weights_only=True)`` (nothing is unpickled); a file it refuses is one UsageError,
    ``refusal (why)``. torch's warning that a TorchScript archive goes to ``torch.jit.load`` stays off stderr:
    with weights_only it is refused, and the reason says what the file is."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals: one line, never torch's advice to unpickle
        raise UsageError(f"{refusal} ({unloadable_reason(e, path)})") from None


#: how the files torch.save writes begin: a zip archive, or a pickle's PROTO opcode (the legacy format)
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def unloadable_reason(e: Exception, path: Optional[Path] = None) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line (torch's own message is a page
    that ends by suggesting ``weights_only=False``, which would run the file's code). ``path``: the file,
    to say so when it is not one torch.save wrote at all (an ONNX export, a JSON sidecar, a photo)."""
    text = str(e).strip()
    if "TorchScript" in text:
        return "it is a TorchScript archive, as export writes, for torch.jit.load: not a checkpoint or state dict"
    head = _first_bytes(path) if path is not None else None
    if head == b"":
        return "the file is empty"
    if head is not None and not head.startswith(_TORCH_SAVE_MAGIC):
        return _foreign_reason(head, path)
    if "weights_only" in text or "Unsupported global" in text:
        return "it holds pickled Python objects, which are never loaded"
    if head is not None and head.startswith(b"PK") and ("zip archive" in text or "Invalid argument" in text):
        # cut short, torch said "... a high likelihood that your checkpoint file is" (its line cut at 200) or
        # "[Errno 22] Invalid argument", depending on where the copy stopped
        return "it is cut short or damaged (not the whole zip archive torch.save writes): copy or save it again"
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:line.rfind(" ", 0, 197)] + " ..."


def _foreign_reason(head: bytes, path: Path) -> str:
    """Why a file that torch.save did not write cannot be loaded, by its first bytes: what it is where that shows
    (and what to give instead)."""
    not_torch = "not a file torch.save wrote"
    if head[:1] == b"\x08" and Path(path).suffix.lower() == ".onnx":  # protobuf's field 1, ir_version
        return (f"it is an ONNX export (run by onnxruntime: examples/predict_onnx.py), {not_torch}; give the "
                "checkpoint it was exported from")
    if head.lstrip()[:1] in (b"{", b"["):
        return f"it is JSON (an export's metadata?), {not_torch}"
    if head.startswith((b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")):
        return f"it is an image, {not_torch}"
    return f"it is {not_torch}: an ONNX export, JSON, an image?"


def _first_bytes(path: Path) -> Optional[bytes]:
    """The first 4 bytes of a file, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return None


def feature_keys(spec: BackboneSpec, model) -> set:
    """The full model's state-dict keys its feature part needs (by prefix, or by the tensors it holds)."""
    state = model.state_dict(keep_vars=True)
    if spec.feature_prefixes:
        return {k for k in state if k.startswith(spec.feature_prefixes)}
    held = {id(v) for v in spec.features(model).state_dict(keep_vars=True).values()}
    return {k for k, v in state.items() if id(v) in held}


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
    needed = sorted(set(missing) & feature_keys(spec, model))
    if needed:
        raise UsageError(f"weights {source} lack {len(needed)} keys {spec.name} needs, such as {needed[:3]}")
    return "all" if not missing else "features"


def _check_sidecar_model(spec: BackboneSpec, path: Path, meta: dict) -> None:
    """A sidecar that names another model (or library) than --backbone is a usage error."""
    arch, library = meta.get("arch"), meta.get("library")
    prefixed, bare = libraries.split_prefix(arch) if isinstance(arch, str) else ("", arch)
    if prefixed and (not library or library == prefixed):  # 'timm:X' names X in timm, as --backbone does
        arch, library = bare, prefixed
    if isinstance(arch, str) and spec.library == "timm":  # timm's MODEL.TAG: the file holds that tag's weights
        arch = arch.split(".", 1)[0]
    if arch and arch not in (spec.name, spec.arch):
        raise UsageError(f"weights file {str(path)!r} is for {arch!r}, not {spec.name!r} (its sidecar says so)")
    if library and spec.library and library != spec.library:
        raise UsageError(f"weights file {str(path)!r} is for {library}'s {arch or 'model'}, not {spec.library}'s "
                         f"{spec.arch} (its sidecar says so); "
                         f"pass {option_text('backbone', f'{library}:{arch or spec.arch}')}")


def load_preprocessing(name: str = "vgg16", weights: str = "DEFAULT"):
    """(transform, weights id) of backbone ``name`` with ``weights``, without loading or downloading them.

    For what needs only the preprocessing (preview): torchvision's weights enum carries its
    ``transforms()``, timm's pretrained config its data config, and a local file's sidecar the rest.
    """
    name, weights = canonical_request(name, weights)
    spec = get_spec(name)
    if weights.lower() == "none":
        return _default_transform(spec), "none"
    if is_weights_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"weights file {str(path)!r} does not exist")
        meta = read_sidecar(path)
        _check_sidecar_model(spec, path, meta)
        transform = _default_transform(spec)
        if "mean" in meta and "std" in meta:
            return _with_sidecar(transform, meta), f"file:{path.name}"
        sidecar = sidecar_path(path)
        warnings.warn(f"sidecar {sidecar.name} has no mean/std; using the model's defaults" if sidecar.is_file() else
                      f"no sidecar {sidecar.name} with mean/std; using the model's defaults")
        return transform, f"file:{path.name}"
    if spec.library == "timm":
        cfg, weights_id = timm_weights_id(spec, weights)
        return transform_of(libraries.timm_preprocessing(cfg)), weights_id
    w = torchvision_weights(spec, weights)
    return w.transforms(), str(w)


def check_loadable(name: str, weights: str) -> None:
    """What only loading tells, before work that cannot be undone or redone cheaply (choose-backbone's earlier
    extractions, demo's quarantine): a weights file with no sidecar whose tensors are another model's, and a
    library's weights not downloaded yet that cannot be (offline): refused now, in one line."""
    name, weights = canonical_request(name, weights)
    spec = get_spec(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'no sidecar', 'random weights': extract says them once, later
        if is_weights_path(weights) and "arch" not in read_sidecar(weights):
            load_backbone(name, weights)  # its keys checked against the model (a second or two)
        elif weights.lower() != "none" and not is_weights_path(weights) and spec.library == "timm":
            _timm_pretrained(spec, weights)  # from the hub's cache, or downloaded now, or refused now
        elif weights.lower() != "none" and not is_weights_path(weights):
            w = torchvision_weights(spec, weights)
            if not expected_download_path(w).is_file():
                _download_state_dict(w)  # now, or its one-line refusal now


def load_backbone(name: str = "vgg16", weights: str = "DEFAULT") -> LoadedBackbone:
    """Build backbone ``name`` with ``weights`` (a library's pretrained name, a file path, or 'none'), in eval mode."""
    import torch

    name, weights = canonical_request(name, weights)
    spec = get_spec(name)
    if spec.library == "timm" and weights.lower() != "none" and not is_weights_path(weights):
        model, cfg, weights_id = _timm_pretrained(spec, weights)
        loaded = LoadedBackbone(spec, model, transform_of(libraries.timm_preprocessing(cfg)), weights_id,
                                covers="all" if getattr(model, "num_classes", 0) else "features",
                                categories=libraries.timm_categories(model))
        loaded.model.eval()
        return loaded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # 'none' means the same random weights in every process (resumable caches)
        model = spec.build()
    if weights.lower() == "none":
        warnings.warn(f"{option_text('weights', 'none')}: {name} has random weights; features are only useful for "
                      "tests")
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


def imagenet_categories(loaded: LoadedBackbone) -> list:
    """The class names of the loaded model's classifier: its weights' own, else (a local file of a full
    model) those of the library's ImageNet classifier of that model."""
    if loaded.categories:
        return list(loaded.categories)
    if loaded.spec.library == "timm":
        return libraries.timm_categories(loaded.model)
    if loaded.spec.torchvision_name:
        from torchvision.models import get_model_weights

        return list(get_model_weights(loaded.spec.torchvision_name).DEFAULT.meta.get("categories", []))
    return []


# -- shapes, blocks and preprocessing, for building and rebuilding whole models ----------------------
def feature_blocks(spec: BackboneSpec, features) -> list:
    """The blocks of a feature part, first to last (``spec.blocks``, or its children)."""
    return spec.blocks(features) if spec.blocks else list(features.children())


def feature_shape(name: str, crop_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the map backbone ``name`` gives for a crop_size x crop_size input (no weights, no compute)."""
    import torch

    spec = get_spec(name)
    with torch.no_grad():
        y = spec.features(meta_model(spec.build))(torch.empty(1, 3, crop_size, crop_size, device="meta"))
    return tuple(int(d) for d in y.shape[1:])


def bare_features(name: str, device: str = "cpu"):
    """The feature part of ``name`` with uninitialised storage ('meta': no storage at all).

    For loading a complete saved state dict, or counting parameters, without initialising (and
    then throwing away) a classifier: VGG-16's alone has 120 M parameters.
    """
    spec = get_spec(name)
    features = spec.features(meta_model(spec.build))
    return features if device == "meta" else features.to_empty(device=device)


def has_depthwise(net) -> bool:
    """True when ``net`` holds a depthwise convolution (one group per input channel: EfficientNet, MobileNet,
    ConvNeXt), which PyTorch runs far below its FLOPs on the CPU unless compiled, and int8 does not help."""
    from torch import nn

    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in net.modules())


def default_transform(name: str):
    """The preprocessing of ``name``'s default weights (needs no download)."""
    return _default_transform(get_spec(name))
