"""``Cache``: the Python API's light handle on one cache file (``pipeline.Cache``).

Opening one reads only its attributes (``read_info``); rows are read through ``FeatureCache``, the one
reader of a cache file, when first asked for; torch is never imported, h5py only once a Cache is opened
(``import pipeline`` stays light).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..files import path_text

if TYPE_CHECKING:
    from ..extraction.extract import ExtractResult
    from .feature_cache import FeatureCache


class Cache:
    """A feature cache: one HDF5 file of features of an image folder through a frozen backbone.

    ``Cache(path)`` opens (and validates) an existing cache; ``extract_features`` returns one. Cheap:
    nothing but the attributes is read until asked for, and torch is never imported.

    - ``len(cache)``: rows (images); ``cache.classes``: class names, in label order
    - ``cache.labels``: (N,) int64 class indices; ``cache.paths``: image paths relative to ``cache.data_root``
    - ``cache.feature_shape``: (C, H, W) of one row; ``cache.features``: the h5py dataset itself, read
      lazily (``cache.features[:10]``); ``cache.read_features(rows)``: rows as a float32 array
    - ``cache.provenance``: backbone, weights, preprocessing, classes, data (``pipeline.cache.provenance.Provenance``)
    - ``cache.summary()``: what ``python cli.py caches`` shows of it; ``cache.attrs``: every HDF5 attribute
    - ``cache.result``: extract's ``ExtractResult`` when the cache came from ``extract_features`` (hit, rows,
      img/s), else None

    A Cache can stand where a path is expected (``os.fspath(cache)``). ``close()`` (or ``with``) closes
    the file once rows were read.
    """

    def __init__(self, path, *, result: Optional[ExtractResult] = None):
        from .feature_cache import read_info

        self.path = Path(path_text(path, "Cache: path"))  # as the API says it: not Path's TypeError
        self._info = read_info(self.path)
        self.result = result
        self._reader: Optional[FeatureCache] = None

    # attributes, read without loading features
    @property
    def attrs(self) -> dict:
        return dict(self._info.attrs)

    def __len__(self) -> int:
        return self._info.rows

    @property
    def classes(self) -> list[str]:
        return self._info.classes

    @property
    def feature_shape(self) -> tuple:
        return tuple(self._info.feature_shape)

    @property
    def complete(self) -> bool:
        return self._info.complete

    @property
    def backbone(self) -> str:
        return self._info.attrs["backbone"]

    @property
    def fingerprint(self) -> str:
        return self._info.attrs["fingerprint"]

    @property
    def data_root(self) -> Path:
        return Path(self._info.attrs["data_root"])

    @property
    def provenance(self):
        """Backbone, weights, preprocessing, classes and data folder (``pipeline.cache.provenance.Provenance``)."""
        from .provenance import Provenance

        return Provenance.from_cache_attrs(self._info.attrs)

    def summary(self) -> dict:
        """Path, backbone, weights, rows, classes, feature shape, dtype, size, created, complete, fingerprint."""
        return self._info.summary()

    # rows, through the one reader of a cache file
    def _rows(self) -> "FeatureCache":
        from .feature_cache import FeatureCache

        if self._reader is None or not self._reader.f.id.valid:
            self._reader = FeatureCache(self.path, allow_incomplete=True)
        return self._reader

    @property
    def labels(self) -> np.ndarray:
        return self._rows().labels.copy()

    @property
    def paths(self) -> list[str]:
        return self._rows().paths

    @property
    def features(self):
        """The ``features`` dataset (N, C, H, W), as h5py reads it: slices come from disk when indexed."""
        return self._rows().features

    def read_features(self, rows: Optional[Sequence[int]] = None, dtype=np.float32) -> np.ndarray:
        """Rows of features as one array (all rows when ``rows`` is None; row numbers, a boolean mask or a
        slice), read block by block, in the order asked for."""
        return self._rows().read_rows(rows, dtype)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files extraction could not decode."""
        from .feature_cache import read_skipped

        return read_skipped(self.path)

    def consolidate(self):
        """Turn a sharded cache (from a torchrun extraction) into one ordinary file, in place; returns a
        ``ConsolidateResult`` (cache, rows, size_bytes, the shards no longer needed)."""
        from .feature_cache import consolidate, read_info

        self.close()
        result = consolidate(self.path)
        self._info = read_info(self.path)
        return result

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.feature_shape)) or "-"
        state = "" if self.complete else ", incomplete"
        return (f"Cache('{self.path}': {len(self)} rows, classes {self.classes}, features {shape} "
                f"{self._info.attrs['dtype']}, {self.backbone} {self._info.attrs['weights']}{state})")


class Caches(list):
    """The valid caches of a folder (Cache objects, newest first); ``unreadable``: [{path, why}] of the rest."""

    def __init__(self, caches=(), unreadable=()):
        super().__init__(caches)
        self.unreadable = list(unreadable)
