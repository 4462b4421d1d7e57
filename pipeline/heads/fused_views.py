"""Fused views: one head on the views of several caches of the same photos, side by side.

Each cache's rows are matched to the first cache's by content (the sha256 every row keeps, with its
class), each cache's view (``avg`` by default) is l2-normalised row by row as one block, so that no
backbone dominates by the scale of its numbers (VGG-16's average-pooled rows are about 100x
EfficientNet-Lite0's), and the blocks are concatenated: one (D,) row per photo, presented as (D, 1, 1)
maps, on which any head fits as on a pooled cache (its own normalisation after). ``FusedRows`` has the
reading side of ``FeatureCache``, so fit-head, its ``--test-data`` and evaluate read fused rows as they
read one cache; ``fuse_maps`` computes the same row in torch from each backbone's map, for every command
that runs the backbones on photos (``models.fused_models``).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..cache.feature_cache import FeatureCache, fingerprint, read_int8_observers
from ..cache.provenance import Provenance
from ..config import Placeholder, option_text
from ..errors import UsageError
from .cache_views import CacheViews, FeatureArray
from .feature_views import Normalizer, apply_view_torch, check_view

#: what a checkpoint's ``fused`` record holds (its parts' provenance, view and block sizes)
FUSED_VERSION = 1


def fused_paths(cache) -> list[str]:
    """The caches a fit-head ``cache`` option names when it names several (a list or tuple of two or
    more), else [] (one cache, or None: the newest); one cache named twice is refused here, naming the option."""
    if isinstance(cache, (list, tuple)):
        paths = [str(p) for p in cache]
        if len(paths) == 1:
            return []
        first, again = _named_twice(paths)
        if again is not None:
            raise UsageError(f"{option_text('cache')} names the cache {first} twice"
                             f"{'' if again == first else f' (the second time as {again})'}: give each cache once")
        return paths
    return []


def _named_twice(paths: Sequence) -> tuple:
    """(the first spelling, the second) of the first file named twice in ``paths``, or (None, None); the same
    file is named twice as 'features/a.h5' and its absolute path too."""
    seen = {}
    for p in map(str, paths):
        key = Path(p).resolve()
        if key in seen:
            return seen[key], p
        seen[key] = p
    return None, None


def single_cache(cache) -> Optional[str]:
    """The one cache a ``cache`` option names (a one-element list counts as one), or None."""
    if isinstance(cache, (list, tuple)):
        return str(cache[0]) if len(cache) == 1 else None
    return cache


def _row_keys(cache: FeatureCache) -> list[tuple]:
    """(sha256, label, k-th copy) of each row: the same photo in the same class, whichever cache holds it."""
    digests, seen, keys = cache.row_digests(), Counter(), []
    missing = [p for d, p in zip(digests, cache.paths) if not d]
    if missing:
        one = len(missing) == 1
        raise UsageError(f"{cache.path}: {len(missing)} {'row has' if one else 'rows have'} no content digest and "
                         f"{'its photo is' if one else 'their photos are'} gone (e.g. {missing[0]}), so "
                         f"{'it' if one else 'they'} cannot be matched to another cache's; extract it again")
    for d, y in zip(digests, cache.labels.tolist()):
        seen[(d, y)] += 1
        keys.append((d, y, seen[(d, y)]))
    return keys


def _are(k: int) -> str:
    """The verb of '<k> of the first's N ... not in the second': '1 of 40 is', '2 of 40 are'."""
    return "is" if k == 1 else "are"


def match_rows(reference: FeatureCache, other: FeatureCache) -> np.ndarray:
    """``order`` such that row ``order[i]`` of ``other`` is the photo of ``reference``'s row i; a UsageError
    naming what differs when the two caches do not hold the same photos in the same classes."""
    if list(other.classes) != list(reference.classes):
        raise UsageError(f"{reference.path} and {other.path} have other classes ({', '.join(reference.classes)} vs "
                         f"{', '.join(other.classes)}): fused caches must be of the same photos")
    ref_keys, keys = _row_keys(reference), _row_keys(other)
    where = {k: i for i, k in enumerate(keys)}
    lacking = [i for i, k in enumerate(ref_keys) if k not in where]
    held = set(ref_keys)
    extra = [i for i, k in enumerate(keys) if k not in held]
    if lacking or extra:
        ways = [f"{len(rows)} of the {whose} {len(ks)} {_are(len(rows))} not in the {other_one} (e.g. "
                f"{cache.paths[rows[0]]})" for rows, whose, ks, other_one, cache in (
                    (lacking, "first's", ref_keys, "second", reference), (extra, "second's", keys, "first", other))
                if rows]  # only the way(s) that differ: '0 of the second's 30 are not in the first' said nothing
        raise UsageError(f"{reference.path} and {other.path} do not hold the same photos: {', '.join(ways)} (a photo "
                         "counts by its content and class); extract both "
                         f"from the same folder with the same {option_text('n')} and {option_text('seed')}")
    return np.array([where[k] for k in ref_keys], np.int64)


