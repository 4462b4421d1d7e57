"""Checkpoints on disk: the one writer and the one reader of every kind (fit-head's head.pt, train's and
finetune's model.pt).

A checkpoint is a plain dict (tensors, strings, numbers, lists, dicts) that ``torch.load(...,
weights_only=True)`` reads back; nothing is ever unpickled, and the model is rebuilt from the backbone's
name. Each one records its ``kind`` and the ``format_version`` it was written in: a checkpoint written
before versions were recorded (fit-head's, before this module) reads as version 0, whose fields are the
same; a newer version than this tool knows is refused in one line.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..cache.provenance import Preprocessing
from ..config import POOLS
from ..errors import UsageError
from ..extraction.backbones import load_weights_only
from ..files import atomic_write
from .fused_views import record_problem

FORMAT_VERSION = 1
HEAD_KIND = "fit-head"  # a checkpoint holding a head on cached features
MODEL_KINDS = ("train", "finetune")  # checkpoints holding a whole model
KINDS = (HEAD_KIND, *MODEL_KINDS)


def write_checkpoint(path, kind: str, fields: dict) -> Path:
    """Write ``fields`` as a checkpoint of ``kind`` (safely: a temporary name, then a rename)."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; allowed: {', '.join(KINDS)}")
    ckpt = {**fields, "kind": kind, "format_version": FORMAT_VERSION}
    return atomic_write(Path(path), lambda tmp: torch.save(ckpt, tmp))


#: field -> (type(s), what it must be): a checkpoint is checked against this once, when read
_SCHEMA = {
    "state_dict": (dict, "a dict of tensors"),
    "backbone": (str, "a backbone name"),
    "weights": (str, "a weights id"),
    "weights_sha256": (str, "a sha256 hex string"),
    "weights_path": (str, "a path"),
    "classes": (list, "a list of at least 2 class names"),
    "in_shape": (list, "a list of 3 positive integers"),
    "pool": (str, f"one of {', '.join(POOLS)}"),
    "dropout": ((int, float), "a number in [0, 1)"),
    "preprocessing": (dict, "a preprocessing record"),
    "config": (dict, "a dict"),
    "head": (dict, "a probe-head config"),
    "fused": (dict, "a fused-features record (heads/fused_views.py)"),
    "trained_on": (dict, "the training photos' sha256 (an (N, 32) uint8 tensor) and sizes (N int64)"),
}
_REQUIRED = ("state_dict", "backbone", "weights", "classes", "in_shape", "preprocessing", "head")


def _field_ok(name: str, value) -> bool:
    if not isinstance(value, _SCHEMA[name][0]) or isinstance(value, bool):
        return False
    if name == "state_dict":
        return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    if name == "classes":
        return len(value) >= 2 and all(isinstance(c, str) for c in value)
    if name == "in_shape":
        return len(value) == 3 and all(isinstance(d, int) and d > 0 for d in value)
    if name == "pool":
        return value in POOLS
    if name == "dropout":
        return 0 <= value < 1
    if name == "fused":
        return record_problem(value) is None
    if name == "trained_on":  # models/trained_on.py
        sha, sizes = value.get("sha256"), value.get("sizes")
        return (isinstance(sha, torch.Tensor) and isinstance(sizes, torch.Tensor) and sha.dtype == torch.uint8
                and sha.dim() == 2 and sha.shape[1] == 32 and sizes.dtype == torch.int64 and sizes.dim() == 1
                and len(sizes) == len(sha))
    if name == "preprocessing":
        try:
            Preprocessing.from_dict(value)
        except (KeyError, TypeError, ValueError):
            return False
    return True


def is_checkpoint(path) -> bool:
    """Whether ``path`` holds a checkpoint of this tool (any kind, any version): one an output may replace. Only a
    zip archive (as torch.save writes) is opened, memory-mapped: a photo or a cache is never read whole."""
    from ..files import starts_with

    if not starts_with(Path(path), b"PK\x03\x04"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's advice on a TorchScript archive: not one of ours either way
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (torch raises what it likes on a zip of another kind)
        return False
    return isinstance(ckpt, dict) and ckpt.get("kind") in KINDS


def read_checkpoint(path) -> dict:
    """The dict in a model.pt or head.pt, read with weights_only=True (nothing is unpickled), schema-checked.

    Every field the tool uses is checked here, once, so a hand-edited or foreign checkpoint is one
    line naming the bad field, never a traceback somewhere in predict, evaluate or finetune.
    """
    path = Path(path)
    if path.is_dir():  # the API's Model.load, serve_app, ... (the CLI's --model says so itself)
        raise UsageError(f"model file {str(path)!r} is a folder: name the head.pt or model.pt in it")
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist")
    ckpt = load_weights_only(path, f"{str(path)!r} is not a loadable checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in KINDS:
        raise UsageError(f"{str(path)!r} is not a checkpoint of this tool (expected kind {', '.join(KINDS)})")
    version = ckpt.get("format_version", 0)  # 0: written before checkpoints recorded their version
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
        raise UsageError(f"{str(path)!r} has checkpoint format version {version!r}; this tool reads versions "
                         f"0 to {FORMAT_VERSION} (a newer tool wrote it)")
    missing = [k for k in _REQUIRED + (("config",) if ckpt["kind"] == HEAD_KIND else ("pool", "dropout"))
               if k not in ckpt]
    if missing:
        raise UsageError(f"{str(path)!r} is a damaged or outdated {ckpt['kind']} checkpoint: it lacks "
                         f"{', '.join(missing)}")
    for name in _SCHEMA:
        if name in ckpt and not _field_ok(name, ckpt[name]):
            raise UsageError(f"{str(path)!r}: field {name!r} must be {_SCHEMA[name][1]}, got {ckpt[name]!r:.60}")
    return ckpt
