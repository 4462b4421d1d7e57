"""Whole models: a backbone's feature part + a new head; freezing; checkpoints on disk.

The head replaces the original classifier with its equivalent for the new classes:
- VGG (``spec.pool == 'none'``): exactly ``build_head`` (below) on the C x H x W map, i.e.
  Flatten + Linear(512*7*7 = 25088, classes) + LogSoftmax, so a fit-head checkpoint from a
  normal cache loads straight into ``model.head``;
- ResNet, MobileNet, EfficientNet, every timm model (``spec.pool == 'avg'``): global average pooling, then
  ``build_head`` on (C, 1, 1), i.e. Linear(C, classes) + LogSoftmax, which is also what fit-head
  trains on a ``--pool avg`` cache.

A checkpoint is a plain dict that ``heads/checkpoints.py`` writes and reads (``torch.load(...,
weights_only=True)``); the model is rebuilt from the backbone's name, never unpickled.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..cache.provenance import Preprocessing, Provenance, older_decoding
from ..config import POOLS, Placeholder, option_text, option_value
from ..errors import PipelineError, UsageError
from ..files import first_line
from ..extraction import backbones as bb
from ..extraction.inference import mirror_mean
from ..heads.checkpoints import read_checkpoint, write_checkpoint
from ..heads.heatmaps import grad_cam
from ..heads.probe_heads import ProbeHead
from ..heads.unknown_score import pooled_rows

log = logging.getLogger(__name__)

ALL = -1  # unfreeze value: every block of the backbone


def build_head(in_shape, n_classes: int, dropout: float = 0.0):
    """A new head on the flattened map: the tutorial's Flatten + (Dropout) + Linear(C*H*W, classes) + LogSoftmax,
    as a ``probe_heads.ProbeHead`` (view 'flat', no normalisation), the one head class every stage saves."""

    return ProbeHead(in_shape, n_classes, "flat", "none", dropout=dropout)


class TransferModel(nn.Module):
    """features -> (global average pool) -> head (Flatten, Linear, LogSoftmax): log-probabilities.

    ``flip``: the features are the mean of the photo's and its mirror image's (as a cache made with
    extract --flip holds them), so a head fitted on such a cache sees the same rows here."""

    def __init__(self, backbone: str, features: nn.Module, in_shape, n_classes: int, pool: str = "none",
                 dropout: float = 0.0, head: Optional[nn.Module] = None, flip: bool = False):
        super().__init__()
        if pool not in POOLS:
            raise UsageError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
        self.backbone, self.flip = backbone, bool(flip)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.Identity()
        self.head = head if head is not None else build_head(in_shape, n_classes, dropout)  # a ProbeHead

    def feature_map(self, x):
        """The backbone's last feature map of images ``x``, before any pool: where a heatmap points."""
        return mirror_mean(self.features, x) if self.flip else self.features(x)

    def head_input(self, x):
        """What the head sees: the backbone's (pooled) features of images ``x``."""
        return self.pool(self.feature_map(x))

    def on_features(self, fn, f):
        """``fn(f)`` in full precision even under bf16/fp16 autocast: the head then computes exactly what it
        computes on cached features (fit-head, evaluate --cache), and a float64 sklearn head stays float64."""
        if f.device.type not in ("cpu", "cuda"):  # the meta device (summary) has no autocast
            return fn(f.float())
        with torch.autocast(f.device.type, enabled=False):
            return fn(f.float())

    def forward(self, x):
        return self.on_features(self.head, self.head_input(x))

    def blocks(self) -> list:
        """The backbone's blocks, first to last (VGG conv stages, ResNet stem + layer1..4, features[i])."""
        return bb.feature_blocks(bb.get_spec(self.backbone), self.features)

    def set_trainable(self, unfreeze: int) -> None:
        """Head trainable; backbone frozen (0), its last ``unfreeze`` blocks trainable, or all of it (ALL)."""
        blocks = self.blocks()
        if unfreeze != ALL and not 0 <= unfreeze <= len(blocks):
            raise UsageError(f"cannot unfreeze the last {unfreeze} blocks: {self.backbone} has {len(blocks)} "
                             f"(allowed: none, all, or 1..{len(blocks)})")
        self.features.requires_grad_(unfreeze == ALL)  # all: every parameter, a ViT's position embedding too
        for block in [] if unfreeze == ALL else blocks[len(blocks) - unfreeze:]:
            block.requires_grad_(True)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        """As nn.Module.train, but BatchNorm layers with frozen parameters stay in eval mode.

        A frozen BatchNorm must keep the running statistics it was trained with; updating them
        from small batches of a new dataset would change the "frozen" features.
        """
        super().train(mode)
        if mode:
            for m in self.features.modules():
                if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self