def l2_rows(rows: np.ndarray) -> np.ndarray:
    """Each row to unit length (a zero row stays zero): one block of a fused row."""
    return Normalizer("l2").transform(np.asarray(rows, np.float32))


def fuse_maps(maps: Sequence, view: str):
    """The torch form of the fused row: each backbone's (B, C, H, W) map -> its ``view`` -> l2 -> side by
    side, as (B, D, 1, 1) float32 maps (what ``FusedRows`` holds for the same photos)."""
    import torch

    blocks = []
    for m in maps:
        z = apply_view_torch(m.float(), view)
        n = z.norm(dim=1, keepdim=True)
        blocks.append(z / torch.where(n == 0, torch.ones_like(n), n))
    return torch.cat(blocks, 1)[:, :, None, None]


def _provenance(parts: list[FeatureCache]) -> Provenance:
    """One record for the fused rows, for the readers that compare one (a head and the rows it is scored
    on): the parts' backbones and weights joined with '+'; the first part's preprocessing, classes and
    data (each part's own record is in the checkpoint's ``fused`` entry)."""
    records = [Provenance.from_cache_attrs(p.attrs) for p in parts]
    first = records[0]

    def joined(name: str) -> str:
        return "+".join(str(getattr(r, name)) for r in records)

    precisions = [r.precision for r in records]
    return Provenance(joined("backbone"), joined("weights"),
                      joined("weights_sha256") if any(r.weights_sha256 for r in records) else "",
                      joined("weights_covers"), "", first.preprocessing, first.classes, "avg", first.data_root,
                      first.data_fingerprint, first.versions,
                      # int8 anywhere: the whole network runs on the CPU, and export refuses it (as for one cache)
                      "int8" if "int8" in precisions else joined("precision"), joined("dtype"),
                      joined("decode_version"), "", any(r.flip for r in records),
                      joined("trunk_version") if any(r.trunk_version for r in records) else "")


def _check_networks_differ(parts: list[FeatureCache]) -> None:
    """Two caches of one network with the same weights (another dtype, precision, --flip or --pool) hold the same
    features: fused, that network ran twice on every photo for a block it already had. Refused, naming both;
    random weights ('none', tests) are each cache's own."""
    seen = {}
    for part in parts:
        r = Provenance.from_cache_attrs(part.attrs)
        if r.weights == "none":
            continue
        key = (r.backbone, r.weights_sha256 or r.weights)
        if key in seen:
            raise UsageError(f"{seen[key].path} and {part.path} are both {r.backbone} with the same weights "
                             f"({r.weights}): fused, it would run twice on each photo for features it already "
                             "gives once; fuse caches of other backbones or other weights")
        seen[key] = part


