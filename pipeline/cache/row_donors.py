"""Rows already computed, found by content: a new extraction copies them instead of running the backbone.

A relabelled photo (moved to another class folder), a renamed one, or the untouched photos of a folder
that gained a few new ones have the same bytes as before, so the same features. Every cache in the
cache folder that records its rows' sha256 and whose ``Provenance`` agrees on every ``ROW_FEATURES``
field (backbone, weights, preprocessing, pool, precision, dtype, decoding, int8 calibration, flip:
``SAME_FEATURES`` but the classes, which label rows without changing them) can give its rows (one
stopped before it was complete, its committed rows), looked up by the sha256 of a file's bytes. A
folder that gained a class, or a pool of unlabelled photos (suggest's) whose photos are then labelled,
gives its rows too. The new cache's own provenance (its data folder and fingerprint) is the new
folder's, as for a cache computed from scratch; it only records how many rows were copied, and from
which caches.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .feature_cache import CacheBusy, CacheError, being_written, list_caches, open_h5, read_digests, read_info
from .provenance import ROW_FEATURES, Provenance

log = logging.getLogger(__name__)


def same_features(a: dict, b: dict) -> bool:
    """Whether two caches' attributes say their rows were computed the same way (the one rule,
    ``Provenance.differences``, on ``ROW_FEATURES``), and their photos were decoded the same way (PIL or on a
    device). Their classes may differ: a row is a photo's features, whatever class folder it is in."""
    try:
        differ = Provenance.from_cache_attrs(a).differences(Provenance.from_cache_attrs(b), ROW_FEATURES)
    except (KeyError, TypeError, ValueError):
        return False
    return not differ and _decode_mode(a) == _decode_mode(b)


def _decode_mode(attrs: dict) -> str:
    try:
        return json.loads(attrs.get("config") or "{}").get("decode", "pil")
    except (TypeError, ValueError):
        return "?"


@dataclass
class RowDonors:
    """Rows of earlier caches by sha256: ``digests`` (for the reader: what not to decode) and ``rows``."""

    sources: list  # paths of the donor caches, newest first
    where: dict = field(default_factory=dict)  # sha256 -> (source index, row, class name)
    # sha256 -> every class its source cache filed those bytes under (a byte copy in two class folders: both)
    classes: dict = field(default_factory=dict)
    # the extraction rate the newest donor recorded (its ``extract_rate`` attribute, JSON), if any: a cache whose
    # every row is copied was made at that rate, the same network on this machine's caches
    extract_rate: Optional[str] = None
    used: set = field(default_factory=set)  # the source indices ``rows`` copied from (the cache's reuse 'from')
    _files: dict = field(default_factory=dict)  # source index -> its h5py.File, open until ``close``

    @property
    def used_sources(self) -> list[str]:
        """The donor caches rows were copied from, not every one that offered digests."""
        return [self.sources[i] for i in sorted(self.used)]

    @property
    def digests(self) -> frozenset:
        return frozenset(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def rows(self, digests: Sequence[str]) -> np.ndarray:
        """The cached feature rows of these digests, in their order (each must be in ``where``)."""
        places = [self.where[d] for d in digests]
        first = self._files[places[0][0]]["features"]
        out = np.empty((len(places), *first.shape[1:]), first.dtype)
        by_source: dict = {}
        for i, (src, row, _) in enumerate(places):
            by_source.setdefault(src, []).append((row, i))
        self.used.update(by_source)
        for src, pairs in by_source.items():
            pairs.sort()
            rows = [r for r, _ in pairs]
            unique, inverse = np.unique(rows, return_inverse=True)
            block = self._files[src]["features"][unique.tolist()]
            out[[i for _, i in pairs]] = block[inverse]
        return out

    def class_changed(self, digest: str, name: str) -> bool:
        """Whether a photo of these bytes now in class ``name`` was in none of that class in its source cache."""
        return name not in self.classes[digest]

    def close(self) -> None:
        for f in self._files.values():
            if f.id.valid:
                f.close()
        self._files.clear()

    def __enter__(self) -> "RowDonors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def digests_of_unchanged(info) -> Optional[list[str]]:
    """The rows' sha256 of a cache made before caches kept them, hashed from its files now: only when
    its data folder is exactly as it was at extraction (the same listing fingerprint: every path, size
    and mtime), so the bytes hashed are those the rows were computed from. None otherwise."""
    from ..data.folders import list_image_folder
    from ..data.image_reader import file_digest

    root = Path(info.attrs["data_root"])
    try:
        if not root.is_dir() or list_image_folder(root).fingerprint() != info.attrs["data_fingerprint"]:
            return None
        with open_h5(info.path, "r", wait_s=0) as f:
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:info.rows]]
    except Exception:  # an unreadable folder or cache is simply not a donor
        return None
    return [file_digest(root / p) for p in paths]


def find_donors(cache_dir, attrs: dict, exclude: Optional[Path] = None,
                also: Sequence[Path] = ()) -> Optional[RowDonors]:
    """The rows of every cache in ``cache_dir`` made like ``attrs`` (a new cache's attributes) that records sha256
    digests, newest cache first for a digest several hold, then the committed rows of the caches ``also`` names
    (set aside as stale: complete or not, see ``freshness``); None when there are none. Of an incomplete cache
    (an extraction stopped, then its folder changed: another request) its committed rows: they were all
    computed again. Each donor's file stays open until the result is closed (it is a context manager)."""
    good, _ = list_caches(cache_dir)  # never one being written; an incomplete one gives its committed rows
    mine = exclude.resolve() if exclude is not None else None
    candidates = [i for i in good if i.path.resolve() != mine]
    for p in also:
        try:
            candidates.append(read_info(p, wait_s=0))
        except (CacheError, CacheBusy) as e:
            log.debug("not reusing rows of %s: %s", p, e)
    donors = RowDonors([])
    for info in candidates:
        if info.rows == 0:
            continue
        if info.attrs.get("sharded") or not same_features(attrs, info.attrs):
            continue
        try:
            f = open_h5(info.path, "r", wait_s=0)
        except Exception as e:  # a busy or odd donor is simply not used
            log.debug("not reusing rows of %s: %s", info.path, e)
            continue
        try:
            # an incomplete cache is kept open from here: a run resuming it later writes a copy put in its
            # place (CacheWriter._repack), never this file; one that began since it was listed is let be
            if not info.complete and being_written(info.path):
                raise CacheBusy(f"{info.path} is being written")
            digests = read_digests(f, info.rows)
            labels = f["labels"][:info.rows]
        except Exception as e:
            log.debug("not reusing rows of %s: %s", info.path, e)
            f.close()
            continue
        if digests is None:
            digests = digests_of_unchanged(info)
        if not digests:
            f.close()
            continue
        src = len(donors.sources)
        classes = info.classes
        added = 0
        for row, (d, y) in enumerate(zip(digests, labels.tolist())):
            if d and d not in donors.where:
                donors.where[d] = (src, row, classes[y])
                donors.classes[d] = {classes[y]}
                added += 1
            elif d and donors.where[d][0] == src:  # another copy of the same bytes in this cache
                donors.classes[d].add(classes[y])
        if added:  # its rows are read from the file its digests came from, kept open: the path may be another's
            donors.sources.append(str(info.path))  # by then (set aside as stale, a new cache written in its place)
            donors.extract_rate = donors.extract_rate or info.attrs.get("extract_rate")
            donors._files[src] = f
            continue
        f.close()
    return donors if donors.where else None