class WithExtras(nn.Module):
    """A TransferModel whose output is its log-probabilities followed by more columns, from the same
    forward pass: the unknown score (``extra='unknown'``, one column, only when the head has one) or the
    pooled, l2-normalised features the unknown score compares (``extra='pooled'``, C columns); with
    ``maps``, last, the predicted class's Grad-CAM map (H x W columns: ``split_maps``), the backbone run
    without a gradient and only the head with one (``heads.heatmaps``)."""

    def __init__(self, model: TransferModel, extra: str = "unknown", maps: bool = False):
        super().__init__()
        self.model, self.extra, self.maps = model, extra, maps

    def forward(self, x):
        def run(f):
            if self.extra == "pooled":
                logp = self.model.head(f)
                return torch.cat([logp, pooled_rows(f).to(logp.dtype)], 1)
            logp, ood = self.model.head.scores(f)
            return logp if ood is None else torch.cat([logp, ood[:, None].to(logp.dtype)], 1)

        if not self.maps:
            return self.model.on_features(run, self.model.head_input(x))

        def run_with_maps(f):
            out = run(self.model.pool(f))
            return torch.cat([out, grad_cam(self.model.head, f, pool=self.model.pool)[1].flatten(1).to(out.dtype)], 1)

        return self.model.on_features(run_with_maps, self.model.feature_map(x))


FUSED_NO_MAP = ("heatmaps need one backbone's feature map; this head is on several backbones' fused features: "
                "explain a head fitted on one of them")


def has_map(lm: "LoadedModel") -> bool:
    """Whether ``lm``'s heatmaps have places to point at: one backbone (not fused features) whose map is more
    than 1 x 1 (not PiT's class token)."""
    return isinstance(lm.model, TransferModel) and bb.feature_shape(lm.model.backbone,
                                                                    lm.transform.crop_size[0])[1:] != (1, 1)


def map_grid(lm: "LoadedModel") -> tuple[int, int]:
    """(H, W) of the heatmaps of ``lm`` (its backbone's last feature map); a head on fused features has no
    one map to point into (a UsageError)."""
    if not isinstance(lm.model, TransferModel):
        raise UsageError(FUSED_NO_MAP)
    c, h, w = bb.feature_shape(lm.model.backbone, lm.transform.crop_size[0])
    if h * w == 1:  # PiT's class token: no place to point at, whatever the head (told before any photo runs)
        raise UsageError(f"heatmaps need a spatial feature map; {lm.model.backbone}'s is {c} x 1 x 1 (its features "
                         "are one token or vector, not a grid of places); predict without "
                         f"{option_text('explain', Placeholder('DIR'))}, or fit a head on a backbone with a map")
    return int(h), int(w)


def split_maps(out, grid: tuple[int, int]):
    """(the other columns, (N, H, W) maps) of a ``WithExtras(maps=True)`` output."""
    k = grid[0] * grid[1]
    return out[..., :-k], out[..., -k:].reshape(*out.shape[:-1], *grid)


