"""Where features come from, in one record: backbone, weights identity, preprocessing, classes, data.

A cache writes its ``Provenance`` as HDF5 attributes; a checkpoint carries the same fields; and
whether two of them fit together (a head and the cache it is evaluated on, a head and the backbone
it is put on) is decided in one place, ``Provenance.differences``: every reader of a second cache or
of a checkpoint (fit-head's test cache, evaluate, compare, predict) asks it, so they refuse the same
things. Preprocessing has one representation, ``Preprocessing``, compared as values, never as strings.
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata

from ..errors import UsageError


@dataclass(frozen=True)
class Preprocessing:
    """What the weights' ``transforms()`` does: resize, center crop, interpolation, normalisation."""

    resize_size: int  # shorter side after resizing
    crop_size: int  # side of the center crop
    interpolation: str  # torchvision InterpolationMode value, e.g. 'bilinear'
    antialias: bool  # antialiased resize
    mean: tuple  # per-channel mean subtracted after ToTensor
    std: tuple  # per-channel std divided by

    @classmethod
    def from_transform(cls, t) -> "Preprocessing":
        """From a torchvision ``ImageClassification`` preset (what ``weights.transforms()`` returns)."""
        return cls(int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value, bool(t.antialias),
                   tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std))

    def to_transform(self):
        """The torchvision preset again (so a saved model needs no weights file to preprocess)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms._presets import ImageClassification

        return ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size, mean=self.mean,
                                   std=self.std, interpolation=InterpolationMode(self.interpolation),
                                   antialias=self.antialias)

    def describe(self) -> str:
        return (f"Resize([{self.resize_size}], {self.interpolation}, antialias={self.antialias}) "
                f"CenterCrop([{self.crop_size}]) ToTensor() Normalize(mean={list(self.mean)}, std={list(self.std)})")

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["resize_size"]), int(d["crop_size"]), str(d["interpolation"]), bool(d["antialias"]),
                   tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))

    @classmethod
    def parse(cls, text: str) -> "Preprocessing":
        """From ``describe()``'s text: the only record caches made before this field existed have."""
        m = re.fullmatch(r"Resize\(\[(\d+)\], (\w+), antialias=(\w+)\) CenterCrop\(\[(\d+)\]\) ToTensor\(\) "
                         r"Normalize\(mean=\[(.*)\], std=\[(.*)\]\)", text.strip())
        if not m:
            raise ValueError(f"cannot read the preprocessing {text!r}")
        nums = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
        return cls(int(m[1]), int(m[4]), m[2], m[3] == "True", nums(m[5]), nums(m[6]))


#: What identifies an int8 network's calibration (its sample, method and versions; not the seconds it took).
CALIBRATION_KEYS = ("version", "method", "calib_batch", "calib_n", "calib_seed", "calib_data", "torch", "torchao")
#: What must agree for rows from two sources to mean the same thing (a head on a cache, a test cache).
SAME_FEATURES = ("backbone", "weights", "preprocessing", "pool", "classes", "precision", "dtype", "decode_version",
                 "calibration", "flip", "trunk_version")
#: What a row's numbers depend on (rows reused by content: row_donors): the same but the classes (labels only).
ROW_FEATURES = tuple(f for f in SAME_FEATURES if f != "classes")
#: Library backbones whose trunk (the map cached) changed after caches of it could be made: canonical name ->
#: (its trunk_version now, what changed). A cache, head or model made before records none ('') and is refused or
#: extracted again (``backbones.older_trunk``); every other backbone's trunk_version is '', its caches untouched.
TRUNK_CHANGES = {name: ("2", "DenseNet's map is taken after the ReLU its forward applies to `features` (the map its "
                             "classifier pools), no longer before it")
                 for name in ("densenet121", "densenet161", "densenet169", "densenet201")}
#: The fields a checkpoint may leave unrecorded ('' on either side is not a difference).
_OPTIONAL = ("precision", "dtype", "decode_version", "calibration")


def calibration_identity(record: str) -> str:
    """The part of a cache's ``calibration`` attribute that decides the quantised network, as JSON ('' if none)."""
    if not record:
        return ""
    d = json.loads(record)
    return json.dumps({k: d.get(k) for k in CALIBRATION_KEYS}, sort_keys=True)