class FusedRows(FeatureArray):
    """Several caches of the same photos as one cache of fused rows: (N, D, 1, 1), in the first cache's row
    order, with the reading side of ``FeatureCache`` (n, labels, classes, paths, row_digests, attrs, info,
    iter_blocks, iter_batches) and its parts (``parts``, open ``FeatureCache``s) for what needs each one."""

    def __init__(self, paths: Sequence, view: str = "avg", block_rows: int = 2048):
        paths = [Path(p) for p in paths]
        if len(paths) < 2:
            raise UsageError("fused features need at least two caches")
        first, again = _named_twice(paths)
        if again is not None:  # fit-head's --cache is refused by fused_paths, naming the option
            raise UsageError(f"the cache {first} is named twice among the caches to fuse")
        self.view, self.parts = view, []
        try:
            for p in paths:
                self.parts.append(FeatureCache(p))
            _check_networks_differ(self.parts)
            ref = self.parts[0]
            blocks = [self._block(part, view, block_rows, match_rows(ref, part) if part is not ref else None)
                      for part in self.parts]
        except BaseException:
            self.close()
            raise
        self.block_sizes = [b.shape[1] for b in blocks]
        super().__init__(np.concatenate(blocks, 1), ref.labels, ref.classes)
        self.path = " + ".join(str(p.path) for p in self.parts)  # for messages
        self.paths, self.info = ref.paths, ref.info  # the photos and their folder: the first cache's
        self._digests = ref.row_digests()
        self.provenance = _provenance(self.parts)
        self.attrs = {**self.provenance.cache_attrs(), "precision": self.provenance.precision,
                      "dtype": self.provenance.dtype, "decode_version": self.provenance.decode_version,
                      "flip": self.provenance.flip, "created": max(p.attrs["created"] for p in self.parts),
                      "fingerprint": fingerprint({"fused": FUSED_VERSION, "view": view,
                                                  "parts": [p.attrs["fingerprint"] for p in self.parts]})}

    @staticmethod
    def _block(part: FeatureCache, view: str, block_rows: int, order: Optional[np.ndarray]) -> np.ndarray:
        try:
            check_view(view, part.feature_shape)
        except ValueError as e:
            raise UsageError(f"{option_text('features', view)}: {part.path}: {e}") from None
        rows = l2_rows(CacheViews(part, np.arange(part.n), block_rows)[view])
        return rows if order is None else rows[order]

    def row_digests(self, rows=None) -> list[str]:
        return self._digests if rows is None else [self._digests[i] for i in rows]

    def like(self, paths: Sequence) -> "FusedRows":
        """The same fusion (view, order of backbones) of other caches: those of the test photos."""
        return FusedRows(paths, self.view)

    def head_config(self, cfg):
        """fit-head's options for the head on the fused rows: their own (D, 1, 1) 'avg' view (the view asked
        for was applied to each cache's block)."""
        from dataclasses import replace

        return replace(cfg, features="avg")

    def checkpoint_fields(self) -> dict:
        """What a checkpoint keeps of the fusion: each part's provenance, map shape, block size and cache
        (and int8 calibration), so predict can run each backbone as extract did."""
        parts = []
        for part, size in zip(self.parts, self.block_sizes):
            observers = read_int8_observers(part.path)
            parts.append({**Provenance.from_cache_attrs(part.attrs).checkpoint_fields(),
                          "in_shape": [int(d) for d in part.feature_shape], "block": int(size),
                          "cache": os.path.abspath(part.path), "cache_fingerprint": part.attrs["fingerprint"],
                          **({"int8_observers": _tensors(observers)} if observers else {})})
        return {"fused": {"version": FUSED_VERSION, "view": self.view, "parts": parts},
                "caches": [os.path.abspath(p.path) for p in self.parts]}  # found from any folder

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tensors(observers: dict) -> dict:
    import torch

    return {k: torch.from_numpy(np.asarray(v)) for k, v in observers.items()}


def open_head_rows(ckpt: dict, cache: Optional[str] = None):
    """The rows a fit-head checkpoint is scored on: ``cache`` (default: the one it was fitted on), or for a
    fused head the caches it was fitted on, fused as then."""
    if not ckpt.get("fused"):
        if not cache:
            _recorded_cache_exists(ckpt["cache"], "pass --cache with its new place, or score photos with --data DIR")
        return FeatureCache(cache or ckpt["cache"])
    if cache:
        raise UsageError(f"this head was fitted on {len(ckpt['caches'])} caches' fused features "
                         f"({ckpt['backbone']}); score it on them (no {option_text('cache')}) or on photos "
                         f"({option_text('data', Placeholder('DIR'))})")
    for path in ckpt["caches"]:
        _recorded_cache_exists(path, "put it back, or score photos with --data DIR")
    return FusedRows(ckpt["caches"], ckpt["fused"]["view"])


def _recorded_cache_exists(path: str, what_to_do: str) -> None:
    """A cache the head recorded, moved or deleted since: said as the head's, with what to do (it was 'cache X
    does not exist', as if the user had named it)."""
    if not os.path.lexists(path):
        raise UsageError(f"the cache this head was fitted on, {path}, is no longer there (moved or deleted?); "
                         f"{what_to_do}")


def record_problem(record) -> Optional[str]:
    """Why a checkpoint's ``fused`` entry cannot be used (a hand edit, a newer format), or None."""
    if not isinstance(record, dict) or record.get("version") != FUSED_VERSION:
        return f"a fused-features record of version {FUSED_VERSION}"
    parts = record.get("parts")
    need = ("backbone", "weights", "preprocessing", "in_shape", "block", "pool")
    if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, dict) and all(k in p for k in need)
                                                                  for p in parts):
        return f"a fused-features record of at least 2 parts, each with {', '.join(need)}"
    if not isinstance(record.get("view"), str):
        return "a fused-features record with its view"
    return None