def split_extras(out, n_classes: int):
    """(log-probabilities, the extra columns or None) of a ``WithExtras`` output (one row or a batch);
    one extra column comes back as a (N,) vector (or a number for one row)."""
    logp, extra = out[..., :n_classes], out[..., n_classes:]
    if extra.shape[-1] == 0:
        return logp, None
    return logp, extra[..., 0] if extra.shape[-1] == 1 else extra


def parse_unfreeze(value) -> int:
    """'none' -> 0 (frozen backbone), 'all' -> ALL, 'K' -> the last K blocks."""
    text = str(value).strip().lower()
    if text in ("none", "0"):
        return 0
    if text == "all":
        return ALL
    if text.isdecimal():  # not isdigit: '²' is a digit int() refuses
        return int(text)
    raise UsageError(f"unknown unfreeze value {value!r}; allowed: none, all, or a number of blocks K >= 1")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def head_in_shape(backbone: str, crop_size: int, pool: str) -> list[int]:
    c, h, w = bb.feature_shape(backbone, crop_size)
    return [c, 1, 1] if pool == "avg" else [c, h, w]


@dataclass
class LoadedModel:
    """A ready model, its evaluation preprocessing, and what a checkpoint records about it."""

    model: TransferModel
    transform: object  # torchvision ImageClassification: PIL image -> normalised tensor
    info: dict  # backbone, weights, preprocessing, classes, in_shape, pool, dropout, ... (see save_model)
    kind: str = "new"  # where it came from: 'new', or the checkpoint kind ('fit-head', 'train', 'finetune')
    precision: Optional[str] = None  # 'int8': the features are the int8 network the head's cache was made with

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])


def _info(loaded: bb.LoadedBackbone, weights: str, in_shape, classes, pool: str, dropout: float) -> dict:
    return {**Provenance.of_backbone(loaded, classes, pool, weights).checkpoint_fields(),
            "in_shape": [int(d) for d in in_shape], "dropout": float(dropout)}


def build_model(backbone: str, weights: str, classes, pool: Optional[str] = None,
                dropout: float = 0.0) -> LoadedModel:
    """A backbone with its weights + a freshly initialised head for ``classes`` (seed torch first)."""
    loaded = bb.load_backbone(backbone, weights)
    pool = pool or loaded.spec.pool
    if pool not in POOLS:
        raise UsageError(f"unknown {option_value('pool', pool)}; allowed: {', '.join(POOLS)}")
    in_shape = head_in_shape(backbone, loaded.transform.crop_size[0], pool)
    model = TransferModel(backbone, loaded.features, in_shape, len(classes), pool, dropout)
    return LoadedModel(model, loaded.transform, _info(loaded, weights, in_shape, classes, pool, dropout))


def save_model(lm: LoadedModel, path, kind: str, config: dict, metrics: dict, history: list,
               resume: Optional[dict] = None, trained_on: Optional[dict] = None) -> Path:
    """Write the checkpoint (``checkpoints.write_checkpoint``) that ``load_model`` turns back into ``lm``;
    ``resume``: what an unfinished run needs to go on (``models.resume``); ``trained_on``: the photos it was
    fitted on, by content (``models.trained_on``), for evaluate."""
    return write_checkpoint(path, kind, {**({"resume": resume} if resume is not None else {}),
        **({"trained_on": trained_on} if trained_on is not None else {}),
        **lm.info, "head": lm.model.head.config,
        "state_dict": {k: v.detach().cpu() for k, v in lm.model.state_dict().items()},
        "config": json.loads(json.dumps(config)), "metrics": json.loads(json.dumps(metrics)),
        "history": json.loads(json.dumps(history))})