def package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (``package_version`` says 'unknown', not '',
    for a missing package: a test of it read an optional package that is not there as installed)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def versions() -> dict:
    """The library versions that can change features or their storage."""
    return {"python": platform.python_version(),
            **{p: package_version(p)
               for p in ("torch", "torchvision", "timm", "h5py", "numpy", "pillow", "transfer-pipeline")}}


@dataclass(frozen=True)
class Provenance:
    """Everything that identifies where a feature map comes from, and what its rows mean."""

    backbone: str  # the canonical --backbone name (backbones.canonical_name): 'vgg16', 'tf_efficientnet_lite0'
    weights: str  # 'VGG16_Weights.IMAGENET1K_V1', 'timm:<arch>.<tag>', 'file:<name>' or 'none'
    weights_sha256: str  # sha256 of a local weights file ('' for torchvision weights)
    weights_covers: str  # which part the weights cover: 'all', 'features' or 'none'
    weights_path: str  # absolute path of a local weights file when it was used ('' otherwise)
    preprocessing: Preprocessing  # resize, crop and normalisation the features were made with
    classes: tuple  # class names, in label order
    pool: str = "none"  # 'none' (C x H x W maps) or 'avg' (globally averaged C x 1 x 1)
    data_root: str = ""  # absolute path of the data folder ('' for a model not tied to a cache)
    data_fingerprint: str = ""  # the data folder's listing fingerprint at extraction
    versions: dict = field(default_factory=dict)  # library versions at extraction
    # how the rows were computed and stored ('' = not recorded, as in checkpoints made before these fields)
    precision: str = ""  # compute precision: fp32, bf16, fp16 or int8
    dtype: str = ""  # storage dtype of the rows: float16 or float32
    decode_version: str = ""  # how photos were decoded (image_reader.DECODE_VERSION)
    calibration: str = ""  # int8: what makes the quantised network (CALIBRATION_KEYS as JSON); '' otherwise
    flip: bool = False  # each map is the mean of the photo's and its mirror image's (extract --flip)
    # which map of the backbone: '' = its trunk as first cut; else TRUNK_CHANGES' version (DenseNet: '2')
    trunk_version: str = ""

    @classmethod
    def of_backbone(cls, loaded, classes, pool: str = "none", weights_arg: str = "", **data) -> "Provenance":
        """From a ``backbones.LoadedBackbone`` (``weights_arg``: the --weights value, to record a file's path)."""
        from pathlib import Path

        local = loaded.weights_id.startswith("file:")
        return cls(loaded.spec.name, loaded.weights_id, loaded.weights_sha256, loaded.covers,
                   str(Path(weights_arg).resolve()) if local and weights_arg else "",
                   Preprocessing.from_transform(loaded.transform), tuple(classes), pool,
                   **{"trunk_version": getattr(loaded, "trunk_version", ""), **data})

    # -- caches ------------------------------------------------------------------------------
    def cache_attrs(self) -> dict:
        """HDF5 attributes: the fields, plus mean/std/transform kept for people reading the file with h5py."""
        import numpy as np

        p = self.preprocessing
        return {"backbone": self.backbone, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "weights_covers": self.weights_covers, "weights_path": self.weights_path,
                "preprocessing": json.dumps(p.to_dict()), "mean": np.array(p.mean), "std": np.array(p.std),
                "transform": p.describe(), "classes": json.dumps(list(self.classes)), "pool": self.pool,
                "data_root": self.data_root, "data_fingerprint": self.data_fingerprint,
                "versions": json.dumps(self.versions),
                **({"trunk_version": self.trunk_version} if self.trunk_version else {})}  # others' attrs as before

    @classmethod
    def from_cache_attrs(cls, attrs: dict) -> "Provenance":
        pre = attrs.get("preprocessing")
        preprocessing = Preprocessing.from_dict(json.loads(pre)) if pre else Preprocessing.parse(attrs["transform"])
        return cls(attrs["backbone"], attrs["weights"], attrs.get("weights_sha256", ""),
                   attrs.get("weights_covers", "all"), attrs.get("weights_path", ""), preprocessing,
                   tuple(json.loads(attrs["classes"])), attrs.get("pool", "none"), attrs.get("data_root", ""),
                   attrs.get("data_fingerprint", ""), json.loads(attrs.get("versions") or "{}"),
                   str(attrs.get("precision", "")), str(attrs.get("dtype", "")), str(attrs.get("decode_version", "")),
                   calibration_identity(attrs.get("calibration", "")), bool(attrs.get("flip", False)),
                   str(attrs.get("trunk_version", "")))

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_fields(self) -> dict:
        """Plain values (``torch.load(weights_only=True)`` reads them back) for a checkpoint dict."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "trunk_version" or self.trunk_version}
        d.update(preprocessing=self.preprocessing.to_dict(), classes=list(self.classes),
                 transform=self.preprocessing.describe())
        return d

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Provenance":
        names = {f.name for f in fields(cls)}
        d = {k: ckpt[k] for k in names if k in ckpt}
        d["preprocessing"] = Preprocessing.from_dict(ckpt["preprocessing"])
        d["classes"] = tuple(ckpt["classes"])
        return cls(**d)

    # -- comparing ---------------------------------------------------------------------------
    def differences(self, other: "Provenance", what: tuple = SAME_FEATURES) -> list[str]:
        """'field: mine vs theirs' for each of ``what`` that differs (a local file compared by its sha256).

        The default, ``SAME_FEATURES``, is the one rule for "these rows mean the same thing"; a field
        that one side did not record (an older checkpoint) is not a difference.
        """
        out = []
        for name in what:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "weights" and self.weights_sha256 and other.weights_sha256:
                mine, theirs = self.weights_sha256, other.weights_sha256
            if name in _OPTIONAL and not (mine and theirs):
                continue
            if name == "calibration" and mine != theirs:  # name the keys that differ, not two JSON texts
                a, b = json.loads(mine), json.loads(theirs)
                out += [f"int8 calibration {k}: {a.get(k)} vs {b.get(k)}" for k in CALIBRATION_KEYS
                        if a.get(k) != b.get(k)]
                continue
            if name == "decode_version" and mine != theirs:
                out.append(decode_difference(mine, theirs))
                continue
            if name == "trunk_version" and mine != theirs:
                out.append(trunk_difference(self.backbone, mine, theirs))
                continue
            if mine != theirs:
                show = (lambda p: p.describe()) if name == "preprocessing" else (lambda v: v)
                out.append(f"{name}: {show(mine)} vs {show(theirs)}")
        return out


def older_decoding(record: str, current: int) -> str:
    """The first decode_version in ``record`` (one cache's, or a fused head's joined by '+': '3+3') other than
    ``current``; '' when there is none, or nothing was recorded."""
    return next((v for v in str(record).split("+") if v and v != str(current)), "")


def decode_difference(mine: str, theirs: str) -> str:
    """The difference of two decode_versions, saying what to do: the rows of the older one were made from other
    pixels (version 3 turned photos upright by their EXIF orientation), so they are made again, never mixed."""
    older = min((mine, theirs), key=lambda v: int(v) if str(v).isdigit() else 0)
    return (f"decode_version: {mine} vs {theirs} (photos decoded by the older rule {older}: extract that data again "
            "with this version, and fit again a head made from it)")


def trunk_change(backbones: str) -> str:
    """What changed in the trunks of ``backbones`` (one canonical name, or a fused head's joined by '+')."""
    changes = [TRUNK_CHANGES[b][1] for b in str(backbones).split("+") if b in TRUNK_CHANGES]
    return "; ".join(changes) or "its trunk changed"


def trunk_difference(backbone: str, mine: str, theirs: str) -> str:
    """The difference of two trunk_versions ('' = the trunk as first cut), saying what changed and what to do."""
    return (f"trunk_version: {mine or 1} vs {theirs or 1} ({trunk_change(backbone)}: extract that data again with "
            "this version, and fit again a head made from it)")


def check_cache_fits(ckpt: dict, cache, what: tuple = SAME_FEATURES) -> None:
    """A one-line UsageError when ``cache`` holds other features than the head ``ckpt`` was fitted on (``what``:
    the fields compared; ROW_FEATURES leaves the classes to the caller)."""

    differ = Provenance.from_checkpoint(ckpt).differences(Provenance.from_cache_attrs(cache.attrs), what)
    if differ:
        raise UsageError(f"cache {cache.path} does not fit the model (model vs cache): {'; '.join(differ)}")
    if tuple(cache.feature_shape) != tuple(ckpt["in_shape"]):
        raise UsageError(f"cache {cache.path} has features {cache.feature_shape}, the model expects "
                         f"{tuple(ckpt['in_shape'])}")
