"""Which photos a train / finetune model was fitted on, by content: the record its model.pt keeps
(``trained_on``: each training photo's sha256 as a (N, 32) uint8 tensor and its size in bytes, 40 bytes a
photo, about 1 MB for 25,000), so evaluate --data can tell photos it was trained on wherever they are now
(a copy of its folder, renamed), as it does for a fit-head head from its cache's digests.

A run's digests are those ``resume.run_record`` computed for it already: no photo is read again for this.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..heads.epoch_loop import split_indices

FIELD = "trained_on"
UNKNOWN_SIZE = -1  # a photo whose size was not recorded (a fit-head cache made before sizes were kept)


def record(digests: Iterable[str], sizes: Iterable[int]) -> dict:
    """The checkpoint field: unique (sha256 hex, size) pairs as tensors; a photo without a digest ('': it could
    not be read) is left out."""
    pairs = sorted({(d, int(s)) for d, s in zip(digests, sizes) if d})
    sha = np.frombuffer(b"".join(bytes.fromhex(d) for d, _ in pairs), np.uint8).reshape(len(pairs), 32)
    return {"sha256": torch.from_numpy(sha.copy()), "sizes": torch.tensor([s for _, s in pairs], dtype=torch.int64)}


def merged(*records: Optional[dict]) -> dict:
    """One record of several (a finetune's photos and its starting model's), each photo once."""
    digests, sizes = [], []
    for r in records:
        if r is not None:
            digests += hex_digests(r)
            sizes += r["sizes"].tolist()
    return record(digests, sizes)


def hex_digests(rec: dict) -> list[str]:
    return [bytes(row).hex() for row in rec["sha256"].numpy()]


def of_run(photos: dict, n_train: int) -> dict:
    """The record of a run's training photos: the first ``n_train`` of ``resume.run_record``'s photos (its train
    photos, then its val ones), with the sha256 it computed."""
    return record(photos["sha256"][:n_train], photos["sizes"][:n_train].tolist())


def refitted(ckpt: dict) -> bool:
    """Whether a fit-head checkpoint's head was fitted again on every row once validated (auto and --tune with
    --refit, the default), as ``fit_head.fit_on_rows`` does: then no row of its cache is unseen."""
    return bool(ckpt.get("tuning")) and bool(ckpt.get("config", {}).get("refit", False))


def of_head(ckpt: dict) -> Optional[dict]:
    """The record of the photos a fit-head head was fitted on (its training rows, the validation ones too when it
    was refitted on every row), from the digests its cache keeps (a row of an older cache, which kept none:
    hashed from its file, as ``train.head_images`` does); None where its cache cannot be read."""
    from ..cache.feature_cache import CacheBusy, CacheError, FeatureCache

    try:
        with FeatureCache(ckpt["cache"]) as cache:
            train_rows, val_rows = split_indices(cache.labels, ckpt["config"]["val_fraction"], ckpt["config"]["seed"])
            rows = np.concatenate([train_rows, val_rows]) if refitted(ckpt) else train_rows
            paths = cache.paths
            sizes = dict(zip((p.decode() for p in cache.f["source/paths"][:]), cache.f["source/sizes"][:].tolist())
                         ) if "source" in cache.f else {}
            return record(cache.row_digests(rows), [sizes.get(paths[i], UNKNOWN_SIZE) for i in rows])
    except (CacheBusy, CacheError, KeyError, OSError):
        return None


def of_checkpoint(ckpt: dict) -> Optional[dict]:
    """The photos a checkpoint was fitted on: a head's (from its cache), or a model's own record; None where
    nobody can tell (the head's cache gone, a model.pt written before the record was kept)."""
    return of_head(ckpt) if ckpt["kind"] == "fit-head" else ckpt.get(FIELD)


def images_in(listing, rec: dict) -> set:
    """The images of ``listing`` whose content is one of ``rec``'s photos. Only files of a size some recorded
    photo has are read (all of them where a size was not recorded), a thread per core as extract's digests."""
    from ..cache.freshness import file_digests

    sizes = set(rec["sizes"].tolist())
    if not sizes:
        return set()
    candidates = [f.path for f in listing.files if UNKNOWN_SIZE in sizes or f.size in sizes]
    seen = set(hex_digests(rec))
    return {p for p, h in zip(candidates, file_digests(Path(listing.root), candidates)) if h in seen}