def learned_state(checkpoint, ckpt: dict, result=None) -> dict:
    """What a checkpoint (and the run that wrote it: its ``result``, when known) says about its model, as the
    Python API's learned attributes (``classes_``, ``history_``, ``metrics_``, ...). The history is the
    run's, the checkpoint's, or the ``history.json`` beside a head.pt / model.pt."""
    checkpoint, run = Path(checkpoint), result
    result = result.to_dict() if hasattr(result, "to_dict") else dict(result or {})
    history, saved = result.get("history"), checkpoint.with_name("history.json")
    if history is None and "history" in ckpt:
        history = ckpt["history"]
    elif history is None and saved.is_file() and checkpoint.name in ("head.pt", "model.pt"):
        history = json.loads(saved.read_text())
    metrics = {**(ckpt.get("metrics") or {}), **{k: result[k] for k in (
        "val_acc", "val_loss", "train_acc", "train_loss", "per_class_val_acc", "train_rows", "val_rows",
        "fit_seconds") if k in result}}
    sd = ckpt["state_dict"]
    t, thr = (sd.get(k, sd.get(f"head.{k}")) for k in ("temperature", "unknown_threshold"))
    return {"temperature_": 1.0 if t is None else float(t), "unknown_threshold_": None if thr is None else float(thr),
            "checkpoint_": checkpoint, "kind_": ckpt["kind"], "classes_": list(ckpt["classes"]),
            "backbone_": ckpt["backbone"], "weights_": ckpt["weights"], "feature_shape_": tuple(ckpt["in_shape"]),
            "n_features_in_": int(np.prod(ckpt["in_shape"])), "history_": history, "metrics_": metrics,
            "config_": dict(ckpt.get("config") or {}), "cache_": ckpt.get("cache"), "run_dir_": result.get("run_dir"),
            "curves_": result.get("curves"), "result_": run}


def load_model(path, weights: Optional[str] = None, trainable: bool = False) -> LoadedModel:
    """A model.pt (train/finetune) or a head.pt (fit-head + its backbone) as a ready model, in eval mode.

    A model.pt holds every weight, so its backbone is rebuilt bare and nothing else is read. A
    head.pt holds only the head: its backbone weights are loaded as recorded (a torchvision name, or
    the local file, found by path and checked by sha256), or from ``weights`` when given. A head fitted
    on an int8 cache runs that cache's int8 network (rebuilt from the observers its checkpoint holds), so
    it sees the rows it was trained on; ``trainable`` (finetune) asks for the float backbone instead.
    """
    return model_from_checkpoint(read_checkpoint(path), path, weights, trainable)


def model_from_checkpoint(ckpt: dict, path, weights: Optional[str] = None, trainable: bool = False) -> LoadedModel:
    """``load_model`` of a checkpoint already read (``read_checkpoint``): a caller holding it does not
    read the file (half a gigabyte for a VGG-16 model.pt) a second time."""
    check_trunk(ckpt, path)
    if ckpt["kind"] == "fit-head" and ckpt.get("fused"):
        lm = _from_fused_head(ckpt, path, weights, trainable)
    elif ckpt["kind"] == "fit-head":
        lm = _from_head(ckpt, path, weights, trainable)
    else:
        if weights is not None:
            log.info("%s holds its backbone weights; %s is not used", path, option_value("weights", weights))
        head_state = {k[len("head."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
        head = head_from_checkpoint(ckpt, head_state, path)
        model = TransferModel(ckpt["backbone"], bb.bare_features(ckpt["backbone"]), ckpt["in_shape"],
                              len(ckpt["classes"]), ckpt["pool"], ckpt["dropout"], head=head)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:
            raise UsageError(f"{str(path)!r} does not match backbone {ckpt['backbone']!r}: "
                             f"{str(e).strip().splitlines()[0]}") from None
        info = {k: v for k, v in ckpt.items()  # what the model is, not what its run saw or did
                if k not in ("state_dict", "kind", "format_version", "config", "metrics", "history", "head",
                             "resume", "trained_on")}
        lm = LoadedModel(model, Preprocessing.from_dict(ckpt["preprocessing"]).to_transform(), info, ckpt["kind"])
    lm.model.set_trainable(0)
    lm.model.eval()
    return lm


def check_trunk(ckpt: dict, path) -> None:
    """A head or model made on another map of its backbone than its trunk gives now (made before that trunk changed:
    ``provenance.TRUNK_CHANGES``) is refused in one line: it would run on inputs it never saw."""
    for part in ckpt["fused"]["parts"] if ckpt.get("fused") else [ckpt]:
        older = bb.older_trunk(part["backbone"], str(part.get("trunk_version", "")))
        if older:
            again = ("extract its data again and fit it again" if ckpt["kind"] == "fit-head" else
                     "train or fine-tune it again")
            raise UsageError(f"{str(path)!r} was made on another map of {part['backbone']} than it gives now "
                             f"({older}); {again}")


def _head_weights_source(ckpt: dict, weights: Optional[str], hint: str = "") -> str:
    """The --weights value that recreates the backbone a fit-head checkpoint's features came from."""
    recorded, sha = ckpt["weights"], ckpt.get("weights_sha256", "")
    if not recorded.startswith("file:"):
        return weights or recorded  # a torchvision weights id, or 'none'
    candidates = [weights] if weights else _recorded_weights_paths(ckpt)
    for c in candidates:
        if bb.is_weights_path(c) and Path(c).is_file():
            if not sha or bb.file_sha256(c) == sha:
                return c
            if weights:
                raise UsageError(f"{option_value('weights', weights)} is not the file the head was fitted with "
                                 f"({recorded}, sha256 {sha[:12]}...)")
        elif weights:
            return weights  # not a file: load_backbone says what is wrong with it
    hint = hint or f"pass {option_text('weights', Placeholder('PATH'))} to it"
    raise PipelineError(f"the head was fitted on features of the weights file {recorded[5:]} (sha256 {sha[:12]}...), "
                        f"not found at {', '.join(map(repr, dict.fromkeys(candidates))) or 'any recorded path'}; "
                        f"{hint}")


def _recorded_weights_paths(ckpt: dict) -> list[str]:
    """Where a head's weights file was: the checkpoint's record, else its cache's (a relative path in
    the cache's config is relative to where extract ran)."""
    paths = [ckpt["weights_path"]] if ckpt.get("weights_path") else []
    record = _cache_record(ckpt.get("cache"))
    return paths + [p for p in (record.get("weights_path"), record.get("config", {}).get("weights")) if p]


def _cache_record(cache) -> dict:
    """A cache's attributes with its config parsed ({} when the file is not there or not readable)."""
    if not cache or not Path(cache).is_file():
        return {}
    from ..cache.feature_cache import read_info

    try:
        attrs = dict(read_info(cache).attrs)
        return {**attrs, "config": json.loads(attrs.get("config", "{}")),
                "calibration": json.loads(attrs.get("calibration", "{}"))}
    except (ValueError, OSError, TypeError, PipelineError) as e:  # CacheError is a ValueError, CacheBusy not
        log.debug("cannot read the record of %s: %s", cache, e)
        return {}


def cache_reads(cache, what: str = "the cache") -> tuple[list, list]:
    """(files, folders) a command reads through a cache, for its output guard (files.check_output): the
    cache, the weights file and sidecar it was made with, its photos' folder and its int8 calibration folder."""
    record = _cache_record(cache)
    config = record.get("config", {})
    files = [(cache, what), *_weights_files(record.get("weights_path"), config.get("weights"))]
    folders = [(record.get("data_root"), f"the photos of {what} {cache}"),
               (record.get("calibration", {}).get("calib_root"), f"the calibration photos of {what} {cache}")]
    return files, folders


def _weights_files(*candidates) -> list:
    """Each weights file among ``candidates`` (names and None left out) with its sidecar, once."""
    return [f for w in dict.fromkeys(candidates) for f in bb.weights_inputs(w)]


def checkpoint_reads(ckpt: dict, path, weights: Optional[str] = None) -> tuple[list, list]:
    """(files, folders) a command that runs this checkpoint reads or may read, each with what it is: the
    checkpoint, its backbone weights and their sidecars (given or recorded), and every cache, model and photo
    folder its record names (through each cache too). The list a command's output guard gets
    (files.check_output), so no output ever replaces any of them, or lands among the photos."""
    config = ckpt.get("config") or {}
    parts = (ckpt.get("fused") or {}).get("parts", [])  # a fused head: each backbone's weights and cache
    files = [(path, "the model"), *_weights_files(weights, ckpt.get("weights_path"), config.get("weights"),
                                                  *(p.get("weights") for p in parts))]
    folders = [(config.get("data"), "the model's training photos"),
               (config.get("test_data"), "the model's test photos")]
    for key, what in (("cache", "the model's cache"), ("test_cache", "the model's test cache")):
        named = [ckpt.get(key), config.get(key), *(p.get(key) for p in parts)]
        for cache in dict.fromkeys(c for v in named for c in (v if isinstance(v, (list, tuple)) else [v]) if c):
            more = cache_reads(cache, what)
            files, folders = files + more[0], folders + more[1]
    files.append((config.get("init_head"), "the head the model started from"))
    return files, folders


def head_from_checkpoint(ckpt: dict, state: dict, path):
    """The checkpoint's head (a ProbeHead) with its weights; a mismatch is a one-line UsageError."""

    try:
        return ProbeHead.from_checkpoint(ckpt["head"], state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{str(path)!r}: its head does not load ({first_line(e, 200)})") from None


def _head_backbone(ckpt: dict, path, weights: Optional[str], trainable: bool = False, **hint):
    """The backbone a fit-head checkpoint's rows came from, checked against its record: (the loaded backbone,
    the weights used, its feature network: the int8 one when its cache was int8 and not ``trainable``,
    'int8' or None)."""
    source = _head_weights_source(ckpt, weights, **hint)
    with warnings.catch_warnings():
        if source.lower() == "none":
            warnings.simplefilter("ignore")  # a head fitted on random features, made so on purpose
        loaded = bb.load_backbone(ckpt["backbone"], source)
    pool = ckpt.get("pool", "none")
    expected = head_in_shape(ckpt["backbone"], loaded.transform.crop_size[0], pool)
    if list(ckpt["in_shape"]) != expected:
        raise UsageError(f"head {str(path)!r} takes features of shape {ckpt['in_shape']}, but {ckpt['backbone']} "
                         f"with pool {pool!r} gives {expected}")
    # the head means nothing on another backbone's features: every command that runs a head comes here
    differ = Provenance.from_checkpoint(ckpt).differences(Provenance.of_backbone(loaded, ckpt["classes"], pool),
                                                          ("weights", "preprocessing"))
    if differ:
        raise UsageError(f"head {str(path)!r} was fitted on other features than {option_text('weights', source)} "
                         f"gives (head vs now: {'; '.join(differ)}); pass the weights it was fitted with")
    warn_older_decoding(ckpt, path)
    features, precision = loaded.features, None
    if ckpt.get("precision") == "int8" and not trainable:
        features, precision = _cache_int8_network(ckpt, loaded, path), "int8"
    return loaded, source, features, precision


def warn_older_decoding(ckpt: dict, path) -> None:
    """One line when a head's rows came from photos decoded by an older rule than photos are now (decode_version:
    before 3, phone photos went in sideways): it still runs on the photos decoded now, the same backbone's
    features, but it learnt from the old pixels."""
    from ..data.image_reader import DECODE_VERSION

    made = older_decoding(ckpt.get("decode_version", ""), DECODE_VERSION)  # a fused head's: '3+3'
    if made:
        log.warning("head %r was fitted on photos decoded by the older rule %s (now %d: photos turned upright by "
                    "their EXIF orientation); to fit it on the photos as now decoded, extract its data again and "
                    "fit it on that cache", str(path), made, DECODE_VERSION)


def _from_head(ckpt: dict, path, weights: Optional[str], trainable: bool = False) -> LoadedModel:
    loaded, source, features, precision = _head_backbone(ckpt, path, weights, trainable)
    pool = ckpt.get("pool", "none")
    model = TransferModel(ckpt["backbone"], features, ckpt["in_shape"], len(ckpt["classes"]), pool,
                          ckpt.get("dropout", 0.0), head=head_from_checkpoint(ckpt, ckpt["state_dict"], path),
                          flip=bool(ckpt.get("flip", False)))
    info = _info(loaded, source, ckpt["in_shape"], ckpt["classes"], pool, ckpt.get("dropout", 0.0))
    info["init_from"] = str(path)
    return LoadedModel(model, loaded.transform, info, "fit-head", precision)


def _from_fused_head(ckpt: dict, path, weights: Optional[str], trainable: bool) -> LoadedModel:
    """A head on several caches' fused features: each backbone loaded as a head on its cache would load it
    (its recorded weights, checked; its int8 network), each on its own preprocessing of the photo
    (``fused_models``)."""
    from .fused_models import FusedModel, StackedTransform

    if trainable:
        raise UsageError(f"{str(path)!r} is a head on {ckpt['backbone']}'s fused features; fine-tuning starts "
                         "from a head on one backbone's")
    given = _fused_weights(ckpt, path, weights)
    parts, transforms, records, precisions = [], [], [], []
    for i, part in enumerate(ckpt["fused"]["parts"]):
        loaded, source, features, precision = _head_backbone(part, path, given.get(i), hint=fused_weights_hint())
        parts.append(TransferModel(part["backbone"], features, part["in_shape"], len(ckpt["classes"]),
                                   part.get("pool", "none"), head=nn.Identity(), flip=bool(part.get("flip", False))))
        transforms.append(loaded.transform)
        records.append(_info(loaded, source, part["in_shape"], ckpt["classes"], part.get("pool", "none"), 0.0))
        precisions.append(precision)
    model = FusedModel(parts, [t.crop_size[0] for t in transforms], ckpt["fused"]["view"],
                       head_from_checkpoint(ckpt, ckpt["state_dict"], path))
    info = {**{k: v for k, v in ckpt.items() if k not in ("state_dict", "kind", "format_version", "config",
                                                            "metrics", "history", "head", "tuning", "trust", "fused")},
            "preprocessing": [r["preprocessing"] for r in records], "fused": records, "init_from": str(path)}
    return LoadedModel(model, StackedTransform(transforms), info, "fit-head", "int8" if "int8" in precisions else None)


def fused_weights_hint() -> str:
    """What to do when a fused head's weights files are not where it recorded them (one --weights finds the rest),
    in the caller's terms."""
    return (f"put its backbones' weights files (with their sidecars) in one folder and pass {option_text('weights')} "
            "naming one of them")


def _fused_weights(ckpt: dict, path, weights: Optional[str]) -> dict:
    """{part index: weights file} for a fused head given ``--weights``: the backbone whose recorded sha256 the
    file has, and each other backbone's recorded file name beside it (same sha256) where its recorded path is
    gone. So a head whose weights folder moved runs again with --weights naming one file of the new folder."""
    if weights is None:
        return {}
    parts = ckpt["fused"]["parts"]
    recorded = ", ".join(f"{p['backbone']}: {p['weights']}" for p in parts)
    if not bb.is_weights_path(weights) or not Path(weights).is_file():
        raise UsageError(f"{str(path)!r} runs {len(parts)} backbones ({recorded}); {option_value('weights', weights)} "
                         "must be one of their weights files (the others are looked for beside it)")
    sha = bb.file_sha256(weights)
    if not any(p.get("weights_sha256") == sha for p in parts):
        raise UsageError(f"{option_value('weights', weights)} is none of the files {str(path)!r} was fitted with "
                         f"({recorded})")
    given = {}
    for i, part in enumerate(parts):
        if part.get("weights_sha256") == sha:
            given[i] = weights
            continue
        if not part["weights"].startswith("file:") or any(Path(c).is_file() for c in _recorded_weights_paths(part)):
            continue  # a library's weights, or still where recorded
        beside = Path(weights).parent / Path(part["weights"][5:]).name
        if beside.is_file() and bb.file_sha256(beside) == part.get("weights_sha256"):
            given[i] = str(beside)
    return given


class FrozenGraph(nn.Module):
    """An exported (int8) graph inside a model: called like a module, but not one of its children, so the
    model's ``eval()``, ``requires_grad_`` and ``state_dict`` leave it alone (an exported graph has no
    train mode and its weights are prepacked constants, not parameters)."""

    def __init__(self, graph):
        super().__init__()
        self.__dict__["graph"] = graph

    def forward(self, x):
        return self.graph(x)


def _cache_int8_network(ckpt: dict, loaded, path):
    observers = ckpt.get("int8_observers")
    if not observers:
        log.warning("%s was fitted on an int8 cache but holds no calibration (fitted before heads kept it): it "
                    "runs the float network, whose features differ slightly from its cache's", path)
        return loaded.features
    from ..extraction.quantize import int8_network, require_torchao

    require_torchao(f"{path}, fitted on an int8 cache,")
    crop = loaded.transform.crop_size[0]
    log.info("int8 calibration reused (the %d observers %s keeps; no photo calibrated)", len(observers), path)
    return FrozenGraph(compiled_int8(int8_network(loaded.features, observers, (3, crop, crop), lower=False)))


#: a head's int8 network runs its first images eagerly and is compiled from then on, as extract's is: compiled it
#: runs about twice as fast, and the compile (about 5 s with the project's kernels cached, 17 s cold on VGG-16 and
#: 2 cores) is repaid after a few batches; a call on a few photos never waits for it
EAGER_FIRST_IMAGES = 64


def compiled_int8(net):
    """``net`` (``quantize_int8(lower=False)``) compiled after ``EAGER_FIRST_IMAGES``, its kernels kept in the
    project's one-offs folder (``extraction.oneoffs``); its lowered graph runs the eager calls."""
    from ..extraction.compiled import CompiledNet
    from ..extraction.oneoffs import oneoffs_dir

    return CompiledNet(net.converted, fallback=net, cache_folder=oneoffs_dir(), eager_first=EAGER_FIRST_IMAGES)


def network(lm: LoadedModel, device: str, precision: str, extra: str = "unknown", maps: bool = False):
    """``lm`` as ``Inference`` runs it, on the device and precision asked for: the one place that decides,
    so predict, evaluate and the API run the same network. Its output is ``WithExtras(lm.model, extra)``'s
    (log-probabilities, then the unknown score when the head has one: ``split_extras``; with ``maps``, the
    predicted class's heatmap last: ``split_maps``). An int8-cache
    head runs its int8 network on the CPU whatever the precision asked for (another precision would give
    other rows than the head saw)."""
    from ..devices import resolve_device, resolve_precision
    from ..extraction.inference import Inference

    if lm.precision == "int8":
        dev = resolve_device("cpu" if device == "auto" else device)
        if dev.type != "cpu":
            raise UsageError(f"this head was fitted on an int8 cache, whose network runs on the CPU only; "
                             f"use {option_text('device', 'cpu', 'auto')}, not {device!r}")
        if precision not in ("auto", "int8"):
            log.info("precision %s not used: the head runs its cache's int8 network", precision)
        prec = "int8"
    else:
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev, asked=device)
    if maps:
        map_grid(lm)  # refused now, in one line, for a head on fused features
    return Inference(WithExtras(lm.model, extra, maps), dev, prec)


def explaining(inference):
    """A ``network``'s Inference again, on its device and precision, with each photo's heatmap in its output
    (``WithExtras(maps=True)``): for the few photos a report explains after the first pass."""
    from ..extraction.inference import Inference

    net = inference.net
    return Inference(WithExtras(net.model, net.extra, maps=True), inference.device, inference.precision)
